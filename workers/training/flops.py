"""Analytic prefill FLOPs of a Qwen2.5-VL model directory: vision tower vs language model, and the
prefill ratio when visual tokens are pruned after the reduce layer (with the glimpse pass and the VIP
when the glimpse modules' config is given).

    python -m workers.training.flops --model models/small-qwen2_5_vl-v2 --image-size 336 --text 40 --keep 0.1 \
        [--modules models/small-qwen2_5_vl-v2-glimpse]

The formulas (matmul FLOPs only, 2 per multiply-add, one image, empty cache) are `workers.modeling.flops`,
shared with the engine's per-row prediction and `bench/engine_bench.py`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from workers.modeling import flops as F


def vision_flops(vision: dict, image_size: int) -> float:
    dims = F.VisionDims.from_config(vision)
    side = image_size // dims.patch
    return F.vision_flops(dims, side, side)


def text_flops(text: dict, tokens: int, layers: int | None = None) -> float:
    return F.text_flops(F.TextDims.from_config(text), tokens, layers)


def prefill_report(config: dict, image_size: int, text_tokens: int, keep_ratio: float, reduce_layer: int,
                   glimpse: Optional[Mapping] = None) -> dict:
    """One square image of `image_size` px and `text_tokens` text tokens, pruned after `reduce_layer` to
    max(1, floor(keep_ratio x N)) visual tokens. `glimpse`: the modules' config.json (adds the glimpse
    pass and the VIP to the pruned side, as the engine runs them)."""
    vision, text = F.VisionDims.from_config(config["vision_config"]), F.TextDims.from_config(config["text_config"])
    side = image_size // vision.patch
    visual = (side // vision.merge) ** 2
    vit = F.vision_flops(vision, side, side)
    lm = F.text_flops(text, visual + text_tokens)
    kept = max(1, int(keep_ratio * visual))
    low = reduce_layer + 1
    lm_pruned = (F.text_flops(text, visual + text_tokens + (1 if glimpse else 0), low)
                 + F.text_flops(text, kept + text_tokens, text.layers - low))
    vip = 0.0
    if glimpse:
        dims = F.VipDims.from_glimpse_config(glimpse, vision_hidden=vision.hidden, heads=text.heads)
        vip = F.vip_flops(dims, visual) + F.glimpse_extra_flops(text, reduce_layer, len(glimpse["selected_layers"]), visual)
    return {"visual_tokens": visual, "text_tokens": text_tokens, "vit_flops": vit, "lm_flops": lm,
            "vit_share": vit / (vit + lm), "keep_ratio": keep_ratio, "reduce_layer": reduce_layer,
            "vip_and_glimpse_flops": vip, "lm_pruned_over_unpruned": lm_pruned / lm,
            "prefill_pruned_over_unpruned": (vit + lm_pruned + vip) / (vit + lm)}


def measure(engine, samples, rounds: int = 3, batch_size: int = 16, max_new_tokens: int = 8) -> dict:
    """Wall seconds of `engine` on `samples` with pruning off and on, interleaved `rounds` times; the
    medians, their ratio, the mean keep ratio and the prefill seconds the engine reports (per batch)."""
    import statistics
    import time

    from workers.modeling.api import GenerationRequest, SamplingParams
    from workers.toyworld import row_images

    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    batches = [engine.build_inputs([GenerationRequest(images=row_images(s), prompt=s.question)
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
    p.add_argument("--modules", type=Path, help="glimpse modules dir: count the glimpse pass and the VIP")
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
    modules = args.modules or args.measure_with
    glimpse = json.loads((modules / "config.json").read_text()) if modules else None
    out["analytic"] = prefill_report(config, args.image_size, args.text, keep, args.reduce_layer, glimpse)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
