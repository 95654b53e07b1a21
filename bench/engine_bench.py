"""Engine benchmark: GlimpsePrune (fixed keep ratio 0.111) against the unpruned model, side by side.

Two parts, both printed as a table and written to one JSON file (default bench/results/engine_bench.json):

1. Measured (random weights, no downloads). The same processed batch (B requests, one square image
   each) goes through `GlimpseEngine.generate_from_inputs` pruned and unpruned, interleaved over R
   repeats in ABBA order after a warm-up, so drift and neighbours' load hit both modes alike. Each
   repeat also runs the ViT alone and each mode's prefill alone (`engine.core.prefill`, which gives
   the KV cache). Medians of: prefill seconds (ViT included, as the engine times it), the decoder's
   part (prefill - ViT), decode seconds, decode seconds per decode step, KV-cache bytes right after
   prefill, peak GPU memory; ratios are pruned / unpruned of the medians. Times are wall seconds
   (the engine's, CUDA-synchronised) and, on CPU, also process CPU seconds: with one thread those
   count the work done and move much less than wall time when other jobs share the cores. Decode
   CPU seconds = generate CPU - prefill-alone CPU of the same repeat and mode.
   * cpu (default without CUDA): a mid-size fp32 Qwen2.5-VL (`cpu_spec`), SDPA, one torch thread
     (on 2 shared cores, 2 threads measured 3-10x slower and far noisier; --threads overrides).
   * cuda (default with CUDA): a Qwen2.5-VL-7B-shaped model in bf16 (`cuda_spec`, vocab 152064),
     flash-attention-2 when importable else SDPA, built directly on the GPU; images 1792x1792 give
     4096 visual tokens, the reference's efficiency setting (section 8.1).
   * --quick: the tiny test model, a few seconds (the smoke test).
   Glimpse config: reduce_layer = selected_layers[0] = K = round(2L/3) - 1 (18 of 28 and 23 of 36 as
   released), glimpse vectors on every layer, VIP levels = the ViT's full-attention blocks, last first.
   EOS: with random weights greedy decoding could stop early and bias the decode timing, so the
   LM-head rows of the stop tokens (and of ids the tokenizer cannot decode) are zeroed: their logit is
   exactly 0, below the maximum of the other random logits. Every row then runs max_new_tokens; the
   JSON still records output lengths, and decode time is also given per decode step.

2. Analytic prefill FLOPs (`prefill_flops`) for the real Qwen2.5-VL-3B and -7B decoders, one image of
   N visual tokens plus T text tokens, keep ratio r. Matmul FLOPs only (2 per multiply-add); norms,
   RoPE, softmax, the ViT (identical in both modes) and the LM head (last position only in both) are
   left out. With d = H * hd, kv heads G, MLP width I, a layer running n tokens with no cache costs

       F_layer(n) = 2 n d (2d + 2 G hd)      q, o: d x d; k, v: d x G hd
                  + 4 H hd n (n + 1) / 2     q k^T and a v, causal (only unmasked pairs, as FA2)
                  + 6 n d I                  gate, up, down

       unpruned = L * F_layer(T + N)
       pruned   = (K + 1) * F_layer(T + N + 1)           layers 0..K, full length + glimpse
                + (K + 1) * 2 d^2                        glimpse vectors e_l (le_proj)
                + n_sel * 2 H hd N                       glimpse logits over the visual keys
                + F_VIP(N)
                + (L - K - 1) * F_layer(T + n_keep)      layers K+1..L-1, n_keep = max(1, floor(r N))

       F_VIP(N) = 2 N (n_sel H) F + 2 N F                attn_in_proj, last attn_out_proj (F -> 1)
                + levels * [ 2 N C_vit C                 cond_in_proj
                           + 4 N (F + C)^2 + 4 N F^2     q, k: (F+C)^2; v, o: F^2
                           + 2 N^2 (F + C) + 2 N^2 F     full (non-causal) attention within the image
                           + 12 N F^2 ]                  SwiGLU F -> 2F -> F

   with the released VIP sizes F = 256, C = 512, 4 levels, C_vit = 1280. Since layers 0..K run at
   full length (plus one token), pruned / unpruned >= (K + 1) / L (reference section 4, "Compute
   accounting"): 19/28 = 0.679 for 7B, 24/36 = 0.667 for 3B. The decode-time KV cache holds
   T + n_keep instead of T + N tokens in every layer (all layers are compacted), so its byte ratio is
   (T + n_keep) / (T + N), independent of the model.

Run: `python bench/engine_bench.py [--quick] [--device cpu|cuda] ...` (see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from workers.modeling import flops as F

KEEP_RATIO = 0.111  # the paper's efficiency setting (fixed_remain_ratio)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "engine_bench.json"
PROMPT = "Describe the image in detail: the shapes, their colors and where they are."


# ---------------------------------------------------------------------------------------------------
# Analytic FLOPs (pure arithmetic, no torch)


@dataclass(frozen=True)
class DecoderDims:
    """An LLM decoder and its glimpse settings. reduce_layer = K (0-indexed)."""

    name: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    reduce_layer: int
    num_selected_layers: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class VipDims:
    """VIP sizes; defaults are the released ones (section 3.2)."""

    vision_hidden: int = 1280
    fuse: int = 256
    cond: int = 512
    levels: int = 4


QWEN25_VL_3B = DecoderDims("Qwen2.5-VL-3B", 36, 2048, 16, 2, 11008, reduce_layer=23)
QWEN25_VL_7B = DecoderDims("Qwen2.5-VL-7B", 28, 3584, 28, 4, 18944, reduce_layer=18)


def _text(dims: DecoderDims) -> F.TextDims:
    return F.TextDims(layers=dims.num_layers, hidden=dims.hidden, heads=dims.heads, kv_heads=dims.kv_heads,
                      head_dim=dims.head_dim, intermediate=dims.intermediate)


def layer_flops(dims: DecoderDims, n: int) -> float:
    """Matmul FLOPs of one decoder layer running n tokens causally with an empty cache."""
    return F.layer_flops(_text(dims), n)


def vip_flops(dims: DecoderDims, vip: VipDims, n: int) -> float:
    """Matmul FLOPs of the VIP on one image of n visual tokens."""
    return F.vip_flops(F.VipDims(vision_hidden=vip.vision_hidden, fuse=vip.fuse, cond=vip.cond, levels=vip.levels,
                                 attn_in=dims.num_selected_layers * dims.heads), n)


def keep_count(visual_tokens: int, keep_ratio: float) -> int:
    """The engine's fixed-ratio rule: exactly max(1, floor(r * N)) tokens."""
    return max(1, int(keep_ratio * visual_tokens))


def prefill_flops(dims: DecoderDims, vip: VipDims, visual: int, text: int, keep_ratio: float = KEEP_RATIO) -> dict:
    """Prefill FLOPs unpruned vs GlimpsePrune for one sample (formula in the module docstring)."""
    k1 = dims.reduce_layer + 1
    kept = keep_count(visual, keep_ratio)
    unpruned = dims.num_layers * layer_flops(dims, text + visual)
    glimpse = F.glimpse_extra_flops(_text(dims), dims.reduce_layer, dims.num_selected_layers, visual)
    vip_part = vip_flops(dims, vip, visual)
    pruned = (
        k1 * layer_flops(dims, text + visual + 1)
        + glimpse
        + vip_part
        + (dims.num_layers - k1) * layer_flops(dims, text + kept)
    )
    return {
        "model": dims.name,
        "num_layers": dims.num_layers,
        "reduce_layer": dims.reduce_layer,
        "visual_tokens": visual,
        "text_tokens": text,
        "kept_visual_tokens": kept,
        "unpruned_flops": unpruned,
        "pruned_flops": pruned,
        "vip_flops": vip_part,
        "prefill_flops_ratio": pruned / unpruned,
        "lower_bound_ratio": k1 / dims.num_layers,
        "vip_share_of_pruned": vip_part / pruned,
        "kv_cache_bytes_ratio": (text + kept) / (text + visual),
    }


def analytic_table(visual_tokens: Sequence[int], text_tokens: int, keep_ratio: float = KEEP_RATIO) -> list[dict]:
    return [
        prefill_flops(dims, VipDims(), n, text_tokens, keep_ratio)
        for dims in (QWEN25_VL_3B, QWEN25_VL_7B)
        for n in visual_tokens
    ]


# ---------------------------------------------------------------------------------------------------
# Models and engines for the measured part


def cpu_spec():
    """Mid-size Qwen2.5-VL (34M decoder parameters): a full default run is about a minute of CPU time.

    Per visual token the ViT does ~40% of the decoder's matmul work (4 patches each), as in 7B.
    """
    from workers.modeling.tiny import TinySpec

    return TinySpec(
        vision_depth=8, vision_hidden_size=192, vision_num_heads=3, vision_intermediate_size=512,
        vision_fullatt_block_indexes=(1, 3, 5, 7),
        text_num_layers=12, text_hidden_size=512, text_num_heads=8, text_num_kv_heads=2,
        text_intermediate_size=1408, text_head_dim=64, mrope_section=(8, 12, 12),
    )  # fmt: skip


def cuda_spec():
    """Qwen2.5-VL-7B's shapes (the released config.json), random weights."""
    from workers.modeling.tiny import TinySpec

    return TinySpec(
        vision_depth=32, vision_hidden_size=1280, vision_num_heads=16, vision_intermediate_size=3420,
        vision_fullatt_block_indexes=(7, 15, 23, 31),
        text_num_layers=28, text_hidden_size=3584, text_num_heads=28, text_num_kv_heads=4,
        text_intermediate_size=18944, text_head_dim=128, mrope_section=(16, 24, 24),
        max_position_embeddings=128000,
    )  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """Everything the measured part depends on, resolved from the command line."""

    device: str
    quick: bool
    batch_size: int
    image_size: int
    max_new_tokens: int
    repeats: int
    warmup: int
    seed: int
    threads: Optional[int]  # torch intra-op threads; None leaves torch's default

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    @property
    def vip_sizes(self) -> dict:
        """Released 256/512/4 on the 7B shape. The mid-size model gets 64/128/4: with the released
        widths the VIP would be ~20% of its decoder prefill FLOPs (0.3% in 7B) and hide the effect."""
        if self.quick:
            return dict(attn_fuse_size=16, visual_cond_size=16, attn_fuse_num_heads=2)
        if self.device == "cpu":
            return dict(attn_fuse_size=64, visual_cond_size=128, attn_fuse_num_heads=4)
        return dict(attn_fuse_size=256, visual_cond_size=512, attn_fuse_num_heads=4)

    def spec(self):
        from workers.modeling.tiny import TinySpec

        if self.quick:
            return TinySpec()
        return cuda_spec() if self.device == "cuda" else cpu_spec()


def attn_implementation(device: str) -> str:
    if device == "cuda":
        from transformers.utils import is_flash_attn_2_available

        return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    return "sdpa"


def build_model(setup: Setup, spec):
    """Random-weight model: tiny's fp32 CPU builder, or bf16 directly on the GPU with a 152k vocab."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from workers.modeling.tiny import build_tiny_config, build_tiny_model

    if setup.device == "cpu":
        return build_tiny_model(spec, seed=setup.seed)
    config = build_tiny_config(spec)
    config.text_config.vocab_size = 152064  # the real vocab: the LM head costs what it costs in 7B
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]), torch.device(setup.device):
        torch.manual_seed(setup.seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation(setup.device), dtype=setup.dtype
        )
    text = config.text_config
    model.generation_config.eos_token_id = [text.eos_token_id, text.pad_token_id]
    model.generation_config.pad_token_id = text.pad_token_id
    return model.eval()


def glimpse_config(model, vip_sizes: dict):
    """K = round(2L/3) - 1 as released (18/28, 23/36); VIP widths from `Setup.vip_sizes`."""
    from workers.modeling.glimpse import GlimpseConfig

    text, vision = model.config.text_config, model.config.vision_config
    k = round(2 * text.num_hidden_layers / 3) - 1
    return GlimpseConfig(
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_hidden_layers=text.num_hidden_layers,
        vision_hidden_size=vision.hidden_size,
        rms_norm_eps=text.rms_norm_eps,
        selected_layers=(k,),
        reduce_layer=k,
        selected_visual_layers=tuple(reversed(vision.fullatt_block_indexes)),
        le_layers=tuple(range(text.num_hidden_layers)),
        fixed_remain_ratio=KEEP_RATIO,
        **vip_sizes,
    )


def build_engine(setup: Setup):
    from workers.modeling.engine import GlimpseEngine
    from workers.modeling.glimpse import GlimpseModules
    from workers.modeling.keep_rule import KeepRule
    from workers.modeling.tiny import build_processor

    spec = setup.spec()
    model = build_model(setup, spec)
    modules = GlimpseModules(glimpse_config(model, setup.vip_sizes))
    modules.reset_parameters(generator=torch.Generator().manual_seed(setup.seed + 1))
    modules.to(setup.device)
    for param in modules.parameters():  # parameters only: the VIP's RoPE inv_freq buffer stays fp32
        param.data = param.data.to(setup.dtype)
    pixels = setup.image_size**2
    processor = build_processor(min_pixels=min(pixels, 56 * 56), max_pixels=pixels, spec=spec)
    processor.tokenizer.model_max_length = spec.max_position_embeddings  # 4096-token prompts are fine
    engine = GlimpseEngine(model, processor, modules, KeepRule(fixed_remain_ratio=KEEP_RATIO))
    silence_stop_tokens(model, engine.eos_ids, len(processor.tokenizer))
    return engine


@torch.no_grad()
def silence_stop_tokens(model, stop_ids: Sequence[int], tokenizer_size: int) -> None:
    """Zero the LM-head rows of stop tokens and of ids past the tokenizer: their logits become 0."""
    weight = model.lm_head.weight  # [V, d]
    weight[list(stop_ids)] = 0
    weight[tokenizer_size:] = 0


def make_inputs(engine, setup: Setup):
    from PIL import Image

    from workers.modeling.api import GenerationRequest

    gen = torch.Generator().manual_seed(setup.seed)
    requests = []
    for _ in range(setup.batch_size):
        pixels = torch.randint(0, 256, (setup.image_size, setup.image_size, 3), generator=gen, dtype=torch.uint8)
        requests.append(GenerationRequest(images=(Image.fromarray(pixels.numpy(), "RGB"),), prompt=PROMPT))
    inputs = engine.build_inputs(requests)
    fields = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    return replace(inputs, **{k: getattr(inputs, k).to(engine.device) for k in fields})


# ---------------------------------------------------------------------------------------------------
# Measurement


class Stopwatch:
    """Wall seconds (after a CUDA sync) and this process's CPU seconds (all threads) of a block.

    With one torch thread, CPU seconds are the work done and barely move when other jobs share the
    cores; wall seconds do. On CUDA only wall seconds mean anything (`cpu_s` is then None).
    """

    def __init__(self, device: str):
        self.device = device
        self.wall_s: float = 0.0
        self.cpu_s: Optional[float] = None

    def __enter__(self) -> "Stopwatch":
        self._sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu if self.device == "cpu" else None

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def run_generation(engine, inputs, setup: Setup, prune: bool) -> dict:
    """One generate (the engine times prefill and decode, wall) plus its CPU seconds in total."""
    from workers.modeling.api import SamplingParams

    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if setup.device == "cuda" else None  # weights + inputs
    with Stopwatch(setup.device) as watch:
        results = engine.generate_from_inputs(inputs, SamplingParams(max_new_tokens=setup.max_new_tokens), prune=prune)
    return {
        "prefill_s": results[0].prefill_s,
        "decode_s": results[0].decode_s,
        "generate_cpu_s": watch.cpu_s,
        "decode_steps": max(r.output_tokens for r in results) - 1,  # forward passes after prefill
        "output_tokens": [r.output_tokens for r in results],
        "visual_tokens": [r.visual_tokens for r in results],
        "kept_tokens": [r.kept_tokens for r in results],
        "memory_before_bytes": before,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if setup.device == "cuda" else None,
    }


@torch.inference_mode()
def run_prefill(engine, inputs, setup: Setup, prune: bool) -> dict:
    """Prefill alone: its wall and CPU seconds, and the KV cache it leaves (bytes, length per row)."""
    from workers.modeling import compat

    with Stopwatch(setup.device) as watch:
        state = engine.core.prefill(inputs, engine.rule if prune else None)
    layers = range(len(engine.core.lm.layers))
    tensors = [compat.cache_keys(state.cache, i) for i in layers] + [compat.cache_values(state.cache, i) for i in layers]
    return {
        "wall_s": watch.wall_s,
        "cpu_s": watch.cpu_s,
        "kv_cache_bytes": sum(t.numel() * t.element_size() for t in tensors),
        "kv_cache_tokens_per_row": int(tensors[0].shape[2]),  # [B, kv_heads, L', head_dim]
    }


@torch.inference_mode()
def run_vision(engine, inputs, setup: Setup) -> dict:
    """The ViT alone (identical work in both modes)."""
    with Stopwatch(setup.device) as watch:
        engine.core.visual_features(inputs.pixel_values, inputs.image_grid_thw, ())
    return {"wall_s": watch.wall_s, "cpu_s": watch.cpu_s}


def measure(engine, inputs, setup: Setup) -> dict:
    """Warm up, then R repeats: the ViT alone, then per mode in ABBA order a generate and a prefill."""
    for _ in range(setup.warmup):
        for prune in (True, False):
            run_generation(engine, inputs, setup, prune)
    runs: dict = {"pruned": [], "unpruned": [], "vision": []}
    for repeat in range(setup.repeats):
        runs["vision"].append(run_vision(engine, inputs, setup))
        for prune in ((True, False) if repeat % 2 == 0 else (False, True)):
            generation = run_generation(engine, inputs, setup, prune)
            prefill = run_prefill(engine, inputs, setup, prune)
            runs["pruned" if prune else "unpruned"].append({**generation, "prefill_alone": prefill})
    return runs


def per_run_figures(run: dict, vision: dict) -> dict:
    """The figures one run contributes; decode CPU = generate CPU - the same mode's prefill CPU."""
    steps, alone = run["decode_steps"], run["prefill_alone"]
    decode_cpu = run["generate_cpu_s"] - alone["cpu_s"] if alone["cpu_s"] is not None else None
    per_step = lambda x: x / steps if x is not None and steps > 0 else None  # noqa: E731
    return {
        "prefill_s": run["prefill_s"],
        "prefill_cpu_s": alone["cpu_s"],
        "decoder_prefill_s": run["prefill_s"] - vision["wall_s"],
        "decoder_prefill_cpu_s": alone["cpu_s"] - vision["cpu_s"] if alone["cpu_s"] is not None else None,
        "decode_s": run["decode_s"],
        "decode_cpu_s": decode_cpu,
        "decode_s_per_step": per_step(run["decode_s"]),
        "decode_cpu_s_per_step": per_step(decode_cpu),
        "kv_cache_bytes": alone["kv_cache_bytes"],
        "kv_cache_tokens_per_row": alone["kv_cache_tokens_per_row"],
        "peak_memory_bytes": run["peak_memory_bytes"],
        "peak_memory_above_start_bytes": (
            run["peak_memory_bytes"] - run["memory_before_bytes"] if run["peak_memory_bytes"] is not None else None
        ),
    }


def summarize(runs: dict) -> dict:
    """Medians per mode (vision paired with its repeat) and pruned / unpruned ratios of the medians."""
    median = {}
    for mode in ("pruned", "unpruned"):
        rows = [per_run_figures(run, vision) for run, vision in zip(runs[mode], runs["vision"])]
        median[mode] = {key: _median([row[key] for row in rows]) for key in rows[0]}
    ratios = {key: _ratio(median["pruned"][key], median["unpruned"][key]) for key in median["pruned"]}
    vision = {key: _median([v[key] for v in runs["vision"]]) for key in ("wall_s", "cpu_s")}
    return {"median": {**median, "vision": vision}, "ratios": ratios, "keep": keep_check(runs["pruned"])}


def keep_check(pruned_runs: list) -> dict:
    """Kept visual tokens of the pruned runs against the rule max(1, floor(0.111 N))."""
    visual, kept = pruned_runs[-1]["visual_tokens"], pruned_runs[-1]["kept_tokens"]
    expected = [keep_count(n, KEEP_RATIO) for n in visual]
    return {
        "target_keep_ratio": KEEP_RATIO,
        "visual_tokens": visual,
        "kept_tokens": kept,
        "expected_kept_tokens": expected,
        "keep_ratio": sum(kept) / sum(visual),
        "ok": kept == expected and all(r["kept_tokens"] == kept for r in pruned_runs),
    }


def _median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def bench_model_analytic(engine, keep: dict, text_tokens: int) -> dict:
    """The analytic ratio for the measured model itself, to compare with the measured decoder time."""
    text, vision, gp = engine.model.config.text_config, engine.model.config.vision_config, engine.modules.config
    dims = DecoderDims(
        "measured model", text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
        text.num_key_value_heads, text.intermediate_size, gp.reduce_layer, len(gp.selected_layers),
    )  # fmt: skip
    vip = VipDims(vision.hidden_size, gp.attn_fuse_size, gp.visual_cond_size, len(gp.selected_visual_layers))
    return prefill_flops(dims, vip, keep["visual_tokens"][0], text_tokens)


# ---------------------------------------------------------------------------------------------------
# Report


def environment(setup: Setup, engine, load_at_start: Optional[list]) -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": setup.device,
        "device_name": torch.cuda.get_device_name() if setup.device == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_at_start,  # 1, 5, 15 min; above cpu_count means shared cores
        "dtype": str(setup.dtype).replace("torch.", ""),
        "attn_implementation": engine.core.impl,
        "git_commit": _git_commit(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fmt(value, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def measured_lines(report: dict) -> list[str]:
    cfg, env, meas = report["config"], report["environment"], report["measured"]
    med, ratios, keep = meas["median"], meas["ratios"], meas["keep"]
    spec, gp = cfg["model_spec"], cfg["glimpse"]
    lines = [
        f"GlimpsePrune engine benchmark: {env['device']} ({env['device_name']}), {env['dtype']}, "
        f"{env['attn_implementation']}, {env['torch_threads']} threads, torch {env['torch']}, transformers {env['transformers']}",
        f"model: text {spec['text_num_layers']} layers d={spec['text_hidden_size']} heads {spec['text_num_heads']}/"
        f"{spec['text_num_kv_heads']} kv, MLP {spec['text_intermediate_size']}; vision {spec['vision_depth']} blocks "
        f"d={spec['vision_hidden_size']}; K={gp['reduce_layer']}, VIP {gp['attn_fuse_size']}/{gp['visual_cond_size']}/"
        f"{gp['attn_fuse_num_heads']}, levels {gp['selected_visual_layers']}",
        f"batch {cfg['batch_size']} x one {cfg['image_size']}x{cfg['image_size']} image ({keep['visual_tokens'][0]} visual "
        f"tokens each, prompt {meas['prompt_tokens'][0]} tokens), {cfg['max_new_tokens']} new tokens, "
        f"{cfg['repeats']} repeats interleaved (medians)",
        "",
        f"{'':34}{'unpruned':>12}{'pruned':>12}{'pruned/unpruned':>18}",
    ]
    rows = [
        ("prefill, wall (s)", "prefill_s", 1, 3),
        ("prefill, CPU (s)", "prefill_cpu_s", 1, 3),
        ("  decoder part (- ViT), wall (s)", "decoder_prefill_s", 1, 3),
        ("  decoder part (- ViT), CPU (s)", "decoder_prefill_cpu_s", 1, 3),
        ("decode, wall (s)", "decode_s", 1, 3),
        ("decode, CPU (s)", "decode_cpu_s", 1, 3),
        ("decode per step, wall (ms)", "decode_s_per_step", 1e3, 2),
        ("decode per step, CPU (ms)", "decode_cpu_s_per_step", 1e3, 2),
        ("KV cache after prefill (MiB)", "kv_cache_bytes", 2**-20, 2),
        ("KV cache tokens per row", "kv_cache_tokens_per_row", 1, 0),
        ("peak GPU memory (MiB)", "peak_memory_bytes", 2**-20, 0),
        ("  above weights + inputs (MiB)", "peak_memory_above_start_bytes", 2**-20, 0),
    ]
    for label, key, scale, digits in rows:
        un, pr = med["unpruned"][key], med["pruned"][key]
        if un is not None or pr is not None:
            lines.append(f"{label:34}{_fmt(un, scale, digits):>12}{_fmt(pr, scale, digits):>12}{_fmt(ratios[key]):>18}")
    vision = med["vision"]
    lines.append(f"ViT alone (same work in both modes): wall {_fmt(vision['wall_s'])} s, CPU {_fmt(vision['cpu_s'])} s")
    own = report["analytic"]["measured_model"]
    lines += [
        "",
        f"kept visual tokens: {keep['kept_tokens']} of {keep['visual_tokens']} = {keep['keep_ratio']:.4f} "
        f"(target {KEEP_RATIO}; rule max(1, floor(0.111 N)) -> {keep['expected_kept_tokens']}): "
        f"{'OK' if keep['ok'] else 'MISMATCH'}",
        f"early EOS stops: {meas['early_stops']} (stop tokens silenced)",
        f"analytic decoder+VIP prefill FLOPs ratio of this model: {own['prefill_flops_ratio']:.3f} "
        f"(lower bound (K+1)/L = {own['lower_bound_ratio']:.3f}); KV bytes ratio {own['kv_cache_bytes_ratio']:.3f}",
    ]
    return lines


def analytic_lines(rows: list[dict]) -> list[str]:
    lines = [
        f"Analytic prefill FLOPs, LLM decoder + VIP (ViT excluded: identical in both), keep ratio {KEEP_RATIO}, "
        f"{rows[0]['text_tokens']} text tokens, one image",
        f"{'model':16}{'K/L':>7}{'visual':>8}{'kept':>6}{'unpruned TFLOP':>16}{'pruned TFLOP':>14}"
        f"{'ratio':>8}{'(K+1)/L':>9}{'VIP share':>11}{'KV ratio':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:16}{r['reduce_layer']:>4}/{r['num_layers']:<2}{r['visual_tokens']:>8}{r['kept_visual_tokens']:>6}"
            f"{r['unpruned_flops'] / 1e12:>16.3f}{r['pruned_flops'] / 1e12:>14.3f}{r['prefill_flops_ratio']:>8.3f}"
            f"{r['lower_bound_ratio']:>9.3f}{r['vip_share_of_pruned']:>11.4f}{r['kv_cache_bytes_ratio']:>10.3f}"
        )
    return lines


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    parser.add_argument("--batch-size", type=int, default=None, help="requests per batch (default 4, quick 2)")
    parser.add_argument("--image-size", type=int, default=None, help="square image side in pixels (default cpu 448 "
                        "= 256 tokens, cuda 1792 = 4096 tokens, quick 224 = 64 tokens)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per request (default 32, quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="measured rounds per mode (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds per mode first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default cpu 1, cuda torch's "
                        "default): on 2 shared cores, 2 threads ran 3-10x slower and far noisier than 1")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a few seconds (smoke test)")
    parser.add_argument("--analytic-visual-tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--analytic-text-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return parser.parse_args(argv)


def resolve_setup(args: argparse.Namespace) -> Setup:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")

    def pick(given, quick, cpu, cuda):
        if given is not None:
            return given
        return quick if args.quick else (cuda if device == "cuda" else cpu)

    setup = Setup(
        device=device,
        quick=args.quick,
        batch_size=pick(args.batch_size, 2, 4, 4),
        image_size=pick(args.image_size, 224, 448, 1792),
        max_new_tokens=pick(args.max_new_tokens, 4, 32, 32),
        repeats=pick(args.repeats, 1, 3, 3),
        warmup=args.warmup,
        seed=args.seed,
        threads=args.threads if args.threads is not None else (1 if device == "cpu" else None),
    )
    if min(setup.batch_size, setup.max_new_tokens, setup.repeats) < 1 or setup.warmup < 0 or setup.image_size < 28:
        raise SystemExit(f"invalid sizes: {setup}")
    return setup


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    setup = resolve_setup(args)
    threads = torch.get_num_threads()
    if setup.threads is not None:
        torch.set_num_threads(setup.threads)
    try:
        return run(args, setup)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process by the smoke test


def _load_average() -> Optional[list]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run(args: argparse.Namespace, setup: Setup) -> dict:
    load_at_start = _load_average()
    engine = build_engine(setup)
    inputs = make_inputs(engine, setup)
    runs = measure(engine, inputs, setup)
    measured = summarize(runs)
    prompt_tokens = inputs.attention_mask.sum(dim=1).tolist()
    measured["prompt_tokens"] = prompt_tokens
    lengths = [n for run in runs["pruned"] + runs["unpruned"] for n in run["output_tokens"]]
    measured["early_stops"] = sum(n < setup.max_new_tokens for n in lengths)
    measured["load_average_after"] = _load_average()
    measured["raw"] = runs
    text_tokens = prompt_tokens[0] - measured["keep"]["visual_tokens"][0]
    report = {
        "config": {**asdict(setup), "keep_ratio": KEEP_RATIO, "prompt": PROMPT,
                   "model_spec": asdict(setup.spec()), "glimpse": engine.modules.config.gp_fields()},
        "environment": environment(setup, engine, load_at_start),
        "measured": measured,
        "analytic": {
            "qwen2_5_vl": analytic_table(args.analytic_visual_tokens, args.analytic_text_tokens),
            "measured_model": bench_model_analytic(engine, measured["keep"], text_tokens),
        },
    }  # fmt: skip
    print("\n".join(measured_lines(report) + [""] + analytic_lines(report["analytic"]["qwen2_5_vl"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
