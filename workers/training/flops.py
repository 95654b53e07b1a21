"""Analytic prefill FLOPs of a Qwen2.5-VL model directory: vision tower vs language model, and the
prefill ratio when visual tokens are pruned after the reduce layer.

    python -m workers.training.flops --model models/small-qwen2_5_vl-v2 --image-size 336 --text 40 --keep 0.1

Matmul FLOPs only (2 per multiply-add), one image, empty cache:
- vision tower: patch embedding (3 * T * P * P -> D_v per patch), per block q/k/v/o projections
  8 n D_v^2, attention scores and values 4 n w D_v with w = the window's patches (window blocks) or n
  (full-attention blocks), gated MLP 6 n D_v F_v; the merger MLP on n / m^2 merged tokens;
- language model: per layer 2 n D (2 D + 2 kvh hd) projections, causal attention 4 h hd n (n + 1) / 2,
  gated MLP 6 n D F (`bench/engine_bench.layer_flops`, the same formula); the LM head is not counted.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence


def vision_flops(vision: dict, image_size: int) -> float:
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    temporal = vision.get("temporal_patch_size", 2)
    d, ffn = vision["hidden_size"], vision["intermediate_size"]
    side = image_size // patch
    n = side * side
    window = min((vision.get("window_size", image_size) // patch) ** 2, n)
    full = set(vision.get("fullatt_block_indexes", []))
    flops = 2 * n * (3 * temporal * patch * patch) * d
    for block in range(vision["depth"]):
        span = n if block in full else window
        flops += 8 * n * d * d + 4 * n * span * d + 6 * n * d * ffn
    merged, wide = n // merge**2, d * merge**2
    flops += 2 * merged * (wide * wide + wide * vision["out_hidden_size"])
    return float(flops)


def text_flops(text: dict, tokens: int, layers: int | None = None) -> float:
    d, heads, kvh = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
    hd = text.get("head_dim") or d // heads
    per_layer = (2 * tokens * d * (2 * d + 2 * kvh * hd) + 4 * heads * hd * tokens * (tokens + 1) / 2
                 + 6 * tokens * d * text["intermediate_size"])
    return float(per_layer * (text["num_hidden_layers"] if layers is None else layers))


def prefill_report(config: dict, image_size: int, text_tokens: int, keep_ratio: float, reduce_layer: int) -> dict:
    vision, text = config["vision_config"], config["text_config"]
    visual = (image_size // vision["patch_size"] // vision["spatial_merge_size"]) ** 2
    vit = vision_flops(vision, image_size)
    lm = text_flops(text, visual + text_tokens)
    kept = max(1, int(keep_ratio * visual))
    low = reduce_layer + 1
    lm_pruned = (text_flops(text, visual + text_tokens, low)
                 + text_flops(text, kept + text_tokens, text["num_hidden_layers"] - low))
    return {"visual_tokens": visual, "text_tokens": text_tokens, "vit_flops": vit, "lm_flops": lm,
            "vit_share": vit / (vit + lm), "keep_ratio": keep_ratio, "reduce_layer": reduce_layer,
            "lm_pruned_over_unpruned": lm_pruned / lm,
            "prefill_pruned_over_unpruned": (vit + lm_pruned) / (vit + lm)}


def measure(engine, samples, rounds: int = 3, batch_size: int = 16, max_new_tokens: int = 8) -> dict:
    """Wall seconds of `engine` on `samples` with pruning off and on, interleaved `rounds` times; the
    medians, their ratio, the mean keep ratio and the prefill seconds the engine reports (per batch)."""
    import statistics
    import time

    from workers.modeling.api import GenerationRequest, SamplingParams

    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    batches = [engine.build_inputs([GenerationRequest(images=(s.image,), prompt=s.question)
                                    for s in samples[i:i + batch_size]]) for i in range(0, len(samples), batch_size)]
    walls: dict[bool, list[float]] = {False: [], True: []}
    prefill: dict[bool, list[float]] = {False: [], True: []}
    keep, text = [], []
    for _ in range(rounds):
        for prune in (False, True):
            t0, pre = time.perf_counter(), 0.0
            for inputs in batches:
                results = engine.generate_from_inputs(inputs, sampling, prune=prune)
                pre += results[0].prefill_s
                if prune:
                    keep += [r.keep_ratio for r in results]
                    text += [r.prompt_tokens - r.visual_tokens for r in results]
            walls[prune].append(time.perf_counter() - t0)
            prefill[prune].append(pre)
    med = {k: statistics.median(v) for k, v in walls.items()}
    pre = {k: statistics.median(v) for k, v in prefill.items()}
    return {"rows": len(samples), "rounds": rounds, "wall_s_unpruned": med[False], "wall_s_pruned": med[True],
            "wall_ratio": med[True] / med[False], "prefill_s_unpruned": pre[False], "prefill_s_pruned": pre[True],
            "prefill_ratio": pre[True] / pre[False], "mean_keep_ratio": sum(keep) / len(keep),
            "mean_text_tokens": sum(text) / len(text)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.training.flops", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--text", type=int, default=40, help="text tokens of the prompt")
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--reduce-layer", type=int, default=1)
    p.add_argument("--measure-with", type=Path, help="glimpse modules dir: also time the engine, pruning off vs on, "
                   "on --rows held-out rows of the model's world (seed --seed); --keep is then the measured mean")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seed", type=int, default=5152)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    config = json.loads((args.model / "config.json").read_text())
    out = {}
    keep = args.keep
    if args.measure_with:
        import torch

        from workers.modeling.loading import load_engine
        from workers.toyworld import generate_samples, load_world

        torch.set_num_threads(args.threads)
        engine = load_engine(str(args.model), str(args.measure_with), device="cpu")
        samples = list(generate_samples(load_world(args.model, seed=args.seed), args.rows))
        out["measured"] = measure(engine, samples)
        keep = out["measured"]["mean_keep_ratio"]
        args.text = round(out["measured"]["mean_text_tokens"])
    out["analytic"] = prefill_report(config, args.image_size, args.text, keep, args.reduce_layer)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
