"""Continuous-batching benchmark: the KV-budget scheduler against static batching, and pruned against
unpruned at an equal KV budget, on one random-weight engine in one process.

Workload: R rows (default 64: one model-stage call at max_rows 16, whose blocks are 4 x max_rows), one
square random image each (part 1: 224 px = 64 visual tokens; parts 2-3: 448 px = 256), one caption prompt, and per row a max_new_tokens drawn uniformly from [8, 128] (seeded). The LM-head rows
of the stop tokens are zeroed (as in engine_bench), so every row generates exactly its own length and
both schedulers do the same useful work.

Part 1, continuous vs static (GlimpsePrune on, keep ratio 0.111, same engine, same max_rows):
  * static = the model stage's `batching.scheduler: static`: glimpse in chunks of max_rows, rows
    regrouped by retained length and packed under max_decode_tokens, each group decodes until its
    longest row ends (finished rows stay in the batch);
  * continuous = `workers.modeling.scheduler.ContinuousScheduler` (rows join and leave every step).
  Order ABBA over `--repeats` rounds. Reported: rows/s of each (median), the ratio, slot occupancy
  (useful row-steps / batch slots x steps) and the analytic prediction: if a decode step costs the
  same at any batch size up to max_rows, the ratio is static decode steps / continuous decode steps,
  with static steps = sum over groups of the group's longest row and continuous steps >= sum of
  lengths / max_rows (full occupancy).

Part 2, pruned vs unpruned at one KV budget (continuous scheduler both): the budget holds `--kv-rows`
unpruned rows at their longest (prompt + visual + 128 new tokens, every layer); for each concurrency
limit (`--limits`, default 4 16 64 rows in flight) both modes run the same rows. Reported: rows/s,
achieved concurrency (mean rows per decode step), KV-budget use, and the predictions: each mode's
concurrency limit from the budget (rows whose reserved cache fits), and the KV ratio (unpruned
reserved cache per row / pruned).

Part 3, engine vs prediction: prefill seconds pruned/unpruned (ViT included) and decode seconds per
token, next to the analytic decoder prefill FLOPs ratio for this model (engine_bench.prefill_flops)
and the cache-token ratio.

Part 4, across blocks (the model stage's calls): blocks of 4 x max_rows rows (the pipeline's block),
static batching block by block, and the continuous scheduler one call at a time (each block drains
before the next: the model stage before rows flowed across blocks) against `--in-flight` calls sharing
one running batch (`workers.generate.EngineLoop`), captions
as in part 1. Reported: rows/s of each, the ratio, decode steps and the prediction at equal step cost.

Run: `python bench/continuous_bench.py [--quick] [--rows R] [--parts 1 2 3 4] [--out FILE]`; JSON to --out (default
reports/bench/continuous_bench.json).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "reports" / "bench" / "continuous_bench.json"
PROMPT = "Describe the image in detail: the shapes, their colors and where they are."


def _engine_bench():
    spec = importlib.util.spec_from_file_location("engine_bench", HERE / "engine_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine_bench"] = module
    spec.loader.exec_module(module)
    return module


EB = _engine_bench()


def make_requests(count: int, image_size: int, lengths: Sequence[int], seed: int, prompt: str = PROMPT) -> list:
    from PIL import Image

    from workers.modeling.api import GenerationRequest

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        pixels = torch.randint(0, 256, (image_size, image_size, 3), generator=gen, dtype=torch.uint8)
        out.append(GenerationRequest(images=(Image.fromarray(pixels.numpy(), "RGB"),), prompt=prompt,
                                     max_new_tokens=int(lengths[i])))
    return out


def draw_lengths(count: int, low: int, high: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed + 17)
    return torch.randint(low, high + 1, (count,), generator=gen).tolist()


# ---------------------------------------------------------------------------------------------------
# The two schedulers


def run_static(engine, requests, sampling, max_rows: int, decode_budget: int, prefill_tokens: int) -> dict:
    """The static policy of the model stage (workers/generate.py, batching.scheduler: static)."""
    from workers.batching import pack_by_budget
    from workers.modeling.engine import request_limits

    t0 = time.perf_counter()
    raw = [len(r.prompt) // 3 + 16 + (r.visual_tokens or 0) for r in requests]
    glimpsed = {}
    for group in pack_by_budget(raw, prefill_tokens, max_rows):
        rows, _ = engine.glimpse(engine.build_inputs([requests[i] for i in group]))
        glimpsed.update(zip(group, rows))
    ids = sorted(glimpsed)
    limits = request_limits(requests, sampling)
    steps = slots = useful = 0
    decode_s = prefill_s = 0.0
    results = {}
    for group in pack_by_budget([glimpsed[i].length for i in ids], decode_budget, max_rows, extra=sampling.max_new_tokens):
        members = [ids[k] for k in group]
        out = engine.generate_from_rows([glimpsed[i] for i in members], sampling, limits=[limits[i] for i in members])
        results.update(zip(members, out))
        decode_s += out[0].decode_s  # the group's decode seconds (every row of a group carries them)
        longest = max(limits[i] for i in members)
        steps += longest - 1  # decoder forwards after the prefill
        slots += len(members) * (longest - 1)
        useful += sum(limits[i] - 1 for i in members)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows_per_s": len(requests) / wall, "decode_steps": steps, "slot_occupancy": useful / slots,
            "decode_s": decode_s, "prefill_and_rest_s": wall - decode_s,
            "tokens": [results[i].token_ids for i in range(len(requests))]}


def run_continuous(engine, requests, sampling, max_rows: int, kv_budget: int, prefill_tokens: int, prune: bool = True) -> dict:
    from workers.modeling.scheduler import ContinuousScheduler, SchedulerConfig, SchedulerStats

    stats = SchedulerStats()
    scheduler = ContinuousScheduler(engine, SchedulerConfig(kv_budget, max_rows=max_rows, prefill_tokens=prefill_tokens), stats)
    t0 = time.perf_counter()
    results = dict(scheduler.run(requests, sampling, prune=prune))
    wall = time.perf_counter() - t0
    row_steps = stats.row_steps
    return {"wall_s": wall, "rows_per_s": len(requests) / wall, "decode_steps": stats.decode_steps,
            "decode_s": stats.decode_s, "prefill_and_rest_s": wall - stats.decode_s,
            "slot_occupancy": row_steps / (stats.decode_steps * max_rows) if stats.decode_steps else 0.0,
            "stats": stats.as_dict(), "kept_tokens": [results[i].kept_tokens for i in range(len(requests))],
            "prompt_tokens": [results[i].prompt_tokens for i in range(len(requests))],
            "visual_tokens": [results[i].visual_tokens for i in range(len(requests))],
            "tokens": [results[i].token_ids for i in range(len(requests))]}


def run_blocks(engine, requests, sampling, max_rows: int, block_rows: int, in_flight: int, prefill_tokens: int) -> dict:
    """The model stage's calls: blocks of `block_rows` rows, `in_flight` of them at once in one
    scheduler session (`workers.generate.EngineLoop`); the next block arrives when the oldest has all
    its rows back (its call returns). in_flight=1 is one call at a time: each block drains before the
    next starts, as the model stage ran before rows flowed across blocks."""
    from workers.modeling.scheduler import ContinuousScheduler, SchedulerConfig, SchedulerStats

    stats = SchedulerStats()
    session = ContinuousScheduler(engine, SchedulerConfig(10**12, max_rows=max_rows, prefill_tokens=prefill_tokens), stats).session(sampling)
    blocks = [requests[i:i + block_rows] for i in range(0, len(requests), block_rows)]
    results, pending, nxt = {}, [], 0
    t0 = time.perf_counter()
    while nxt < len(blocks) or pending:
        while nxt < len(blocks) and len(pending) < in_flight:
            pending.append(session.submit(blocks[nxt]))
            nxt += 1
        results.update(session.step())
        while pending and all(i in results for i in pending[0]):
            pending.pop(0)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows_per_s": len(requests) / wall, "decode_steps": stats.decode_steps,
            "slot_occupancy": stats.row_steps / (stats.decode_steps * max_rows) if stats.decode_steps else 0.0,
            "tokens": [results[i].token_ids for i in range(len(requests))]}


def part4(engine, requests, sampling, args) -> dict:
    """Across blocks: blocks of 4 x max_rows rows (the pipeline's block size), 1 call in flight (each
    block drains) against `--in-flight` calls sharing one running batch. ABBA over --repeats rounds.
    Prediction at equal step cost: drained decode steps / shared decode steps."""
    block_rows = 4 * args.max_rows
    blocks = [requests[i:i + block_rows] for i in range(0, len(requests), block_rows)]
    runs = {"static": [], "one_call": [], "shared": []}

    def static_blocks():  # the static model stage, block by block
        got = [run_static(engine, b, sampling, args.max_rows, 10**9, args.prefill_tokens) for b in blocks]
        wall = sum(g["wall_s"] for g in got)
        return {"wall_s": wall, "rows_per_s": len(requests) / wall, "decode_steps": sum(g["decode_steps"] for g in got),
                "slot_occupancy": statistics.mean(g["slot_occupancy"] for g in got), "tokens": [t for g in got for t in g["tokens"]]}

    for _ in range(args.repeats):
        for mode in ("static", "one_call", "shared", "shared", "one_call", "static"):
            if mode == "static":
                runs[mode].append(static_blocks())
            else:
                flight = 1 if mode == "one_call" else args.in_flight
                runs[mode].append(run_blocks(engine, requests, sampling, args.max_rows, block_rows, flight, args.prefill_tokens))
    med = {m: statistics.median(r["rows_per_s"] for r in rs) for m, rs in runs.items()}
    steps = {m: rs[0]["decode_steps"] for m, rs in runs.items()}
    return {
        "rows": len(requests), "block_rows": block_rows, "in_flight": args.in_flight, "max_rows": args.max_rows,
        "rows_per_s": med, "ratio_shared_over_one_call": med["shared"] / med["one_call"],
        "ratio_shared_over_static": med["shared"] / med["static"],
        "all_ratios": [b["rows_per_s"] / a["rows_per_s"] for a, b in zip(runs["one_call"], runs["shared"])],
        "all_ratios_over_static": [b["rows_per_s"] / a["rows_per_s"] for a, b in zip(runs["static"], runs["shared"])],
        "decode_steps": steps, "predicted_ratio_equal_step_cost": steps["one_call"] / max(steps["shared"], 1),
        "predicted_ratio_over_static_equal_step_cost": steps["static"] / max(steps["shared"], 1),
        "slot_occupancy": {m: rs[0]["slot_occupancy"] for m, rs in runs.items()},
        "same_tokens": runs["one_call"][0]["tokens"] == runs["shared"][0]["tokens"] == runs["static"][0]["tokens"],
    }


# ---------------------------------------------------------------------------------------------------


def part1(engine, requests, sampling, args) -> dict:
    """predicted_rows_per_s_ratio: prefill as measured, each continuous decode step at the static step's
    measured cost (step cost independent of batch size up to max_rows, as on a memory-bound GPU).
    ceiling_rows_per_s_ratio: the same with the continuous decode at full occupancy (the fewest steps
    max_rows allows): no scheduler can beat it while the prefill is the same work in both modes."""
    layers = len(engine.core.lm.layers)
    kv_budget = 10**12  # not binding: both are limited by max_rows alone
    decode_budget = 10**9
    runs = {"static": [], "continuous": []}
    for _ in range(args.repeats):
        for mode in ("static", "continuous", "continuous", "static"):
            if mode == "static":
                runs[mode].append(run_static(engine, requests, sampling, args.max_rows, decode_budget, args.prefill_tokens))
            else:
                runs[mode].append(run_continuous(engine, requests, sampling, args.max_rows, kv_budget, args.prefill_tokens))
    same = runs["static"][0]["tokens"] == runs["continuous"][0]["tokens"]
    lengths = [r.max_new_tokens for r in requests]
    ideal = -(-sum(n - 1 for n in lengths) // args.max_rows)
    static_steps = runs["static"][0]["decode_steps"]
    med = {m: statistics.median(r["rows_per_s"] for r in rs) for m, rs in runs.items()}
    dec = {m: statistics.median(r["decode_s"] for r in rs) for m, rs in runs.items()}
    per_step = {m: dec[m] / max(runs[m][0]["decode_steps"], 1) for m in runs}
    rest = {m: statistics.median(r["prefill_and_rest_s"] for r in rs) for m, rs in runs.items()}
    cont_steps = runs["continuous"][0]["decode_steps"]
    return {
        "max_rows": args.max_rows, "layers": layers, "rows": len(requests),
        "rows_per_s": med, "ratio_continuous_over_static": med["continuous"] / med["static"],
        "all_ratios": [c["rows_per_s"] / s["rows_per_s"] for s, c in zip(runs["static"], runs["continuous"])],
        "slot_occupancy": {m: rs[0]["slot_occupancy"] for m, rs in runs.items()},
        "decode_steps": {m: rs[0]["decode_steps"] for m, rs in runs.items()},
        "predicted_ratio_equal_step_cost": static_steps / max(ideal, 1),
        "predicted_continuous_steps_at_full_occupancy": ideal,
        "decode_s": dec, "decode_ratio_static_over_continuous": dec["static"] / dec["continuous"],
        "decode_s_per_step": per_step, "prefill_and_rest_s": rest,
        "predicted_decode_ratio_measured_steps": static_steps / max(cont_steps, 1),
        "predicted_rows_per_s_ratio": (rest["static"] + dec["static"]) / (rest["static"] + per_step["static"] * cont_steps),
        "ceiling_rows_per_s_ratio": (rest["static"] + dec["static"]) / (rest["static"] + per_step["static"] * ideal),
        "same_tokens": same,
        # while rows still waited to join, rows per decode step over max_rows; the other steps are the
        # drain at the end of the input (nothing left to join), which a longer input amortises
        "steady_slot_occupancy": runs["continuous"][0]["stats"]["steady_concurrency"] / args.max_rows,
        "drain_steps": cont_steps - runs["continuous"][0]["stats"]["queued_steps"],
        "continuous_stats": runs["continuous"][0]["stats"],
    }


def part2(engine, requests, sampling, args) -> dict:
    layers = len(engine.core.lm.layers)
    longest_new = max(r.max_new_tokens for r in requests)
    probe = run_continuous(engine, requests[:2], sampling, 2, 10**12, args.prefill_tokens, prune=False)
    full_len = max(probe["prompt_tokens"])
    kv_budget = args.kv_rows * (full_len + longest_new) * layers
    by_limit = []
    for limit in args.limits:
        entry = {"max_rows": limit, "kv_budget_tokens": kv_budget}
        for mode, prune in (("unpruned", False), ("pruned", True)):
            got = run_continuous(engine, requests, sampling, limit, kv_budget, args.prefill_tokens, prune=prune)
            st = got["stats"]
            cache_len = [p - v + k for p, v, k in zip(got["prompt_tokens"], got["visual_tokens"], got["kept_tokens"])]
            reserve = max(cache_len) + longest_new  # the widest row the admission rule reserves for
            entry[mode] = {
                "rows_per_s": got["rows_per_s"], "wall_s": got["wall_s"],
                "achieved_concurrency": st["achieved_concurrency"], "peak_rows": st["peak_rows"],
                "predicted_concurrency_cap": min(limit, kv_budget // (reserve * layers)),
                "kv_budget_use": st["kv_budget_use"], "padding_fraction": st["padding_fraction"],
                "mean_cache_tokens_after_prefill": statistics.mean(cache_len),
                "prefill_s": st["prefill_s"], "decode_s": st["decode_s"], "decode_steps": st["decode_steps"],
                "decode_tokens_per_s": st["decode_tokens_per_s"], "same_tokens_as_unpruned": None,
                "tokens": got["tokens"],
            }
        u, p = entry["unpruned"], entry["pruned"]
        entry["rows_per_s_ratio_pruned_over_unpruned"] = p["rows_per_s"] / u["rows_per_s"]
        entry["concurrency_ratio"] = p["achieved_concurrency"] / u["achieved_concurrency"]
        entry["kv_ratio_reserved"] = (u["mean_cache_tokens_after_prefill"] + statistics.mean(r.max_new_tokens for r in requests)) / (
            p["mean_cache_tokens_after_prefill"] + statistics.mean(r.max_new_tokens for r in requests))
        for mode in ("unpruned", "pruned"):
            entry[mode].pop("tokens")
            entry[mode].pop("same_tokens_as_unpruned")
        by_limit.append(entry)
    return {"layers": layers, "kv_rows": args.kv_rows, "unpruned_prompt_tokens": full_len, "by_limit": by_limit}


def part3(engine, requests, part2_result) -> dict:
    """Measured prefill/decode ratios (the largest limit of part 2) vs the analytic ones."""
    text = engine.model.config.text_config
    cfg = engine.modules.config
    vision = engine.model.config.vision_config
    dims = EB.DecoderDims("this model", text.num_hidden_layers, text.hidden_size, text.num_attention_heads,
                          text.num_key_value_heads, text.intermediate_size, cfg.reduce_layer, len(cfg.selected_layers))
    vip = EB.VipDims(vision_hidden=vision.hidden_size, fuse=cfg.attn_fuse_size, cond=cfg.visual_cond_size,
                     levels=len(cfg.selected_visual_layers))
    entry = part2_result["by_limit"][-1]
    u, p = entry["unpruned"], entry["pruned"]
    visual = requests[0].images[0].width // 28 * (requests[0].images[0].height // 28)
    text_tokens = part2_result["unpruned_prompt_tokens"] - visual
    flops = EB.prefill_flops(dims, vip, visual, text_tokens, EB.KEEP_RATIO)
    return {
        "measured_prefill_ratio": p["prefill_s"] / u["prefill_s"],
        "analytic_decoder_prefill_flops_ratio": flops["prefill_flops_ratio"],
        "analytic_lower_bound": flops["lower_bound_ratio"],
        "note": "measured prefill includes the ViT (same in both modes), the analytic ratio is the decoder's only",
        "measured_decode_s_per_token_ratio": (p["decode_s"] / max(1, sum(r.max_new_tokens for r in requests)))
        / (u["decode_s"] / max(1, sum(r.max_new_tokens for r in requests))),
        "analytic_cache_tokens_ratio": p["mean_cache_tokens_after_prefill"] / u["mean_cache_tokens_after_prefill"],
        "visual_tokens": visual, "text_tokens": text_tokens,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.rows, args.image_size, args.max_new = args.rows or 8, args.image_size or 112, args.max_new or 12
        args.part1_image_size = args.part1_image_size or 56
        args.limits = args.limits or [2, 8]
        args.max_rows = min(args.max_rows, 4)
    else:
        args.rows, args.image_size, args.max_new = args.rows or 64, args.image_size or 448, args.max_new or 128
        args.part1_image_size = args.part1_image_size or 224
        args.limits = args.limits or [4, 16, 64]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    from workers.modeling.api import SamplingParams

    setup = EB.Setup(device="cpu", quick=args.quick, batch_size=args.rows, image_size=args.image_size,
                     max_new_tokens=args.max_new, repeats=1, warmup=0, seed=args.seed, threads=args.threads)
    engine = EB.build_engine(setup)
    lengths = draw_lengths(args.rows, min(args.min_new, args.max_new), args.max_new, args.seed)
    requests = make_requests(args.rows, args.image_size, lengths, args.seed)
    captions = make_requests(args.rows, args.part1_image_size, lengths, args.seed + 1)
    sampling = SamplingParams(max_new_tokens=args.max_new)
    run_continuous(engine, requests[:2], sampling, 2, 10**12, args.prefill_tokens)  # warm-up
    run_static(engine, captions[:2], sampling, 2, 10**9, args.prefill_tokens)
    started = time.perf_counter()
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
              "answer_lengths": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)}}
    if 1 in args.parts:
        result["part1_continuous_vs_static"] = part1(engine, captions, sampling, args)
    if 2 in args.parts or 3 in args.parts:
        result["part2_pruned_vs_unpruned_equal_kv"] = part2(engine, requests, sampling, args)
        result["part3_engine_vs_prediction"] = part3(engine, requests, result["part2_pruned_vs_unpruned_equal_kv"])
    if 4 in args.parts:
        blocks_rows = args.part4_rows or 3 * 4 * args.max_rows
        block_lengths = draw_lengths(blocks_rows, min(args.min_new, args.max_new), args.max_new, args.seed + 2)
        result["part4_across_blocks"] = part4(engine, make_requests(blocks_rows, args.part1_image_size, block_lengths, args.seed + 2),
                                              sampling, args)
    return finish(result, started, args.out, print_report)


def finish(result: dict, started: float, out: Path, report) -> dict:
    """Wall time into the result, the printed report, the JSON to `out`."""
    result["bench_wall_s"] = time.perf_counter() - started
    report(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return result


def print_report(result: dict) -> None:
    if "part1_continuous_vs_static" in result:
        _print_part1(result)
    if "part2_pruned_vs_unpruned_equal_kv" in result:
        _print_parts23(result)
    p4 = result.get("part4_across_blocks")
    if p4:
        print(f"part 4: {p4['rows']} rows in blocks of {p4['block_rows']}, max_rows {p4['max_rows']}")
        print(f"  rows/s static {p4['rows_per_s']['static']:.3f}  continuous one call at a time {p4['rows_per_s']['one_call']:.3f}  "
              f"{p4['in_flight']} calls sharing one batch {p4['rows_per_s']['shared']:.3f}")
        print(f"  shared / one call {p4['ratio_shared_over_one_call']:.2f} (predicted at equal step cost "
              f"{p4['predicted_ratio_equal_step_cost']:.2f}); shared / static {p4['ratio_shared_over_static']:.2f} (predicted "
              f"{p4['predicted_ratio_over_static_equal_step_cost']:.2f}); decode steps {p4['decode_steps']}; occupancy "
              f"{p4['slot_occupancy']}; same tokens: {p4['same_tokens']}")


def _print_part1(result: dict) -> None:
    p1 = result["part1_continuous_vs_static"]
    print(f"part 1: {p1['rows']} rows, answers {result['answer_lengths']['min']}-{result['answer_lengths']['max']} tokens, "
          f"max_rows {p1['max_rows']}")
    print(f"  rows/s static {p1['rows_per_s']['static']:.3f}  continuous {p1['rows_per_s']['continuous']:.3f}  "
          f"ratio {p1['ratio_continuous_over_static']:.2f} (predicted at equal step cost {p1['predicted_ratio_equal_step_cost']:.2f})")
    print(f"  decode s static {p1['decode_s']['static']:.2f}  continuous {p1['decode_s']['continuous']:.2f}  ratio "
          f"{p1['decode_ratio_static_over_continuous']:.2f} (predicted from steps {p1['predicted_decode_ratio_measured_steps']:.2f}); "
          f"rows/s predicted {p1['predicted_rows_per_s_ratio']:.2f}, ceiling at full occupancy {p1['ceiling_rows_per_s_ratio']:.2f}")
    print(f"  slot occupancy static {p1['slot_occupancy']['static']:.2f}  continuous {p1['slot_occupancy']['continuous']:.2f}; "
          f"decode steps {p1['decode_steps']}; same tokens: {p1['same_tokens']}")
    if "steady_slot_occupancy" in p1:
        print(f"  continuous occupancy while rows waited {p1['steady_slot_occupancy']:.2f}; drain at the end "
              f"{p1['drain_steps']} of {p1['decode_steps']['continuous']} steps; cache copies on join/leave "
              f"{p1['continuous_stats'].get('surgery_s', 0.0):.2f} s in {p1['continuous_stats']['admissions']} admissions")


def _print_parts23(result: dict) -> None:
    p2 = result["part2_pruned_vs_unpruned_equal_kv"]
    print(f"part 2: KV budget = {p2['kv_rows']} unpruned rows ({p2['by_limit'][0]['kv_budget_tokens']} cache tokens)")
    print("  limit | rows/s unpruned | rows/s pruned | ratio | concurrency u / p (cap u / p) | KV use u / p")
    for e in p2["by_limit"]:
        u, p = e["unpruned"], e["pruned"]
        print(f"  {e['max_rows']:5d} | {u['rows_per_s']:15.3f} | {p['rows_per_s']:13.3f} | {e['rows_per_s_ratio_pruned_over_unpruned']:5.2f} | "
              f"{u['achieved_concurrency']:5.1f} / {p['achieved_concurrency']:5.1f} ({u['predicted_concurrency_cap']} / "
              f"{p['predicted_concurrency_cap']}) | {u['kv_budget_use']:.2f} / {p['kv_budget_use']:.2f}")
    p3 = result["part3_engine_vs_prediction"]
    print(f"part 3: prefill pruned/unpruned measured {p3['measured_prefill_ratio']:.3f} (ViT included) vs analytic decoder "
          f"{p3['analytic_decoder_prefill_flops_ratio']:.3f}; decode s/token {p3['measured_decode_s_per_token_ratio']:.3f}; "
          f"cache tokens {p3['analytic_cache_tokens_ratio']:.3f}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few rows: seconds (the smoke test)")
    parser.add_argument("--rows", type=int, default=None, help="rows (default 64, quick 8)")
    parser.add_argument("--image-size", type=int, default=None, help="parts 2-3: square side in px (default 448, quick 112)")
    parser.add_argument("--part1-image-size", type=int, default=None, help="part 1 (captions): side in px (default 224)")
    parser.add_argument("--min-new", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=None, help="longest answer (default 128, quick 12)")
    parser.add_argument("--max-rows", type=int, default=16, help="part 1: rows decoding at once (both schedulers)")
    parser.add_argument("--limits", type=int, nargs="+", default=None, help="part 2 concurrency limits (default 4 16 64)")
    parser.add_argument("--kv-rows", type=int, default=8, help="part 2: the KV budget holds this many unpruned rows")
    parser.add_argument("--prefill-tokens", type=int, default=8192, help="raw tokens per glimpse chunk")
    parser.add_argument("--repeats", type=int, default=2, help="part 1: ABBA rounds")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4], help="which parts to run (3 runs with 2)")
    parser.add_argument("--in-flight", type=int, default=4, help="part 4: calls (blocks) in flight sharing one batch")
    parser.add_argument("--part4-rows", type=int, default=None, help="part 4 rows (default 3 blocks of 4 x max_rows)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
