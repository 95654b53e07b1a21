"""A tiny, offline, deterministic Qwen2.5-VL: tokenizer, processor, config, random weights, model dir.

Why it exists: no model hub is reachable from the project's machines, yet the engine, the Ray workers,
the demo and the benchmarks all load "a Qwen2.5-VL checkpoint" from a directory. This module writes
one that the stock transformers classes load exactly like a hub checkpoint (no `trust_remote_code`):

    path = save_tiny_model_dir(tmp_path)
    processor = load_processor(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")

It is also the base architecture of the small model the project will train (`TinySpec` sizes it).

Invariants:
- Everything is a pure function of its arguments: the tokenizer is a byte-level BPE trained in-process
  on a fixed built-in corpus (the shapes-and-colours VQA world), the weights come from a seeded RNG that
  is forked, so the caller's global torch RNG state is untouched.
- The tokenizer is byte-level, so `decode(encode(s)) == s` for any ASCII text; the Qwen2.5-VL special
  tokens are atomic added tokens at the end of the vocab (ids in `SPECIAL_TOKENS` order).
- The text pipeline is the one `Qwen2Tokenizer` builds (NFC, Qwen pre-tokenizer regex, byte-level), so
  reloading through `AutoTokenizer` (which rebuilds a `Qwen2Tokenizer` from vocab and merges) gives
  the same ids.
- The processor expands each `<|image_pad|>` into grid_t * grid_h * grid_w / merge_size**2 tokens.

transformers 5.x quirks handled here:
- `Qwen2_5_VLProcessor(..., video_processor=None)` fails (VIDEO_PROCESSOR_MAPPING has no
  `_extra_content`): `ImageOnlyQwen2_5_VLProcessor` has no video slot in `__init__`, and
  `ProcessorMixin` derives a processor's sub-processors from that signature.
- `AutoProcessor` silently returns just the tokenizer when it cannot resolve the saved
  `processor_class`; `register_processor()` maps it, and `load_processor` asserts the result.
- `AutoProcessor.register(Qwen2_5_VLConfig, ...)` without `exist_ok=True` raises ("already used by a
  Transformers model"), and the mapping skips native config classes unless `exist_ok=True`.
- Only the PIL image processor (`Qwen2VLImageProcessorPil`) is built: torchvision breaks CPU installs.
  It is saved under its base name `Qwen2VLImageProcessor`; on load AutoImageProcessor picks the backend.
- `save_pretrained` has no `safe_serialization` any more: safetensors is the only format.
- The tokenizer class is `Qwen2Tokenizer` (a `TokenizersBackend`, which 5.x also exports as
  `PreTrainedTokenizerFast`); `additional_special_tokens` is now `extra_special_tokens`.
- `rope_parameters.mrope_section` must sum to head_dim / 2 (checked in `TinySpec`).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)
from transformers.processing_utils import ProcessorMixin

# The Qwen2.5-VL special tokens, in the hub checkpoint's order (there they start at id 151643; here
# they follow the BPE vocab).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

VOCAB_SIZE = 1000  # BPE vocab (bytes + merges) plus SPECIAL_TOKENS; upper bound, the corpus may give fewer
MODEL_MAX_LENGTH = 2048
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 448 * 448

# The pre-tokenizer regex of Qwen2Tokenizer (digits split one by one, words keep their leading space).
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen-style ChatML. Content is a string or a list of parts ({"type": "image"}, {"type": "text", ...}).
# Every output goes through {{ }} so that the template's own layout adds no whitespace.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- endif -%}"
)

COLORS = (
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink", "brown", "cyan",
)  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ellipse")
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
_EXTRA_WORDS = (
    "The image shows a small large big tiny on in at of and with next to the left right top bottom "
    "center middle corner above below near background foreground picture photo object objects shape "
    "shapes color colors colour count number answer question Answer Question Yes No yes no none only "
    "it its this that there here is are was were has have a an I you You assistant user system "
    "helpful Please please describe Describe What Which How Where Is Are many much what which where"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny Qwen2.5-VL. The defaults give 0.34M parameters (1.4 MB of fp32 weights).

    Vision tower: `vision_*` fields, patch / merge / temporal sizes (shared with the image processor).
    Text decoder: `text_*` fields; head_dim * num_heads must equal hidden_size, and the M-RoPE sections
    (temporal, height, width) must sum to head_dim / 2. The vision output size is the text hidden size.
    """

    vision_depth: int = 4
    vision_hidden_size: int = 32
    vision_num_heads: int = 2
    vision_intermediate_size: int = 64
    vision_fullatt_block_indexes: tuple[int, ...] = (1, 3)
    vision_window_size: int = 112  # pixels; a multiple of patch_size * spatial_merge_size
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2  # videos only; 2 as in the released checkpoints (the class default is 4)
    text_num_layers: int = 4
    text_hidden_size: int = 64
    text_num_heads: int = 4
    text_num_kv_heads: int = 2
    text_intermediate_size: int = 128
    text_head_dim: int = 16
    mrope_section: tuple[int, ...] = (2, 3, 3)
    rope_theta: float = 1_000_000.0  # the stock Qwen2.5-VL default
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        problems = [message for broken, message in self._rules() if broken]
        if problems:
            raise ValueError("invalid TinySpec: " + "; ".join(problems))

    def _rules(self) -> list[tuple[bool, str]]:
        """(broken, message) for each cross-field rule; messages carry the numbers."""
        return [
            (
                self.text_num_heads * self.text_head_dim != self.text_hidden_size,
                f"text_num_heads * text_head_dim = {self.text_num_heads} * {self.text_head_dim} "
                f"!= text_hidden_size {self.text_hidden_size}",
            ),
            (
                self.text_num_heads % self.text_num_kv_heads != 0,
                f"text_num_heads {self.text_num_heads} not divisible by "
                f"text_num_kv_heads {self.text_num_kv_heads}",
            ),
            (
                len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.text_head_dim,
                f"mrope_section {self.mrope_section} must be 3 ints summing to text_head_dim / 2 "
                f"= {self.text_head_dim / 2}",
            ),
            (
                self.vision_hidden_size % self.vision_num_heads != 0,
                f"vision_hidden_size {self.vision_hidden_size} not divisible by "
                f"vision_num_heads {self.vision_num_heads}",
            ),
            (
                any(not 0 <= i < self.vision_depth for i in self.vision_fullatt_block_indexes),
                f"vision_fullatt_block_indexes {self.vision_fullatt_block_indexes} outside "
                f"[0, {self.vision_depth})",
            ),
            (
                self.vision_window_size % (self.patch_size * self.spatial_merge_size) != 0,
                f"vision_window_size {self.vision_window_size} not a multiple of "
                f"patch_size * spatial_merge_size = {self.patch_size * self.spatial_merge_size}",
            ),
        ]


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def _training_corpus() -> list[str]:
    """Sentences of the shapes-and-colours VQA world, in a fixed order (training is deterministic)."""
    lines = [_EXTRA_WORDS, _EXTRA_WORDS.lower()]
    for role in ("system", "user", "assistant"):
        lines += [f"{role}\n{DEFAULT_SYSTEM_PROMPT}", f"{role}\nDescribe the image."]
    for i, word in enumerate(NUMBER_WORDS):
        lines += [f"{word} {word.capitalize()} {i}", f"There are {word} shapes. {word.capitalize()}."]
    for k, (color, shape) in enumerate(itertools.product(COLORS, SHAPES)):
        count = NUMBER_WORDS[k % len(NUMBER_WORDS)]
        lines += [
            f"What color is the {shape}? The {shape} is {color}. {color.capitalize()}.",
            f"How many {color} {shape}s are there? There are {count} {color} {shape}s. {k % 10}",
            f"Is there a {color} {shape}? Yes, there is a {color} {shape}. No.",
            f"What shape is the {color} object? It is a {shape}. {shape.capitalize()}.",
            f"A {color} {shape} is on the left, the {shape} is at the top right.",
        ]
    return lines


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE; return its vocab (special tokens appended) and merges."""
    backend = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    backend.train_from_iterator(_training_corpus(), trainer)
    trained = json.loads(backend.to_str())["model"]
    vocab = dict(sorted(trained["vocab"].items(), key=lambda item: item[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab, merges


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer: a `Qwen2Tokenizer` (what `AutoTokenizer` gives for Qwen2.5-VL).

    pad = <|endoftext|>, eos = <|im_end|>, no bos/unk, left padding, Qwen ChatML chat template.
    """
    vocab, merges = _train_bpe()
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )


# ---------------------------------------------------------------------------------------------------
# Processor


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video slot (transformers 5.x cannot build it with None).

    `ProcessorMixin` reads the sub-processors from this `__init__` signature, so saving writes only the
    image processor and tokenizer, and `from_pretrained` loads only those. Images behave exactly as in
    the stock processor (same `replace_image_token`, `mm_token_type_ids`).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", IMAGE_TOKEN)
        self.video_token = getattr(tokenizer, "video_token", VIDEO_TOKEN)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        # Skip Qwen2_5_VLProcessor.__init__: it always passes a video_processor.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def register_processor() -> None:
    """Map Qwen2_5_VLConfig and the saved `processor_class` name to `ImageOnlyQwen2_5_VLProcessor`.

    Idempotent. exist_ok=True is required: without it transformers refuses (or silently skips) a
    native config class. Side effect: in this process, AutoProcessor on a Qwen2.5-VL directory whose
    files name no processor class gets the image-only processor; named stock classes still win.
    """
    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)


def build_image_processor(
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> Qwen2VLImageProcessorPil:
    """The PIL image processor; images are resized to multiples of patch_size * merge_size pixels."""
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )


def build_processor(
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    spec: TinySpec | None = None,
) -> ImageOnlyQwen2_5_VLProcessor:
    """Tokenizer + PIL image processor + chat template. `spec` (default TinySpec()) gives the patch,
    merge and temporal sizes, which must match the vision tower's."""
    spec = spec or TinySpec()
    image_processor = build_image_processor(
        min_pixels,
        max_pixels,
        patch_size=spec.patch_size,
        merge_size=spec.spatial_merge_size,
        temporal_patch_size=spec.temporal_patch_size,
    )
    return ImageOnlyQwen2_5_VLProcessor(image_processor, build_tokenizer(), chat_template=CHAT_TEMPLATE)


def load_processor(path: str | Path) -> ImageOnlyQwen2_5_VLProcessor:
    """Load the image-only processor from any Qwen2.5-VL directory: ours, or a hub checkpoint whose
    files name the stock `Qwen2_5_VLProcessor` (AutoProcessor would then try to build the video
    processor, which transformers 5.x cannot do without torchvision).

    The image processor is saved under its base name, so the backend is picked at load time: PIL
    where torchvision is absent (the CPU machines), the torchvision twin where it is installed.
    """
    register_processor()
    try:
        processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(str(path))
    except OSError as exc:
        raise TypeError(f"{path}: not a full processor ({str(exc).splitlines()[0]})") from None
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise TypeError(f"{path}: no image processor and tokenizer found (not a full processor)")
    return processor


# ---------------------------------------------------------------------------------------------------
# Config and model


def _special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids[PAD_TOKEN],  # as in the hub checkpoint: bos id = <|endoftext|>, never prepended
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
    }


def build_tiny_config(spec: TinySpec = TinySpec()) -> Qwen2_5_VLConfig:
    """A `Qwen2_5_VLConfig` sized by `spec`, with vocab size and token ids from `build_tokenizer()`."""
    tokenizer = build_tokenizer()
    ids = _special_token_ids(tokenizer)
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "hidden_act": "silu",
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_num_heads,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "tokens_per_second": spec.tokens_per_second,
        "window_size": spec.vision_window_size,
        "out_hidden_size": spec.text_hidden_size,
        "fullatt_block_indexes": list(spec.vision_fullatt_block_indexes),
    }
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden_size,
        "intermediate_size": spec.text_intermediate_size,
        "num_hidden_layers": spec.text_num_layers,
        "num_attention_heads": spec.text_num_heads,
        "num_key_value_heads": spec.text_num_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.text_num_layers,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": spec.rope_theta,
            "mrope_section": list(spec.mrope_section),
        },
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def build_tiny_model(spec: TinySpec = TinySpec(), seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Randomly initialised tiny model, fp32, eval mode, SDPA attention; weights depend only on `seed`.

    The CPU RNG is forked, so the caller's torch RNG state is the same before and after.
    """
    config = build_tiny_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    text = config.text_config
    model.generation_config.bos_token_id = text.bos_token_id
    model.generation_config.eos_token_id = [text.eos_token_id, text.pad_token_id]
    model.generation_config.pad_token_id = text.pad_token_id
    return model.eval()


def save_tiny_model_dir(
    path: str | Path,
    spec: TinySpec = TinySpec(),
    seed: int = 0,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Path:
    """Write a loadable model directory: config, safetensors weights, generation config, tokenizer,
    image processor and processor config, chat template. Returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_model(spec, seed).save_pretrained(path)  # safetensors is the only format in 5.x
    build_processor(min_pixels, max_pixels, spec=spec).save_pretrained(path)
    return path
