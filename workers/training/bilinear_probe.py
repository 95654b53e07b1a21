"""How much "which object" can a query read from a frozen base's states? A fitted bilinear probe.

    python -m workers.training.bilinear_probe --base DIR --layer 1 --rows 800 --seed 4242

For held-out one-image attribute / existence / counting rows of the model's own world, take the
decoder's input states at `--layer` (0 = the embeddings, the vision tower's merged tokens on the image
rows) and fit a fresh rank-r bilinear score s_j = (A q) . (B v_j) over the row's visual tokens v_j, with
the query q taken from:

  slot    the answer slot (the last prompt position, where the glimpse sits);
  word    the question's first shape or colour word, at the same layer;
  word0   that word's token embedding (what the word is, before any layer).

The loss is the lookup loss of `train_base.lookup_losses` (-log softmax mass on the asked boxes over
the visual tokens); the score is the `which` AUC of `locate_probe` (asked object's tokens vs the other
objects'), on the last quarter of the rows, which the fit never sees. No RoPE and free A, B: an upper
bound on what a glimpse query at that layer could read, if the base let it. A query that has not read
the question scores 0.5 whatever A and B are.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from workers.toyworld import COLOURS, load_world, make_sample
from workers.training.data import IGNORE_INDEX, BatchEncoder
from workers.training.glimpse_trainer import build_batch
from workers.training.locate_probe import auc, first_words

log = logging.getLogger(__name__)
QUERIES = ("slot", "word", "word0")


def collect(model, encoder: BatchEncoder, world, rows: int, layer: int, batch_size: int = 16) -> list[dict]:
    """Per usable row: the three query states, the visual states, the asked and object masks."""
    out = []
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            samples = [make_sample(world, i) for i in range(start, min(start + batch_size, rows))]
            batch = build_batch(encoder, samples)
            word_pos, has_word = first_words(encoder, samples, batch)
            inputs = batch.inputs
            states = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                           image_grid_thw=inputs.image_grid_thw, output_hidden_states=True).hidden_states
            is_image = inputs.input_ids == model.config.image_token_id
            slot = (batch.labels != IGNORE_INDEX).int().argmax(dim=1) - 1
            for b in range(len(samples)):
                asked = torch.as_tensor(batch.box_masks[b]).bool()
                objects = torch.as_tensor(batch.object_masks[b]).bool()
                if not has_word[b] or not asked.any() or not (objects & ~asked).any():
                    continue
                word = encoder.tokenizer.decode([int(inputs.input_ids[b, word_pos[b]])]).strip().lower()
                out.append({"slot": states[layer][b, slot[b]], "word": states[layer][b, word_pos[b]],
                            "word0": states[0][b, word_pos[b]], "visual": states[layer][b][is_image[b]],
                            "asked": asked, "objects": objects, "colour_word": word in COLOURS})
    return out


def fit(train: Sequence[dict], query: str, rank: int, epochs: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    gen = torch.Generator().manual_seed(seed)
    width = train[0][query].shape[-1]
    a, b = torch.nn.Linear(width, rank, bias=False), torch.nn.Linear(width, rank, bias=False)
    with torch.no_grad():
        for lin in (a, b):
            lin.weight.normal_(0.0, width**-0.5, generator=gen)
    opt = torch.optim.Adam(list(a.parameters()) + list(b.parameters()), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen).tolist()
        for i in range(0, len(order), 32):
            loss = 0.0
            for j in order[i:i + 32]:
                row = train[j]
                logp = torch.log_softmax(b(row["visual"]) @ a(row[query]), dim=0)
                loss = loss - torch.logsumexp(logp[row["asked"]], dim=0)
            opt.zero_grad()
            (loss / len(order[i:i + 32])).backward()
            opt.step()
    return a, b


def which_auc(rows: Sequence[dict], query: str, a, b) -> Optional[float]:
    if not rows:
        return None
    with torch.no_grad():
        scores = [(b(r["visual"]) @ a(r[query])) for r in rows]
        return float(np.mean([auc(s[r["asked"]].numpy(), s[r["objects"] & ~r["asked"]].numpy()) for s, r in zip(scores, rows)]))


def run(base: str, layer: int, rows: int, seed: int, rank: int = 32, epochs: int = 60) -> dict:
    from workers.modeling.loading import load_engine

    trained = load_world(base)
    if seed == trained.seed:
        raise SystemExit(f"--seed {seed} is the training world's seed")
    world = dataclasses.replace(trained, seed=seed, two_image_share=0.0,
                                question_mix=(("attribute", 0.4), ("existence", 0.3), ("counting", 0.3)))
    loaded = load_engine(base, None, device="cpu")
    torch.manual_seed(seed)
    data = collect(loaded.model, BatchEncoder(loaded.processor), world, rows, layer)
    cut = int(len(data) * 0.75)
    train, test = data[:cut], data[cut:]
    result = {"base": base, "layer": layer, "rows": rows, "usable_rows": len(data), "seed": seed, "rank": rank, "queries": {}}
    for query in QUERIES:
        a, b = fit(train, query, rank, epochs, seed)
        result["queries"][query] = {
            "train_which_auc": which_auc(train, query, a, b), "test_which_auc": which_auc(test, query, a, b),
            "test_colour_word_auc": which_auc([r for r in test if r["colour_word"]], query, a, b),
            "test_shape_word_auc": which_auc([r for r in test if not r["colour_word"]], query, a, b)}
        log.info("%s: %s", query, result["queries"][query])
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.training.bilinear_probe", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--layer", type=int, default=1, help="decoder input states of this layer (0 = embeddings)")
    p.add_argument("--rows", type=int, default=800)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.base, args.layer, args.rows, args.seed, args.rank, args.epochs)
    print(f"layer {args.layer}, {result['usable_rows']} rows (last quarter held out), which AUC train / test:")
    for query, r in result["queries"].items():
        print(f"  {query:6s} {r['train_which_auc']:.3f} / {r['test_which_auc']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
