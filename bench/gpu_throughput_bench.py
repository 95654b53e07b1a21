"""GPU throughput benchmark: images/s pruned vs unpruned at equal KV memory, 7B-shaped, bf16.

Issue 9's device benchmark, prepared on CPU so that it runs unchanged on a lent GPU:

  * model: Qwen2.5-VL-7B's shapes with random weights (`engine_bench.cuda_spec`, vocab 152064), bf16,
    once with flash-attention-2 (when importable) and once with SDPA; glimpse modules at the released
    widths, K = 18, fixed keep ratio 0.111 (random modules have no meaningful threshold);
  * workload: `--rows` images of `--image-size` px (896 = 1024 visual tokens), one VQA task
    (`--vqa-tokens`, default 16 new tokens) and one caption task (`--caption-tokens`, default 128); the
    stop tokens' LM-head rows are zeroed (as in engine_bench), so every row generates exactly its length;
  * scheduler: `workers.modeling.scheduler.ContinuousScheduler`, one KV budget for both modes
    (`--kv-fraction` of the free device memory after the model is loaded, the job's
    `batching.kv_memory_fraction`), `--max-rows` high enough that the budget is what binds;
  * per (attention, task): pruned and unpruned on the same rows, in order P U U P over `--repeats`
    rounds after a warm-up; figures are medians.

Reported per run: images/s, achieved concurrency (mean rows per decode step), peak rows, KV-budget
use, peak device memory, and model FLOP utilisation: the analytic matmul FLOPs of the work done (ViT,
decoder prefill with the glimpse pass and VIP, LM head, decode steps with their attention) per second
over the device's bf16 dense peak (`--peak-tflops`, default from the device name: H100/H200 SXM 989).
Ratios: images/s pruned / unpruned per task and attention, concurrency pruned / unpruned.
Targets (issue 9): captions >= 2x images/s pruned vs unpruned; the pruned run >= 50% MFU.

Run on the GPU: `python bench/gpu_throughput_bench.py --out bench/results/gpu_throughput.json` (never
run on a GPU yet; a few minutes on an H100 by estimate). `--quick` runs the same code on CPU with the tiny model in seconds (the smoke test).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import continuous_bench as CB  # noqa: E402 - the workload helpers; it loads engine_bench (EB)

EB = CB.EB
PROMPT_VQA = "What color is the largest shape in the image?"
PROMPT_CAPTION = CB.PROMPT
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0))


def attention_kinds(device: str) -> list:
    if device != "cuda":
        return ["sdpa"]
    from transformers.utils import is_flash_attn_2_available

    return (["flash_attention_2"] if is_flash_attn_2_available() else []) + ["sdpa"]


def build_engine(args, attn: str):
    """engine_bench's engine (7B shapes on cuda, tiny with --quick) with the given attention kernel."""
    setup = EB.Setup(device=args.device, quick=args.quick, batch_size=1, image_size=args.image_size,
                     max_new_tokens=args.caption_tokens, repeats=1, warmup=0, seed=args.seed, threads=None)
    chosen = EB.attn_implementation
    EB.attn_implementation = lambda device: attn
    try:
        engine = EB.build_engine(setup)
    finally:
        EB.attn_implementation = chosen
    return engine


def make_requests(count: int, image_size: int, prompt: str, new_tokens: int, seed: int) -> list:
    return CB.make_requests(count, image_size, [new_tokens] * count, seed, prompt)


# ---------------------------------------------------------------------------------------------------
# Analytic FLOPs of the work a run did


def model_dims(engine):
    text, vision = engine.model.config.text_config, engine.model.config.vision_config
    cfg = engine.modules.config
    dims = EB.DecoderDims("bench model", text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
                          text.num_key_value_heads, text.intermediate_size, cfg.reduce_layer, len(cfg.selected_layers))
    vip = EB.VipDims(vision_hidden=vision.hidden_size, fuse=cfg.attn_fuse_size, cond=cfg.visual_cond_size,
                     levels=len(cfg.selected_visual_layers))
    return dims, vip, text, vision


def vit_flops(vision, visual_tokens: int) -> float:
    """Matmul FLOPs of the Qwen2.5-VL ViT on one image: patches = 4 per visual token; full attention
    in the fullatt blocks, windows of window_size px (112: 8 x 8 patches) elsewhere; SwiGLU MLP; the
    2-layer merger; the patch embedding."""
    patches = 4 * visual_tokens
    d, inter = vision.hidden_size, vision.intermediate_size
    window = min(patches, (getattr(vision, "window_size", 112) // vision.patch_size) ** 2)
    full = set(vision.fullatt_block_indexes)
    total = 0.0
    for block in range(vision.depth):
        span = patches if block in full else window
        total += 2 * patches * 4 * d * d + 6 * patches * d * inter + 4 * patches * span * d
    merged = 4 * d
    total += 2 * visual_tokens * (merged * merged + merged * vision.out_hidden_size)
    patch_values = 3 * vision.temporal_patch_size * vision.patch_size**2
    return total + 2 * patches * patch_values * d  # the patch embedding


def run_flops(engine, results: list, prune: bool) -> float:
    """FLOPs of a run's rows: ViT + decoder prefill (glimpse pass and VIP when pruned) + LM head on the
    last prompt token + every decode step (weights, LM head, attention over the row's cache)."""
    dims, vip, text, vision = model_dims(engine)
    params = dims.num_layers * (2 * dims.hidden * (dims.hidden + dims.kv_heads * dims.head_dim) + 3 * dims.hidden * dims.intermediate)
    head = 2 * dims.hidden * text.vocab_size
    total = 0.0
    for res in results:
        visual, prompt = res.visual_tokens, res.prompt_tokens
        text_tokens = prompt - visual
        f = EB.prefill_flops(dims, vip, visual, text_tokens, EB.KEEP_RATIO)
        total += vit_flops(vision, visual) + (f["pruned_flops"] if prune else f["unpruned_flops"]) + head
        cache = text_tokens + (res.kept_tokens if prune else visual)
        steps = max(res.output_tokens - 1, 0)  # decoder forwards after the prefill; step s attends to cache + s + 1
        attended = steps * cache + steps * (steps + 1) // 2
        total += steps * (2 * params + head) + 4 * dims.num_layers * dims.heads * dims.head_dim * attended
    return total


def peak_tflops(args) -> Optional[float]:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(engine, requests, sampling, budget: int, args, prune: bool) -> dict:
    from workers.modeling.scheduler import ContinuousScheduler, SchedulerConfig, SchedulerStats

    stats = SchedulerStats()
    scheduler = ContinuousScheduler(engine, SchedulerConfig(budget, max_rows=args.max_rows, prefill_tokens=args.prefill_tokens), stats)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(args.device)
    t0 = time.perf_counter()
    results = dict(scheduler.run(requests, sampling, prune=prune))
    _sync(args.device)
    wall = time.perf_counter() - t0
    rows = [results[i] for i in range(len(requests))]
    flops = run_flops(engine, rows, prune)
    return {
        "wall_s": wall, "images_per_s": len(requests) / wall,
        "achieved_concurrency": stats.achieved_concurrency, "peak_rows": stats.peak_rows, "kv_budget_use": stats.kv_budget_use,
        "admissions": stats.admissions, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
        "output_tokens": sum(r.output_tokens for r in rows), "kept_tokens_mean": statistics.mean(r.kept_tokens or 0 for r in rows),
        "visual_tokens_mean": statistics.mean(r.visual_tokens for r in rows),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
        "model_tflops": flops / 1e12, "achieved_tflops_per_s": flops / wall / 1e12,
    }


def bench_attention(args, attn: str) -> dict:
    from workers.modeling.api import SamplingParams
    from workers.modeling.scheduler import default_kv_budget

    engine = build_engine(args, attn)
    budget, source = default_kv_budget(engine.model, args.kv_fraction)
    tasks = {"vqa": (PROMPT_VQA, args.vqa_tokens), "caption": (PROMPT_CAPTION, args.caption_tokens)}
    warm = make_requests(2, args.image_size, PROMPT_VQA, 2, args.seed + 99)
    for prune in (True, False):
        run_once(engine, warm, SamplingParams(max_new_tokens=2), budget, args, prune)
    out = {"attn_implementation": attn, "kv_budget_tokens": budget, "kv_budget_source": source, "tasks": {}}
    peak = peak_tflops(args)
    for task, (prompt, tokens) in tasks.items():
        requests = make_requests(args.rows, args.image_size, prompt, tokens, args.seed)
        sampling = SamplingParams(max_new_tokens=tokens)
        runs = {"pruned": [], "unpruned": []}
        for _ in range(args.repeats):
            for mode in ("pruned", "unpruned", "unpruned", "pruned"):
                runs[mode].append(run_once(engine, requests, sampling, budget, args, mode == "pruned"))
        med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0] if rs[0][k] is not None} for m, rs in runs.items()}
        for m in med:
            med[m]["mfu"] = med[m]["achieved_tflops_per_s"] / peak if peak else None
        out["tasks"][task] = {
            "new_tokens": tokens, "rows": args.rows, "median": med,
            "images_per_s_ratio_pruned_over_unpruned": med["pruned"]["images_per_s"] / med["unpruned"]["images_per_s"],
            "concurrency_ratio_pruned_over_unpruned": med["pruned"]["achieved_concurrency"] / max(med["unpruned"]["achieved_concurrency"], 1e-9),
            "all_ratios": [p["images_per_s"] / u["images_per_s"] for p, u in zip(runs["pruned"], runs["unpruned"])],
        }
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def print_report(result: dict) -> None:
    print(f"device: {result['machine']['device_name']}; peak bf16 {result['peak_tflops']} TFLOP/s; rows {result['config']['rows']} "
          f"x {result['config']['image_size']} px")
    for attn in result["by_attention"]:
        print(f"{attn['attn_implementation']}: KV budget {attn['kv_budget_tokens']} tokens ({attn['kv_budget_source']})")
        for task, t in attn["tasks"].items():
            p, u = t["median"]["pruned"], t["median"]["unpruned"]
            mfu = lambda m: f"{m['mfu']:.2f}" if m.get("mfu") is not None else "n/a"  # noqa: E731
            print(f"  {task:7s} ({t['new_tokens']} tokens): images/s pruned {p['images_per_s']:.2f} unpruned {u['images_per_s']:.2f} "
                  f"ratio {t['images_per_s_ratio_pruned_over_unpruned']:.2f}; concurrency {p['achieved_concurrency']:.1f} / "
                  f"{u['achieved_concurrency']:.1f}; MFU {mfu(p)} / {mfu(u)}; peak GiB "
                  f"{(p.get('peak_memory_bytes') or 0) / 2**30:.1f} / {(u.get('peak_memory_bytes') or 0) / 2**30:.1f}")


def parse_args(argv: Optional[Sequence[str]]):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU, seconds: the smoke test of this script")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--rows", type=int, default=None, help="images per task (default 256, quick 6)")
    ap.add_argument("--image-size", type=int, default=None, help="square side in px (default 896 = 1024 tokens, quick 112)")
    ap.add_argument("--vqa-tokens", type=int, default=None, help="VQA answer length (default 16, quick 3)")
    ap.add_argument("--caption-tokens", type=int, default=None, help="caption length (default 128, quick 8)")
    ap.add_argument("--kv-fraction", type=float, default=0.3, help="KV budget: this share of free device memory")
    ap.add_argument("--max-rows", type=int, default=1024, help="rows decoding at once (high: the budget binds)")
    ap.add_argument("--prefill-tokens", type=int, default=16_384, help="raw tokens per glimpse chunk")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of P U U P")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default from the device name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu_throughput.json")
    args = ap.parse_args(argv)
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cpu" and not args.quick:
        raise SystemExit("the 7B-shaped run needs a GPU; on CPU use --quick (the tiny model)")
    quick = args.quick
    args.rows = args.rows or (6 if quick else 256)
    args.image_size = args.image_size or (112 if quick else 896)
    args.vqa_tokens = args.vqa_tokens or (3 if quick else 16)
    args.caption_tokens = args.caption_tokens or (8 if quick else 128)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"},
        "peak_tflops": peak_tflops(args),
        "by_attention": [bench_attention(args, attn) for attn in attention_kinds(args.device)],
    }
    return CB.finish(result, started, args.out, print_report)


if __name__ == "__main__":
    main()
