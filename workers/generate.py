"""The model stage: a Ray Data UDF class that runs the GlimpsePrune engine with adaptive batching.

Input batch (pyarrow): rows after the image stage (`status`, `error`, `visual_tokens`, `_prompt`,
`_images`, `_image_tokens`, passthrough columns). Output: the same rows, same order, plus the model
columns of `schemas.rows.OUTPUT_SCHEMA`. Rows that failed earlier pass through untouched; a batch the
engine cannot run (e.g. an image the processor rejects) turns only its rows into error rows.

Batching inside the actor, `batching.scheduler`:
  * continuous (default; `workers.modeling.scheduler`): the actor runs several calls at once
    (`resources.blocks_ahead_per_actor`) and all of them feed one running batch (`EngineLoop`): rows
    go through the glimpse pass in `max_batch_tokens` chunks and join the decode batch as soon as the
    KV budget (`batching.kv_budget_tokens`, default a share of the free device memory) allows, also
    while the previous block's rows still decode; a row leaves the step it finishes, and a call
    returns when its own rows are done. A step that fails is retried row by row, so only a bad row
    becomes an error row. Per row: prefill_s/decode_s are its shares of the batched work, decode_rows the
    batch size it decoded in, kv_use and pad_fraction the decode batch's budget use and padding.
  * static (`workers.batching`):
  1. the glimpse pass is batched under `batching.max_batch_tokens` raw tokens (prompt + visual);
  2. after pruning, rows are regrouped by retained length and generation batches are packed under
     `batching.max_decode_tokens` (retained length + max_new_tokens per row), so short pruned rows
     do not pay for long ones. Without pruning, step 2 packs by raw length directly.
`pad_fraction` per row is the padding share of the generation batch it ran in.

Heavy imports (torch, transformers) happen in `__init__`, once per actor. A CUDA failure is re-raised
so Ray restarts the actor (its task is retried); any other exception becomes error rows.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import zlib
from concurrent.futures import Future
from typing import Any

import pyarrow as pa

from schemas.job import KEEP_RATIO_MODES, STRATEGY_MODES, JobSpec
from schemas.rows import (IMAGES_COLUMN, KEY_COLUMN, PROMPT_COLUMN, PRUNE_COLUMN, ROW_COLUMN, SAMPLING_COLUMN, STATUS_ERROR, STATUS_OK,
                          decode_frame, one_line)
from workers.batching import pack_by_budget, padding_fraction

log = logging.getLogger(__name__)
MODEL_COLUMNS = ("answer", "kept_tokens", "keep_ratio", "kept_per_image", "kept_mask", "prompt_tokens", "output_tokens",
                 "finish_reason", "prefill_s", "decode_s", "pad_fraction", "decode_rows", "kv_use", "prefill_work_ratio",
                 "prefill_flops_ratio")


def keep_rule_for(job: JobSpec):
    """The pruning strategy of the job as the engine's KeepRule (None = no pruning)."""
    from workers.modeling.keep_rule import KeepRule

    p = job.pruning
    if p.mode == "none":
        return None
    if p.mode in KEEP_RATIO_MODES:
        return KeepRule(fixed_remain_ratio=p.keep_ratio)
    return KeepRule(threshold=p.threshold, max_remain_ratio=p.max_remain_ratio, min_remain_num=p.min_remain_num)


def strategy_for(job: JobSpec):
    """The job's pruning strategy other than GlimpsePrune (`workers.modeling.strategies`), or None."""
    from workers.modeling.strategies import make_strategy

    p = job.pruning
    if p.mode not in STRATEGY_MODES:
        return None
    params = p.model_dump(exclude={"mode", "keep_ratio", "positions"})
    params["reindex"] = p.positions == "contiguous"
    if "stage_fractions" in params:
        params["fractions"] = tuple(params.pop("stage_fractions"))
    return make_strategy(p.mode, **params)


class GlimpseUDF:
    """Loads the model once per actor; `__call__` maps one pyarrow batch."""

    def __init__(self, job: JobSpec, env: dict | None = None):
        import os
        import time

        from workers.modeling.api import SamplingParams

        started = time.perf_counter()

        for name, value in (env or {}).items():  # credentials for object-store model/image URLs
            os.environ.setdefault(name, value)
        from workers.modeling.loading import load_engine

        self.job = job
        rule = keep_rule_for(job)
        strategy = strategy_for(job)
        m = job.model
        self.engine = load_engine(
            m.base, m.glimpse_modules if rule is not None and strategy is None else None, rule=rule, strategy=strategy,
            dtype=m.dtype, attn_implementation=m.attn_implementation, device=m.device,
            storage_options=_storage_options(job),
        )
        if rule is not None and not self.engine.prunes:
            raise ValueError(f"pruning.mode {job.pruning.mode} needs model.glimpse_modules")
        self.engine.prune_layers()  # a strategy layer beyond the model's depth fails here, in one line
        _match_resize(self.engine.processor, job.image.min_pixels, job.image.max_pixels)
        self.engine.system_prompt, self.engine.chat_template = job.chat.system, job.chat.template
        self.engine.check_chat_template()  # a broken template fails here, in one line
        self.metrics = RowMetrics.create(job.name or "job")
        self.sampling = SamplingParams(**job.sampling.model_dump(exclude={"stop"}), stop=tuple(job.sampling.stop))
        self.scheduler = self._scheduler() if job.batching.scheduler == "continuous" else None
        self.loop = EngineLoop(self.scheduler, self.sampling) if self.scheduler is not None else None
        self._static_lock = threading.Lock()  # the static path runs one call at a time
        log.info("model stage ready in %.1f s (%s, pruning %s)", time.perf_counter() - started, m.base, job.pruning.mode)

    def _scheduler(self):
        from workers.modeling.scheduler import ContinuousScheduler, SchedulerConfig, default_kv_budget

        b = self.job.batching
        budget, source = (b.kv_budget_tokens, "the job's batching.kv_budget_tokens") if b.kv_budget_tokens else \
            default_kv_budget(self.engine.model, b.kv_memory_fraction)
        layers = len(self.engine.core.lm.layers)
        log.info("continuous batching: KV budget %d cache tokens (%d per layer; from %s), up to %d rows",
                 budget, budget // layers, source, b.max_rows)
        return ContinuousScheduler(self.engine, SchedulerConfig(budget, max_rows=b.max_rows, prefill_tokens=b.max_batch_tokens))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out: list[dict[str, Any]] = [{} for _ in rows]
        todo = [i for i, r in enumerate(rows) if r.get("status") == STATUS_OK]
        requests = {}
        for i in todo:
            try:
                requests[i] = self._request(rows[i])
            except Exception as exc:  # noqa: BLE001 - e.g. a truncated frame: this row only
                out[i] = {"status": STATUS_ERROR, "error": f"model: {one_line(exc)}"}
        todo = [i for i in todo if i in requests]
        if self.loop is not None:
            self._continuous(todo, requests, out)
            return self._assemble(batch, rows, out)
        with self._static_lock:
            self._static(todo, requests, rows, out)
        return self._assemble(batch, rows, out)

    def _static(self, todo: list, requests: dict, rows: list, out: list) -> None:
        raw = {i: len(rows[i][PROMPT_COLUMN] or "") // 3 + int(rows[i]["visual_tokens"] or 0) for i in todo}
        b = self.job.batching
        if self.engine.prunes:
            from workers.modeling.engine import request_limits

            glimpsed = self._glimpse(todo, requests, raw, out)
            lengths = {i: g[0].length for i, g in glimpsed.items()}
            run = lambda ids: self.engine.generate_from_rows(  # noqa: E731
                [glimpsed[i][0] for i in ids], self.sampling, [glimpsed[i][1] for i in ids], row_seeds=[requests[i].seed for i in ids],
                limits=request_limits([requests[i] for i in ids], self.sampling),
                row_params=[requests[i].sampling for i in ids], return_masks=True)
        else:
            lengths = raw
            run = lambda ids: self.engine.generate([requests[i] for i in ids], self.sampling)  # noqa: E731
        ids = sorted(lengths)
        groups = self._pack([lengths[i] for i in ids], b.max_decode_tokens, extra=self.sampling.max_new_tokens)
        for group in groups:
            members = [ids[k] for k in group]
            pad = padding_fraction([lengths[i] for i in members], [list(range(len(members)))])
            self._guarded(members, out, lambda: run(members), pad)

    def _assemble(self, batch, rows, out) -> pa.Table:
        if self.engine.prunes:
            for o in out:
                if o.get("kept_tokens") is not None and o.get("prompt_tokens"):
                    o["prefill_work_ratio"] = self.engine.prefill_work_ratio(o["prompt_tokens"], o["visual_tokens"], o["kept_tokens"])
                    o["prefill_flops_ratio"] = self.engine.prefill_flops(o["prompt_tokens"], o["visual_tokens"], o["kept_tokens"]).ratio
        table = _assemble(batch, rows, out)
        if self.metrics is not None:
            self.metrics.record(table)
        return table

    def _continuous(self, todo: list, requests: dict, out: list) -> None:
        """The batch's rows through the actor's one running continuous batch (`EngineLoop`): rows of
        every call in flight share it, so a block's rows join while the previous block's still decode.
        A row whose step failed was re-run alone by the loop; if it fails alone it becomes an error row."""
        futures = self.loop.submit([requests[i] for i in todo])
        for i, future in zip(todo, futures):
            try:
                out[i] = _model_values(future.result())
            except Exception as exc:  # noqa: BLE001 - this row only ...
                if _fatal(exc):
                    raise  # ... unless the device broke: the actor must die so Ray retries its tasks
                out[i] = {"status": STATUS_ERROR, "error": f"model: {one_line(exc)}"}

    def _pack(self, lengths: list, budget: int, extra: int = 0) -> list:
        """The batching policy (overridable, e.g. by the benchmark's fixed-row baseline)."""
        return pack_by_budget(lengths, budget, self.job.batching.max_rows, extra=extra)

    def _request(self, row: dict):
        from workers.modeling.api import GenerationRequest
        from workers.modeling.keep_rule import with_row_value

        images = tuple(decode_frame(data) for data in row[IMAGES_COLUMN] or [])
        expected = row.get("visual_tokens")
        own = row.get(PRUNE_COLUMN)
        rule = with_row_value(self.engine.rule, own) if own is not None and self.engine.rule is not None else None
        sampling = self._row_sampling(row)
        return GenerationRequest(images=images, prompt=row[PROMPT_COLUMN],
                                 visual_tokens=int(expected) if expected is not None and images else None,
                                 seed=self._row_seed(row, sampling or self.sampling), keep_rule=rule,
                                 prune_seed=_prune_seed(row), sampling=sampling)

    def _row_sampling(self, row: dict):
        """The row's own SamplingParams (the job's, updated by its input.columns.sampling), or None."""
        own = row.get(SAMPLING_COLUMN)
        if not own:
            return None
        values = json.loads(own)
        if "stop" in values:
            values["stop"] = tuple(values["stop"])
        return dataclasses.replace(self.sampling, **values)

    def _row_seed(self, row: dict, sampling):
        """With a job seed, each row samples from its own seed (job seed, shard key, row number), so its
        answer does not depend on which rows it was batched with, nor on retries."""
        if self.sampling.seed is None or sampling.temperature == 0 or row.get(KEY_COLUMN) is None:
            return None
        return zlib.crc32(f"{self.sampling.seed}:{row[KEY_COLUMN]}:{row.get(ROW_COLUMN)}".encode())

    def _glimpse(self, todo, requests, raw, out) -> dict:
        """Glimpse pass in raw-token batches; returns {row: (GlimpsedRow, seconds per row)}."""
        b = self.job.batching
        glimpsed: dict = {}
        for group in self._pack([raw[i] for i in todo], b.max_batch_tokens):
            members = [todo[k] for k in group]

            def step(members=members):
                reqs = [requests[i] for i in members]
                rules = [r.keep_rule for r in reqs]
                rows, seconds = self.engine.glimpse(self.engine.build_inputs(reqs),
                                                    rules=rules if any(r is not None for r in rules) else None)
                for i, row in zip(members, rows):
                    glimpsed[i] = (row, seconds / len(members))

            self._guarded(members, out, step)
        return glimpsed

    def _guarded(self, members, out, fn, pad_fraction_value=None) -> None:
        try:
            results = fn()
        except Exception as exc:  # noqa: BLE001 - a failed batch becomes error rows ...
            if _fatal(exc):
                raise  # ... but a broken GPU must kill the actor so Ray restarts it
            log.warning("model batch of %d rows failed: %s", len(members), one_line(exc))
            for i in members:
                out[i] = {"status": STATUS_ERROR, "error": f"model: {one_line(exc)}"}
            return
        for i, res in zip(members, results or []):
            out[i] = _model_values(res, pad_fraction_value)


class EngineLoop:
    """The actor's one running continuous batch, stepped by one thread for every call in flight.

    The model stage runs with several calls per actor at once (`resources.blocks_ahead_per_actor`,
    Ray's `max_concurrent_calls_per_actor`): each call decodes its block's images and builds its
    requests in its own thread, hands them to `submit`, and waits for their results. The loop thread
    feeds new rows into the scheduler `Session` between steps, so a block's rows join the decode batch
    while the previous block's are still running: no drain at the end of each block, and no row is
    carried past the call that owns it (if the actor dies, Ray retries every call in flight, and no
    result was returned for a row that was not finished).

    A failed step (e.g. an image the processor rejects in a glimpse chunk) drops the rows that had
    started; each is re-run alone, so only a row that fails by itself gets the error. A CUDA error or
    out-of-memory fails every pending row with it and stops the loop (the actor must be restarted)."""

    def __init__(self, scheduler, sampling):
        self.scheduler, self.sampling = scheduler, sampling
        self.session = scheduler.session(sampling, return_masks=True)
        self._cond = threading.Condition()
        self._incoming: list = []  # (requests, futures) not yet in the session
        self._owners: dict = {}  # session index -> Future
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None

    def submit(self, requests: list) -> list:
        futures = [Future() for _ in requests]
        with self._cond:
            if self._fatal is not None:
                raise self._fatal
            self._incoming.append((requests, futures))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="glimpse-engine-loop", daemon=True)
                self._thread.start()
            self._cond.notify()
        return futures

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self.session.busy:
                    self._cond.wait()
                incoming, self._incoming = self._incoming, []
            for requests, futures in incoming:
                try:
                    self._owners.update(zip(self.session.submit(requests), futures))
                except Exception as exc:  # noqa: BLE001 - requests the scheduler refuses: theirs only
                    for f in futures:
                        f.set_exception(exc)
            try:
                finished = self.session.step()
            except BaseException as exc:  # noqa: BLE001 - handed to the calls that own the rows
                broken = exc if _fatal(exc) or not isinstance(exc, Exception) else self._isolate(exc)
                if broken is not None:
                    self._stop(broken)
                    return
                continue
            for index, result in finished:
                self._owners.pop(index).set_result(result)

    def _isolate(self, exc: Exception) -> BaseException | None:
        """Re-run the rows of a failed step one by one; returns the error if the device broke meanwhile."""
        dropped = self.session.abort()
        log.warning("model step failed (%s); re-running its %d row(s) one by one", one_line(exc), len(dropped))
        for index, request in dropped.items():
            try:
                result = next(iter(self.scheduler.run([request], self.sampling, return_masks=True)))[1]
            except Exception as alone:  # noqa: BLE001 - this row's own failure
                if _fatal(alone):
                    return alone  # its future is still owned: _stop fails it
                self._owners.pop(index).set_exception(alone)
            else:
                self._owners.pop(index).set_result(result)
        return None

    def _stop(self, exc: BaseException) -> None:
        with self._cond:
            self._fatal = exc
            for _requests, futures in self._incoming:
                for f in futures:
                    f.set_exception(exc)
            self._incoming = []
        for future in self._owners.values():
            future.set_exception(exc)
        self._owners.clear()


def _prune_seed(row: dict):
    """A row's seed for a strategy's random choices: its shard and row number (so not its batch)."""
    if row.get(KEY_COLUMN) is None:
        return None
    return zlib.crc32(f"{row[KEY_COLUMN]}:{row.get(ROW_COLUMN)}".encode())


def _fatal(exc: Exception) -> bool:
    return "CUDA" in str(exc) or type(exc).__name__ == "OutOfMemoryError"


def _model_values(res, pad_fraction_value=None) -> dict:
    """The model columns of one result (the continuous scheduler's per-row figures ride in `extra`)."""
    extra = res.extra
    return {
        "answer": res.text, "kept_tokens": res.kept_tokens, "keep_ratio": res.keep_ratio,
        "kept_per_image": res.kept_per_image, "prompt_tokens": res.prompt_tokens,
        "output_tokens": res.output_tokens, "finish_reason": res.finish_reason,
        "prefill_s": res.prefill_s, "decode_s": res.decode_s, "visual_tokens": res.visual_tokens,
        "pad_fraction": extra.get("pad_fraction", pad_fraction_value), "decode_rows": extra.get("decode_rows"),
        "kv_use": extra.get("kv_use"), "kept_mask": pack_mask(res.keep_mask),
    }


class RowMetrics:
    """Counters on the Ray dashboard / Prometheus (`ray.util.metrics`), tagged with the job's name:
    glimpse_batch_rows (by status), glimpse_batch_visual_tokens, glimpse_batch_kept_tokens,
    glimpse_batch_output_tokens. Only inside a Ray worker (None elsewhere)."""

    def __init__(self, job: str):
        from ray.util.metrics import Counter

        tags = ("job",)
        self.tags = {"job": job}
        self.rows = Counter("glimpse_batch_rows", description="Rows through the model stage, by status.", tag_keys=tags + ("status",))
        self.visual = Counter("glimpse_batch_visual_tokens", description="Visual tokens before pruning (ok rows).", tag_keys=tags)
        self.kept = Counter("glimpse_batch_kept_tokens", description="Visual tokens kept after pruning (ok rows).", tag_keys=tags)
        self.output = Counter("glimpse_batch_output_tokens", description="Generated tokens (ok rows).", tag_keys=tags)

    @classmethod
    def create(cls, job: str) -> "RowMetrics | None":
        import sys

        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            return None
        return cls(job)

    def record(self, table: pa.Table) -> None:
        import pyarrow.compute as pc

        ok = pc.equal(table.column("status"), STATUS_OK)
        n_ok = int(pc.sum(ok).as_py() or 0)
        if n_ok:
            self.rows.inc(n_ok, tags={**self.tags, "status": STATUS_OK})
        if table.num_rows - n_ok:
            self.rows.inc(table.num_rows - n_ok, tags={**self.tags, "status": STATUS_ERROR})
        done = table.filter(ok)
        for counter, name in ((self.visual, "visual_tokens"), (self.kept, "kept_tokens"), (self.output, "output_tokens")):
            total = int(pc.sum(done.column(name)).as_py() or 0)
            if total:
                counter.inc(total, tags=self.tags)


def pack_mask(mask) -> "bytes | None":
    """A keep mask [N_v] as bytes, 8 tokens per byte, first token in the highest bit (numpy.packbits)."""
    if mask is None:
        return None
    import numpy as np

    return np.packbits(np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, dtype=bool)).tobytes()


def _assemble(batch: pa.Table, rows: list, out: list) -> pa.Table:
    """Input columns (stage columns dropped) + the model columns, row order unchanged."""
    table = batch.drop_columns([c for c in (PROMPT_COLUMN, IMAGES_COLUMN) if c in batch.column_names])
    status = [o.get("status", r.get("status")) for r, o in zip(rows, out)]
    error = [o.get("error", r.get("error")) for r, o in zip(rows, out)]
    table = table.set_column(table.column_names.index("status"), "status", pa.array(status, pa.string()))
    table = table.set_column(table.column_names.index("error"), "error", pa.array(error, pa.string()))
    types = {"kept_tokens": pa.int32(), "prompt_tokens": pa.int32(), "output_tokens": pa.int32(), "keep_ratio": pa.float64(),
             "prefill_s": pa.float64(), "decode_s": pa.float64(), "pad_fraction": pa.float64(),
             "decode_rows": pa.float64(), "kv_use": pa.float64(), "prefill_work_ratio": pa.float64(), "prefill_flops_ratio": pa.float64(),
             "kept_per_image": pa.list_(pa.int32()), "kept_mask": pa.binary(), "answer": pa.string(), "finish_reason": pa.string()}
    for name in MODEL_COLUMNS:
        table = table.append_column(name, pa.array([o.get(name) for o in out], types[name]))
    return table


def _storage_options(job: JobSpec) -> dict:
    s = job.input.storage
    return {k: v for k, v in {"endpoint_url": s.endpoint_url, "region": s.region, "anonymous": s.anonymous or None}.items() if v}


def _match_resize(processor, min_pixels: int, max_pixels: int) -> None:
    """Make the processor's resize bounds the job's, so images resized by the image stage stay as they
    are (and the model sees the visual tokens the stage counted). transformers 4.x keeps them in
    `min_pixels`/`max_pixels` attributes, 5.x in `size` (a `SizeDict` or a dict) as
    shortest_edge/longest_edge. Raises ValueError if the processor still has other bounds."""
    ip = processor.image_processor
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(ip, name):
            setattr(ip, name, value)
    size = getattr(ip, "size", None)
    if size is not None:
        fields = {k: v for k, v in dict(size).items() if k not in ("min_pixels", "max_pixels")}
        fields.update(shortest_edge=min_pixels, longest_edge=max_pixels)
        ip.size = fields if isinstance(size, dict) else type(size)(**fields)
    got = resize_bounds(processor)
    if got != (min_pixels, max_pixels):
        raise ValueError(f"the image processor keeps resize bounds {got}, not the job's image.min_pixels/max_pixels "
                         f"({min_pixels}, {max_pixels}): visual-token counts would disagree")


def resize_bounds(processor) -> tuple:
    """(min_pixels, max_pixels) the processor resizes to."""
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    lo, hi = size.get("shortest_edge"), size.get("longest_edge")  # dict and SizeDict alike
    return (lo if lo is not None else getattr(ip, "min_pixels", None), hi if hi is not None else getattr(ip, "max_pixels", None))
