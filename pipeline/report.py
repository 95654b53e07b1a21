"""The run report: `_report/report.md` and its PNGs next to the output, viewable offline.

  * what the output holds: rows, ok / error, keep ratios, tokens, throughput (from `_summary.json`);
  * keep-ratio histogram; mean keep ratio by question type (a `qtype` / `question_type` / `task` /
    `category` column when the input has one, else the question's first two words) and by image size
    (visual tokens before pruning);
  * throughput over time (rows durable vs seconds, this run);
  * errors: the most frequent messages (numbers and paths folded together), with counts;
  * the kept tokens drawn over sample rows (`workers.ask.overlay`; the `kept_mask` column on the image
    as the image stage sized it).

It reads only a few columns of the committed output files and a few input rows; a failure to write the
report is logged and never fails the run.
"""
from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from typing import Optional, Sequence

import pyarrow as pa

from pipeline import storage
from schemas.job import JobSpec

log = logging.getLogger(__name__)
GROUP_COLUMNS = ("qtype", "question_type", "task", "category")
REPORT_DIR = "_report"
SAMPLES = 6


def _output_rows(job: JobSpec) -> pa.Table:
    """The committed output's columns the report needs (every top-level data file)."""
    files = [u for u in storage.list_files(job.output.uri, job.output.storage) if u["url"].endswith(".parquet")
             and "/" not in storage.normalize_url(u["url"])[len(storage.normalize_url(job.output.uri)) + 1:]]
    tables = []
    for f in files:
        t = storage.read_parquet(f["url"], job.output.storage)
        wanted = [c for c in ("id", "status", "error", "keep_ratio", "visual_tokens", "kept_tokens", "kept_mask", "answer",
                              "question", "input_question") + GROUP_COLUMNS if c in t.column_names]
        tables.append(t.select(wanted))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def _group_of(row: dict) -> str:
    for name in GROUP_COLUMNS:
        if row.get(name):
            return str(row[name])
    q = row.get("question") or row.get("input_question") or ""
    words = re.findall(r"[a-z']+", str(q).lower())
    return " ".join(words[:2]) or "(no question)"


def _fold(message: str) -> str:
    message = re.sub(r"(?:[a-z][a-z0-9+.-]*://|/)[^\s:,'\"]+", "<path>", message or "")
    return re.sub(r"\d+(?:\.\d+)?", "N", message)[:160]


def _plots(rows: list, timeline: Sequence, out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("keep_ratio") is not None]
    keep = [100 * r["keep_ratio"] for r in ok]

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[name] = buf.getvalue()

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(keep, bins=40, range=(0, 100), color="#3b7dd8")
    ax.set_xlabel("keep ratio (%)")
    ax.set_ylabel("rows")
    ax.set_title(f"kept visual tokens per row ({len(keep)} ok rows)")
    save(fig, "keep_hist.png")

    groups: dict = {}
    for r in ok:
        groups.setdefault(_group_of(r), []).append(100 * r["keep_ratio"])
    top = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:12]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * max(3, len(top)) + 1))
    ax.barh([f"{k} ({len(v)})" for k, v in top][::-1], [sum(v) / len(v) for _, v in top][::-1], color="#6aa84f")
    ax.set_xlabel("mean keep ratio (%)")
    ax.set_title("keep ratio by question type")
    save(fig, "keep_by_type.png")

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.scatter([r["visual_tokens"] for r in ok], keep, s=6, alpha=0.5)
    ax.set_xlabel("visual tokens before pruning (image size)")
    ax.set_ylabel("keep ratio (%)")
    ax.set_title("keep ratio by image size")
    save(fig, "keep_by_size.png")

    fig, ax = plt.subplots(figsize=(6, 3.4))
    if timeline:
        ax.plot([t for t, _ in timeline], [n for _, n in timeline], lw=1.5)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("rows durable (this run)")
    ax.set_title("throughput over time")
    save(fig, "throughput.png")


def _overlays(job: JobSpec, plan, rows: list, out: dict) -> list:
    """Up to SAMPLES rows with their kept tokens drawn over the image as the model saw it."""
    import numpy as np

    from pipeline import inputs
    from pipeline.images import ImageStageConfig, prepare_row
    from schemas.job import IMAGE_FACTOR
    from schemas.rows import decode_frame
    from workers.ask import overlay

    masks = {r["id"]: r for r in rows if r.get("kept_mask") is not None and r.get("status") == "ok"}
    if not masks:
        return []
    config = ImageStageConfig.from_job(job)
    cols = job.input.columns
    made = []
    for sp in plan.todo:
        if len(made) >= SAMPLES or not sp.units:
            break
        block = next(iter(inputs.unit_blocks(dict(sp.units[0], wanted=None), cols, job.input.storage, 64)), None)
        if block is None:
            continue
        for src in block.to_pylist():
            row = masks.get(src.get(cols.id))
            if row is None or len(made) >= SAMPLES:
                continue
            prepared = prepare_row(src.get(cols.image), src.get(cols.question) if cols.question else None, config)
            if prepared.error or not prepared.images:
                continue
            bits = np.unpackbits(np.frombuffer(row["kept_mask"], dtype=np.uint8))[: row["visual_tokens"]].astype(bool)
            first, tiles = 0, []
            for frame in prepared.images:
                image = decode_frame(frame)
                h, w = image.height // IMAGE_FACTOR, image.width // IMAGE_FACTOR
                tiles.append(overlay(image, (h, w), bits[first:first + h * w]))
                first += h * w
            name = f"sample_{len(made)}.png"
            buf = io.BytesIO()
            _side_by_side(tiles).save(buf, format="PNG")
            out[name] = buf.getvalue()
            made.append((name, row))
    return made


def _side_by_side(images: list):
    from PIL import Image

    width, height = sum(i.width for i in images) + 4 * (len(images) - 1), max(i.height for i in images)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + 4
    return canvas


def build(job: JobSpec, plan, summary: dict, timeline: Sequence) -> dict[str, bytes]:
    """{file name: bytes} of the report (report.md and its PNGs)."""
    table = _output_rows(job)
    rows = table.to_pylist()
    files: dict[str, bytes] = {}
    _plots(rows, timeline, files)
    samples = _overlays(job, plan, rows, files)
    errors = Counter(_fold(r.get("error")) for r in rows if r.get("status") == "error")
    ok = sum(1 for r in rows if r.get("status") == "ok")
    run = summary.get("this_run", {})
    fmt = lambda x, p=3: "n/a" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = [
        f"# Run report: {job.name or 'job'}\n",
        f"Output `{storage.normalize_url(job.output.uri)}`: {len(rows)} rows ({ok} ok, {len(rows) - ok} error); model "
        f"`{job.model.base}`, pruning `{json.dumps(job.pruning.model_dump(mode='json'), sort_keys=True)}`.\n",
        f"Mean keep ratio {fmt(summary.get('mean_keep_ratio'))}, overall {fmt(summary.get('overall_keep_ratio'))} "
        f"({summary.get('kept_tokens', 0)} of {summary.get('visual_tokens', 0)} visual tokens kept); this run: "
        f"{run.get('rows_computed', 0)} rows computed, {run.get('rows_resumed', 0)} resumed, {fmt(run.get('rows_per_s'), 2)} "
        f"rows/s ({fmt(run.get('steady_rows_per_s'), 2)} steady), first durable output after "
        f"{fmt(run.get('first_durable_s'), 1)} s.\n",
        "## Keep ratio\n", "![keep ratio histogram](keep_hist.png)\n", "![keep by question type](keep_by_type.png)\n",
        "![keep by image size](keep_by_size.png)\n",
        "## Throughput\n", "![throughput over time](throughput.png)\n",
        "## Errors\n",
    ]
    if errors:
        lines += ["| count | message (numbers and paths folded) |", "|---|---|"]
        lines += [f"| {n} | {m.replace('|', '/')} |" for m, n in errors.most_common(15)]
    else:
        lines.append("No error rows.")
    lines.append("\n## Kept tokens on sample rows\n")
    if samples:
        lines.append("Pruned tokens are dimmed; kept tokens are outlined in red (the image as the model saw it).\n")
        for name, row in samples:
            question = row.get("question") or row.get("input_question") or job.input.prompt or ""
            lines.append(f"**{row['id']}**: {str(question)[:120]} -> {str(row.get('answer'))[:120]} "
                         f"(kept {row['kept_tokens']} of {row['visual_tokens']})\n\n![{name}]({name})\n")
    else:
        lines.append("No pruned rows to draw (pruning off, or no rows of this run's shards).")
    files["report.md"] = ("\n".join(lines) + "\n").encode()
    return files


def write(job: JobSpec, plan, summary: dict, timeline: Sequence) -> Optional[str]:
    """Write the report under the output; its URL, or None if it could not be made (logged)."""
    folder = storage.join_url(job.output.uri, REPORT_DIR)
    try:
        files = build(job, plan, summary, timeline)
        for name, data in files.items():
            storage.write_bytes(storage.join_url(folder, name), data, job.output.storage)
        try:  # an earlier report's pictures this one does not have (the folder is the report's own)
            stale = [f["url"] for f in storage.list_files(folder, job.output.storage)
                     if f["url"].rsplit("/", 1)[-1] not in files]
        except FileNotFoundError:
            stale = []
        for url in stale:
            storage.remove(url, job.output.storage)
    except Exception as exc:  # noqa: BLE001 - the report is a view; the run's data is already committed
        log.warning("run report not written: %s: %s", type(exc).__name__, exc)
        return None
    return storage.join_url(job.output.uri, REPORT_DIR, "report.md")
