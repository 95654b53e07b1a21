"""What the project owns under `output.uri`: staged parts, shard records, the lease, commits.

Layout (all names deterministic; names starting with '_' are hidden from Parquet dataset readers):
  {key}-{run}-{chunk:05d}.parquet               committed rows of input shard `key` (listed in its record)
  _shards/{key}.json                             the shard's record: fingerprint, files, stats, complete
  _shards/{key}.pending                          files a commit is writing (intent, removed after it)
  _staging/{key}/{fp}/{first:010d}-{last:010d}.parquet
                                                 durable, not yet committed rows (row range in the name,
                                                 so a retried write task overwrites, never duplicates)
  _lease.json                                    the run that owns the output now
  _run.json                                      the latest run: generation, settings, finished or not
  _summary.json, _SUCCESS

Invariants:
  - Rows reach `_staging` while the job runs (streaming). A shard is committed when every one of its
    rows is durable there: its final files are written under a new run-specific name, then the record
    (one atomic object) is replaced, then the files the previous record listed are deleted. Until the
    record is replaced the previous output is untouched, so a failed or killed run never loses it.
  - Only files named in the project's own records (and its `_staging/`) are ever deleted.
  - A shard's fingerprint = its input's size + change token and the settings that change answers;
    staged parts are only reused under the same fingerprint, and `skip_existing` redoes a shard
    whose recorded fingerprint differs (and says which part changed).
  - A run that did not finish (killed, Ctrl-C, crashed) is continued by the next run of the same
    settings, in either output mode: its committed shards and staged rows are kept, not recomputed
    (`_run.json` carries the "generation" that successive runs continuing one another share; shard
    records name the generation that committed them). An `overwrite` run after a FINISHED run redoes
    everything.
  - Exactly one run owns an output (`_lease.json`, created with a conditional put). Writers of an
    earlier, killed run check the lease before each part and stop, so they cannot touch a new run's
    output. A lease whose holder is dead (same host, pid gone), silent (no heartbeat for
    `LEASE_TTL_S`) or an ended run of this same process (its removal failed) is taken over; release
    waits for a heartbeat under way, so a late heartbeat cannot recreate a released lease.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from schemas.job import JobSpec, OutputSpec, StorageOptions, redact_url
from schemas.rows import ROW_COLUMN, TRANSIENT_COLUMN

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
RUN_NAME = "_run.json"
RECORDS_DIR = "_shards"
STAGING_DIR = "_staging"
SUCCESS_NAME = "_SUCCESS"
SUMMARY_NAME = "_summary.json"
LEASE_TTL_S = 120.0
HEARTBEAT_S = 15.0
_PART = re.compile(r"^(\d{10})-(\d{10})\.parquet$")


# ---------------------------------------------------------------------------------------------------
# Fingerprints


def settings_fingerprint_fields(job: JobSpec) -> dict[str, Any]:
    """The job settings that change a row's answer (what `skip_existing` compares)."""
    return {
        "model": {"base": redact_url(job.model.base), "glimpse_modules": redact_url(job.model.glimpse_modules), "dtype": job.model.dtype,
                  "attn_implementation": job.model.attn_implementation},
        "pruning": job.pruning.model_dump(mode="json"),
        "prompt": job.input.prompt,
        "columns": _without_new_defaults(job.input.columns.model_dump(mode="json"), {"sampling": None}),
        "sampling": _without_new_defaults(job.sampling.model_dump(mode="json"), {"top_k": 0, "repetition_penalty": 1.0, "stop": []}),
        "image": job.image.model_dump(mode="json"),
        "limit": job.input.limit,
        **({"chat": job.chat.model_dump(mode="json", exclude={"template_file"})} if job.chat.system or job.chat.template else {}),
    }


def _without_new_defaults(values: dict, defaults: dict) -> dict:
    """Settings added after outputs were first written leave the fingerprint unchanged at their defaults,
    so upgrading does not make skip_existing redo finished shards."""
    return {k: v for k, v in values.items() if not (k in defaults and v == defaults[k])}


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_fingerprint(size: Optional[int], version: Optional[str], num_rows: int) -> dict[str, Any]:
    return {"size": size, "version": version, "rows": num_rows}


def shard_fingerprint(settings: Mapping[str, Any], source: Mapping[str, Any]) -> str:
    return digest({"settings": settings, "input": source})


def what_changed(record: Mapping[str, Any], settings: Mapping[str, Any], source: Mapping[str, Any]) -> str:
    """'input (size/version)' or 'settings: sampling.max_new_tokens, ...' for the log line."""
    if record.get("input") != dict(source):
        return "input changed (size or version)"
    old = record.get("settings") or {}
    keys = []
    for section in sorted(set(old) | set(settings)):
        a, b = old.get(section), settings.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            keys.append(section)
    return "settings changed: " + (", ".join(keys) or "unknown")


# ---------------------------------------------------------------------------------------------------
# The run marker


def read_run_marker(output: OutputSpec) -> Optional[dict]:
    try:
        return json.loads(storage.read_text(storage.join_url(output.uri, RUN_NAME), output.storage))
    except FileNotFoundError:
        return None


def write_run_marker(output: OutputSpec, marker: Mapping[str, Any]) -> None:
    storage.write_text(storage.join_url(output.uri, RUN_NAME), json.dumps(marker, indent=1, default=str), output.storage)


def generation_to_continue(marker: Optional[Mapping[str, Any]], settings: Mapping[str, Any]) -> Optional[str]:
    """The generation of an unfinished earlier run with the same settings, if any."""
    if marker and not marker.get("finished") and marker.get("settings") == digest(settings):
        return marker.get("generation")
    return None


# ---------------------------------------------------------------------------------------------------
# Records (one per committed shard)


def record_url(output: OutputSpec, key: str) -> str:
    return storage.join_url(output.uri, RECORDS_DIR, f"{key}.json")


def pending_url(output: OutputSpec, key: str) -> str:
    """Files a commit of `key` is about to write (removed once its record names them)."""
    return storage.join_url(output.uri, RECORDS_DIR, f"{key}.pending")


def abandoned_files(output: OutputSpec, key: str) -> list[str]:
    """Final files an interrupted commit wrote that the shard's record does not name."""
    try:
        pending = json.loads(storage.read_text(pending_url(output, key), output.storage))
    except FileNotFoundError:
        return []
    named = set((read_record(output, key) or {}).get("files", []))
    return [name for name in pending.get("files", []) if name not in named]


def pending_keys(output: OutputSpec) -> list[str]:
    urls = storage.glob(storage.join_url(output.uri, RECORDS_DIR, "*.pending"), output.storage)
    return [posixpath.basename(u)[: -len(".pending")] for u in urls]


def read_record(output: OutputSpec, key: str) -> Optional[dict]:
    url = record_url(output, key)
    try:
        return json.loads(storage.read_text(url, output.storage))
    except FileNotFoundError:
        return None


def read_records(output: OutputSpec) -> dict[str, dict]:
    out = {}
    for url in storage.glob(storage.join_url(output.uri, RECORDS_DIR, "*.json"), output.storage):
        key = posixpath.basename(url)[: -len(".json")]
        record = read_record(output, key)
        if record is not None:
            out[key] = record
    return out


# ---------------------------------------------------------------------------------------------------
# Staging


def staging_dir(output: OutputSpec, key: str, fingerprint: Optional[str] = None) -> str:
    parts = [STAGING_DIR, key] + ([fingerprint] if fingerprint else [])
    return storage.join_url(output.uri, *parts)


def part_url(output: OutputSpec, key: str, fingerprint: str, first: int, last: int) -> str:
    return storage.join_url(staging_dir(output, key, fingerprint), f"{first:010d}-{last:010d}.parquet")


def staged_fingerprints(output: OutputSpec, key: str) -> list[str]:
    """Fingerprint folders under a shard's staging folder."""
    fs, path = storage.fsspec_filesystem(staging_dir(output, key), output.storage)
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")


def staged_parts(output: OutputSpec, key: str, fingerprint: str) -> list[str]:
    urls = storage.glob(storage.join_url(staging_dir(output, key, fingerprint), "*.parquet"), output.storage)
    return [u for u in urls if _PART.match(posixpath.basename(u))]


def durable_rows(output: OutputSpec, key: str, fingerprint: str) -> set[int]:
    """Shard rows already staged under this fingerprint that need no recomputation (rows that failed
    for a transient reason are not durable: a re-run retries them)."""
    done: set[int] = set()
    for url in staged_parts(output, key, fingerprint):
        fs, path = storage.pyarrow_filesystem(url, output.storage)
        table = pq.read_table(path, filesystem=fs, columns=[ROW_COLUMN, TRANSIENT_COLUMN])
        done.update(r for r, t in zip(table.column(ROW_COLUMN).to_pylist(), table.column(TRANSIENT_COLUMN).to_pylist()) if not t)
    return done


def merge_parts(tables: Iterable[pa.Table]) -> pa.Table:
    """All staged rows of one shard, one row per `_row`, sorted: a row that succeeded (or failed
    permanently) wins over a transient failure of the same row; otherwise the first one seen."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({})
    merged = pa.concat_tables(tables, promote_options="permissive")
    order = pc.sort_indices(merged, sort_keys=[(ROW_COLUMN, "ascending"), (TRANSIENT_COLUMN, "ascending")])
    merged = merged.take(order)
    rows = merged.column(ROW_COLUMN).to_numpy()
    first = [0] + [i for i in range(1, len(rows)) if rows[i] != rows[i - 1]]
    return merged.take(pa.array(first, pa.int64()))


# ---------------------------------------------------------------------------------------------------
# The lease


class OutputBusy(RuntimeError):
    """Another live run owns the output."""


_HELD: set = set()  # run ids of the leases this process holds now


@dataclass
class Lease:
    """Ownership of one output location for one run (see module docstring)."""

    output: OutputSpec
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6])
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: Optional[threading.Thread] = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return storage.join_url(self.output.uri, LEASE_NAME)

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time()}).encode()

    def acquire(self) -> "Lease":
        for _ in range(2):
            if storage.put_if_absent(self.url, self._body(), self.output.storage):
                _HELD.add(self.run_id)
                self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = self.holder()
            if holder is None:
                continue
            why = _stale(holder)
            if why is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise OutputBusy(
                    f"output {redact_url(self.output.uri)} is in use by run {holder.get('run_id')} "
                    f"(pid {holder.get('pid')} on {holder.get('host')}, heartbeat {age:.0f} s ago); "
                    f"wait for it, or remove {LEASE_NAME} there if that run is gone")
            log.warning("taking over the lease of run %s (%s)", holder.get("run_id"), why)
            storage.remove(self.url, self.output.storage)
        raise OutputBusy(f"could not take the lease on {redact_url(self.output.uri)} (another run raced for it)")

    def holder(self) -> Optional[dict]:
        try:
            return json.loads(storage.read_text(self.url, self.output.storage))
        except FileNotFoundError:
            return None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder = self.holder()
                if holder is None or holder.get("run_id") != self.run_id:
                    log.error("lost the lease on %s to run %s", redact_url(self.output.uri), holder and holder.get("run_id"))
                    return
                storage.write_bytes(self.url, self._body(), self.output.storage)
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried at the next beat
                log.warning("lease heartbeat failed: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:  # a heartbeat under way must land before the removal, not after it
            self._thread.join(timeout=LEASE_TTL_S)
        _HELD.discard(self.run_id)
        try:
            holder = self.holder()
            if holder and holder.get("run_id") == self.run_id:
                storage.remove(self.url, self.output.storage)
        except Exception as exc:  # noqa: BLE001 - a stale lease is taken over by the next run
            log.warning("could not release the lease: %s", exc)


def _stale(holder: Mapping[str, Any]) -> Optional[str]:
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > LEASE_TTL_S:
        return f"no heartbeat for {age:.0f} s"
    if holder.get("host") == socket.gethostname():
        if str(holder.get("pid")) == str(os.getpid()) and holder.get("run_id") not in _HELD:
            return "its run in this process has ended (its release did not get through)"
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return f"pid {holder.get('pid')} is gone"
        except (PermissionError, ValueError):
            return None
    return None


def check_lease(output_uri: str, options: StorageOptions, run_id: str) -> None:
    """Raise unless `run_id` still owns the output (called by writers before each part)."""
    try:
        holder = json.loads(storage.read_text(storage.join_url(output_uri, LEASE_NAME), options))
    except FileNotFoundError:
        holder = None
    if not holder or holder.get("run_id") != run_id:
        raise OutputBusy(f"run {run_id} no longer owns {redact_url(output_uri)} (now: "
                         f"{holder and holder.get('run_id')}); this writer stops")
