"""Where does the base model point at the asked object? A per-layer localisation probe.

    python -m workers.training.locate_probe --base DIR --modules DIR --rows 200 --seed 80808 --out FILE.json

Glimpse pruning after layer K can keep the asked object only if something computed by layer K ranks
that object's visual tokens above the other objects'. This probe measures that ranking on held-out
rows of the model's own world, with three scores per visual token:

  last_token   the last prompt token's raw attention logits at each layer 0..L-1 (the base model's own
               query, as FastV uses it after layer K);
  word         the same for the question's first shape or colour word ("triangle" in "What color is the
               triangle?"), where the base model may match a word to the object it names (rows
               without such a word, e.g. quadrant questions, have no word score);
  glimpse      the glimpse query's raw attention logits at each layer (the modules' glimpse vectors
               added as in training; only layers <= the modules' reduce_layer feed the VIP, and the
               glimpse vectors of later layers are trained only when the modules were trained with
               the answer loss);
  vip          the VIP's importance logit (what the keep rule thresholds).

and two AUCs per row (rank statistics, so a per-row softmax would not change them):
  which        the relevant boxes' tokens vs the tokens of the scene's OTHER objects: does the score
               pick the asked object, not just any object?
  objectness   the tokens of every object vs background tokens.
Attention scores are reported for the best single head and for the mean over heads of the logits.
Rows without relevant tokens, or whose relevant tokens cover every object, have no `which` AUC.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from workers.modeling import compat
from workers.modeling.qwen2_5_vl import QwenGlimpseModel
from workers.toyworld import WorldConfig, make_sample
from workers.training.data import BatchEncoder
from workers.training.glimpse_trainer import build_batch, insert_glimpse

log = logging.getLogger(__name__)


def auc(pos: np.ndarray, neg: np.ndarray) -> Optional[float]:
    """P(score of a positive > score of a negative), ties count 1/2 (Mann-Whitney U / (n_pos n_neg))."""
    if len(pos) == 0 or len(neg) == 0:
        return None
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


@torch.inference_mode()
def layer_scores(core: QwenGlimpseModel, batch, word_pos: Optional[torch.Tensor] = None) -> dict:
    """Per sample, per layer: last-token and glimpse raw logits over its visual tokens [N_v, H], and the
    VIP logits [N_v]. One forward of the training layout (prompt, glimpse, answer; causal, so the prompt
    and the glimpse see what they see at inference)."""
    modules, cfg = core.modules, core.modules.config
    inputs = batch.inputs
    embeds, feats = core.embed(inputs, tuple(cfg.selected_visual_layers))
    positions = core.positions(inputs)
    is_image = inputs.input_ids == core.config.image_token_id
    seq = insert_glimpse(embeds, positions, inputs.attention_mask, batch.labels, is_image, modules.glimpse_vector(0))
    rows = torch.arange(seq.hidden.shape[0])
    last = seq.index - 1  # the last prompt token
    glimpse_at = seq.is_glimpse[..., None]
    cache = DynamicCache(config=compat.text_config(core.model))
    queries: dict = {}
    out: dict = {"last_token": {}, "glimpse": {}, "word": {}}
    word_at = word_pos if word_pos is not None else last
    n_layers = len(core.lm.layers)
    le_layers = set(cfg.le_layers)

    def query_of(i, h, rope, at):
        r = (rope[0][rows, at][:, None], rope[1][rows, at][:, None])
        return core.glimpse_query(i, h[rows, at][:, None], r)

    def on_layer(i, h, rope, before):
        if before:
            if i > 0 and i in le_layers:
                h = h + glimpse_at * modules.glimpse_vector(i).to(h.dtype)
            queries[i] = (query_of(i, h, rope, last), query_of(i, h, rope, seq.index), query_of(i, h, rope, word_at))
            return h
        q_last, q_glimpse, q_word = queries.pop(i)
        out["word"][i] = core._glimpse_attention(i, q_word, cache, seq.is_image[:, :-1])
        # `_glimpse_attention` drops the last key slot, here the final answer token (never visual).
        out["last_token"][i] = core._glimpse_attention(i, q_last, cache, seq.is_image[:, :-1])
        out["glimpse"][i] = core._glimpse_attention(i, q_glimpse, cache, seq.is_image[:, :-1])

    core.run_layers(range(n_layers), seq.hidden, seq.pad, seq.positions, cache, on_layer)
    attn_in = torch.cat([out["glimpse"][i] for i in cfg.selected_layers], dim=-1)
    grids = [tuple(g) for g in (inputs.image_grid_thw[:, 1:] // core.visual.spatial_merge_size).tolist()]
    vip = modules.attn_fuser(attn_in, feats, grids)
    sizes = [int(n) for n in seq.is_image.sum(dim=1).tolist()]
    split = lambda t: [x.float().numpy() for x in torch.split(t, sizes)]  # noqa: E731
    return {"last_token": {i: split(t) for i, t in out["last_token"].items()},
            "word": {i: split(t) for i, t in out["word"].items()},
            "glimpse": {i: split(t) for i, t in out["glimpse"].items()},
            "vip": split(vip)}


def row_aucs(score: np.ndarray, relevant: np.ndarray, objects: np.ndarray) -> dict:
    """score [N_v] or [N_v, H]: the two AUCs, best head and head mean (1-D scores: 'score')."""
    others = objects & ~relevant
    result = {}
    columns = {"score": score} if score.ndim == 1 else {
        "mean": score.mean(axis=1), **{f"h{h}": score[:, h] for h in range(score.shape[1])}}
    for name, s in columns.items():
        result[name] = {"which": auc(s[relevant], s[others]), "objectness": auc(s[objects], s[~objects])}
    return result


def summarise(per_row: list) -> dict:
    """Mean AUC per (score, layer, column, kind) and qtype; 'best_head' = the head with the highest mean
    `which` AUC over all rows (chosen on these rows: an optimistic figure)."""
    acc: dict = defaultdict(list)
    for row in per_row:
        for key, value in row["aucs"].items():
            for qt in (row["qtype"], "all"):
                if value is not None:
                    acc[(key, qt)].append(value)
    means = {k: (float(np.mean(v)), len(v)) for k, v in acc.items()}
    out: dict = defaultdict(dict)
    for (key, qt), (m, n) in means.items():
        out[key][qt] = {"auc": round(m, 4), "n": n}
    # best head per (score, layer, kind)
    best: dict = {}
    for key in list(out):
        score, layer, column, kind = key.split("|")
        if column.startswith("h"):
            cand = (score, layer, kind)
            if cand not in best or out[key]["all"]["auc"] > out[best[cand]]["all"]["auc"]:
                best[cand] = key
    table = {}
    for (score, layer, kind), key in best.items():
        table[f"{score}|{layer}|best_head|{kind}"] = {**out[key], "head": key.split("|")[2]}
    return {**{k: v for k, v in out.items() if not k.split("|")[2].startswith("h")}, **table}


def first_words(encoder: BatchEncoder, samples: Sequence, batch) -> tuple[torch.Tensor, list]:
    """Per row, the slot of the question's first shape or colour word in the left-padded batch (the
    last prompt token where there is none) and whether there is one."""
    lengths = batch.inputs.attention_mask.sum(dim=1).tolist()
    width = batch.inputs.input_ids.shape[1]
    visual = [int(n) for n in (batch.inputs.input_ids == encoder.image_token_id).sum(dim=1).tolist()]
    labels = batch.labels != -100
    pos, has = [], []
    for b, s in enumerate(samples):
        words = encoder.question_words(s.question, visual[b])
        if words:
            pos.append(width - int(lengths[b]) + words[0][0])
            has.append(True)
        else:
            pos.append(int(labels[b].int().argmax()) - 1)
            has.append(False)
    return torch.tensor(pos), has


def run_probe(core: QwenGlimpseModel, encoder: BatchEncoder, world: WorldConfig, rows: int, batch_size: int = 16) -> dict:
    per_row = []
    for start in range(0, rows, batch_size):
        samples = [make_sample(world, i) for i in range(start, min(start + batch_size, rows))]
        batch = build_batch(encoder, samples)
        relevant = [m.numpy().astype(bool) for m in batch.box_masks]
        objects = [m.numpy().astype(bool) for m in batch.object_masks]
        word_pos, has_word = first_words(encoder, samples, batch)
        scores = layer_scores(core, batch, word_pos)
        for b, s in enumerate(samples):
            aucs = {}
            for kind in ("last_token", "glimpse", "word"):
                if kind == "word" and not has_word[b]:
                    continue
                for layer, per_sample in scores[kind].items():
                    for column, v in row_aucs(per_sample[b], relevant[b], objects[b]).items():
                        for which, a in v.items():
                            aucs[f"{kind}|{layer}|{column}|{which}"] = a
            for which, a in row_aucs(scores["vip"][b], relevant[b], objects[b])["score"].items():
                aucs[f"vip|-|score|{which}"] = a
            per_row.append({"id": s.id, "qtype": s.qtype, "aucs": aucs})
        log.info("probed %d/%d rows", len(per_row), rows)
    return summarise(per_row)


def render(summary: dict, qtypes: Sequence[str], n_layers: int, reduce_layer: int) -> str:
    lines = [f"`which` AUC (asked object's tokens vs the other objects'), mean over rows; glimpse pruning acts after "
             f"layer {reduce_layer}. 0.5 = no preference.", "",
             "| score | layer | " + " | ".join(qtypes) + " | all | objectness (all) |",
             "|---" * (len(qtypes) + 4) + "|"]

    def row(label, layer, key_which, key_obj):
        if key_which not in summary:
            return
        cells = " | ".join(f"{summary[key_which][q]['auc']:.3f}" if q in summary[key_which] else "-" for q in qtypes)
        lines.append(f"| {label} | {layer} | {cells} | {summary[key_which]['all']['auc']:.3f} | "
                     f"{summary[key_obj]['all']['auc']:.3f} |")

    for kind in ("last_token", "word", "glimpse"):
        for layer in range(n_layers):
            row(f"{kind}, head mean", layer, f"{kind}|{layer}|mean|which", f"{kind}|{layer}|mean|objectness")
            key = f"{kind}|{layer}|best_head|which"
            if key in summary:
                row(f"{kind}, best head ({summary[key]['head']})", layer, key, f"{kind}|{layer}|best_head|objectness")
    row("VIP logit", "-", "vip|-|score|which", "vip|-|score|objectness")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from workers.modeling.loading import load_engine
    from workers.training.evaluate import trained_world

    p = argparse.ArgumentParser(prog="python -m workers.training.locate_probe", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--modules", required=True)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--seed", type=int, default=80808)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    trained, _ = trained_world(args.base, args.modules)
    if args.seed == trained.seed:
        raise SystemExit(f"--seed {args.seed} is the training world's seed")
    world = dataclasses.replace(trained, seed=args.seed)
    loaded = load_engine(args.base, args.modules, device="cpu")
    core = QwenGlimpseModel(loaded.model, loaded.modules)
    encoder = BatchEncoder(loaded.processor)
    t0 = time.perf_counter()
    summary = run_probe(core, encoder, world, args.rows, args.batch_size)
    qtypes = [q for q in ("attribute", "existence", "counting", "captioning", "next_to", "quadrant", "region_count")
              if any(q in v for v in summary.values())]
    text = render(summary, qtypes, len(core.lm.layers), loaded.modules.config.reduce_layer)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"base": args.base, "modules": args.modules, "rows": args.rows, "seed": args.seed,
                                        "seconds": round(time.perf_counter() - t0, 1), "summary": summary,
                                        "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
