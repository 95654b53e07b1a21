"""The offline tiny Qwen2.5-VL: tokenizer, chat template, processor, config, save/load, generate."""
from __future__ import annotations

import random
import string

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from workers.modeling.tiny import (
    COLORS,
    SHAPES,
    SPECIAL_TOKENS,
    ImageOnlyQwen2_5_VLProcessor,
    TinySpec,
    build_processor,
    build_tiny_config,
    build_tiny_model,
    build_tokenizer,
    load_processor,
    save_tiny_model_dir,
)

IMAGE_SIZES = ((56, 84), (112, 112))  # (width, height): grids 6x4 and 8x8 patches -> 6 and 16 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in IMAGE_SIZES]


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _batch(processor):
    questions = ("What color is the circle?", "How many stars are there? Count them.")
    texts = [_prompt(processor, question) for question in questions]
    return processor(text=texts, images=_images(), padding=True, return_tensors="pt")


def test_tokenizer_round_trips_any_ascii(tokenizer):
    rng = random.Random(0)
    texts = [string.printable, "  two  spaces\n\n\ttab ", "What color is the red circle?", ""]
    texts += ["".join(rng.choice(string.printable) for _ in range(rng.randint(1, 60))) for _ in range(50)]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_special_tokens_are_atomic_and_last(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert ids == list(range(len(tokenizer) - len(SPECIAL_TOKENS), len(tokenizer)))
    assert len(tokenizer) <= 1000
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi<|im_end|>"
    encoded = tokenizer.encode(text, add_special_tokens=False)
    for token in ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"):
        assert encoded.count(tokenizer.convert_tokens_to_ids(token)) == 1
    assert encoded.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 2
    assert tokenizer.decode(encoded) == text
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "user\nhi"


def test_tokenizer_settings(tokenizer):
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "left"
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)  # nothing prepended


def test_vqa_vocabulary_is_compact(tokenizer):
    for word in COLORS + SHAPES + ("yes", "no", "one", "two", "three", "image", "there"):
        assert len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1, word
    for question in ("What color is the star?", "How many circles are there?", "Is there a green diamond?"):
        assert len(tokenizer.encode(question, add_special_tokens=False)) <= 8, question
    assert len(tokenizer.encode("Describe the image.", add_special_tokens=False)) <= 4


def test_chat_template(tokenizer):
    content = [{"type": "image"}, {"type": "text", "text": "Is there a star?"}]
    messages = [{"role": "user", "content": content}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is there a star?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "Two."},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nHow many?<|im_end|>\n"
        "<|im_start|>assistant\nTwo.<|im_end|>\n"
    )


def test_processor_expands_image_pads_with_left_padding(processor):
    batch = _batch(processor)
    image_pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = batch["image_grid_thw"]  # [N_images, 3]
    assert grid.tolist() == [[1, 6, 4], [1, 8, 8]]
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    per_row = (batch["input_ids"] == image_pad_id).sum(-1)
    assert per_row.tolist() == (grid.prod(-1) // 4).tolist()
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # the shorter row is padded on the left
    assert (batch["input_ids"][mask == 0] == processor.tokenizer.pad_token_id).all()
    assert batch["mm_token_type_ids"].sum(-1).tolist() == per_row.tolist()


def test_config_takes_ids_from_tokenizer(tokenizer):
    config = build_tiny_config()
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == 16


def test_tiny_spec_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="mrope_section"):
        TinySpec(mrope_section=(2, 2, 2))
    with pytest.raises(ValueError, match="text_hidden_size"):
        TinySpec(text_hidden_size=96)


def test_model_is_deterministic_and_leaves_rng_alone(model):
    state = torch.random.get_rng_state()
    again = build_tiny_model(seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(model.lm_head.weight, build_tiny_model(seed=1).lm_head.weight)
    assert not model.training and model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"


def test_save_load_round_trip_gives_identical_logits(model, processor, model_dir):
    loaded_processor = load_processor(model_dir)
    assert isinstance(loaded_processor, ImageOnlyQwen2_5_VLProcessor)
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa")
    batch, loaded_batch = _batch(processor), _batch(loaded_processor)
    assert batch.keys() == loaded_batch.keys()
    assert all(torch.equal(batch[key], loaded_batch[key]) for key in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.eval()(**batch).logits)


def test_load_processor_refuses_a_bare_tokenizer(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="not a full processor"):
        load_processor(tmp_path)


def test_generate_on_left_padded_batch(model, processor):
    batch = _batch(processor)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
        padded_logits = model(**batch).logits[0, -1]  # [V], the left-padded row
        text = _prompt(processor, "What color is the circle?")
        single = processor(text=[text], images=_images()[:1], return_tensors="pt")
        single_logits = model(**single).logits[0, -1]
    assert out.shape[0] == 2 and 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 5
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    torch.testing.assert_close(padded_logits, single_logits, atol=1e-5, rtol=1e-5)
