"""Durable-pipeline benchmark: streaming writes, flat memory, and what the pipeline costs vs the engine.

One process run, one model, one local Ray runtime:
  1. pipeline on N rows (1x) and on scale*N rows, each with a sampler thread that records the time
     the first part file appears under `_staging/` (time to first durable output), CPU seconds per
     process kind (every 2 s) and, in the first 1x run and the scale*N run only, the Ray object
     store's bytes in use (raylet memory info) and the driver's RSS (psutil), once a second (the
     store query makes every worker report its stats: the later 1x runs, which only time, skip it);
     The scale*N input is `scale` copies of the N-row input's shards (same rows, new shard names);
  2. the engine alone on the N rows of the same data, before the first and after every 1x pipeline run
     (`--pairs` of them: each 1x run's ratio uses the mean rate of the engine runs on either side of it,
     and the reported 1x ratio is the median over the pairs; the scale*N run uses the first two): `GlimpseUDF` (the pipeline's model stage,
     same code, same batch size, the same number of calls in flight) called in-process on image-stage blocks, torch at 1 thread as in the
     actor (Ray gives fractional-CPU actors OMP_NUM_THREADS=1); image decoding excluded, model load
     excluded.
Figures: first durable output as a share of the run's wall time (target < 10%); peak object-store
and driver memory at scale*N over N (target < 1.3: flat in rows); pipeline steady-state rows/s (rows
durable between 10% and 90% of the run, `this_run.steady_rows_per_s`) over engine rows/s (target
>= 0.9). Written to bench/results/durable_bench.json and printed.

Run: `python bench/durable_bench.py [--rows 5000] [--scale 4] [--pairs 1] [--model shipped|tiny]`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_inputs(root: Path, rows: int, rows_per_shard: int) -> Path:
    from workers.toyworld import WorldConfig, write_shards

    out = root / f"in-{rows}"
    write_shards(WorldConfig(seed=77, min_objects=1, max_objects=6), rows, out, rows_per_shard=rows_per_shard)
    return out


def replicate_inputs(small: Path, scale: int) -> Path:
    """`scale` copies of every shard of `small` under new names: the same rows, `scale` times, so the
    engine's rate on `small` is its rate on the large input too (no second engine run needed)."""
    import shutil

    out = small.parent / f"{small.name}-x{scale}"
    out.mkdir()
    for shard in sorted(small.glob("*.parquet")):
        for copy in range(scale):
            shutil.copyfile(shard, out / f"{shard.stem}-copy{copy}.parquet")
    return out


def model_dirs(kind: str, root: Path) -> tuple[str, str]:
    if kind == "shipped":
        return str(REPO / "models" / "small-qwen2_5_vl-v2"), str(REPO / "models" / "small-qwen2_5_vl-v2-glimpse")
    sys.path.insert(0, str(REPO / "tests"))
    from engine_helpers import random_modules

    from workers.modeling.tiny import TinySpec, build_tiny_model, save_tiny_model_dir

    spec = TinySpec(rope_theta=10_000.0)
    base = save_tiny_model_dir(root / "tiny-base", spec, seed=0)
    random_modules(build_tiny_model(spec, seed=0), seed=1).save(root / "tiny-glimpse", base_config=build_tiny_model(spec, seed=0).config.to_dict())
    return str(base), str(root / "tiny-glimpse")


def job_for(inputs: Path, output: Path, models, args):
    from pipeline.jobfile import load_job

    return load_job(REPO / "jobs" / "demo.yaml", [
        f"input.uri={inputs}", f"output.uri={output}", f"model.base={models[0]}", f"model.glimpse_modules={models[1]}",
        f"sampling.max_new_tokens={args.max_new_tokens}", f"batching.max_rows={args.max_rows}", "output.rows_per_file=100000",
    ])


class Sampler(threading.Thread):
    """Polls object-store use, driver RSS and the first staged part while a run goes on."""

    def __init__(self, output: Path, memory: bool = True, every_s: float = 0.25, memory_every_s: float = 1.0,
                 cpu_every_s: float = 2.0):
        super().__init__(daemon=True)
        import psutil

        # What the sampler itself costs is not the pipeline's: the object-store query is an RPC to the
        # raylet, which asks every worker for its stats (4 queries a second cost ~0.04 of a core here),
        # and the CPU scan walks every process. So the store is queried once a second and only in the
        # runs that measure memory (`memory`), the CPU scan runs every 2 s, and the output folder is
        # listed every `every_s` only until the first part appears.
        self.output, self.every_s, self.proc = output, every_s, psutil.Process()
        self.memory, self.memory_every_s, self.cpu_every_s = memory, memory_every_s, cpu_every_s
        self.stop_event = threading.Event()
        self.start_t = time.monotonic()
        self.first_part_s = None
        self.peak_store = 0
        self.peak_rss = 0
        self.cpu = {}  # pid -> [kind, cpu-s at first sight, cpu-s now]
        self.actor_cpu = []  # (t, cpu-s of the model actors)

    def run(self) -> None:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(None) if self.memory else None
        next_memory = next_cpu = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic() - self.start_t
            if self.memory and now >= next_memory:
                next_memory = now + self.memory_every_s
                try:
                    self.peak_store = max(self.peak_store, int(get_memory_info_reply(state).store_stats.object_store_bytes_used))
                except Exception:  # noqa: BLE001 - a missed sample is just missed
                    pass
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            if now >= next_cpu:
                next_cpu = now + self.cpu_every_s
                self._sample_cpu()
            if self.first_part_s is None and (any(self.output.glob("_staging/*/*/*.parquet")) or any(self.output.glob("*.parquet"))):
                self.first_part_s = time.monotonic() - self.start_t
            self.stop_event.wait(self.every_s if self.first_part_s is None else min(self.memory_every_s, self.cpu_every_s))


    def _sample_cpu(self) -> None:
        """CPU seconds per process kind (model actor, read/image tasks, write tasks, driver, Ray's own)."""
        import psutil

        actors = 0.0
        for proc in psutil.process_iter():
            try:
                kind = _kind(proc)
                times = proc.cpu_times()
            except (psutil.Error, OSError):
                continue
            if kind is None:
                continue
            used = times.user + times.system
            entry = self.cpu.setdefault(proc.pid, [kind, used, used])
            if kind != "ray_idle":
                entry[0] = kind  # a pooled worker's kind is the last task seen on it
            entry[2] = used
            if entry[0] == "model_actor":
                actors += used
        self.actor_cpu.append((time.monotonic() - self.start_t, actors))

    def cpu_by_kind(self) -> dict:
        totals: dict = {}
        for kind, first, last in self.cpu.values():
            totals[kind] = totals.get(kind, 0.0) + last - first
        return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}

    def actor_busy(self, t0: float, t1: float) -> Optional[float]:
        """Model-actor CPU seconds per wall second between t0 and t1 (1.0 = one core all the time)."""
        inside = [(t, c) for t, c in self.actor_cpu if t0 <= t <= t1]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def _kind(proc) -> Optional[str]:
    line = " ".join(proc.cmdline())[:300]
    for needle, kind in (("GlimpseUDF", "model_actor"), ("read_stage", "read_image_tasks"), ("write_stage", "write_tasks"),
                         ("IDLE", "ray_idle"), ("raylet", "raylet"), ("gcs_server", "gcs"), ("durable_bench", "driver")):
        if needle in line:
            return kind
    return "ray_other" if "ray" in line else None


def run_pipeline(inputs: Path, output: Path, models, args, memory: bool = True) -> dict:
    from pipeline.run import run_job

    sampler = Sampler(output, memory=memory)
    sampler.start()
    start = time.monotonic()
    summary = run_job(job_for(inputs, output, models, args))
    wall = time.monotonic() - start
    sampler.stop_event.set()
    sampler.join()
    run = summary["this_run"]
    return {
        "rows": run["rows_computed"], "wall_s": wall, "first_durable_s": sampler.first_part_s,
        "first_durable_share": (sampler.first_part_s / wall) if sampler.first_part_s else None,
        "first_durable_s_driver": run["first_durable_s"], "steady_rows_per_s": run["steady_rows_per_s"],
        "rows_per_s_by_quarter": run.get("rows_per_s_by_quarter"), "rows_per_s": run["rows_computed"] / wall,
        "memory_sampled": memory, "peak_object_store_bytes": sampler.peak_store if memory else None,
        "peak_driver_rss_bytes": sampler.peak_rss if memory else None, "rows_error": summary["rows_error"],
        "cpu_s_by_process_kind": sampler.cpu_by_kind(),
        "model_actor_busy_10_90": sampler.actor_busy(0.1 * wall, 0.9 * wall),
        "model_actor_cpu_s_per_row": sampler.cpu_by_kind().get("model_actor", 0.0) / max(run["rows_computed"], 1),
    }


def run_engine(inputs: Path, models, args) -> dict:
    import pyarrow as pa
    import torch

    from pipeline import shards, storage, writer
    from pipeline.images import ImageStageConfig
    from pipeline.run import _block_rows
    from pipeline.stages import to_block
    from workers.generate import GlimpseUDF

    torch.set_num_threads(1)
    job = job_for(inputs, Path(tempfile.mkdtemp()) / "unused", models, args)
    block_rows = _block_rows(job)  # the pipeline's own block size
    urls = storage.list_shards(str(inputs))
    keys = writer.shard_keys(urls, str(inputs))
    config = ImageStageConfig.from_job(job)
    blocks = []
    for url in urls:
        info = shards.inspect_shard(url, keys[url], job.input.columns, job.input.storage)
        blocks += [to_block(b, config) for b in shards.read_rows(url, keys[url], range(len(info.row_groups)), 0, None,
                                                                job.input.storage, block_rows)]
    table = pa.concat_tables(blocks)
    udf = GlimpseUDF(job)
    udf(table.slice(0, min(block_rows, table.num_rows)))  # warm-up
    # As in the actor: `blocks_ahead_per_actor` calls at once (with the continuous scheduler they all
    # feed one running batch; with the static one they take turns).
    from concurrent.futures import ThreadPoolExecutor

    start, cpu_start = time.monotonic(), time.process_time()
    with ThreadPoolExecutor(job.resources.blocks_ahead_per_actor) as pool:
        list(pool.map(udf, [table.slice(offset, block_rows) for offset in range(0, table.num_rows, block_rows)]))
    seconds = time.monotonic() - start
    cpu = time.process_time() - cpu_start
    return {"rows": table.num_rows, "seconds": seconds, "rows_per_s": table.num_rows / seconds,
            "cpu_s_per_row": cpu / table.num_rows}


def combine_engine_runs(before: dict, after: dict) -> dict:
    """The engine is timed before and after the pipeline runs (the machine's speed drifts by 10-15%
    over minutes here); the ratios use the mean of the two rates, and `spread` says how far apart
    they were."""
    rate = (before["rows_per_s"] + after["rows_per_s"]) / 2
    return {"rows": before["rows"], "rows_per_s": rate, "cpu_s_per_row": (before["cpu_s_per_row"] + after["cpu_s_per_row"]) / 2,
            "spread": abs(before["rows_per_s"] - after["rows_per_s"]) / rate}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--scale", type=int, default=4, help="the memory run's input: this many copies of the rows (1: no such run)")
    ap.add_argument("--rows-per-shard", type=int, default=100)
    ap.add_argument("--model", choices=("shipped", "tiny"), default="shipped")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--max-rows", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=1, help="1x pipeline runs, each between two engine runs; the ratio is their median")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "durable_bench.json"))
    args = ap.parse_args(argv)

    import ray
    from ray.data import DataContext

    root = Path(tempfile.mkdtemp(prefix="durable-bench-"))
    models = model_dirs(args.model, root)
    small = make_inputs(root, args.rows, args.rows_per_shard)
    large = replicate_inputs(small, args.scale) if args.scale > 1 else None
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # E P [4x] E P E P E ...: each 1x pipeline run is compared with the mean of the engine runs on either
    # side of it (the machine's speed drifts by 10-15% over minutes here), and Ray is down while the
    # engine runs.
    engine_runs = [run_engine(small, models, args)]
    pipelines, many = [], None
    for pair in range(args.pairs):
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False)
        DataContext.get_current().enable_progress_bars = False
        pipelines.append(run_pipeline(small, root / f"out-1x-{pair}", models, args, memory=pair == 0))
        if pair == 0 and large is not None:
            many = run_pipeline(large, root / f"out-{args.scale}x", models, args)
        ray.shutdown()
        engine_runs.append(run_engine(small, models, args))
    one = pipelines[0]
    engine = combine_engine_runs(engine_runs[0], engine_runs[-1])
    pair_ratios = [(p["steady_rows_per_s"] or 0) / combine_engine_runs(engine_runs[i], engine_runs[i + 1])["rows_per_s"]
                   for i, p in enumerate(pipelines)]
    ratios = {"first_durable_share_1x": one["first_durable_share"],
              "pipeline_steady_over_engine_1x": statistics.median(pair_ratios),
              "actor_cpu_per_row_over_engine_1x": one["model_actor_cpu_s_per_row"] / engine["cpu_s_per_row"]}
    if many is not None:
        ratios.update({
            f"first_durable_share_{args.scale}x": many["first_durable_share"],
            f"object_store_peak_{args.scale}x_over_1x": many["peak_object_store_bytes"] / max(one["peak_object_store_bytes"], 1),
            f"driver_rss_peak_{args.scale}x_over_1x": many["peak_driver_rss_bytes"] / max(one["peak_driver_rss_bytes"], 1),
            f"pipeline_steady_over_engine_{args.scale}x": (many["steady_rows_per_s"] or 0) / combine_engine_runs(
                engine_runs[0], engine_runs[1])["rows_per_s"],
            # Model-actor CPU per row (its start included) over the engine's: above 1, each row costs the
            # actor more CPU than in-process (cores shared with image decoding, Ray's processes).
            f"actor_cpu_per_row_over_engine_{args.scale}x": many["model_actor_cpu_s_per_row"] / engine["cpu_s_per_row"],
        })
    result = {"config": vars(args), "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                                 "load_avg": os.getloadavg()},
              "pipeline_1x": one, "pipeline_1x_runs": pipelines, "pair_ratios_1x": pair_ratios,
              **({f"pipeline_{args.scale}x": many} if many is not None else {}), "engine_1x": engine,
              "engine_runs": engine_runs, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for name, value in ratios.items():
        print(f"{name:40s} {value:.3f}" if value is not None else f"{name:40s} n/a")
    print(json.dumps({k: v for k, v in result.items() if k != "ratios"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
