"""Job = YAML -> JobSpec -> plan -> run. Only `run_job` has side effects (Ray, I/O).

The plan (`make_plan`, no Ray, no writes): list the input shards, refuse an output that overlaps the
input, inspect every shard on its own (a bad one is one failed-shard line, the rest go on), compare
each with its record (fingerprint: `pipeline.state`) and with what an interrupted run already staged,
and cut the rows still to compute into work units.

The data path, as Ray Data stages, streaming end to end (no shuffle, nothing returns to the driver but
one small stats row per written part):
  from_items(units) -> read_stage (CPU tasks: rows of one shard, image stage, one internal schema)
  -> GlimpseUDF (actor pool: the model, adaptive batching)
  -> write_stage (CPU tasks: parts under `_staging/`, deterministic names)
The driver counts durable rows per shard and commits a shard (final files + record) as soon as all its
rows are durable; `_summary.json` and (when everything is complete) `_SUCCESS` come last.

Why not Ray Data's own checkpointing (`DataContext.checkpoint_config`): it needs a plan that ends in a
Ray Data write with one id column over the whole dataset (our ids are per-shard and may repeat or be
null, and the output is per-shard files with records and fingerprints), and its filter actor pool
(>= 1 CPU, 1 GiB each) starves 2-CPU nodes next to the model actor (platform notes). Row identity here
is (shard key, row index), which needs neither.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline import inputs, shards, state, storage, writer
from pipeline.images import ImageStageConfig
from pipeline.progress import Progress
from pipeline.resources import READ_TASK_CPUS, WRITE_TASK_CPUS, ActorResources, Cluster, ResourceError
from pipeline.resources import cluster_from_ray_nodes, local_machine, resolve
from pipeline.stages import ReadContext, read_stage, write_stage
from schemas.job import JobSpec, redact_url
from schemas.rows import settings_values

log = logging.getLogger(__name__)
READ_TASK_MEMORY = 256 * 1024**2  # bytes reserved per read/decode task


class RunRefused(RuntimeError):
    """The run must not start (overlapping input/output, output in use)."""


class CouldNotStart(RuntimeError):
    """Planning failed (input unreachable, listing failed): nothing was written."""


class Interrupted(RuntimeError):
    """Ctrl-C: what was durable stays valid; `summary` says how far it got."""

    def __init__(self, summary: dict):
        super().__init__("interrupted")
        self.summary = summary


@dataclass
class ShardPlan:
    info: shards.ShardInfo
    fingerprint: str
    source: dict
    rows: int  # rows of the shard this job processes (input.limit may cut the last one)
    resumed: int  # rows already staged by an interrupted run (not recomputed)
    units: list = field(default_factory=list)
    durable: int = 0  # rows durable so far (resumed + written by this run)

    def __post_init__(self) -> None:
        self.durable = self.resumed

    @property
    def pending(self) -> int:
        return self.rows - self.resumed


@dataclass
class Plan:
    """What a run will do, decided before Ray starts."""

    settings: dict
    generation: str  # shared by runs that continue one another (pipeline.state)
    continues: bool  # this run continues an unfinished earlier one
    todo: list  # ShardPlan
    keys: dict  # url -> key (all listed shards)
    skipped: list = field(default_factory=list)  # keys complete under the same fingerprint
    redo: dict = field(default_factory=dict)  # key -> why its earlier output is not reused
    bad: dict = field(default_factory=dict)  # url -> one-line reason

    @property
    def shards(self) -> list:
        return [sp.info.url for sp in self.todo]

    def describe(self) -> dict:
        return {"shards": [redact_url(u) for u in self.shards], "rows_to_compute": sum(sp.pending for sp in self.todo),
                "rows_resumed": sum(sp.resumed for sp in self.todo), "skipped": self.skipped, "redo": self.redo,
                "bad": {redact_url(u): why for u, why in self.bad.items()}}


def check_ownership(job: JobSpec) -> None:
    if storage.overlaps(job.input.uri, job.output.uri):
        raise RunRefused(f"output.uri {redact_url(job.output.uri)} overlaps input.uri {redact_url(job.input.uri)} "
                         f"(same location, or one inside the other): choose an output outside the input")


def check_model_paths(job: JobSpec) -> dict:
    """The model and modules resolve and are what the job declares (`preflight.check_models`): one line
    before Ray starts instead of a failure in every actor."""
    from pipeline.preflight import PreflightError, check_models

    try:
        return check_models(job)
    except PreflightError as exc:
        raise RunRefused(str(exc)) from None


def check_output(job: JobSpec) -> str:
    from pipeline.preflight import PreflightError, check_output_writable

    try:
        return check_output_writable(job)
    except PreflightError as exc:
        raise RunRefused(str(exc)) from None


def make_plan(job: JobSpec, block_rows: Optional[int] = None) -> Plan:
    """List, check and compare the input shards; no Ray, no writes."""
    check_ownership(job)
    fmt, files = inputs.list_input(job)
    if fmt == "images":
        if not job.input.prompt:
            raise RunRefused(f"input.uri {redact_url(job.input.uri)} is a folder of images: set input.prompt (the question "
                             "asked of every image)")
        root = writer.input_root(job.input.uri, [f["url"] for f in files])
        virtual = inputs.image_shards(job, files, root)
        urls = [v.url for v in virtual]
    else:
        urls = [f["url"] for f in files]
    keys = writer.shard_keys(urls, job.input.uri) if fmt != "images" else {
        v.url: writer.shard_key(v.url, root) for v in virtual}
    settings = state.settings_fingerprint_fields(job)
    records = state.read_records(job.output)
    earlier = state.generation_to_continue(state.read_run_marker(job.output), settings)
    plan = Plan(settings=settings, generation=earlier or uuid.uuid4().hex[:12], continues=earlier is not None,
                todo=[], keys=keys)
    if fmt == "images":
        inspected = [dataclasses.replace(v, key=keys[v.url]) for v in virtual]
    else:
        with ThreadPoolExecutor(max_workers=8) as pool:
            inspected = list(pool.map(lambda u: _inspect(u, keys[u], job, fmt), urls))
    budget = job.input.limit
    for url, result in zip(urls, inspected):
        if isinstance(result, str):
            plan.bad[url] = result
            continue
        rows = result.num_rows if budget is None else min(result.num_rows, budget)
        if budget is not None:
            budget -= rows
        source = state.input_fingerprint(result.size, result.version, rows)
        fingerprint = state.shard_fingerprint(settings, source)
        record = records.get(result.key)
        reusable = job.output.mode == "skip_existing" or (record or {}).get("generation") == plan.generation
        if record and record.get("fingerprint") == fingerprint and record.get("complete") and reusable:
            plan.skipped.append(result.key)
            continue
        if record and job.output.mode == "skip_existing":
            plan.redo[result.key] = ("earlier run left transient failures" if record.get("fingerprint") == fingerprint
                                     else state.what_changed(record, settings, source))
        durable = {r for r in state.durable_rows(job.output, result.key, fingerprint) if r < rows}
        sp = ShardPlan(info=result, fingerprint=fingerprint, source=source, rows=rows, resumed=len(durable))
        sp.units = _units(sp, durable, block_rows or _block_rows(job))
        plan.todo.append(sp)
    _split_first_unit(plan, block_rows or _block_rows(job))
    return plan


def _split_first_unit(plan: Plan, block_rows: int) -> None:
    """The run's first unit is cut to one block (same row groups, read twice), so the first durable
    output waits for one block of model work instead of a whole unit."""
    first = next((sp for sp in plan.todo if sp.units), None)
    if first is None:
        return
    unit = first.units[0]
    rows = unit["wanted"]
    if rows is None:
        span = sum(first.info.row_groups[i] for i in unit["row_groups"])
        rows = list(range(unit["first_row"], unit["first_row"] + span))  # a complete unit: all its rows
    if len(rows) <= block_rows:
        return
    first.units[0:1] = [dict(unit, wanted=rows[:block_rows]), dict(unit, wanted=rows[block_rows:])]


def _inspect(url: str, key: str, job: JobSpec, fmt: str = "parquet"):
    try:
        if fmt == "parquet":
            return shards.inspect_shard(url, key, job.input.columns, job.input.storage)
        return inputs.inspect_manifest(url, key, fmt, job.input.columns, job.input.storage)
    except shards.ShardProblem as exc:
        return str(exc)


def _block_rows(job: JobSpec) -> int:
    return max(4 * job.batching.max_rows, 16)


def _units(sp: ShardPlan, durable: set, block_rows: int) -> list[dict]:
    """Work units: runs of consecutive row groups (about 4 blocks each) with the rows still to do."""
    units, group, first, wanted_all = [], [], 0, []
    for index, start, end in shards.row_group_spans(sp.info):
        end = min(end, sp.rows)
        if start >= end:
            break
        if not group:
            first = start
        group.append(index)
        wanted_all += [r for r in range(start, end) if r not in durable]
        if end - first >= 4 * block_rows:
            units.append(_unit(sp, group, first, wanted_all))
            group, wanted_all = [], []
    if group:
        units.append(_unit(sp, group, first, wanted_all))
    return [u for u in units if u["wanted"] is None or u["wanted"]]


def _unit(sp: ShardPlan, group: list, first: int, wanted: list) -> dict:
    last_row = min(first + sum(sp.info.row_groups[i] for i in group), sp.rows)
    complete = len(wanted) == last_row - first
    info = sp.info
    return {"url": info.url, "key": info.key, "row_groups": list(group), "first_row": first,
            "wanted": None if complete else wanted, "kind": info.kind, "rows": last_row - first,
            "files": list(info.files[first:last_row]), "ids": list(info.ids[first:last_row])}


# ---------------------------------------------------------------------------------------------------
# Ray


def joins_a_cluster(job: JobSpec) -> bool:
    """Whether the run joins a running Ray cluster (resources.ray_address, or RAY_ADDRESS, which `ray job
    submit` sets for the driver) instead of starting a local one."""
    return bool(job.resources.ray_address or os.environ.get("RAY_ADDRESS"))


def start_ray(job: JobSpec) -> None:
    import ray

    if ray.is_initialized():
        return
    res = job.resources
    # Worker output stays in Ray's log files (path logged below), not on the user's terminal: the
    # run's own progress line and one-line errors are what the user reads.
    if joins_a_cluster(job):
        ray.init(address=res.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=res.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    log.info("Ray worker logs: %s", _ray_log_dir())


def known_cluster(job: JobSpec) -> Optional[Cluster]:
    """The nodes the model actors will run on, as far as they are known without starting or joining Ray:
    the connected Ray's, else this machine when the run would start a local Ray; None for a cluster the
    run will join (known once joined). Imports nothing: Ray is connected only if already imported."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return cluster_from_ray_nodes(ray.nodes())
    return None if joins_a_cluster(job) else local_machine(job.resources.ray_num_cpus)


def actor_resources(job: JobSpec, cluster: Cluster) -> ActorResources:
    """`resources` resolved on `cluster`; CouldNotStart (one line) if the cluster can never run them."""
    try:
        return resolve(job.resources, job.model.device, cluster)
    except ResourceError as exc:
        raise CouldNotStart(str(exc)) from None


def describe_resources(job: JobSpec) -> dict:
    """The dry run's view of the model actors: resolved on `known_cluster`, or what the job asks for."""
    cluster = known_cluster(job)
    if cluster is None:
        asked = {k: getattr(job.resources, k) for k in ("min_actors", "max_actors", "num_cpus_per_actor", "num_gpus_per_actor")}
        address = job.resources.ray_address or os.environ.get("RAY_ADDRESS")
        return {**asked, "resolved_against": f"not resolved: the run joins the Ray cluster at {redact_url(address)} "
                "and resolves and checks these there before any work"}
    return {**actor_resources(job, cluster).describe(), "resolved_against": cluster.describe()}


def _ray_log_dir() -> str:
    try:
        import ray

        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 - only a hint for the user
        return "(see Ray's session directory)"


def credential_env(job: JobSpec) -> dict:
    """Values of the credential variables the job names, to hand to Ray workers (which may have
    started before they were set, or on other machines). Never logged or written out."""
    names = set()
    for opts in (job.input.storage, job.output.storage):
        names.update(n for n in (opts.key_env, opts.secret_env, opts.token_env) if n)
    names.update(n for n in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE") if os.environ.get(n))
    return {n: os.environ[n] for n in sorted(names) if os.environ.get(n)}


def build_dataset(job: JobSpec, plan: Plan, run_id: str, actors: ActorResources):
    """The Ray Data plan (lazy): read -> image stage -> model (`actors` sizes its pool) -> staged parts."""
    import ray

    from pipeline.stages import model_stage

    units = [u for sp in plan.todo for u in sp.units]
    env = credential_env(job)
    block_rows = _block_rows(job)
    read = ReadContext(image=ImageStageConfig.from_job(job), storage=job.input.storage, block_rows=block_rows, env=env)
    parts = writer.PartContext(output=job.output, run_id=run_id, fingerprints={sp.info.key: sp.fingerprint for sp in plan.todo})
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    # The memory reservation (besides sizing decode tasks) keeps Ray from fusing the read stage into
    # the model actors: fused, image decoding would run serially with the model.
    ds = ds.map_batches(read_stage, fn_kwargs={"context": read}, batch_size=1, batch_format="pyarrow",
                        num_cpus=READ_TASK_CPUS, memory=READ_TASK_MEMORY)
    ds = model_stage(ds, job, actors, env, block_rows)
    return ds.map_batches(write_stage, fn_kwargs={"context": parts, "env": env}, batch_size=None,
                          batch_format="pyarrow", num_cpus=WRITE_TASK_CPUS)


# ---------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Tally:
    """Driver-side counters of this run (from the write tasks' stats rows)."""

    rows: int = 0
    errors: int = 0
    transient: int = 0
    pad_sum: float = 0.0
    pad_rows: int = 0
    kept_tokens: int = 0
    visual_tokens: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_share: float = 0.0
    kv_use_steps: float = 0.0
    kv_rows: int = 0

    def add(self, row: dict) -> None:
        self.rows += row["rows"]
        self.errors += row["errors"]
        self.transient += row["transient"]
        self.pad_sum += row["pad_sum"]
        self.pad_rows += row["pad_rows"]
        self.kept_tokens += row["kept_tokens"]
        self.visual_tokens += row["visual_tokens"]
        self.output_tokens += row["output_tokens"]
        for name in ("prompt_tokens", "prefill_s", "decode_s", "decode_steps", "decode_share", "kv_use_steps", "kv_rows"):
            setattr(self, name, getattr(self, name) + row[name])

    def batching(self) -> dict:
        """The model stage's batch-level figures of this run (from the per-row shares)."""
        kv_steps = self.decode_steps if self.kv_rows else 0
        return {
            "achieved_concurrency": self.decode_steps / self.decode_share if self.decode_share else None,
            "mean_kv_budget_use": self.kv_use_steps / kv_steps if kv_steps else None,
            "prefill_tokens_per_model_s": self.prompt_tokens / self.prefill_s if self.prefill_s else None,
            "decode_tokens_per_model_s": self.output_tokens / self.decode_s if self.decode_s else None,
            "model_s": self.prefill_s + self.decode_s,
        }


class _Committer:
    """Commits shards in a background thread as they become complete; removes `_SUCCESS` first."""

    def __init__(self, job: JobSpec, plan: Plan, run_id: str):
        self.job, self.plan, self.run_id = job, plan, run_id
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self.futures: dict[str, Future] = {}
        self.settings = settings_values(job)
        self._success_removed = False
        self._results: dict[str, Any] = {}

    def submit(self, sp: ShardPlan) -> None:
        if not self._success_removed:
            storage.remove(storage.join_url(self.job.output.uri, state.SUCCESS_NAME), self.job.output.storage)
            self._success_removed = True
        record = {"source": redact_url(sp.info.url), "fingerprint": sp.fingerprint, "input": sp.source,
                  "settings": self.plan.settings, "generation": self.plan.generation}
        self.futures[sp.info.key] = self.pool.submit(
            writer.commit_shard, self.job.output, sp.info.key, fingerprint=sp.fingerprint, num_rows=sp.rows,
            run_id=self.run_id, record=record, settings=self.settings)

    def results(self) -> dict[str, Any]:
        """Wait for every submitted commit (idempotent); {key: CommitResult}."""
        out = self._results
        for key, future in [(k, f) for k, f in self.futures.items() if k not in out]:
            try:
                out[key] = future.result()
            except Exception as exc:  # noqa: BLE001 - one shard's failed commit is that shard's failure
                log.error("commit of shard %s failed: %s", key, exc, exc_info=True)
                out[key] = writer.CommitResult(key, 0, False, [], writer.RunStats(), problem=f"commit failed: {exc}")
        self.pool.shutdown()
        return out


def run_job(job: JobSpec, progress_stream=None) -> dict[str, Any]:
    """Run a validated job end to end; returns the summary (also written next to the data).

    Raises RunRefused (overlap, output in use, model directory missing), FileNotFoundError (no input),
    CouldNotStart (planning failed, e.g. storage unreachable), Interrupted (Ctrl-C)."""
    start = time.perf_counter()
    check_model_paths(job)
    try:
        plan = make_plan(job)
        if any(sp.pending for sp in plan.todo):
            check_output(job)
    except (RunRefused, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - anything before the first write: the run could not start
        raise CouldNotStart(f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else str(exc)) from exc
    for url, reason in plan.bad.items():
        log.error("shard %s failed: %s", redact_url(url), reason)
    for key, reason in plan.redo.items():
        log.warning("shard %s is redone: %s", key, reason)
    actors = None
    if any(sp.pending for sp in plan.todo):
        # Ray up and the actors sized before anything is written: a request the cluster can never
        # satisfy (a GPU on CPUs, actors that leave no CPU for reads) fails here, not after a silent hang.
        start_ray(job)
        cluster = known_cluster(job)
        actors = actor_resources(job, cluster)
        log.info("model actors: %d-%d, each %g CPU and %g GPU (%s)", actors.min_actors, actors.max_actors,
                 actors.num_cpus, actors.num_gpus, cluster.describe())
    try:
        lease = state.Lease(job.output).acquire()
    except state.OutputBusy as exc:
        raise RunRefused(str(exc)) from None
    committer = _Committer(job, plan, lease.run_id)
    tally = _Tally()
    total = sum(sp.pending for sp in plan.todo)
    progress = Progress(total, stream=progress_stream)
    marker = {"generation": plan.generation, "run_id": lease.run_id, "settings": state.digest(plan.settings),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "finished": False}
    if plan.continues:
        log.info("continuing the unfinished run of generation %s", plan.generation)
    try:
        state.write_run_marker(job.output, marker)
        _finish_earlier_commits(job)
        interrupted = _execute(job, plan, actors, lease.run_id, committer, tally, progress)
        commits = committer.results()
        summary = _summary(job, plan, commits, tally, progress, time.perf_counter() - start, interrupted)
        if interrupted:
            raise Interrupted(summary)
        state.write_run_marker(job.output, dict(marker, finished=True))
        return summary
    finally:
        committer.results()  # a crash still finishes the commits already under way
        lease.release()


def _execute(job: JobSpec, plan: Plan, actors: Optional[ActorResources], run_id: str, committer: "_Committer",
             tally: _Tally, progress: Progress) -> bool:
    """Stream the rows through Ray Data (Ray started, `actors` resolved: None only when nothing is pending),
    committing shards as they complete. True if interrupted."""
    remaining = {sp.info.key: sp for sp in plan.todo}
    for sp in [sp for sp in plan.todo if sp.pending == 0]:
        committer.submit(remaining.pop(sp.info.key))
    if not remaining:
        return False
    try:
        _configure_ray_data(job, actors)
        # prefetch_batches=0: with the default prefetch, a block reaches the driver only when the next
        # one arrives (one block of lag on every commit and on the progress line).
        for stats in build_dataset(job, plan, run_id, actors).iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for row in stats.to_pylist():
                tally.add(row)
                progress.add(row["rows"], row["errors"])
                sp = remaining.get(row["key"])
                if sp is None:
                    continue
                sp.durable += row["rows"]
                if sp.durable >= sp.rows:
                    committer.submit(remaining.pop(row["key"]))
        progress.show(final=True)
    except KeyboardInterrupt:
        return True
    except Exception as exc:
        if _chain_has(exc, "ActorDiedError", "creation task"):  # the actors' constructor raised
            raise CouldNotStart(f"the model stage could not start: {root_cause(exc)}") from exc
        if _chain_has(exc, "GetTimeoutError", "starting actors"):  # wait_for_min_actors_s ran out
            raise CouldNotStart(
                f"the model actors did not start within resources.actor_start_timeout_s={job.resources.actor_start_timeout_s} s "
                f"(each asks for {actors.num_cpus:g} CPU and {actors.num_gpus:g} GPU; the cluster has "
                f"{_cluster_resources()})") from exc
        raise
    return False


def _chain_has(exc: Optional[BaseException], kind: str, text: str) -> bool:
    """Whether `exc` or an exception it was raised from is a `ray.exceptions.<kind>` whose message
    contains `text`."""
    import ray

    wanted = getattr(ray.exceptions, kind)
    while exc is not None:
        if isinstance(exc, wanted) and text in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def root_cause(exc: BaseException) -> str:
    """The innermost 'SomeError: message' line of an exception (Ray wraps worker errors in tracebacks)."""
    import re

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line) and not line.startswith("ray.")]
    if causes:
        return causes[-1].split(": ", 1)[0].rsplit(".", 1)[-1] + ": " + causes[-1].split(": ", 1)[1]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _cluster_resources() -> str:
    import ray

    total = ray.cluster_resources()
    return f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU"


def _finish_earlier_commits(job: JobSpec) -> None:
    """A run killed inside a commit: remove the files it wrote that no record names, and the files a
    written record superseded."""
    out = job.output
    for key in state.pending_keys(out):
        for name in state.abandoned_files(out, key):
            storage.remove(storage.join_url(out.uri, name), out.storage)
        storage.remove(state.pending_url(out, key), out.storage)
    for key, record in state.read_records(out).items():
        for name in record.get("superseded", []):
            storage.remove(storage.join_url(out.uri, name), out.storage)


def _configure_ray_data(job: JobSpec, actors: ActorResources) -> None:
    """Our own progress line instead of Ray's, and an object-store budget that bounds the data in
    flight (a few blocks per model actor) so memory stays flat in the number of rows: without it the
    read stage runs ahead of the model until a fixed share of the whole store is full."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    _quiet_ray_data_console()
    # Reads wait until the model actors are up: on a small node they would otherwise take the CPU
    # the actors need to load the model, and the first durable output comes later, not sooner. A pool
    # that cannot start (no GPU, model load hangs) fails after the timeout instead of waiting forever.
    ctx.wait_for_min_actors_s = job.resources.actor_start_timeout_s
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=in_flight_budget(job, actors.max_actors))


def _quiet_ray_data_console() -> None:
    """Ray Data's own console lines (plan, internal tracebacks) go to its log file only; the run
    prints its progress and one-line errors itself."""
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL)


def in_flight_budget(job: JobSpec, max_actors: int) -> int:
    """Bytes: twice the blocks each model actor holds at once (`resources.blocks_ahead_per_actor`), of
    one-image rows at the largest decoded size, at least 128 MiB (a soft budget: Ray Data still runs one
    task per stage when a block is larger). The second half is read-ahead: with only the actors' own
    blocks (64 MiB on the demo job) the model stage found no row to run 7-8% of the time, measured
    inside the actor's engine loop on 2,000 rows; with room for as many again, 0%."""
    per_row = job.image.max_pixels * 3
    return max(128 * 1024**2, 2 * job.resources.blocks_ahead_per_actor * max_actors * _block_rows(job) * per_row)


def _summary(job, plan, commits, tally, progress, wall_s, interrupted) -> dict[str, Any]:
    records = state.read_records(job.output)
    listed = {key for key in plan.keys.values()}
    totals = writer.RunStats()
    for key in sorted(listed & set(records)):
        totals = totals + writer.RunStats.from_dict(records[key].get("stats", {}))
    incomplete = [{"shard": key, "error": c.problem or f"{records.get(key, {}).get('transient_rows', 0)} row(s) failed "
                   "for a transient reason (a re-run retries them)"} for key, c in commits.items() if not c.complete]
    unfinished = [sp.info.key for sp in plan.todo if sp.info.key not in commits]
    incomplete += [{"shard": key, "error": "not finished (run interrupted or stopped)"} for key in unfinished]
    computed = max(wall_s, 1e-9)
    extra = {
        "shards_failed": [{"shard": redact_url(url), "error": why} for url, why in plan.bad.items()],
        "shards_incomplete": incomplete,
        "shards_processed": len(commits),
        "shards_redone": plan.redo,
        "duplicate_ids": sum(c.duplicate_ids for c in commits.values()),
        "null_ids": sum(c.null_ids for c in commits.values()),
        "duplicate_ids_across_shards": writer.cross_shard_duplicate_ids(
            job.output, {k: records[k] for k in sorted(listed & set(records))}),
        "mean_pad_fraction": tally.pad_sum / tally.pad_rows if tally.pad_rows else None,
        "interrupted": interrupted,
        "this_run": {
            "rows_computed": tally.rows, "rows_resumed": sum(sp.resumed for sp in plan.todo),
            "rows_error": tally.errors, "rows_transient": tally.transient,
            "rows_per_s": tally.rows / computed, "tokens_per_s": tally.output_tokens / computed,
            "first_durable_s": progress.first_durable_s,
            "steady_rows_per_s": progress.steady_rate(),
            "rows_per_s_by_quarter": progress.rate_by_quarter(),
            "batching": tally.batching(),
        },
    }
    if extra["duplicate_ids"] or extra["null_ids"]:
        log.warning("ids: %d duplicate(s) and %d null(s) within shards (rows kept; see the shard records)",
                    extra["duplicate_ids"], extra["null_ids"])
    if extra["duplicate_ids_across_shards"]:
        log.warning("ids: %d id(s) occur in more than one shard (rows kept)", extra["duplicate_ids_across_shards"])
    elif extra["duplicate_ids_across_shards"] is None:
        log.info("ids: the cross-shard duplicate check was skipped (output over 50M rows)")
    summary = writer.build_summary(totals, wall_s, job, shards_total=len(plan.keys), shards_skipped=len(plan.skipped), extra=extra)
    prediction = summary.get("pruning_prediction")
    if prediction and not prediction["pays"]:
        flops = prediction["prefill_flops_ratio"]
        log.warning("pruning can save little on these rows: predicted prefill %s, decode cache %.2f of the unpruned "
                    "model's (visual tokens are %.0f%% of the prompt); its glimpse pass may cost more than it saves",
                    (f"FLOPs {flops:.2f} (ViT and VIP included; decoder token-layers {prediction['prefill_work_ratio']:.2f})"
                     if flops is not None else f"work {prediction['prefill_work_ratio']:.2f}"),
                    prediction["kv_cache_ratio"], 100 * prediction["visual_share_of_prompt"])
    summary["rows_per_s"], summary["tokens_per_s"] = extra["this_run"]["rows_per_s"], extra["this_run"]["tokens_per_s"]
    if job.output.report and not interrupted:
        from pipeline import report

        summary["report_url"] = report.write(job, plan, summary, progress.timeline)
    summary["summary_url"] = writer.write_summary(job.output, summary)
    complete = not plan.bad and not incomplete and not interrupted and all(
        records.get(k, {}).get("complete") for k in listed)
    if complete:
        summary["success_url"] = writer.write_success(job.output)
    return summary
