"""Scores, summary, paired intervals, tables and the plot of the quality evaluation (`evaluate`).

Scoring rules (one per answer kind):
  * exact match after normalisation (lower case, strip, whitespace collapsed, a final full stop
    dropped) against the generator's canonical answer, for every question type, multi-token answers
    ("blue square", "a red circle and a blue square") included: the order the generator uses is part
    of the answer;
  * token F1: word-level F1 (multiset of words after normalisation, commas dropped), every row;
  * object F1: F1 over (colour, shape) phrases, order-free, for list answers (captioning, quadrant).
Relative accuracy = accuracy of a setting / accuracy of `unpruned` (overall and per question type).

Paired 95% intervals: the same rows answer every setting, so a difference A - B is estimated per row
(score_A - score_B) and its interval is a paired percentile bootstrap over rows (rows resampled with
replacement, `n_boot` times, numpy generator seeded), per question type and over all rows.
"""
from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from workers.toyworld import QTYPES

log = logging.getLogger(__name__)
SETTINGS = ("unpruned", "glimpse", "glimpse_cap", "oracle", "anti_oracle", "outside_all", "random", "no_visual")
PRUNED = SETTINGS[1:]
LIST_QTYPES = ("captioning", "quadrant")  # answers that list objects: object F1 as well
PAIRS = (("glimpse", "unpruned"), ("glimpse_cap", "unpruned"), ("glimpse", "random"), ("glimpse", "oracle"),
         ("oracle", "anti_oracle"), ("oracle", "outside_all"), ("oracle", "random"), ("unpruned", "no_visual"))


# ---- scoring --------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    text = " ".join(text.strip().lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def _words(text: str) -> Counter:
    return Counter(normalise(text).replace(",", " ").split())


def token_f1(predicted: str, gold: str) -> float:
    """Word-level F1 of two answers (SQuAD-style, without article removal: articles carry counts here)."""
    pred, ref = _words(predicted), _words(gold)
    if not pred and not ref:
        return 1.0
    hits = sum((pred & ref).values())
    if hits == 0:
        return 0.0
    precision, recall = hits / sum(pred.values()), hits / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


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


# ---- paired intervals --------------------------------------------------------------------------------
def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int, seed: int) -> dict:
    """Mean of a - b over paired rows and its 95% percentile-bootstrap interval."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.size == 0:
        return {"n": 0, "diff": None, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"n": int(diff.size), "diff": float(diff.mean()), "lo": float(lo), "hi": float(hi)}


def differences(groups: dict, n_boot: int, seed: int) -> dict:
    """Per pair "A - B": per group (all, question types) exact-match and, for list types, object-F1 differences."""
    out = {}
    for a, b in PAIRS:
        entry = {}
        for key, rs in groups.items():
            cell = {"accuracy": paired_bootstrap([r[a]["correct"] for r in rs], [r[b]["correct"] for r in rs], n_boot, seed)}
            if key in LIST_QTYPES:
                cell["object_f1"] = paired_bootstrap([r[a]["object_f1"] for r in rs], [r[b]["object_f1"] for r in rs], n_boot, seed)
            entry[key] = cell
        out[f"{a} - {b}"] = entry
    return out


# ---- summary ---------------------------------------------------------------------------------------
def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def _sum(dicts) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def _setting_stats(name: str, rs: list, base: Optional[float]) -> dict:
    acc = _mean(r[name]["correct"] for r in rs)
    out = {"n": len(rs), "accuracy": acc, "relative_accuracy": _ratio(acc, base),
           "keep_ratio": _mean(r[name]["keep_ratio"] for r in rs), "token_f1": _mean(r[name]["token_f1"] for r in rs)}
    listed = [r for r in rs if "object_f1" in r[name]]
    out["object_f1"] = _mean(r[name]["object_f1"] for r in listed)
    if name in PRUNED:
        out["keep_mask_vs_boxes"] = prf(_sum(r[name]["mask"] for r in rs))
    return out


def count_bias(records: Sequence[dict]) -> dict:
    """For question types whose gold answers are all whole numbers (counting, region_count): per setting,
    the share of answers above, equal to and below the gold count, and of answers that are no number.
    Pruning that keeps objects the question is not about shows up as "over"; one that drops asked
    objects as "under"."""
    out = {}
    for qtype in sorted({r["qtype"] for r in records}):
        rows = [r for r in records if r["qtype"] == qtype]
        if not all(normalise(r["answer"]).isdigit() for r in rows):
            continue
        out[qtype] = {}
        for name in SETTINGS:
            tally = Counter()
            for r in rows:
                said, gold = normalise(r[name]["text"]), int(normalise(r["answer"]))
                tally["other" if not said.isdigit() else "over" if int(said) > gold else "under" if int(said) < gold else "exact"] += 1
            out[qtype][name] = {"n": len(rows), **{k: tally[k] / len(rows) for k in ("over", "exact", "under", "other")}}
    return out


def summarise(records: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    present = [q for q in QTYPES if any(r["qtype"] == q for r in records)]
    present += sorted({r["qtype"] for r in records} - set(present))
    by_qtype = {q: [r for r in records if r["qtype"] == q] for q in present}
    by_objects = defaultdict(list)
    for r in records:
        by_objects[r["num_objects"]].append(r)
    groups = {"all": list(records), **by_qtype}
    base = {key: _mean(r["unpruned"]["correct"] for r in rs) for key, rs in groups.items()}
    out: dict = {"rows": len(records), "qtypes": present, "settings": {}}
    for name in SETTINGS:
        entry = _setting_stats(name, list(records), base["all"])
        entry["by_qtype"] = {q: _setting_stats(name, rs, base[q]) for q, rs in by_qtype.items()}
        entry["by_objects"] = {str(n): _setting_stats(name, rs, None) for n, rs in sorted(by_objects.items())}
        out["settings"][name] = entry
    out["predicted_mask_vs_boxes"] = {key: prf(_sum(r["glimpse"]["predicted_mask"] for r in rs)) for key, rs in groups.items()}
    out["box_ratio"] = {"all": _mean(r["box_ratio"] for r in records),
                        "by_qtype": {q: _mean(r["box_ratio"] for r in rs) for q, rs in by_qtype.items()},
                        "by_objects": {str(n): _mean(r["box_ratio"] for r in rs) for n, rs in sorted(by_objects.items())}}
    by_images = defaultdict(list)
    for r in records:
        by_images[r.get("images", 1)].append(r)
    if len(by_images) > 1 or 1 not in by_images:
        out["by_images"] = {str(n): {name: _setting_stats(name, rs, None) for name in SETTINGS} for n, rs in sorted(by_images.items())}
        for n, rs in by_images.items():
            for name in PRUNED:
                shares = [r[name]["other_image_share"] for r in rs if "other_image_share" in r.get(name, {})]
                out["by_images"][str(n)][name]["other_image_share"] = _mean(shares)
            swapped = [r for r in rs if "unpruned_swapped" in r]
            out["by_images"][str(n)]["unpruned_swapped"] = {
                "n": len(swapped), "accuracy": _mean(r["unpruned_swapped"]["correct"] for r in swapped),
                "difference": paired_bootstrap([r["unpruned"]["correct"] for r in swapped],
                                               [r["unpruned_swapped"]["correct"] for r in swapped], n_boot, seed)}
    out["count_bias"] = count_bias(records)
    out["differences"] = differences(groups, n_boot, seed)
    out["intervals"] = f"paired percentile bootstrap over rows, {n_boot} resamples, seed {seed}, 95%"
    return out


# ---- markdown ----------------------------------------------------------------------------------------
def _fmt(x, pct=False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _prf_text(scores: dict) -> str:
    return " / ".join(_fmt(scores[k]) for k in ("precision", "recall", "iou"))


def _diff_text(cell: dict, points: bool = True) -> str:
    """"+1.2 [-0.5, +2.9]" in accuracy points, or "+0.012 [...]" for F1 differences."""
    if cell["diff"] is None:
        return "-"
    values = [cell[k] * (100 if points else 1) for k in ("diff", "lo", "hi")]
    fmt = "{:+.1f}" if points else "{:+.3f}"
    return f"{fmt.format(values[0])} [{fmt.format(values[1])}, {fmt.format(values[2])}]"


def _table(head: list, rows: list) -> list:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(summary: dict, header: str = "") -> str:
    s, qtypes = summary["settings"], summary["qtypes"]
    listed = [q for q in qtypes if q in LIST_QTYPES]
    lines = [header, f"Held-out synthetic rows: {summary['rows']} ("
             + ", ".join(f"{q} {s['unpruned']['by_qtype'][q]['n']}" for q in qtypes) + ").", "",
             "Exact-match accuracy (relative to unpruned); object F1 for list answers; keep mask vs box mask:", ""]
    head = ["setting", "keep", "all (rel)"] + qtypes + [f"{q} obj F1" for q in listed] + ["keep mask P / R / IoU"]
    rows = []
    for name in SETTINGS:
        e = s[name]
        cells = [f"{_fmt(e['by_qtype'][q]['accuracy'], True)} ({_fmt(e['by_qtype'][q]['relative_accuracy'], True)})" for q in qtypes]
        mask = e.get("keep_mask_vs_boxes")
        rows.append([name, _fmt(e["keep_ratio"], True), f"{_fmt(e['accuracy'], True)} ({_fmt(e['relative_accuracy'], True)})"]
                    + cells + [_fmt(e["by_qtype"][q]["object_f1"]) for q in listed] + [_prf_text(mask) if mask else "-"])
    lines += _table(head, rows)
    d = summary["differences"]
    lines += ["", f"Paired differences, accuracy points (object F1 for list answers), with 95% intervals "
              f"({summary['intervals']}):", ""]
    head = ["difference", "all"] + qtypes + [f"{q} obj F1" for q in listed]
    rows = [[pair, _diff_text(cells["all"]["accuracy"])] + [_diff_text(cells[q]["accuracy"]) for q in qtypes]
            + [_diff_text(cells[q]["object_f1"], points=False) for q in listed] for pair, cells in d.items()]
    lines += _table(head, rows)
    lines += ["", "Token F1 (word level) by question type:", ""]
    lines += _table(["setting", "all"] + qtypes, [[n, _fmt(s[n]["token_f1"])] + [_fmt(s[n]["by_qtype"][q]["token_f1"]) for q in qtypes]
                                                  for n in SETTINGS])
    pm = summary["predicted_mask_vs_boxes"]
    lines += ["", f"Predicted mask (sigmoid > threshold) vs box mask, all rows: P / R / IoU {_prf_text(pm['all'])}.", "",
              "Mean keep ratio by question type (box mask = the oracle's share):", ""]
    lines += _table(["question type", "n", "box mask"] + list(PRUNED) + ["predicted mask P / R / IoU"],
                    [[q, str(s["unpruned"]["by_qtype"][q]["n"]), _fmt(summary["box_ratio"]["by_qtype"][q], True)]
                     + [_fmt(s[n]["by_qtype"][q]["keep_ratio"], True) for n in PRUNED] + [_prf_text(pm[q])] for q in qtypes])
    lines += ["", "By object count: keep ratio of glimpse / glimpse_cap / box mask, and accuracy per setting:", ""]
    acc_names = ("unpruned", "glimpse", "oracle", "anti_oracle", "outside_all", "random", "no_visual")
    lines += _table(["objects", "n", "keep glimpse", "keep glimpse_cap", "box mask"] + [f"acc {n}" for n in acc_names],
                    [[k, str(e["n"]), _fmt(s["glimpse"]["by_objects"][k]["keep_ratio"], True),
                      _fmt(s["glimpse_cap"]["by_objects"][k]["keep_ratio"], True), _fmt(summary["box_ratio"]["by_objects"][k], True)]
                     + [_fmt(s[n]["by_objects"][k]["accuracy"], True) for n in acc_names]
                     for k, e in s["unpruned"]["by_objects"].items()])
    if summary.get("count_bias"):
        lines += ["", "Count answers: share above / equal to / below the gold count (and no number), per setting:", ""]
        names = [n for n in SETTINGS if n != "outside_all"]
        lines += _table(["question type", "n"] + names,
                        [[q, str(by["unpruned"]["n"])]
                         + [" / ".join(f"{100 * by[n][k]:.0f}" for k in ("over", "exact", "under")) + (
                             f" ({100 * by[n]['other']:.0f})" if by[n]["other"] else "") for n in names]
                         for q, by in summary["count_bias"].items()])
    if "by_images" in summary:
        bi = summary["by_images"]
        names = ("unpruned", "glimpse", "glimpse_cap", "oracle", "anti_oracle", "random", "no_visual")
        lines += ["", "By images per row: accuracy per setting; unpruned with the images in reverse order (the "
                  "question names the same image: a model that reads the named image loses, one that ignores the name "
                  "does not) and unpruned minus that; glimpse's keep ratio and the share of its kept tokens on the image "
                  "the question is NOT about (0 = only the asked image kept):", ""]
        lines += _table(["images", "n"] + [f"acc {n}" for n in names]
                        + ["acc unpruned, images swapped", "unpruned - swapped", "keep glimpse", "glimpse kept on other image",
                           "random kept on other image"],
                        [[k, str(e["unpruned"]["n"])] + [_fmt(e[n]["accuracy"], True) for n in names]
                         + [_fmt(e["unpruned_swapped"]["accuracy"], True),
                            _diff_text(e["unpruned_swapped"]["difference"]) if e["unpruned_swapped"]["n"] else "-",
                            _fmt(e["glimpse"]["keep_ratio"], True), _fmt(e["glimpse"].get("other_image_share"), True),
                            _fmt(e["random"].get("other_image_share"), True)]
                         for k, e in bi.items()])
    lines += ["", "Plot: eval.png (accuracy, or object F1 for list answers, vs mean keep ratio, per question type)."]
    return "\n".join(lines) + "\n"


# ---- plot ---------------------------------------------------------------------------------------------
_MARKERS = {"unpruned": "o", "glimpse": "*", "glimpse_cap": "P", "oracle": "^", "anti_oracle": "v", "outside_all": "D",
            "random": "s", "no_visual": "x"}


def panel_grid(count: int, max_cols: int, size: tuple, path: Path):
    """(pyplot, figure, axes [rows, cols]) for `count` panels, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a dependency in pyproject; a bare environment still gets the tables
        log.warning("matplotlib is not installed: no %s", path)
        return None
    cols = min(max_cols, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return plt, fig, axes


def write_plot(summary: dict, path: Path) -> Optional[Path]:
    """Accuracy (object F1 for list answers) vs mean keep ratio, one panel per question type + all."""
    panels = ["all"] + summary["qtypes"]
    grid = panel_grid(len(panels), 4, (3.6, 3.2), path)
    if grid is None:
        return None
    plt, fig, axes = grid
    for ax, key in zip(axes.flat, panels):
        metric = "object_f1" if key in LIST_QTYPES else "accuracy"
        for name in SETTINGS:
            e = summary["settings"][name] if key == "all" else summary["settings"][name]["by_qtype"][key]
            if e[metric] is not None and e["keep_ratio"] is not None:
                ax.scatter(100 * e["keep_ratio"], 100 * e[metric] if metric == "accuracy" else e[metric],
                           marker=_MARKERS[name], s=60, label=name)
        n = summary["rows"] if key == "all" else summary["settings"]["unpruned"]["by_qtype"][key]["n"]
        ax.set_title(f"{key} (n={n})", fontsize=10)
        ax.set_xlabel("mean keep ratio (%)")
        ax.set_ylabel("object F1" if metric == "object_f1" else "accuracy (%)")
        ax.set_xlim(-5, 105)
        ax.set_ylim(*((-0.05, 1.05) if metric == "object_f1" else (-5, 105)))  # full scale: no exaggerated gaps
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(SETTINGS), fontsize=9, frameon=False)
    fig.suptitle(summary.get("title", ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



# ---- two runs on the same rows ------------------------------------------------------------------------
def paired_runs(new: Sequence[dict], old: Sequence[dict], settings: Sequence[str] = SETTINGS, n_boot: int = 2000,
                seed: int = 0) -> dict:
    """Per setting and question type (and "all"), new minus old accuracy over the same rows (two
    `eval_rows.jsonl` of one evaluation set, e.g. two training stages), with paired intervals."""
    if [r["id"] for r in new] != [r["id"] for r in old]:
        raise ValueError("the two runs do not hold the same rows in the same order")
    types = ["all"] + [q for q in QTYPES if any(r["qtype"] == q for r in new)]
    out = {}
    for name in settings:
        out[name] = {}
        for q in types:
            rows = [i for i, r in enumerate(new) if q == "all" or r["qtype"] == q]
            out[name][q] = paired_bootstrap([new[i][name]["correct"] for i in rows], [old[i][name]["correct"] for i in rows],
                                            n_boot, seed)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m workers.training.eval_report",
                                     description="Paired accuracy differences of two evaluation runs on the same rows.")
    parser.add_argument("new", type=Path, help="eval_rows.jsonl of the new run")
    parser.add_argument("old", type=Path, help="eval_rows.jsonl of the old run (same seed, rows and world)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    load = lambda p: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]  # noqa: E731
    diffs = paired_runs(load(args.new), load(args.old), n_boot=args.bootstrap)
    types = list(next(iter(diffs.values())))
    print(f"new - old, accuracy points, 95% paired bootstrap ({args.bootstrap} resamples):\n")
    print("\n".join(_table(["setting"] + types, [[name] + [_diff_text(by[q]) for q in types] for name, by in diffs.items()])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
