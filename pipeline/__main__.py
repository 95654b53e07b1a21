"""`python -m pipeline run JOB.yaml [--profile NAME] [--set dotted.key=value ...] [--dry-run]`: validate, then run a job.

Exit codes:
  0    all done (every shard committed and complete)
  1    done, but some shards or rows failed (listed in the summary and on stderr)
  2    invalid job file, refused output (overlaps the input, in use by another run), or nothing could
       start (no input, storage unreachable, model missing)
  3    the run stopped on an error after it had started (finished shards are kept; re-run to continue)
  130  interrupted (Ctrl-C): what was written stays valid; re-run to continue
Every failure is one line on stderr; the traceback goes to a log file whose path that line names.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

EXIT_OK, EXIT_PARTIAL, EXIT_REFUSED, EXIT_CRASHED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job file")
    run.add_argument("job", help="path to a job YAML (e.g. jobs/demo.yaml)")
    run.add_argument("--profile", dest="profiles", action="append", default=[], metavar="NAME",
                     help="apply settings for a kind of machine over the job file, before --set, e.g. --profile local "
                          "(a CPU-only machine with the small model the repo ships; jobs/profiles/NAME.yaml or a path)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a job field, e.g. --set input.uri=s3://bucket/shards/ (repeatable)")
    run.add_argument("--dry-run", action="store_true",
                     help="validate, size the model actors, list the shards and plan, run nothing")
    run.add_argument("--log-file", help="where the full log (with tracebacks) goes (default: a new file in $TMPDIR)")
    args = ap.parse_args(argv)
    log_path = setup_logging(args.log_file)

    from pipeline.jobfile import JobFileError, load_job

    try:
        job = load_job(args.job, args.overrides, args.profiles)
    except JobFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return run_command(job, args.dry_run, log_path)


def run_command(job, dry_run: bool, log_path: str) -> int:
    from pipeline.run import CouldNotStart, Interrupted, RunRefused, describe_resources, make_plan, run_job
    from pipeline.storage import StorageError

    started = False
    try:
        if dry_run:
            # Resources first: sized on this machine (a local Ray is not started) or on the connected
            # cluster; a request that can never run fails here as it would in the run. Then the model,
            # the input, the output; each failure is one line.
            from pipeline.preflight import estimate
            from pipeline.run import check_model_paths, check_output

            resources = describe_resources(job)
            models = check_model_paths(job)
            plan = make_plan(job)
            checks = {**models, "output.uri": check_output(job)}
            print(json.dumps({**plan.describe(), "checks": checks, "estimate": estimate(job, plan), "resources": resources},
                             indent=2))
            return EXIT_OK
        started = True
        summary = run_job(job)
    except Interrupted as exc:
        done = exc.summary.get("this_run", {}).get("rows_computed", 0)
        print(f"\ninterrupted: {done} row(s) of this run are durable; re-run the same command to continue "
              f"(log: {log_path})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"\ninterrupted before any work started (log: {log_path})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RunRefused, FileNotFoundError, StorageError) as exc:
        return _fail("error", exc, log_path, EXIT_REFUSED)
    except CouldNotStart as exc:
        return _fail("could not start", exc, log_path, EXIT_REFUSED)
    except Exception as exc:  # noqa: BLE001 - the CLI turns anything else into one line + a log file
        return _fail("error" if started else "could not start", exc, log_path, EXIT_CRASHED if started else EXIT_REFUSED)
    print_summary(summary)
    failed = summary.get("shards_failed") or summary.get("shards_incomplete") or summary.get("rows_error")
    return EXIT_PARTIAL if failed else EXIT_OK


def _fail(prefix: str, exc: BaseException, log_path: str, code: int) -> int:
    """One line on stderr; the traceback appended to the log file."""
    import traceback

    from pipeline.run import root_cause
    from schemas.rows import one_line

    with open(log_path, "a") as handle:
        handle.write("".join(traceback.format_exception(exc)))
    own = isinstance(exc, (RuntimeError, OSError)) and type(exc).__module__.startswith("pipeline")
    text = str(exc) if own or isinstance(exc, FileNotFoundError) else root_cause(exc)
    print(f"{prefix}: {one_line(text, 400)} (traceback: {log_path})", file=sys.stderr)
    return code


def setup_logging(path: str | None) -> str:
    """INFO to stderr (short lines, no tracebacks), DEBUG with tracebacks to the log file."""
    if path is None:
        fd, path = tempfile.mkstemp(prefix=time.strftime("glimpse-batch-%Y%m%d-%H%M%S-"), suffix=".log")
        os.close(fd)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_OneLine("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [console, to_file]
    return path


class _OneLine(logging.Formatter):
    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return ""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = ""
        saved, record.exc_info = record.exc_info, None
        try:
            return super().format(record)
        finally:
            record.exc_info = saved


def print_summary(summary: dict) -> None:
    keep = summary.get("mean_keep_ratio")
    pad = summary.get("mean_pad_fraction")
    run = summary.get("this_run", {})
    print(
        f"\nthis run: {run.get('rows_computed', 0)} rows computed, {run.get('rows_resumed', 0)} resumed, "
        f"{summary['shards_skipped']} shard(s) skipped | {summary['rows_per_s']:.2f} rows/s, "
        f"{summary['tokens_per_s']:.1f} tokens/s | pad fraction: {'n/a' if pad is None else f'{pad:.3f}'} | "
        f"wall {summary['wall_s']:.1f} s\n"
        f"output: {summary['rows_total']} rows ({summary['rows_ok']} ok, {summary['rows_error']} error) | "
        f"mean keep ratio: {'n/a' if keep is None else f'{keep:.3f}'}"
    )
    for failed in summary.get("shards_failed", []):
        print(f"shard failed: {failed['shard']}: {failed['error']}")
    for failed in summary.get("shards_incomplete", []):
        print(f"shard incomplete: {failed['shard']}: {failed['error']}")
    print(f"summary: {summary['summary_url']}")
    if summary.get("report_url"):
        print(f"report: {summary['report_url']}")
    if summary.get("success_url"):
        print(f"output: {summary['summary_url'].rsplit('/', 1)[0]}")


if __name__ == "__main__":
    raise SystemExit(main())
