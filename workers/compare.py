"""The comparison harness: pruning strategies x keep ratios on one evaluation set, in one engine.

    # the shipped small model's held-out synthetic set
    python -m workers.compare --base models/small-qwen2_5_vl-v2 --modules models/small-qwen2_5_vl-v2-glimpse \\
        --rows 300 --ratios 0.056,0.111,0.222,0.333 --out reports/eval-small-qwen2_5_vl-v2/compare
    # any Parquet set with reference answers (local, s3://, gs://, ...: anything fsspec reads)
    python -m workers.compare --base ... --modules ... --eval-set s3://bucket/textvqa/val/ \\
        --columns answer=answers,task=dataset --post-prompt "Answer the question using a single word or phrase." --out ...

Every row is answered greedily by every setting from the same processed inputs, batch by batch, so
all settings see the same rows on the same machine in the same minutes (the order of the settings
rotates from batch to batch, so slow drift of the machine favours none):

  unpruned        all visual tokens (the reference);
  glimpse         GlimpsePrune's dynamic rule (threshold 0.5, no cap);
  glimpse@r       GlimpsePrune with exactly int(r * N) tokens (fixed_remain_ratio r, top-k importance);
  <strategy>@r    random, uniform, fastv, pdrop, divprune, dart, visionzip, cdpruner (`workers.modeling.strategies`);
  oracle          exactly the tokens of the relevant boxes; anti_oracle: as many tokens, all outside
                  them (the wrong tokens at the right count). Needs boxes: the synthetic world has
                  them, a Parquet set may (`boxes` column: normalised x0,y0,x1,y1 per box, one image).
  anti_glimpse    without boxes: as many tokens as glimpse keeps, the ones it ranks LOWEST (what
                  keeping exactly the tokens glimpse throws away costs);
  no_visual       no visual token. The explicit masks (oracle, anti_*, no_visual) prune at the
                  modules' reduce_layer. They show what the set can tell apart: a strategy no better
                  than anti_oracle / no_visual has learnt nothing on it.

Scores (`workers.metrics`, lmms-eval conventions), per row, by its task: exact match, VQA accuracy
(several reference answers), ANLS (document tasks), relaxed accuracy (charts), object F1 (the
synthetic world's list answers). Per setting: the mean score overall and per task, relative to
unpruned, mean keep ratio, prefill milliseconds and KV-cache tokens (per layer, after prefill) per
row, and rows/s of that setting's batches (wall clock, the same rows). Paired 95% bootstrap
intervals for every setting against unpruned, and for every strategy against glimpse at the same ratio.

Writes compare.md (tables), compare.json (everything), compare_rows.jsonl and compare.png (score vs
keep ratio, one line per strategy, the references as markers).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from workers.modeling.api import GenerationRequest, KeepMasks, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.strategies import make_strategy

log = logging.getLogger(__name__)
STRATEGY_NAMES = ("random", "uniform", "fastv", "pdrop", "divprune", "dart", "visionzip", "cdpruner")
MASK_SETTINGS = ("oracle", "anti_oracle", "anti_glimpse", "no_visual")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation row: its images, question, reference answers, task and metric; boxes (normalised
    x0, y0, x1, y1 of the regions that answer it, on image `box_image` of the row) when the set has
    them, else None."""

    id: str
    images: tuple
    question: str
    refs: tuple
    task: str
    metric: str
    boxes: Optional[tuple] = None
    box_image: int = 0


@dataclass(frozen=True)
class CompareConfig:
    rows: int = 300
    seed: int = 2_000_003  # held out: must differ from the training world's seed
    ratios: tuple = (0.056, 0.111, 0.222, 0.333)
    strategies: tuple = STRATEGY_NAMES + ("glimpse",)
    batch_size: int = 16
    max_new_tokens: int = 96
    threshold: float = 0.5
    bootstrap: int = 2000
    random_seed: int = 0
    params: dict = field(default_factory=dict)  # per strategy name, its parameters
    boxes: bool = True  # the set has boxes: oracle / anti_oracle; else anti_glimpse


def build_settings(model, processor, modules, cfg: CompareConfig) -> dict:
    """name -> (engine, kind) with kind "plain", "rule" or "masks"."""
    out = {"unpruned": (GlimpseEngine(model, processor), "plain"),
           "glimpse": (GlimpseEngine(model, processor, modules, KeepRule(cfg.threshold, None, 1)), "rule")}
    for name in cfg.strategies:
        for r in cfg.ratios:
            rule = KeepRule(fixed_remain_ratio=r)
            if name == "glimpse":
                engine = GlimpseEngine(model, processor, modules, rule)
            else:
                engine = GlimpseEngine(model, processor, rule=rule, strategy=make_strategy(name, **cfg.params.get(name, {})))
            out[f"{name}@{r:g}"] = (engine, "rule")
    for name in (("oracle", "anti_oracle") if cfg.boxes else ("anti_glimpse",)) + ("no_visual",):
        out[name] = (out["glimpse"][0], "masks")
    return out


def _box_masks(items: Sequence[EvalItem], grids, merge: int) -> list:
    from workers.toyworld import boxes_on_grids
    from workers.training.data import split_grids

    rows = split_grids(grids, [len(item.images) for item in items], merge)
    return [torch.from_numpy(boxes_on_grids([item.boxes if k == item.box_image else [] for k in range(len(row))], row))
            for item, row in zip(items, rows)]


def _masks(items: Sequence[EvalItem], inputs, merge: int, visual: list, first: int, seed: int) -> dict:
    from workers.training.evaluate import random_keep_masks

    sizes = [sum(v) for v in visual]
    out = {"no_visual": [torch.zeros(n, dtype=torch.bool) for n in sizes]}
    if items and items[0].boxes is not None:
        boxes = _box_masks(items, inputs.image_grid_thw, merge)
        seeds = [seed * 1_000_003 + first + i for i in range(len(boxes))]
        out["oracle"] = [b.bool() for b in boxes]
        out["anti_oracle"] = random_keep_masks(sizes, [int(b.sum()) for b in boxes], seeds, allowed=[~b.bool() for b in boxes])
    return out


def anti_masks(results: Sequence) -> list:
    """Per row, as many tokens as its glimpse result kept, the ones with the LOWEST importance."""
    from workers.modeling.strategies import topk_mask

    return [topk_mask(-r.importance_logits.float(), r.kept_tokens) for r in results]


def evaluate_batch(settings: dict, items: Sequence[EvalItem], first: int, cfg: CompareConfig, seconds: dict,
                   prefill: Optional[dict] = None) -> list:
    """Every setting on one batch (in an order rotated by the batch's position, so slow drift of the
    machine does not favour the settings that run first; anti_glimpse runs after glimpse, whose
    importance it reads); seconds/prefill: per setting, totals."""
    gp = settings["glimpse"][0]
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    inputs = gp.build_inputs([GenerationRequest(images=tuple(it.images), prompt=it.question) for it in items])
    visual = gp.core.visual_tokens(inputs)
    masks = _masks(items, inputs, gp.core.visual.spatial_merge_size, visual, first, cfg.random_seed)
    seeds = [cfg.random_seed * 1_000_003 + first + i for i in range(len(items))]
    results = {}
    names = list(settings)
    shift = (first // max(1, cfg.batch_size)) % len(names)
    order = names[shift:] + names[:shift]
    if "anti_glimpse" in order:
        order.remove("anti_glimpse")
        order.insert(order.index("glimpse") + 1, "anti_glimpse")
    for name in order:
        engine, kind = settings[name]
        t0 = time.perf_counter()
        if kind == "plain":
            res = engine.generate_from_inputs(inputs, sampling, prune=False)
        elif kind == "masks":
            chosen = anti_masks(results["glimpse"]) if name == "anti_glimpse" else masks[name]
            res = engine.generate_from_inputs(inputs, sampling, keep=KeepMasks(tuple(chosen)))
        else:
            res = engine.generate_from_inputs(inputs, sampling, prune_seeds=seeds, return_masks=name == "glimpse")
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        if prefill is not None:  # the static engine gives each row its batch's prefill seconds
            prefill[name] = prefill.get(name, 0.0) + res[0].prefill_s
        results[name] = res
    work = {name: _work(settings[name]) for name in results}
    return [record(it, {name: res[i] for name, res in results.items()}, work) for i, it in enumerate(items)]


def _work(setting):
    """res -> predicted decoder prefill work over unpruned (the engine's pruning schedule: a multi-stage
    strategy's earlier layers see more than its final budget)."""
    engine, kind = setting
    if kind == "plain":
        return lambda res: 1.0
    return lambda res: engine.prefill_work_ratio(res.prompt_tokens, res.visual_tokens, res.kept_tokens, masks=kind == "masks")


def record(item: EvalItem, results: dict, work: Optional[dict] = None) -> dict:
    from workers.metrics import score

    out = {"id": item.id, "task": item.task, "metric": item.metric, "refs": list(item.refs)}
    for name, res in results.items():
        out[name] = {"text": res.text, "score": score(item.metric, res.text, item.refs), "keep_ratio": res.keep_ratio,
                     "kv_tokens": res.prompt_tokens - res.visual_tokens + res.kept_tokens,
                     "prefill_work": work[name](res) if work else None}
    return out


# ---- evaluation sets -----------------------------------------------------------------------------
def synthetic_items(world, start: int, stop: int) -> list:
    """Rows start..stop-1 of a synthetic world: one-word answers by exact match, list answers
    (captioning, quadrant) by object F1, the relevant objects' boxes for the oracle."""
    from workers.toyworld import make_sample, row_images
    from workers.training.eval_report import LIST_QTYPES

    out = []
    for i in range(start, stop):
        s = make_sample(world, i)
        out.append(EvalItem(id=s.id, images=row_images(s), question=s.question, refs=(s.answer,), task=s.qtype,
                            metric="object_f1" if s.qtype in LIST_QTYPES else "exact_match",
                            boxes=tuple(tuple(b) for b in s.boxes), box_image=s.target))
    return out


PARQUET_COLUMNS = {"id": "id", "image": "image", "question": "question", "answer": "answer", "task": "task",
                   "boxes": "boxes", "box_image": "target_image"}


class ParquetSet:
    """An evaluation set from Parquet (a file, a folder or a glob; local or any fsspec URL).

    Columns (names overridable): id; image (encoded bytes, a {bytes, path} struct as Hugging Face
    datasets write it, or a list of either for multi-image rows); question; answer (a string or a
    list of reference strings, e.g. VQAv2's ten); optional task (the per-task tables and the
    metric choice); optional boxes (list of normalised [x0, y0, x1, y1]: enables the oracle /
    anti-oracle rows) on the row's image number `box_image` (column `target_image` in the toy world's
    shards; 0 when absent). metric: one name for all rows, a {task: name} dict (other tasks:
    picked), or None to pick per task (`workers.metrics.pick_metric`). post_prompt: appended to every question (lmms-eval's
    "Answer the question using a single word or phrase." for short-answer sets)."""

    def __init__(self, uri: str, columns: Optional[dict] = None, metric: Optional[str] = None, post_prompt: str = "",
                 limit: Optional[int] = None):
        import pyarrow.dataset as pads
        from fsspec.core import url_to_fs

        self.columns = {**PARQUET_COLUMNS, **(columns or {})}
        fs, path = url_to_fs(uri)
        if any(ch in path for ch in "*?["):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
        else:
            files = [path]
        if not files:
            raise ValueError(f"--eval-set {uri}: no Parquet files found")
        table = pads.dataset(files, filesystem=fs, format="parquet").to_table()
        missing = [self.columns[c] for c in ("id", "image", "question", "answer") if self.columns[c] not in table.column_names]
        if missing:
            raise ValueError(f"--eval-set {uri}: no column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")
        if limit is not None:
            table = table.slice(0, limit)
        self.table = table
        self.metric = metric
        self.post_prompt = post_prompt
        self.has_boxes = self.columns["boxes"] in table.column_names

    def __len__(self) -> int:
        return self.table.num_rows

    def items(self, start: int, stop: int) -> list:
        from workers.metrics import pick_metric

        c = self.columns
        rows = self.table.slice(start, stop - start).to_pylist()
        out = []
        for i, row in enumerate(rows):
            refs = row[c["answer"]]
            refs = tuple(str(r) for r in refs) if isinstance(refs, (list, tuple)) else (str(refs),)
            task = str(row.get(c["task"]) or "all")
            images = row[c["image"]]
            images = tuple(_image(x) for x in (images if isinstance(images, list) else [images]))
            boxes = row.get(c["boxes"]) if self.has_boxes else None
            box_image = int(row.get(c["box_image"]) or 0) if self.has_boxes else 0
            if self.has_boxes and not 0 <= box_image < len(images):
                raise ValueError(f"row {row[c['id']]}: boxes on image {box_image} of a row with {len(images)} image(s)")
            question = str(row[c["question"]]) + (("\n" + self.post_prompt) if self.post_prompt else "")
            metric = self.metric.get(task) if isinstance(self.metric, dict) else self.metric
            out.append(EvalItem(id=str(row[c["id"]] if row[c["id"]] is not None else start + i), images=images,
                                question=question, refs=refs, task=task, metric=metric or pick_metric(task, len(refs)),
                                boxes=tuple(tuple(b) for b in (boxes or ())) if self.has_boxes else None,
                                box_image=box_image))
        return out


def _image(value):
    import io

    from PIL import Image

    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("an eval-set image must be encoded bytes (or a {bytes, path} struct)")
    return Image.open(io.BytesIO(data)).convert("RGB")


# ---- summary ---------------------------------------------------------------------------------------
def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarise(records: Sequence[dict], settings: Sequence[str], seconds: dict, cfg: CompareConfig,
              prefill: Optional[dict] = None) -> dict:
    from workers.training.eval_report import paired_bootstrap

    tasks = sorted({r["task"] for r in records})
    groups = {"all": list(records), **{t: [r for r in records if r["task"] == t] for t in tasks if t != "all"}}
    base = {k: _mean(r["unpruned"]["score"] for r in rs) for k, rs in groups.items()}
    metrics = {t: sorted({r["metric"] for r in rs}) for t, rs in groups.items()}
    out = {"rows": len(records), "tasks": [t for t in groups if t != "all"], "metrics": metrics, "settings": {}}
    for name in settings:
        score = {k: _mean(r[name]["score"] for r in rs) for k, rs in groups.items()}
        entry = {
            "score": score,
            "relative": {k: (score[k] / base[k] if base[k] else None) for k in groups},
            "keep_ratio": _mean(r[name]["keep_ratio"] for r in records),
            "prefill_ms": 1000 * prefill[name] / len(records) if prefill and name in prefill else None,
            "kv_tokens": _mean(r[name]["kv_tokens"] for r in records),
            "prefill_work": _mean(r[name]["prefill_work"] for r in records if r[name].get("prefill_work") is not None),
            "rows_per_s": len(records) / seconds[name] if seconds.get(name) else None,
            "vs_unpruned": paired_bootstrap([r[name]["score"] for r in records], [r["unpruned"]["score"] for r in records],
                                            cfg.bootstrap, cfg.random_seed),
        }
        strategy, _, ratio = name.partition("@")
        if ratio and strategy != "glimpse" and f"glimpse@{ratio}" in settings:
            other = f"glimpse@{ratio}"
            entry["vs_glimpse_same_ratio"] = paired_bootstrap(
                [r[name]["score"] for r in records], [r[other]["score"] for r in records], cfg.bootstrap, cfg.random_seed)
        out["settings"][name] = entry
    out["intervals"] = f"paired percentile bootstrap over rows, {cfg.bootstrap} resamples, seed {cfg.random_seed}, 95%"
    return out


def _f(x, pct=False, digits=3) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.{digits}f}"


def _diff(cell: Optional[dict]) -> str:
    if not cell or cell.get("diff") is None:
        return "-"
    return f"{100 * cell['diff']:+.1f} [{100 * cell['lo']:+.1f}, {100 * cell['hi']:+.1f}]"


def render_markdown(summary: dict, meta: dict) -> str:
    q = summary["tasks"]
    metrics = ", ".join(f"{t}: {'/'.join(m)}" for t, m in summary["metrics"].items() if t != "all")
    lines = ["# Pruning strategies compared\n",
             f"base `{meta['base']}`, modules `{meta['modules']}`; {summary['rows']} rows of {meta['set']}; greedy, max "
             f"{meta['config']['max_new_tokens']} new tokens; batches of {meta['config']['batch_size']}; device "
             f"{meta['device']}, {meta['threads']} thread(s); {meta['seconds']:.0f} s in all. Explicit masks (oracle, "
             f"anti_*, no_visual) prune after layer {meta['masks_layer']}.\n",
             f"Score per row by its task's metric ({metrics}); `rel.` = over unpruned. Differences are in points with "
             + summary["intervals"] + ". `keep`: visual tokens left after the (last) pruning point; `prefill work`: "
             "the predicted decoder prefill token-layers over unpruned (layers before a pruning point run on more "
             "tokens: FastV/DART/glimpse prune after a layer, PDrop in stages). KV tokens: the cache length per layer "
             "after prefill (text + kept visual). Prefill ms and rows/s: that setting's batches alone, wall clock, on "
             "the same rows.\n"]
    head = ["setting", "keep", "score", "rel."] + q + ["prefill work", "prefill ms/row", "KV tok/row", "rows/s", "vs unpruned",
                                                       "vs glimpse@r"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in summary["settings"].items():
        cells = [name, _f(e["keep_ratio"], True), _f(e["score"]["all"]), _f(e["relative"]["all"], True)]
        cells += [_f(e["score"][k]) for k in q]
        cells += [_f(e.get("prefill_work"), digits=2), _f(e["prefill_ms"], digits=1), _f(e["kv_tokens"], digits=1),
                  _f(e["rows_per_s"], digits=1),
                  _diff(e["vs_unpruned"]), _diff(e.get("vs_glimpse_same_ratio"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plot(summary: dict, path: Path, title: str) -> Optional[Path]:
    from workers.training.eval_report import panel_grid

    panels = ["all"] + summary["tasks"]
    grid = panel_grid(len(panels), 3, (4.4, 3.6), path)
    if grid is None:
        return None
    plt, fig, axes = grid
    lines: dict = {}
    for name, e in summary["settings"].items():
        strategy, _, ratio = name.partition("@")
        if ratio:
            lines.setdefault(strategy, []).append(e)
    markers = {"unpruned": "o", "glimpse": "*", "oracle": "^", "anti_oracle": "v", "anti_glimpse": "v", "no_visual": "x"}
    for ax, key in zip(axes.flat, panels):
        for strategy, entries in lines.items():
            entries = sorted(entries, key=lambda e: e["keep_ratio"])
            ax.plot([100 * e["keep_ratio"] for e in entries], [e["score"][key] for e in entries], marker=".",
                    lw=2.2 if strategy == "glimpse" else 1.2, label=f"{strategy}@r")
        for ref, marker in markers.items():
            e = summary["settings"].get(ref)
            if e is not None and e["score"][key] is not None:
                ax.scatter(100 * e["keep_ratio"], e["score"][key], marker=marker, s=70, color="black" if ref != "glimpse" else "red",
                           zorder=5, label=ref)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("mean keep ratio (%)")
        ax.set_ylabel("score")
        ax.set_xlim(-3, 103)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(model, processor, modules, cfg: CompareConfig, items) -> tuple:
    """items(start, stop) -> EvalItems; cfg.rows of them are compared (after an untimed warm-up batch)."""
    settings = build_settings(model, processor, modules, cfg)
    evaluate_batch(settings, items(0, min(2, cfg.rows)), 0, cfg, {})  # warm-up, untimed
    seconds: dict = {}
    prefill: dict = {}
    records = []
    t0 = time.perf_counter()
    for start in range(0, cfg.rows, cfg.batch_size):
        records.extend(evaluate_batch(settings, items(start, min(start + cfg.batch_size, cfg.rows)), start, cfg, seconds, prefill))
        log.info("compared %d/%d rows (%.0f s)", len(records), cfg.rows, time.perf_counter() - t0)
    return records, summarise(records, list(settings), seconds, cfg, prefill)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.compare", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--modules", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--rows", type=int, default=CompareConfig.rows)
    p.add_argument("--seed", type=int, default=CompareConfig.seed, help="held-out world seed (synthetic set)")
    p.add_argument("--eval-set", help="a Parquet evaluation set (file, folder or glob; any fsspec URL) instead of the "
                   "model's synthetic world")
    p.add_argument("--columns", default="", metavar="ROLE=NAME,...",
                   help="eval-set column names, roles: " + ", ".join(PARQUET_COLUMNS))
    p.add_argument("--metric", help="eval-set metric: one for every row, or TASK=METRIC,... (other tasks: chosen per "
                   "task); metrics: exact_match, vqa_accuracy, anls, relaxed_accuracy, object_f1")
    p.add_argument("--post-prompt", default="", help="eval-set: text appended to every question")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in CompareConfig.ratios))
    p.add_argument("--strategies", default=",".join(CompareConfig.strategies))
    p.add_argument("--batch-size", type=int, default=CompareConfig.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=CompareConfig.max_new_tokens)
    p.add_argument("--param", action="append", default=[], metavar="STRATEGY.KEY=VALUE",
                   help="a strategy parameter, e.g. fastv.layer=3 (JSON value)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    return p.parse_args(argv)


def config_from(args) -> CompareConfig:
    params: dict = {}
    for item in args.param:
        key, _, value = item.partition("=")
        strategy, _, name = key.partition(".")
        if not name or not value:
            raise SystemExit(f"--param {item!r}: expected STRATEGY.KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        params.setdefault(strategy, {})[name] = parsed
    for strategy, values in params.items():
        if "fractions" in values:
            values["fractions"] = tuple(values["fractions"])
    ratios = tuple(float(r) for r in args.ratios.split(",") if r)
    strategies = tuple(s for s in args.strategies.split(",") if s)
    for s in strategies:
        if s != "glimpse":
            make_strategy(s, **params.get(s, {}))  # unknown names/parameters fail before any work
    if any(not 0 < r <= 1 for r in ratios):
        raise SystemExit(f"--ratios must be in (0, 1], got {args.ratios}")
    return CompareConfig(rows=args.rows, seed=args.seed, ratios=ratios, strategies=strategies, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, params=params)


def _columns(text: str) -> dict:
    out = {}
    for item in (t for t in text.split(",") if t):
        role, _, name = item.partition("=")
        if role not in PARQUET_COLUMNS or not name:
            raise SystemExit(f"--columns {item!r}: expected ROLE=NAME with ROLE one of {', '.join(PARQUET_COLUMNS)}")
        out[role] = name
    return out


def _metric_arg(text: Optional[str], known) -> Optional[object]:
    """--metric: None, one metric name, or {task: metric} from TASK=METRIC,..."""
    if not text:
        return None
    pairs = [t.partition("=") for t in text.split(",") if t]
    named = {task: metric for task, eq, metric in pairs if eq}
    single = [task for task, eq, _ in pairs if not eq]
    for name in list(named.values()) + single:
        if name not in known:
            raise SystemExit(f"--metric {name!r}: known metrics are {', '.join(known)}")
    if single and (named or len(single) > 1):
        raise SystemExit(f"--metric {text!r}: give one metric, or TASK=METRIC pairs")
    return single[0] if single else named


def main(argv=None) -> int:
    from workers.metrics import METRICS
    from workers.modeling.loading import load_engine
    from workers.training.evaluate import trained_world

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from(args)
    metric = _metric_arg(args.metric, METRICS)
    if args.eval_set:
        try:
            dataset = ParquetSet(args.eval_set, _columns(args.columns), metric, args.post_prompt, limit=cfg.rows)
        except (ValueError, OSError) as exc:
            raise SystemExit(str(exc))
        import dataclasses

        cfg = dataclasses.replace(cfg, rows=min(cfg.rows, len(dataset)), boxes=dataset.has_boxes)
        items, described, world_meta = dataset.items, f"`{args.eval_set}`", {}
    else:
        trained, _source = trained_world(args.base, args.modules)
        if cfg.seed == trained.seed:
            raise SystemExit(f"--seed {cfg.seed} is the training world's seed: use a held-out one")
        import dataclasses

        world = dataclasses.replace(trained, seed=cfg.seed)
        items = lambda start, stop: synthetic_items(world, start, stop)  # noqa: E731
        described = f"the synthetic world held out by seed {world.seed} (trained on seed {trained.seed})"
        world_meta = {"world": asdict(world), "training_seed": trained.seed}
    loaded = load_engine(args.base, args.modules, device=args.device)
    t0 = time.perf_counter()
    records, summary = run(loaded.model, loaded.processor, loaded.modules, cfg, items)
    meta = {"base": str(args.base), "modules": str(args.modules), "set": described, "config": asdict(cfg), **world_meta,
            "device": str(loaded.device), "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0,
            "masks_layer": loaded.modules.config.reduce_layer}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({**meta, **summary}, indent=2))
    (out / "compare.md").write_text(render_markdown(summary, meta))
    with open(out / "compare_rows.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    write_plot(summary, out / "compare.png", f"{args.base}: {summary['rows']} rows, score vs keep ratio")
    print((out / "compare.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
