"""`python -m pipeline run JOB.yaml [--set dotted.key=value ...]`: validate, then run a job.

Exit codes: 0 done; 1 done but some input shards could not be read (no _SUCCESS); 2 bad job file.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job file")
    run.add_argument("job", help="path to a job YAML (e.g. jobs/demo.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a job field, e.g. --set input.uri=s3://bucket/shards/ (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="validate and list the shards, run nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipeline.jobfile import JobFileError, load_job

    try:
        job = load_job(args.job, args.overrides)
    except JobFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pipeline.run import make_plan, run_job

    if args.dry_run:
        plan = make_plan(job)
        print(json.dumps({"shards": plan.shards, "skipped": plan.skipped, "bad": plan.bad}, indent=2))
        return 0
    try:
        summary = run_job(job)
    except FileNotFoundError as exc:
        print(f"error: input: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 1 if summary.get("shards_failed") else 0


def print_summary(summary: dict) -> None:
    keep = summary.get("mean_keep_ratio")
    pad = summary.get("mean_pad_fraction")
    print(
        f"\nrows: {summary['rows_total']} ({summary['rows_ok']} ok, {summary['rows_error']} error) | "
        f"mean keep ratio: {'n/a' if keep is None else f'{keep:.3f}'} | "
        f"{summary['rows_per_s']:.2f} rows/s, {summary['tokens_per_s']:.1f} tokens/s | "
        f"pad fraction: {'n/a' if pad is None else f'{pad:.3f}'} | wall {summary['wall_s']:.1f} s"
    )
    for failed in summary.get("shards_failed", []):
        print(f"shard failed: {failed['shard']}: {failed['error']}")
    print(f"summary: {summary['summary_url']}")
    if summary.get("success_url"):
        print(f"output: {summary['summary_url'].rsplit('/', 1)[0]}")


if __name__ == "__main__":
    raise SystemExit(main())
