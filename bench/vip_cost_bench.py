"""What the VIP's size costs: engine wall time with pruning over without, for several glimpse-module
dirs on one base model, interleaved in one process, next to each one's analytic prefill FLOPs ratio.

Per round, in alternating order (ABC, CBA, ...): the unpruned engine and each modules dir's pruned
engine run the same prebuilt batches (held-out rows of the base model's world, seed never used for
training). Each round gives every dir a ratio against that round's unpruned time, so the machine's
drift (2x within minutes on the shared 2-core machine) cancels; the median over rounds is reported,
with every round's ratio. Prefill seconds (the engine's own timer) are reported the same way. The
analytic figure is `workers.training.flops.prefill_report` at the measured mean keep ratio and text length
(ViT + decoder, and on the pruned side the glimpse pass and the VIP).

    python bench/vip_cost_bench.py --modules models/small-qwen2_5_vl-v2-glimpse out/other-glimpse \\
        [--base models/small-qwen2_5_vl-v2] [--rows 64] [--rounds 6] [--out reports/bench/vip_cost.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=REPO / "models" / "small-qwen2_5_vl-v2")
    ap.add_argument("--modules", type=Path, nargs="+", required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=6262)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "vip_cost.json")
    args = ap.parse_args(argv)

    import torch

    from workers.modeling.api import GenerationRequest, SamplingParams
    from workers.modeling.loading import load_engine
    from workers.toyworld import generate_samples, load_world
    from workers.training.flops import prefill_report

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args) -> int:
    import torch

    from workers.modeling.api import GenerationRequest, SamplingParams
    from workers.modeling.loading import load_engine
    from workers.toyworld import generate_samples, load_world
    from workers.training.flops import prefill_report

    names = [str(m) for m in args.modules]
    engines = {name: load_engine(str(args.base), name, device="cpu") for name in names}
    # One image per row, as the analytic prediction below assumes (the world may also have two-image rows).
    samples = list(generate_samples(dataclasses.replace(load_world(args.base, seed=args.seed), two_image_share=0.0), args.rows))
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    batches = {name: [e.build_inputs([GenerationRequest(images=(s.image,), prompt=s.question) for s in samples[i:i + args.batch_size]])
                      for i in range(0, len(samples), args.batch_size)] for name, e in engines.items()}
    keep: dict = {name: [] for name in names}
    text: list = []

    def run(name: str, prune: bool) -> tuple:
        start, prefill = time.perf_counter(), 0.0
        for inputs in batches[name]:
            results = engines[name].generate_from_inputs(inputs, sampling, prune=prune)
            prefill += results[0].prefill_s
            if prune:
                keep[name] += [r.keep_ratio for r in results]
            elif name == names[0]:
                text.extend(r.prompt_tokens - r.visual_tokens for r in results)
        return time.perf_counter() - start, prefill

    run(names[0], False)  # warm-up
    slots = [(None, False)] + [(name, True) for name in names]
    rounds = []
    for r in range(args.rounds):
        order = slots if r % 2 == 0 else slots[::-1]
        times = {slot: run(slot[0] or names[0], slot[1]) for slot in order}
        base_wall, base_prefill = times[(None, False)]
        rounds.append({name: {"wall_ratio": times[(name, True)][0] / base_wall,
                              "prefill_ratio": times[(name, True)][1] / base_prefill} for name in names})
        print(f"round {r}: unpruned {base_wall:.2f} s; " + "; ".join(
            f"{Path(n).name} {rounds[-1][n]['wall_ratio']:.3f}" for n in names), flush=True)

    config = json.loads((args.base / "config.json").read_text())
    results = {}
    for name in names:
        glimpse = json.loads((Path(name) / "config.json").read_text())
        mean_keep = statistics.mean(keep[name])
        analytic = prefill_report(config, int(load_world(args.base, seed=args.seed).image_size), round(statistics.mean(text)),
                                  mean_keep, glimpse.get("reduce_layer", 1), glimpse)
        results[name] = {
            "vip": {"fuse": glimpse["attn_fuse_size"], "cond": glimpse["visual_cond_size"], "levels": len(glimpse["selected_visual_layers"])},
            "mean_keep_ratio": mean_keep,
            "wall_pruned_over_unpruned": statistics.median(r[name]["wall_ratio"] for r in rounds),
            "prefill_pruned_over_unpruned": statistics.median(r[name]["prefill_ratio"] for r in rounds),
            "all_wall_ratios": [r[name]["wall_ratio"] for r in rounds],
            "analytic_prefill_flops_ratio": analytic["prefill_pruned_over_unpruned"],
            "analytic_vip_and_glimpse_flops": analytic["vip_and_glimpse_flops"],
        }
        res = results[name]
        print(f"{name}: VIP {res['vip']['fuse']}/{res['vip']['cond']}, keep {mean_keep:.3f}: wall pruned/unpruned "
              f"{res['wall_pruned_over_unpruned']:.3f}, prefill {res['prefill_pruned_over_unpruned']:.3f} "
              f"(analytic prefill FLOPs {res['analytic_prefill_flops_ratio']:.3f})")
    out = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"modules": names},
           "machine": {"python": platform.python_version(), "torch": torch.__version__}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
