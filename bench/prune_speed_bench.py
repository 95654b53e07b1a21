"""End-to-end pruning speed: the pipeline on the same rows with `pruning.mode=none` and `glimpse`.

One process, one local Ray runtime, the shipped v2 small model (336 px, 144 visual tokens per image,
pruned after layer 1 of 8), rows from its own world (`world.json`) with a seed never used for training
or tuning. Runs in ABBA order (none, glimpse, glimpse, none, ...) over `--repeats` pairs, each into a
fresh output directory; per run: run_job's wall time and its steady-state rows/s (rows durable between
10% and 90% of the run: the actor start and the tail excluded). Ratios are glimpse / none of the medians,
and of each ABBA pair on its own (`pair_ratios`, with their median, min and max: this machine's noise
shows there; the first run of the first pair is the cold one).

Next to them, the analytic prediction (`workers.training.flops.prefill_report`): prefill FLOPs pruned /
unpruned at the mean keep ratio and mean prompt length the glimpse runs measured (ViT + LM, and on the
pruned side the glimpse pass and the VIP; matmuls only).
Decode is not in that figure: a pruned row also decodes against a shorter cache, so the end-to-end
ratio can be lower (better) than the prefill one, or higher where per-call overheads dominate.

    python bench/prune_speed_bench.py [--rows 400] [--repeats 2] [--modules DIR] [--out reports/bench/prune_speed.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE = REPO / "models" / "small-qwen2_5_vl-v2"
MODULES = REPO / "models" / "small-qwen2_5_vl-v2-glimpse"


def make_inputs(root: Path, rows: int, seed: int) -> Path:
    from workers.toyworld import load_world, write_shards

    out = root / "in"
    write_shards(dataclasses.replace(load_world(BASE, seed=seed), two_image_share=0.0), rows, out, rows_per_shard=100)  # one image per row
    return out


def run_once(inputs: Path, output: Path, mode: str, args) -> dict:
    from pipeline.jobfile import load_job
    from pipeline.run import run_job

    job = load_job(REPO / "jobs" / "demo.yaml", [
        f"input.uri={inputs}", f"output.uri={output}", f"pruning.mode={mode}", f"model.glimpse_modules={args.modules}",
        f"sampling.max_new_tokens={args.max_new_tokens}",
    ])
    start = time.monotonic()
    summary = run_job(job)
    wall = time.monotonic() - start
    run = summary["this_run"]
    return {"mode": mode, "rows": run["rows_computed"], "wall_s": wall, "steady_rows_per_s": run["steady_rows_per_s"],
            "rows_per_s": run["rows_computed"] / wall, "rows_error": summary["rows_error"],
            "mean_keep_ratio": summary["mean_keep_ratio"], "overall_keep_ratio": summary["overall_keep_ratio"],
            "prompt_tokens": summary["prompt_tokens"], "visual_tokens": summary["visual_tokens"],
            "rows_ok": summary["rows_ok"], "output_tokens": summary["output_tokens"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2, help="ABBA pairs")
    ap.add_argument("--seed", type=int, default=6161)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--modules", default=str(MODULES), help="glimpse modules dir (default: the shipped ones)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "prune_speed.json"))
    args = ap.parse_args(argv)

    import ray

    from workers.training.flops import prefill_report

    root = Path(tempfile.mkdtemp(prefix="prune-speed-"))
    inputs = make_inputs(root, args.rows, args.seed)
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False)
    order = []
    for pair in range(args.repeats):
        order += ["none", "glimpse"] if pair % 2 == 0 else ["glimpse", "none"]
    runs = [run_once(inputs, root / f"out-{i}-{mode}", mode, args) for i, mode in enumerate(order)]
    ray.shutdown()

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    glimpse_runs = [r for r in runs if r["mode"] == "glimpse"]
    keep = statistics.mean(r["overall_keep_ratio"] for r in glimpse_runs)
    visual = sum(r["visual_tokens"] for r in glimpse_runs) / max(sum(r["rows_ok"] for r in glimpse_runs), 1)
    text = sum(r["prompt_tokens"] - r["visual_tokens"] for r in glimpse_runs) / max(sum(r["rows_ok"] for r in glimpse_runs), 1)
    config = json.loads((BASE / "config.json").read_text())
    glimpse = json.loads((Path(args.modules) / "config.json").read_text())
    analytic = prefill_report(config, 336, round(text), keep, glimpse.get("reduce_layer", 1), glimpse)
    pairs = [(runs[2 * i], runs[2 * i + 1]) for i in range(args.repeats)]
    by_mode = [{r["mode"]: r for r in pair} for pair in pairs]
    pair_ratios = {key: [p["glimpse"][key] / p["none"][key] for p in by_mode] for key in ("steady_rows_per_s", "wall_s")}
    ratios = {
        "wall_glimpse_over_none": median("glimpse", "wall_s") / median("none", "wall_s"),
        "steady_rows_per_s_glimpse_over_none": median("glimpse", "steady_rows_per_s") / median("none", "steady_rows_per_s"),
        "analytic_prefill_pruned_over_unpruned": analytic["prefill_pruned_over_unpruned"],
        "analytic_rows_per_s_glimpse_over_none": 1 / analytic["prefill_pruned_over_unpruned"],
        "pair_steady_rows_per_s_median": statistics.median(pair_ratios["steady_rows_per_s"]),
        "pair_steady_rows_per_s_min": min(pair_ratios["steady_rows_per_s"]),
        "pair_steady_rows_per_s_max": max(pair_ratios["steady_rows_per_s"]),
        "pair_wall_median": statistics.median(pair_ratios["wall_s"]),
    }
    result = {"config": vars(args), "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                                 "load_avg": os.getloadavg()},
              "runs": runs, "pair_ratios": pair_ratios, "mean_visual_tokens": visual, "mean_text_tokens": text, "analytic": analytic, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for run in runs:
        print(f"{run['mode']:8s} wall {run['wall_s']:7.1f} s  steady {run['steady_rows_per_s'] or 0:6.2f} rows/s  "
              f"keep {run['overall_keep_ratio'] or 1:.3f}  errors {run['rows_error']}")
    for name, value in ratios.items():
        print(f"{name:42s} {value:.3f}")
    print("steady rows/s glimpse/none per pair:", " ".join(f"{v:.3f}" for v in pair_ratios["steady_rows_per_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
