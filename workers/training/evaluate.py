"""Quality evaluation of glimpse modules on a held-out synthetic set: does pruning keep the answers, and
does the model tell good pruning from bad?

    python -m workers.training.evaluate --base DIR --modules DIR --rows 300 --seed 1000003 --out DIR

The held-out world is the one the model was trained on (`world.json` in the base or the modules dir,
via `workers.toyworld.load_world`; the default 224 px world without one) with the seed replaced by
`--seed`, which must differ from the training seed. `--image-size/--min-objects/--max-objects`
override the recorded world.

Every row is answered (greedy) eight ways by the same base model, from the same processed inputs:
  unpruned     the plain model, all visual tokens;
  glimpse      GlimpsePrune with the modules' keep rule at threshold 0.5 (no cap);
  glimpse_cap  the same with max_remain_ratio 0.111 (the paper's "<= 11.1%" setting);
  oracle       keep exactly the tokens of the relevant boxes (`box_token_mask`); an empty box mask
               (e.g. "how many ... in the top left corner?" -> 0) keeps none;
  anti_oracle  as many tokens as the oracle keeps, drawn uniformly from those OUTSIDE the relevant boxes
               (fewer when the outside has fewer; seeded per row): the wrong tokens at the right count;
  outside_all  keep every token outside the relevant boxes (the answer's tokens alone are gone);
  random       per row, as many tokens as `glimpse` kept, uniformly at random (seeded per row);
  no_visual    keep no visual token.
Two-image rows also get `unpruned_swapped`: the plain model with the two images in reverse order (the
question still names the first or second image), the control for "does the model read the named image".
The last four are explicit keep masks through the engine's keep-mask API (`KeepMasks`): the same
compaction, KV cache, re-left-pad and decode as glimpse, pruned after the modules' reduce_layer, or
after `--keep-layer` (-1 = before the LLM).

Scoring (eval_report): exact match after normalisation for every type; a word-level token F1 for
every row; an object F1 over (colour, shape) phrases for list answers (captioning, quadrant).
Outputs: eval.md, eval.json, eval_rows.jsonl and eval.png (accuracy vs keep ratio per setting).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from workers.modeling.api import GenerationRequest, KeepMasks, SamplingParams
from workers.modeling.engine import GlimpseEngine
from workers.modeling.keep_rule import KeepRule
from workers.modeling.qwen2_5_vl import ModelInputs, QwenGlimpseModel
from workers.toyworld import Sample, WorldConfig, load_world, make_sample, row_images
from workers.training.data import asked_image_masks, box_masks
from workers.training.eval_report import (
    SETTINGS, caption_objects, confusion, normalise, object_f1, render_markdown, summarise, token_f1, write_plot,
    LIST_QTYPES,
)

__all__ = ["SETTINGS", "EvalConfig", "caption_objects", "keep_mask_rows", "normalise", "object_f1", "run_eval", "main"]
log = logging.getLogger(__name__)
MASKED = ("oracle", "anti_oracle", "outside_all", "random", "no_visual")  # explicit keep masks


@dataclass(frozen=True)
class EvalConfig:
    """The held-out set and the settings compared. seed must differ from the training world's.

    image_size / min_objects / max_objects: None = as recorded in the model's world.json.
    keep_layer: where the explicit masks prune (None = the modules' reduce_layer, -1 = LLM input).
    """

    rows: int = 300
    seed: int = 1_000_003
    image_size: Optional[int] = None
    min_objects: Optional[int] = None
    max_objects: Optional[int] = None
    two_image_share: Optional[float] = None
    batch_size: int = 16
    max_new_tokens: int = 96  # a 12-object caption is ~60 tokens
    threshold: float = 0.5
    cap: float = 0.111
    random_seed: int = 0
    keep_layer: Optional[int] = None
    bootstrap: int = 2000  # paired bootstrap resamples for the 95% intervals

    def world(self, trained: WorldConfig) -> WorldConfig:
        if self.seed == trained.seed:
            raise ValueError(f"held-out seed {self.seed} is the training world's seed")
        overrides = {k: getattr(self, k) for k in ("image_size", "min_objects", "max_objects", "two_image_share")
                     if getattr(self, k) is not None}
        return dataclasses.replace(trained, seed=self.seed, **overrides)


# ---- keep masks ----------------------------------------------------------------------------------
@torch.inference_mode()
def keep_mask_rows(core: QwenGlimpseModel, inputs: ModelInputs, keep_masks: Sequence[torch.Tensor]) -> list:
    """`GlimpsedRow`s pruned after the modules' reduce_layer with the given masks (for `finish_prefill`).
    Kept for callers of the old helper: it is the engine's `masked_stage` now."""
    return core.masked_stage(inputs, list(keep_masks))


def random_keep_masks(sizes: Sequence[int], counts: Sequence[int], seeds: Sequence[int],
                      allowed: Optional[Sequence[torch.Tensor]] = None) -> list:
    """Per row, `count` of `size` tokens uniformly at random (torch.Generator seeded per row); with
    `allowed` (bool [size] per row) only among the allowed tokens, at most all of them."""
    out = []
    for b, (size, count, seed) in enumerate(zip(sizes, counts, seeds)):
        pool = torch.arange(size) if allowed is None else allowed[b].bool().nonzero().flatten()
        order = pool[torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))]
        mask = torch.zeros(size, dtype=torch.bool)
        mask[order[:count]] = True
        out.append(mask)
    return out


def baseline_masks(boxes: Sequence[torch.Tensor], glimpse_counts: Sequence[int], seeds: Sequence[int]) -> dict:
    """The explicit-mask settings' masks for one batch, per setting a list of bool [N_v(b)]."""
    sizes = [b.numel() for b in boxes]
    outside = [~b.bool() for b in boxes]
    return {
        "oracle": [b.bool() for b in boxes],
        "anti_oracle": random_keep_masks(sizes, [int(b.sum()) for b in boxes], seeds, allowed=outside),
        "outside_all": outside,
        "random": random_keep_masks(sizes, glimpse_counts, seeds),
        "no_visual": [torch.zeros(n, dtype=torch.bool) for n in sizes],
    }


# ---- running --------------------------------------------------------------------------------------
def evaluate_batch(engines: dict, samples: Sequence[Sample], first_index: int, cfg: EvalConfig) -> list:
    """All settings on one batch; returns one record per sample."""
    gp = engines["glimpse"]
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    inputs = gp.build_inputs([GenerationRequest(images=row_images(s), prompt=s.question) for s in samples])
    # One mask per row over all its images' tokens (box_masks raises if the grids do not add up).
    boxes = box_masks(samples, inputs.image_grid_thw, gp.core.visual.spatial_merge_size)
    asked = asked_image_masks(samples, inputs.image_grid_thw, gp.core.visual.spatial_merge_size)
    results = {
        "unpruned": gp.generate_from_inputs(inputs, sampling, prune=False),
        "glimpse": gp.generate_from_inputs(inputs, sampling, return_masks=True),
        "glimpse_cap": engines["glimpse_cap"].generate_from_inputs(inputs, sampling, return_masks=True),
    }
    seeds = [cfg.random_seed * 1_000_003 + first_index + i for i in range(len(samples))]
    masks = baseline_masks(boxes, [r.kept_tokens for r in results["glimpse"]], seeds)
    for name in MASKED:
        keep = KeepMasks(tuple(masks[name]), cfg.keep_layer)
        results[name] = gp.generate_from_inputs(inputs, sampling, return_masks=True, keep=keep)
    records = [record(s, boxes[i], {name: res[i] for name, res in results.items()}, cfg.threshold, asked[i])
               for i, s in enumerate(samples)]
    # Two-image rows, the images' order reversed (same question): a model that reads the image the
    # question names now looks at the wrong scene, one that ignores the name answers as before.
    multi = [i for i, s in enumerate(samples) if len(row_images(s)) > 1]
    if multi:
        swapped = gp.generate_from_inputs(gp.build_inputs([
            GenerationRequest(images=row_images(samples[i])[::-1], prompt=samples[i].question) for i in multi]),
            sampling, prune=False)
        for i, res in zip(multi, swapped):
            records[i]["unpruned_swapped"] = {"text": res.text, "correct": normalise(res.text) == normalise(samples[i].answer)}
    return records


def record(sample: Sample, box: torch.Tensor, results: dict, threshold: float,
           asked: Optional[torch.Tensor] = None) -> dict:
    """One row: per setting the answer, its scores, keep ratio and keep mask vs box mask counts; on a
    two-image row (`asked`: True on the asked image's tokens) also the share of the kept tokens that
    lie on the other image (`other_image_share`)."""
    images = len(row_images(sample))
    out = {"id": sample.id, "qtype": sample.qtype, "num_objects": sample.num_objects, "answer": sample.answer,
           "question": sample.question, "images": images, "visual_tokens": int(box.numel()),
           "box_ratio": float(box.float().mean())}
    gold = normalise(sample.answer)
    for name, res in results.items():
        entry = {"text": res.text, "correct": normalise(res.text) == gold, "token_f1": token_f1(res.text, sample.answer),
                 "keep_ratio": res.keep_ratio}
        if sample.qtype in LIST_QTYPES:
            entry["object_f1"] = object_f1(res.text, sample.answer)
        if res.keep_mask is not None and name != "unpruned":
            entry["mask"] = confusion(res.keep_mask, box)
            if images > 1 and asked is not None:
                kept = res.keep_mask.bool().cpu()
                entry["other_image_share"] = float((kept & ~asked).sum()) / max(int(kept.sum()), 1)
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


def run_eval(model, processor, modules, cfg: EvalConfig, world: WorldConfig) -> list:
    """world: the held-out world (`EvalConfig.world(trained)`)."""
    engines = build_engines(model, processor, modules, cfg)
    records = []
    t0 = time.perf_counter()
    for start in range(0, cfg.rows, cfg.batch_size):
        samples = [make_sample(world, i) for i in range(start, min(start + cfg.batch_size, cfg.rows))]
        records.extend(evaluate_batch(engines, samples, start, cfg))
        log.info("evaluated %d/%d rows (%.0f s)", len(records), cfg.rows, time.perf_counter() - t0)
    return records


def trained_world(base: str, modules: str) -> tuple[WorldConfig, Optional[str]]:
    """The training world recorded in the base dir, else the modules dir, else the default world."""
    for directory in (base, modules):
        if (Path(directory) / "world.json").exists():
            return load_world(directory), str(Path(directory) / "world.json")
    return load_world(base), None


def report_header(meta: dict) -> str:
    world = meta["world"]
    header = (f"# GlimpsePrune evaluation\n\nbase `{meta['base']}`, modules `{meta['modules']}`; held-out seed "
              f"{world['seed']} of the training world ({meta['world_source'] or 'default world: no world.json'}; "
              f"{world['image_size']} px, {world['min_objects']}-{world['max_objects']} objects"
              f"{', two-image rows %.0f%%' % (100 * world['two_image_share']) if world.get('two_image_share') else ''}); explicit masks pruned "
              f"after layer {meta['keep_layer']}.\n")
    if meta["keep_layer"] != meta["reduce_layer"]:
        header += (f"\n**Note:** glimpse and glimpse_cap prune after the modules' reduce_layer {meta['reduce_layer']}, the "
                   f"explicit-mask settings (oracle, anti_oracle, outside_all, random, no_visual) after layer "
                   f"{meta['keep_layer']}: a difference between the two groups mixes the mask with the layer.\n")
    return header


def write_outputs(out_dir: Path, records: Sequence[dict], summary: dict, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps({**meta, **summary}, indent=2))
    (out_dir / "eval.md").write_text(render_markdown(summary, report_header(meta)))
    with open(out_dir / "eval_rows.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    write_plot({**summary, "title": f"{meta['base']} + {meta['modules']}, {summary['rows']} held-out rows, "
                                    f"explicit masks after layer {meta['keep_layer']}"}, out_dir / "eval.png")


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base model dir / URL / hub id")
    p.add_argument("--modules", required=True, help="glimpse modules dir / URL / hub id")
    p.add_argument("--out", required=True, type=Path)
    for f in dataclasses.fields(EvalConfig):
        kind = type(f.default) if f.default is not None else (float if f.name in ("cap", "two_image_share") else int)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from workers.modeling.loading import load_engine

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
    trained, source = trained_world(args.base, args.modules)
    world = cfg.world(trained)
    loaded = load_engine(args.base, args.modules, device=args.device)  # also merges a GlimpsePrune+ LoRA
    t0 = time.perf_counter()
    records = run_eval(loaded.model, loaded.processor, loaded.modules, cfg, world)
    summary = summarise(records, cfg.bootstrap, cfg.random_seed)
    reduce_layer = loaded.modules.config.reduce_layer
    keep_layer = cfg.keep_layer if cfg.keep_layer is not None else reduce_layer
    world_dict = asdict(world)
    meta = {"base": str(args.base), "modules": str(args.modules), "config": asdict(cfg), "device": str(loaded.device),
            "world": world_dict, "world_source": source, "training_seed": trained.seed, "keep_layer": keep_layer,
            "reduce_layer": reduce_layer,
            "seconds": round(time.perf_counter() - t0, 1)}
    write_outputs(args.out, records, summary, meta)
    print((args.out / "eval.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
