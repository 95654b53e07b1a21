"""Pipeline benchmark: retained-token batching vs fixed-row batching, and what the Ray pipeline costs.

Both policies are the static scheduler's (`batching.scheduler=static`); the continuous scheduler is
measured against static batching by bench/continuous_bench.py.

Everything runs on one set of rows and one saved random-weight model, in one process run:

1. Batching policy, same actor code. `GlimpseUDF` (workers/generate.py) is run in-process on the
   image-stage output of the rows, in blocks of the size the pipeline hands it
   (max(4 * max_rows, 16) rows), under two policies:
   * adaptive: GlimpseUDF unchanged. Glimpse pass packed by raw length under
     batching.max_batch_tokens, then rows regrouped by retained length and generation packed under
     batching.max_decode_tokens (`workers.batching.pack_by_budget`), both capped at max_rows.
   * fixed-N: what a naive batch-of-N loop does. Glimpse pass in groups of N rows in input order,
     generation in groups of N rows in input order (`workers.batching.fixed_rows`).
   `BenchUDF` overrides only GlimpseUDF's packing policy (`_pack`, used at both batching points) with
   `fixed_rows` and leaves everything else (request building, engine calls, error rows,
   `pad_fraction`) to GlimpseUDF's own code. The engine
   is wrapped (`RecordingEngine`) to record every glimpse batch (its attention mask: real vs padded
   tokens) and every generation batch (retained lengths). Policies alternate in ABBA order over R
   repeats after a warm-up call each (max_rows rows); medians are reported, ratios are adaptive / fixed.
   Padding fractions (token-weighted over all batches): glimpse = 1 - real / (rows x longest) of the
   processed prompts; generation = the same over retained lengths (what GlimpseUDF's `pad_fraction`
   counts; max_new_tokens excluded). They do not depend on timing.

2. Pipeline vs engine. `pipeline.run.run_job` on a local Ray runtime that the benchmark starts first
   (`ray.init(address="local", num_cpus=4)`; its startup is timed but excluded), run twice ("cold",
   "warm"), interleaved with in-process runs of the adaptive GlimpseUDF on the same rows
   (engine, cold, engine, warm, engine). The pipeline time is run_job's wall time: plan and shard
   checks, a fresh actor pool (worker process, torch import, model load: Ray Data starts new actors
   for each execution, so "warm" pays it too), the read + image stage (CPU tasks, not fused into the
   actor), the model stage, the streamed part writes and per-shard commits, summary (the plan is
   described in `pipeline/run.py`). The engine figure is the model stage alone (model loaded,
   rows already decoded). Overhead = pipeline - engine wall; a fresh Python process that imports the
   project and constructs GlimpseUDF is timed apart (what each actor start costs, minus Ray's worker
   spawn), and the rest is left by difference. The in-process image stage and GlimpseUDF construction
   are timed for reference. The actor gets OMP_NUM_THREADS=1 from Ray (fractional CPUs), so the
   in-process runs use one torch thread too (--threads).

Model: a random-weight Qwen2.5-VL built with TinySpec (text 8 x 256, ViT 4 x 64; --quick: the test
tiny model), saved to a temp dir with random glimpse modules (K = round(2L/3) - 1 as released, VIP
levels = the ViT's full-attention blocks). Pruning keeps tokens with sigmoid(importance) > 0.5, so
keep ratios vary per row, but with random modules they are arbitrary (not what a trained VIP keeps).
The LM-head rows of the stop tokens are zeroed (their logit is exactly 0, never the maximum of the
other random logits), so every row generates max_new_tokens tokens in both policies.
Data: synthetic world rows (`workers.toyworld`), half from a 224 px world and half from a 448 px
world (64 / 256 visual tokens), 1..12 objects, shuffled together, written as Parquet shards.

Output: a table on stdout and JSON (default bench/results/pipeline_bench.json): config, environment,
raw per-repeat figures, medians, ratios. Run: `python bench/pipeline_bench.py [--quick] [--with-ray]`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "pipeline_bench.json"
DEMO_JOB = REPO / "jobs" / "demo.yaml"


@dataclass(frozen=True)
class BenchConfig:
    """Everything the benchmark depends on, resolved from the command line."""

    quick: bool
    rows: int  # input rows
    image_sizes: tuple  # px, square; equally many rows of each
    max_objects: int
    max_new_tokens: int
    max_rows: int  # adaptive: batching.max_rows
    fixed_rows: int  # baseline: rows per glimpse and per generation batch
    max_batch_tokens: int
    max_decode_tokens: int
    threshold: float
    repeats: int
    threads: int  # torch intra-op threads in this process
    seed: int
    with_ray: bool

    @property
    def block_rows(self) -> int:
        """Rows per GlimpseUDF call, as `pipeline.run.build_dataset` sets batch_size."""
        return max(4 * self.max_rows, 16)

    def spec(self):
        from workers.modeling.tiny import TinySpec

        if self.quick:
            return TinySpec()
        # Decoder-heavy like the real model (there the ViT costs ~40% of the decoder per visual token):
        # with a 128-wide ViT, the ViT (which no batching policy changes) took a third of the CPU time.
        return TinySpec(
            vision_depth=4, vision_hidden_size=64, vision_num_heads=2, vision_intermediate_size=128,
            vision_fullatt_block_indexes=(1, 3), text_num_layers=8, text_hidden_size=256, text_num_heads=4,
            text_num_kv_heads=2, text_intermediate_size=704, text_head_dim=64, mrope_section=(8, 12, 12),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Inputs: model directories, shards, job


def glimpse_config(model, cfg: BenchConfig):
    from workers.modeling.glimpse import GlimpseConfig

    text, vision = model.config.text_config, model.config.vision_config
    k = round(2 * text.num_hidden_layers / 3) - 1  # as released: 18 of 28, 23 of 36
    vip = dict(attn_fuse_size=16, visual_cond_size=16, attn_fuse_num_heads=2) if cfg.quick else \
        dict(attn_fuse_size=64, visual_cond_size=128, attn_fuse_num_heads=4)  # fmt: skip
    return GlimpseConfig(
        hidden_size=text.hidden_size, num_attention_heads=text.num_attention_heads,
        num_hidden_layers=text.num_hidden_layers, vision_hidden_size=vision.hidden_size,
        rms_norm_eps=text.rms_norm_eps, selected_layers=(k,), reduce_layer=k,
        selected_visual_layers=tuple(reversed(vision.fullatt_block_indexes)),
        le_layers=tuple(range(text.num_hidden_layers)), reduce_threshold=cfg.threshold, **vip,
    )  # fmt: skip


def save_models(root: Path, cfg: BenchConfig, min_pixels: int, max_pixels: int) -> tuple[Path, Path]:
    """Write (base model dir, glimpse modules dir), as a user would have them on disk."""
    import torch

    from workers.modeling.glimpse import GlimpseModules
    from workers.modeling.tiny import build_processor, build_tiny_model

    spec = cfg.spec()
    model = build_tiny_model(spec, seed=cfg.seed)
    with torch.no_grad():  # stop tokens never win: every row decodes max_new_tokens tokens
        model.lm_head.weight[list(model.generation_config.eos_token_id)] = 0
    model.save_pretrained(root / "base")
    build_processor(min_pixels, max_pixels, spec=spec).save_pretrained(root / "base")
    modules = GlimpseModules(glimpse_config(model, cfg))
    modules.reset_parameters(generator=torch.Generator().manual_seed(cfg.seed + 1))
    modules.save(root / "glimpse", base_config=model.config.to_dict())
    return root / "base", root / "glimpse"


def write_shards(directory: Path, cfg: BenchConfig, shards: int) -> None:
    """Rows from one world per image size, equally many of each, shuffled together, split into shards."""
    import pyarrow.parquet as pq

    from workers.toyworld import WorldConfig, make_sample, samples_to_table

    worlds = [WorldConfig(image_size=s, max_objects=cfg.max_objects, seed=cfg.seed + k) for k, s in enumerate(cfg.image_sizes)]
    picks = [i % len(worlds) for i in range(cfg.rows)]  # an even mix, in random order
    random.Random(cfg.seed).shuffle(picks)
    samples = [make_sample(worlds[k], i) for i, k in enumerate(picks)]  # ids differ by index
    directory.mkdir(parents=True, exist_ok=True)
    per_shard = -(-cfg.rows // shards)
    for shard, start in enumerate(range(0, cfg.rows, per_shard)):
        pq.write_table(samples_to_table(samples[start:start + per_shard]), directory / f"part-{shard:05d}.parquet")


def make_job(cfg: BenchConfig, shard_dir: Path, out_dir: Path, base: Path, glimpse: Path):
    """jobs/demo.yaml with this benchmark's paths, sampling and batching."""
    from pipeline.jobfile import load_job

    return load_job(DEMO_JOB, [
        f"input.uri={shard_dir}", f"output.uri={out_dir}", f"model.base={base}", f"model.glimpse_modules={glimpse}",
        f"pruning.threshold={cfg.threshold}", f"sampling.max_new_tokens={cfg.max_new_tokens}",
        f"batching.max_rows={cfg.max_rows}", f"batching.max_batch_tokens={cfg.max_batch_tokens}",
        f"batching.max_decode_tokens={cfg.max_decode_tokens}", "batching.scheduler=static", "output.mode=overwrite",
    ])  # fmt: skip


def image_stage_blocks(job, shard_dir: Path, block_rows: int) -> tuple[list, float]:
    """The image stage in-process over all rows (input order), cut into GlimpseUDF-sized blocks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.images import ImageStageConfig, decode_batch

    table = pa.concat_tables([pq.read_table(p) for p in sorted(shard_dir.glob("*.parquet"))])
    start = time.perf_counter()
    staged = decode_batch(table, ImageStageConfig.from_job(job))
    seconds = time.perf_counter() - start
    return [staged.slice(s, block_rows) for s in range(0, staged.num_rows, block_rows)], seconds


# ---------------------------------------------------------------------------------------------------
# The two policies, through GlimpseUDF


class RecordingEngine:
    """Forwards to a GlimpseEngine; records the shape of every glimpse and generation batch."""

    def __init__(self, engine):
        self._engine = engine
        self.reset()

    def reset(self) -> None:
        self.glimpse_batches: list = []  # (rows, real tokens, padded slots)
        self.generation_batches: list = []  # retained lengths of the rows
        self.seconds = {"glimpse": 0.0, "generation": 0.0}  # wall, inside the engine calls

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def glimpse(self, inputs, **kwargs):
        mask = inputs.attention_mask  # [B, L] left-padded
        self.glimpse_batches.append((int(mask.shape[0]), int(mask.sum()), int(mask.numel())))
        return self._timed("glimpse", self._engine.glimpse, inputs, **kwargs)

    def generate_from_rows(self, rows, *args, **kwargs):
        self.generation_batches.append([row.length for row in rows])
        return self._timed("generation", self._engine.generate_from_rows, rows, *args, **kwargs)

    def _timed(self, stage: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[stage] += time.perf_counter() - start


def bench_udf_class():
    """BenchUDF is defined on demand: importing GlimpseUDF at module level would import the project
    (and pyarrow) before argument parsing."""
    from workers.batching import fixed_rows
    from workers.generate import GlimpseUDF

    class BenchUDF(GlimpseUDF):
        """GlimpseUDF with a recording engine; with `fixed_rows`, the fixed-row baseline policy."""

        def __init__(self, job, fixed_rows: Optional[int] = None):
            super().__init__(job)
            self.engine = RecordingEngine(self.engine)
            self.fixed_rows = fixed_rows

        def _pack(self, lengths, budget, extra=0):
            if self.fixed_rows is None:
                return super()._pack(lengths, budget, extra)
            return fixed_rows(len(lengths), self.fixed_rows)

    return BenchUDF


def run_policy(udf, blocks: list) -> dict:
    """All blocks through one UDF: wall and CPU seconds, batch padding, per-row results."""
    import pyarrow as pa

    udf.engine.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    table = pa.concat_tables([udf(block) for block in blocks])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    glimpse, generation = udf.engine.glimpse_batches, udf.engine.generation_batches
    rows = table.to_pylist()
    answered = [r for r in rows if r["status"] == "ok" and r["answer"] is not None and (r["output_tokens"] or 0) > 0]
    slots = sum(len(g) * max(g) for g in generation)
    return {
        "wall_s": wall, "cpu_s": cpu, "rows": len(rows), "rows_per_s": len(rows) / wall, "rows_per_cpu_s": len(rows) / cpu,
        "glimpse_s": udf.engine.seconds["glimpse"], "generation_s": udf.engine.seconds["generation"],
        "rows_answered": len(answered),
        "glimpse_batches": len(glimpse), "glimpse_pad_fraction": 1 - sum(b[1] for b in glimpse) / sum(b[2] for b in glimpse),
        "generation_batches": len(generation), "generation_pad_fraction": 1 - sum(map(sum, generation)) / slots,
        "generation_batch_rows": [len(g) for g in generation],
        "keep_ratios": [r["keep_ratio"] for r in rows], "answers": {r["id"]: r["answer"] for r in rows},
    }  # fmt: skip


def measure_batching(job, blocks: list, cfg: BenchConfig) -> tuple[dict, dict]:
    """Both policies, ABBA-interleaved over cfg.repeats after a warm-up call each. Returns the
    per-repeat runs and the UDFs (the adaptive one is reused by the pipeline part)."""
    cls = bench_udf_class()
    start = time.perf_counter()
    udfs = {"adaptive": cls(job)}
    load_s = time.perf_counter() - start
    udfs["fixed"] = cls(job, fixed_rows=cfg.fixed_rows)
    for udf in udfs.values():  # warm-up: first-call costs (allocator, lazy initialisation)
        udf(blocks[0].slice(0, cfg.max_rows))
    runs: dict = {name: [] for name in udfs}
    for r in range(cfg.repeats):
        for name in (("adaptive", "fixed") if r % 2 == 0 else ("fixed", "adaptive")):
            runs[name].append(run_policy(udfs[name], blocks))
    runs["udf_init_s"] = load_s
    return runs, udfs


# ---------------------------------------------------------------------------------------------------
# Pipeline vs engine


def start_ray() -> tuple[float, Optional[str]]:
    """A fresh local Ray runtime (never an existing cluster), loopback only, quiet."""
    import ray
    from ray.data import DataContext

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    start = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    seconds = time.perf_counter() - start
    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = 300
    ctx.enable_progress_bars = False
    threads = ray.get(ray.remote(num_cpus=0.5)(lambda: os.environ.get("OMP_NUM_THREADS")).remote())
    return seconds, threads


def run_pipeline(job) -> dict:
    from pipeline.run import run_job

    start = time.perf_counter()
    summary = run_job(job)
    wall = time.perf_counter() - start
    keys = ("rows_total", "rows_ok", "rows_error", "mean_keep_ratio", "mean_pad_fraction", "wall_s")
    return {"wall_s": wall, "rows_per_s": summary["rows_total"] / wall, "summary": {k: summary.get(k) for k in keys}}


def fresh_process_start_s(job) -> float:
    """Wall seconds for a fresh Python process (one thread, like the actor) to import the project and
    construct GlimpseUDF: what each actor start costs, without Ray's own worker spawn."""
    code = "import sys; from schemas.job import JobSpec; from workers.generate import GlimpseUDF; " \
        "GlimpseUDF(JobSpec.model_validate_json(sys.stdin.read()))"  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], input=job.model_dump_json(), text=True, capture_output=True,
                   check=True, env=env, cwd=REPO)
    return time.perf_counter() - start


def measure_pipeline(job, blocks: list, udf) -> dict:
    """Engine, pipeline (cold), engine, pipeline (warm), engine; Ray started first (timed apart)."""
    import ray

    actor_start_s = fresh_process_start_s(job)
    ray_start_s, actor_threads = start_ray()
    try:
        engine = [run_policy(udf, blocks)]
        pipeline = []
        for _ in ("cold", "warm"):
            pipeline.append(run_pipeline(job))
            engine.append(run_policy(udf, blocks))
    finally:
        ray.shutdown()
    for run in engine:
        run.pop("answers")
    return {"ray_start_s": ray_start_s, "actor_omp_num_threads": actor_threads, "fresh_process_udf_start_s": actor_start_s,
            "engine": engine, "pipeline": pipeline}


# ---------------------------------------------------------------------------------------------------
# Summary and report


def _median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _spread(values: list) -> dict:
    deciles = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
    return {"mean": statistics.fmean(values), "min": min(values), "p10": deciles[0], "median": statistics.median(values),
            "p90": deciles[-1], "max": max(values), "share_kept_all": sum(v == 1.0 for v in values) / len(values)}


def _ratio(a, b) -> Optional[float]:
    return None if a is None or not b else a / b


FIGURES = ("rows_per_s", "rows_per_cpu_s", "wall_s", "cpu_s", "glimpse_s", "generation_s", "glimpse_pad_fraction",
           "generation_pad_fraction", "glimpse_batches", "generation_batches")
TABLE_ROWS = (  # (figure, label, digits) of the batching table
    ("rows_per_s", "rows/s (wall)", 2), ("rows_per_cpu_s", "rows/s (CPU s)", 2),
    ("wall_s", "model stage wall s", 1), ("cpu_s", "model stage CPU s", 1),
    ("glimpse_s", "  in glimpse calls, wall s", 1), ("generation_s", "  in generation calls, wall s", 1),
    ("glimpse_batches", "glimpse batches", 0), ("glimpse_pad_fraction", "glimpse pad fraction", 3),
    ("generation_batches", "generation batches", 0), ("generation_pad_fraction", "generation pad fraction", 3),
)


def summarize_batching(runs: dict, cfg: BenchConfig) -> dict:
    median = {name: {k: _median(r[k] for r in runs[name]) for k in FIGURES} for name in ("adaptive", "fixed")}
    ratios = {k: _ratio(median["adaptive"][k], median["fixed"][k]) for k in FIGURES}
    paired = [a["rows_per_s"] / f["rows_per_s"] for a, f in zip(runs["adaptive"], runs["fixed"])]
    last = {name: runs[name][-1] for name in ("adaptive", "fixed")}
    same = sum(last["adaptive"]["answers"][i] == a for i, a in last["fixed"]["answers"].items())
    keep = [k for k in last["adaptive"]["keep_ratios"] if k is not None]
    for name in ("adaptive", "fixed"):
        for run in runs[name]:
            run.pop("answers")
    return {
        "median": median, "ratios": ratios, "paired_rows_per_s_ratio_median": _median(paired),
        "rows_answered": {name: last[name]["rows_answered"] for name in last}, "rows": cfg.rows,
        "answers_identical": same, "keep_ratio": _spread(keep),
        "udf_init_s": runs["udf_init_s"], "raw": {name: runs[name] for name in ("adaptive", "fixed")},
    }  # fmt: skip


def summarize_pipeline(measured: dict, rows: int) -> dict:
    """Rows/s and ratios; the overhead split is by difference: pipeline wall - engine wall (median) -
    a fresh process's import + model load = Ray Data's scheduling, read, image stage, shuffle, write."""
    engine = _median(r["rows_per_s"] for r in measured["engine"])
    engine_wall = _median(r["wall_s"] for r in measured["engine"])
    runs = dict(zip(("cold", "warm"), measured["pipeline"]))
    return {
        "engine_rows_per_s_median": engine, "engine_wall_s_median": engine_wall,
        "pipeline_rows_per_s": {k: p["rows_per_s"] for k, p in runs.items()},
        "ratio_pipeline_over_engine": {k: _ratio(p["rows_per_s"], engine) for k, p in runs.items()},
        "overhead_s": {k: p["wall_s"] - engine_wall for k, p in runs.items()},
        "overhead_rest_s": {k: p["wall_s"] - engine_wall - measured["fresh_process_udf_start_s"] for k, p in runs.items()},
        "rows": rows, **measured,
    }  # fmt: skip


def environment(load_at_start) -> dict:
    import pyarrow
    import ray
    import torch
    import transformers

    return {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "transformers": transformers.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": load_at_start, "load_average_at_end": _load_average(), "git_commit": _git_commit(),
    }  # fmt: skip


def _load_average() -> Optional[list]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_lines(report: dict) -> list[str]:
    cfg, b, spec = report["config"], report["batching"], report["config"]["model_spec"]
    med, ratio, keep = b["median"], b["ratios"], b["keep_ratio"]
    n = cfg["fixed_rows"]
    lines = [
        f"Pipeline benchmark: {cfg['rows']} rows ({'/'.join(map(str, cfg['image_sizes']))} px mixed, <= {cfg['max_objects']} "
        f"objects), {cfg['max_new_tokens']} new tokens, {cfg['repeats']} repeats, {report['environment']['torch_threads']} "
        f"torch thread(s), load {report['environment']['load_average_at_start']}",
        f"model: text {spec['text_num_layers']} x {spec['text_hidden_size']}, ViT {spec['vision_depth']} x "
        f"{spec['vision_hidden_size']}, K={cfg['glimpse']['reduce_layer']}; random glimpse modules, threshold "
        f"{cfg['threshold']}: keep ratio mean {keep['mean']:.3f} (min {keep['min']:.3f}, p10 {keep['p10']:.3f}, median "
        f"{keep['median']:.3f}, p90 {keep['p90']:.3f}, max {keep['max']:.3f}; {keep['share_kept_all']:.0%} of rows keep all)",
        "",
        f"1. batching (GlimpseUDF in-process, blocks of {cfg['block_rows']} rows; medians)",
        f"{'':30}{'adaptive':>12}{f'fixed-{n}':>12}{'adapt/fixed':>13}",
    ]
    for key, label, digits in TABLE_ROWS:
        lines.append(f"{label:30}{_f(med['adaptive'][key], digits):>12}{_f(med['fixed'][key], digits):>12}{_f(ratio[key], 3):>13}")
    lines.append(f"paired per-repeat rows/s ratio (median): {_f(b['paired_rows_per_s_ratio_median'], 3)}; answered "
                 f"{b['rows_answered']['adaptive']}/{b['rows']} and {b['rows_answered']['fixed']}/{b['rows']}; identical "
                 f"answers {b['answers_identical']}/{b['rows']}; GlimpseUDF init (model load) {b['udf_init_s']:.1f} s")
    return lines + pipeline_lines(report.get("pipeline"), report.get("image_stage_s"))


def pipeline_lines(p: Optional[dict], image_stage_s: Optional[float]) -> list[str]:
    if p is None:
        return ["", "2. pipeline: skipped (--quick without --with-ray, or --no-ray)"]
    cold, warm = p["pipeline"]
    lines = [
        "",
        f"2. pipeline (run_job, local Ray, 4 logical CPUs; Ray start {p['ray_start_s']:.1f} s excluded; actor "
        f"OMP_NUM_THREADS={p['actor_omp_num_threads']})",
        f"{'':30}{'rows/s':>10}{'wall s':>10}{'/ engine':>10}{'overhead s':>12}",
        f"{'engine alone (median of 3)':30}{_f(p['engine_rows_per_s_median']):>10}{_f(p['engine_wall_s_median'], 1):>10}"
        f"{'1.000':>10}{'-':>12}",
    ]
    for name, run in (("cold", cold), ("warm", warm)):
        lines.append(f"{'pipeline, ' + name:30}{_f(run['rows_per_s']):>10}{_f(run['wall_s'], 1):>10}"
                     f"{_f(p['ratio_pipeline_over_engine'][name], 3):>10}{_f(p['overhead_s'][name], 1):>12}")
    return lines + [
        f"overhead = pipeline - engine wall; of it: fresh process import + GlimpseUDF init (actor start) "
        f"{p['fresh_process_udf_start_s']:.1f} s, rest (Ray Data scheduling, read, image stage, shuffle, write) "
        f"{_f(p['overhead_rest_s']['cold'], 1)} / {_f(p['overhead_rest_s']['warm'], 1)} s",
        f"pipeline rows ok {cold['summary']['rows_ok']}/{p['rows']} and {warm['summary']['rows_ok']}/{p['rows']}; "
        f"in-process image stage alone {_f(image_stage_s, 1)} s for all rows",
    ]


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 rows, 1 repeat, no Ray: seconds (smoke test)")
    parser.add_argument("--with-ray", action="store_true", help="run the pipeline part in --quick mode too")
    parser.add_argument("--no-ray", action="store_true", help="skip the pipeline part")
    parser.add_argument("--rows", type=int, default=None, help="input rows (default 64, quick 8)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per policy (default 3, quick 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per row (default 16, quick 4)")
    parser.add_argument("--max-rows", type=int, default=None, help="adaptive batching.max_rows (default 8, quick 4)")
    parser.add_argument("--fixed-rows", type=int, default=None, help="baseline rows per batch (default = --max-rows)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="adaptive glimpse budget (raw tokens)")
    parser.add_argument("--max-decode-tokens", type=int, default=8192, help="adaptive generation budget (tokens)")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep iff sigmoid(importance) > threshold")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (the actor gets 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    q = args.quick
    max_rows = args.max_rows or (4 if q else 8)
    cfg = BenchConfig(
        quick=q, rows=args.rows or (8 if q else 64), image_sizes=(224, 448), max_objects=12,
        max_new_tokens=args.max_new_tokens or (4 if q else 16), max_rows=max_rows, fixed_rows=args.fixed_rows or max_rows,
        max_batch_tokens=args.max_batch_tokens, max_decode_tokens=args.max_decode_tokens, threshold=args.threshold,
        repeats=args.repeats or (1 if q else 3), threads=args.threads, seed=args.seed,
        with_ray=not args.no_ray and (args.with_ray or not q),
    )  # fmt: skip
    if min(cfg.rows, cfg.repeats, cfg.max_rows, cfg.fixed_rows, cfg.max_new_tokens, cfg.threads) < 1:
        raise SystemExit(f"invalid sizes: {cfg}")
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import torch

    args = parse_args(argv)
    cfg, out = resolve_config(args), args.out
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline_bench_") as tmp:
            report = run(cfg, Path(tmp))
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process by the smoke test
    print("\n".join(report_lines(report)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return report


def run(cfg: BenchConfig, tmp: Path) -> dict:
    load_at_start = _load_average()
    write_shards(tmp / "in", cfg, shards=1 if cfg.quick else 2)
    job = make_job(cfg, tmp / "in", tmp / "out", tmp / "model" / "base", tmp / "model" / "glimpse")
    save_models(tmp / "model", cfg, job.image.min_pixels, job.image.max_pixels)
    blocks, image_stage_s = image_stage_blocks(job, tmp / "in", cfg.block_rows)
    runs, udfs = measure_batching(job, blocks, cfg)
    batching = summarize_batching(runs, cfg)
    pipeline = summarize_pipeline(measure_pipeline(job, blocks, udfs["adaptive"]), cfg.rows) if cfg.with_ray else None
    return {
        "config": {**asdict(cfg), "block_rows": cfg.block_rows, "model_spec": asdict(cfg.spec()),
                   "glimpse": udfs["adaptive"].engine.modules.config.gp_fields(), "job": job.to_manifest()},
        "environment": environment(load_at_start),
        "image_stage_s": image_stage_s,
        "batching": batching,
        "pipeline": pipeline,
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
