"""Quality evaluation of glimpse modules on a held-out synthetic set: does pruning keep the answers?

    python -m workers.training.evaluate --base DIR --modules DIR --rows 300 --seed 1000003 --out DIR

Every row is answered (greedy) five ways by the same base model, from the same processed inputs:
  unpruned     the plain model, all visual tokens;
  glimpse      GlimpsePrune with the modules' keep rule at threshold 0.5 (no cap);
  glimpse_cap  the same with max_remain_ratio 0.111 (the paper's "<= 11.1%" setting);
  oracle       keep exactly the tokens of the relevant boxes (`box_token_mask`), pruned at reduce_layer
               without a glimpse (the reference's `use_ref_masks` ablation); an empty box mask keeps none;
  random       per row, as many tokens as `glimpse` kept, chosen uniformly at random (seeded per row).
Oracle and random run through the engine's own second half (`finish_prefill` via `generate_from_rows`)
on rows built here from explicit keep masks (`keep_mask_rows`): the engine has no keep-mask override.

Answers are compared after normalisation (lower case, strip, drop a final full stop) with the
generator's canonical answers; captioning also gets a per-object F1 over (colour, shape) phrases.
Outputs: eval.md (tables), eval.json (everything in the tables) and eval_rows.jsonl (per row).
Relative accuracy = accuracy of a setting / accuracy of `unpruned` (overall and per question type).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import DynamicCache

from workers.toyworld import QTYPES, Sample, WorldConfig, make_sample
from workers.modeling import compat
from workers.modeling.api import GenerationRequest, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.qwen2_5_vl import GlimpsedRow, ModelInputs, QwenGlimpseModel, _visual_tokens_per_sample
from workers.training.data import box_masks

log = logging.getLogger(__name__)
SETTINGS = ("unpruned", "glimpse", "glimpse_cap", "oracle", "random")
PRUNED = SETTINGS[1:]


@dataclass(frozen=True)
class EvalConfig:
    """The held-out set and the settings compared. seed must differ from the training world's."""

    rows: int = 300
    seed: int = 1_000_003
    image_size: int = 224
    min_objects: int = 1
    max_objects: int = 12
    batch_size: int = 16
    max_new_tokens: int = 96  # a 12-object caption is ~60 tokens
    threshold: float = 0.5
    cap: float = 0.111
    random_seed: int = 0

    def world(self) -> WorldConfig:
        return WorldConfig(image_size=self.image_size, min_objects=self.min_objects,
                           max_objects=self.max_objects, seed=self.seed)


# ---- keep-mask override ------------------------------------------------------------------------
@torch.inference_mode()
def keep_mask_rows(core: QwenGlimpseModel, inputs: ModelInputs, keep_masks: Sequence[torch.Tensor]) -> list:
    """Layers 0..reduce_layer on the plain prompt, then keep the given visual tokens: `GlimpsedRow`s
    for `finish_prefill`. keep_masks: per sample bool [N_v(b)]. Equals `glimpse_stage` with the same
    masks (the glimpse is the last token, so causally no prompt token ever sees it)."""
    k_last = core.modules.config.reduce_layer
    hidden, _ = core.embed(inputs, ())
    positions = core.positions(inputs)
    cache = DynamicCache(config=compat.text_config(core.model))
    hidden = core.run_layers(range(k_last + 1), hidden, inputs.attention_mask, positions, cache)
    is_image = inputs.input_ids == core.config.image_token_id
    remain = inputs.attention_mask.bool().clone()
    remain[is_image] = torch.cat(list(keep_masks)).to(remain.device) & remain[is_image]
    visual = _visual_tokens_per_sample(inputs, core.config.image_token_id, core.visual.spatial_merge_size)
    kv = [(compat.cache_keys(cache, i), compat.cache_values(cache, i)) for i in range(k_last + 1)]
    rows = []
    for b, keep in enumerate(keep_masks):
        sel = remain[b]
        rows.append(GlimpsedRow(
            hidden=hidden[b][sel], positions=positions[:, b][:, sel],
            keys=tuple(k[b][:, sel] for k, _ in kv), values=tuple(v[b][:, sel] for _, v in kv),
            visual_tokens=visual[b], keep_mask=keep.bool(),
            importance_logits=torch.where(keep.bool(), float("inf"), float("-inf")),  # logit(mask), as use_ref_masks
            prompt_tokens=int(inputs.attention_mask[b].sum()),
        ))
    return rows


def random_keep_masks(sizes: Sequence[int], counts: Sequence[int], seeds: Sequence[int]) -> list:
    """Per row, `count` of `size` tokens uniformly at random (torch.Generator seeded per row)."""
    out = []
    for size, count, seed in zip(sizes, counts, seeds):
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros(size, dtype=torch.bool)
        mask[order[:count]] = True
        out.append(mask)
    return out


# ---- scoring --------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


_PHRASE = re.compile(r"^(?:a|an)\s+(\w+)\s+(\w+)$")


def caption_objects(text: str) -> Counter:
    """Multiset of (colour, shape) from "a red circle, a blue square and an orange star"; unparsable
    phrases count as one unmatched object each."""
    parts = [p.strip() for p in re.split(r",\s*|\s+and\s+", normalise(text)) if p.strip()]
    found: Counter = Counter()
    for part in parts:
        match = _PHRASE.match(part)
        found[match.groups() if match else ("?", part)] += 1
    return found


def object_f1(predicted: str, gold: str) -> float:
    pred, ref = caption_objects(predicted), caption_objects(gold)
    hits = sum((pred & ref).values())
    if not pred and not ref:
        return 1.0
    if hits == 0:
        return 0.0
    precision, recall = hits / sum(pred.values()), hits / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def confusion(pred: torch.Tensor, gt: torch.Tensor) -> dict:
    pred, gt = pred.bool().cpu(), gt.bool().cpu()
    return {"tp": int((pred & gt).sum()), "fp": int((pred & ~gt).sum()), "fn": int((~pred & gt).sum())}


def prf(counts: dict) -> dict:
    tp, fp, fn = counts.get("tp", 0), counts.get("fp", 0), counts.get("fn", 0)
    div = lambda a, b: a / b if b else None  # noqa: E731
    return {"precision": div(tp, tp + fp), "recall": div(tp, tp + fn), "iou": div(tp, tp + fp + fn)}


# ---- running --------------------------------------------------------------------------------------
def evaluate_batch(engines: dict, samples: Sequence[Sample], first_index: int, cfg: EvalConfig) -> list:
    """All five settings on one batch; returns one record per sample."""
    gp = engines["glimpse"]
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    inputs = gp.build_inputs([GenerationRequest(images=(s.image,), prompt=s.question) for s in samples])
    boxes = box_masks(samples, inputs.image_grid_thw, gp.core.visual.spatial_merge_size)
    results = {
        "unpruned": gp.generate_from_inputs(inputs, sampling, prune=False),
        "glimpse": gp.generate_from_inputs(inputs, sampling, return_masks=True),
        "glimpse_cap": engines["glimpse_cap"].generate_from_inputs(inputs, sampling, return_masks=True),
    }
    counts = [r.kept_tokens for r in results["glimpse"]]
    randoms = random_keep_masks([m.numel() for m in boxes], counts,
                                [cfg.random_seed * 1_000_003 + first_index + i for i in range(len(samples))])
    for name, masks in (("oracle", boxes), ("random", randoms)):
        rows = keep_mask_rows(gp.core, inputs.to(gp.device), [m.to(gp.device) for m in masks])
        results[name] = gp.generate_from_rows(rows, sampling, return_masks=True)
    return [record(s, boxes[i], {name: res[i] for name, res in results.items()}, cfg.threshold)
            for i, s in enumerate(samples)]


def record(sample: Sample, box: torch.Tensor, results: dict, threshold: float) -> dict:
    """One row: per setting the answer, correctness, keep ratio and keep mask vs box mask counts."""
    out = {"id": sample.id, "qtype": sample.qtype, "num_objects": sample.num_objects, "answer": sample.answer,
           "question": sample.question, "visual_tokens": int(box.numel()), "box_ratio": float(box.float().mean())}
    gold = normalise(sample.answer)
    for name, res in results.items():
        entry = {"text": res.text, "correct": normalise(res.text) == gold, "keep_ratio": res.keep_ratio}
        if sample.qtype == "captioning":
            entry["object_f1"] = object_f1(res.text, sample.answer)
        if res.keep_mask is not None and name != "unpruned":
            entry["mask"] = confusion(res.keep_mask, box)
        if name == "glimpse":
            entry["predicted_mask"] = confusion(res.importance_logits.sigmoid() > threshold, box)
        out[name] = entry
    return out


def build_engines(model, processor, modules, cfg: EvalConfig) -> dict:
    rule = modules.config.keep_rule()
    uncapped = KeepRule(cfg.threshold, None, rule.min_remain_num)
    capped = KeepRule(cfg.threshold, cfg.cap, rule.min_remain_num)
    return {"glimpse": GlimpseEngine(model, processor, modules, uncapped),
            "glimpse_cap": GlimpseEngine(model, processor, modules, capped)}


def run_eval(model, processor, modules, cfg: EvalConfig) -> list:
    engines = build_engines(model, processor, modules, cfg)
    world = cfg.world()
    records = []
    t0 = time.perf_counter()
    for start in range(0, cfg.rows, cfg.batch_size):
        samples = [make_sample(world, i) for i in range(start, min(start + cfg.batch_size, cfg.rows))]
        records.extend(evaluate_batch(engines, samples, start, cfg))
        log.info("evaluated %d/%d rows (%.0f s)", len(records), cfg.rows, time.perf_counter() - t0)
    return records


# ---- summary ---------------------------------------------------------------------------------------
def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def summarise(records: Sequence[dict]) -> dict:
    groups = {"all": list(records)}
    by_qtype = {q: [r for r in records if r["qtype"] == q] for q in QTYPES if any(r["qtype"] == q for r in records)}
    by_objects = defaultdict(list)
    for r in records:
        by_objects[r["num_objects"]].append(r)
    base = {key: _mean(r["unpruned"]["correct"] for r in rs) for key, rs in {**groups, **by_qtype}.items()}
    out: dict = {"rows": len(records), "settings": {}}
    for name in SETTINGS:
        def stats(rs, key=None):
            acc = _mean(r[name]["correct"] for r in rs)
            out = {"n": len(rs), "accuracy": acc, "relative_accuracy": _ratio(acc, base.get(key)) if key else None,
                   "keep_ratio": _mean(r[name]["keep_ratio"] for r in rs)}
            if name in PRUNED:
                out["keep_mask_vs_boxes"] = prf(_sum(r[name]["mask"] for r in rs))
            return out

        entry = stats(records, "all")
        entry["by_qtype"] = {q: stats(rs, q) for q, rs in by_qtype.items()}
        entry["by_objects"] = {str(n): stats(rs) for n, rs in sorted(by_objects.items())}
        caps = [r for r in records if r["qtype"] == "captioning"]
        entry["caption_object_f1"] = _mean(r[name]["object_f1"] for r in caps)
        out["settings"][name] = entry
    out["predicted_mask_vs_boxes"] = {"all": prf(_sum(r["glimpse"]["predicted_mask"] for r in records)),
                                      **{q: prf(_sum(r["glimpse"]["predicted_mask"] for r in rs)) for q, rs in by_qtype.items()}}
    out["box_ratio"] = {"all": _mean(r["box_ratio"] for r in records),
                        "by_qtype": {q: _mean(r["box_ratio"] for r in rs) for q, rs in by_qtype.items()},
                        "by_objects": {str(n): _mean(r["box_ratio"] for r in rs) for n, rs in sorted(by_objects.items())}}
    return out


def _sum(dicts) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def _fmt(x, pct=False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _prf_text(scores: dict, short: bool = False) -> str:
    if short:
        return " / ".join(_fmt(scores[k]) for k in ("precision", "recall", "iou"))
    return f"precision {_fmt(scores['precision'])}, recall {_fmt(scores['recall'])}, IoU {_fmt(scores['iou'])}"


def render_markdown(summary: dict, header: str = "") -> str:
    s, qtypes = summary["settings"], list(summary["settings"]["unpruned"]["by_qtype"])
    lines = [header, f"Held-out synthetic rows: {summary['rows']}.", "",
             "| setting | accuracy | relative | keep ratio | " + " | ".join(f"{q} acc (rel)" for q in qtypes)
             + " | caption object F1 | keep mask P / R / IoU |",
             "|---" * (6 + len(qtypes)) + "|"]
    for name in SETTINGS:
        e = s[name]
        per_q = [f"{_fmt(e['by_qtype'][q]['accuracy'], True)} ({_fmt(e['by_qtype'][q]['relative_accuracy'], True)})" for q in qtypes]
        mask = e.get("keep_mask_vs_boxes")
        mask_txt = _prf_text(mask, short=True) if mask else "-"
        lines.append(f"| {name} | {_fmt(e['accuracy'], True)} | {_fmt(e['relative_accuracy'], True)} | "
                     f"{_fmt(e['keep_ratio'], True)} | " + " | ".join(per_q)
                     + f" | {_fmt(e['caption_object_f1'])} | {mask_txt} |")
    pm = summary["predicted_mask_vs_boxes"]
    lines += ["", f"Predicted mask (sigmoid > 0.5) vs box mask: {_prf_text(pm['all'])}.", "",
              "Mean keep ratio by question type (predicted mask P / R / IoU in the last column):", "",
              "| question type | n | box mask | " + " | ".join(PRUNED) + " | predicted mask P / R / IoU |",
              "|---" * (4 + len(PRUNED)) + "|"]
    for q in qtypes:
        lines.append(f"| {q} | {s['unpruned']['by_qtype'][q]['n']} | {_fmt(summary['box_ratio']['by_qtype'][q], True)} | "
                     + " | ".join(_fmt(s[n]['by_qtype'][q]['keep_ratio'], True) for n in PRUNED)
                     + f" | {_prf_text(pm[q], short=True)} |")
    lines += ["", "By object count (keep ratio; accuracy unpruned -> glimpse):", "",
              "| objects | n | box mask | " + " | ".join(PRUNED) + " | acc unpruned | acc glimpse |",
              "|---" * (5 + len(PRUNED)) + "|"]
    for n, e in s["unpruned"]["by_objects"].items():
        lines.append(f"| {n} | {e['n']} | {_fmt(summary['box_ratio']['by_objects'][n], True)} | "
                     + " | ".join(_fmt(s[k]['by_objects'][n]['keep_ratio'], True) for k in PRUNED)
                     + f" | {_fmt(e['accuracy'], True)} | {_fmt(s['glimpse']['by_objects'][n]['accuracy'], True)} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, records: Sequence[dict], summary: dict, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps({**meta, **summary}, indent=2))
    header = f"# GlimpsePrune evaluation\n\nbase `{meta['base']}`, modules `{meta['modules']}`, seed {meta['config']['seed']}.\n"
    (out_dir / "eval.md").write_text(render_markdown(summary, header))
    with open(out_dir / "eval_rows.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base model dir / URL / hub id")
    p.add_argument("--modules", required=True, help="glimpse modules dir / URL / hub id")
    p.add_argument("--out", required=True, type=Path)
    defaults = EvalConfig()
    for name, value in asdict(defaults).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from workers.modeling.loading import load_engine

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EvalConfig(**{k: getattr(args, k) for k in asdict(EvalConfig())})
    loaded = load_engine(args.base, args.modules, device=args.device)  # also merges a GlimpsePrune+ LoRA
    device = loaded.device
    t0 = time.perf_counter()
    records = run_eval(loaded.model, loaded.processor, loaded.modules, cfg)
    summary = summarise(records)
    meta = {"base": str(args.base), "modules": str(args.modules), "config": asdict(cfg), "device": str(device),
            "seconds": round(time.perf_counter() - t0, 1)}
    write_outputs(args.out, records, summary, meta)
    print((args.out / "eval.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
