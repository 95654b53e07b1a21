"""Does the model's answer depend on the visual tokens kept after the pruning layer? A quick probe.

    python -m workers.training.keep_probe --model DIR [--checkpoint last.pt --preset small-v2] \
        --rows 200 --seed 5151 --prune-layer 1

Teacher-forced exact match (every answer token and ``<|im_end|>`` is the argmax, i.e. greedy decoding
gives the answer) on held-out rows of the model's own world (``load_world``, new seed), by question
type, under four keep masks applied after layer K exactly as the engine prunes (``run_pruned``,
checked against the engine in tests/unit/test_train_base.py):

- ``unpruned``: every visual token;
- ``oracle``: only the tokens of the question's relevant boxes (none for a row without boxes);
- ``anti_oracle``: only the tokens OUTSIDE those boxes;
- ``no_visual``: no visual token after layer K;
- with ``--modules``: ``glimpse`` (the GlimpsePrune modules' keep masks from the engine, threshold
  0.5, optionally capped with ``--cap``, fed back through the same forward) and ``random`` (the same
  number of tokens per row as glimpse kept, drawn uniformly).

A model whose answers live in the question's text tokens by layer K scores the same with the oracle
and the anti-oracle; a testbed on which pruning matters scores far lower with the anti-oracle. This is
the training-time check; the evaluator (``workers.training.evaluate``) reports the full table.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from workers.toyworld import WorldConfig, generate_samples, load_world, row_images

from .data import BatchEncoder
from .train_base import PRESETS, answer_losses, box_positions

SETTINGS = ("unpruned", "oracle", "anti_oracle", "no_visual")
GLIMPSE_SETTINGS = ("glimpse", "random")


def drop_masks(batch, is_image: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """[B, L] bool, True at the visual tokens each setting prunes (None: no pruning)."""
    box = box_positions(batch, is_image)
    return {"unpruned": None, "oracle": is_image & ~box, "anti_oracle": box, "no_visual": is_image}


def glimpse_drops(engine, chunk, is_image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The engine's glimpse keep masks for `chunk` as drop masks, and a random mask of the same count."""
    from workers.modeling.api import GenerationRequest, SamplingParams

    requests = [GenerationRequest(images=row_images(s), prompt=s.question) for s in chunk]
    results = engine.generate(requests, SamplingParams(max_new_tokens=1), return_masks=True)
    keep = torch.cat([r.keep_mask.bool().cpu() for r in results])
    glimpse = torch.zeros_like(is_image)
    glimpse[is_image] = ~keep
    random = torch.zeros_like(is_image)
    for b, r in enumerate(results):
        visual = is_image[b].nonzero()[:, 0]
        chosen = torch.randperm(len(visual), generator=generator)[:int(r.keep_mask.sum())]
        row = torch.ones(len(visual), dtype=torch.bool)
        row[chosen] = False
        random[b, visual] = row
    return {"glimpse": glimpse, "random": random}


@torch.no_grad()
def probe(model, processor, world: WorldConfig, rows: int, prune_layer: int, batch_size: int = 25,
          engine=None) -> dict:
    """{setting: {qtype: accuracy, "all": accuracy}, "keep_ratio": {setting: {qtype: mean, "all": mean}},
    "n": {qtype: rows}, "glimpse_mask": precision / recall / IoU vs the boxes (with `engine`)}."""
    model.eval()
    encoder = BatchEncoder(processor)
    samples = list(generate_samples(world, rows))
    settings = SETTINGS + (GLIMPSE_SETTINGS if engine is not None else ())
    hits: dict[str, dict[str, list[bool]]] = {s: defaultdict(list) for s in settings}
    keep: dict[str, dict[str, list[float]]] = {s: defaultdict(list) for s in settings}
    tp = fp = fn = 0
    generator = torch.Generator().manual_seed(0)
    for start in range(0, rows, batch_size):
        chunk = samples[start:start + batch_size]
        batch = encoder.encode(chunk)
        per_image = model.model.get_image_features(batch.pixel_values, batch.image_grid_thw,
                                                   return_dict=True).pooler_output
        is_image = batch.input_ids == model.config.image_token_id
        drops = drop_masks(batch, is_image)
        if engine is not None:
            drops.update(glimpse_drops(engine, chunk, is_image, generator))
            box, kept_g = box_positions(batch, is_image), is_image & ~drops["glimpse"]
            tp, fp, fn = tp + int((kept_g & box).sum()), fp + int((kept_g & ~box).sum()), fn + int((~kept_g & box).sum())
        for setting, drop in drops.items():
            prune = None if drop is None else (drop, prune_layer)
            correct = answer_losses(model, per_image, batch, prune=prune)[1]
            kept = is_image.sum(1) if drop is None else (is_image & ~drop).sum(1)
            for sample, ok, ratio in zip(chunk, correct.tolist(), (kept / is_image.sum(1)).tolist()):
                hits[setting][sample.qtype].append(bool(ok))
                keep[setting][sample.qtype].append(ratio)
    out: dict = {"keep_ratio": {}}
    for setting in settings:
        out[setting] = {q: sum(v) / len(v) for q, v in sorted(hits[setting].items())}
        out[setting]["all"] = sum(sum(v) for v in hits[setting].values()) / rows
        out["keep_ratio"][setting] = {q: sum(v) / len(v) for q, v in sorted(keep[setting].items())}
        out["keep_ratio"][setting]["all"] = sum(sum(v) for v in keep[setting].values()) / rows
    out["n"] = {q: len(v) for q, v in sorted(hits["unpruned"].items())}
    if engine is not None:
        out["glimpse_mask"] = {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
                               "iou": tp / max(tp + fp + fn, 1)}
    return out


def load_model(model_dir: Path, checkpoint: Path | None, preset: str):
    """The saved model, or (with `checkpoint`) a trainer checkpoint's weights in `preset`'s shape."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from workers.modeling.tiny import build_tiny_model, load_processor

    if checkpoint is None:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), attn_implementation="sdpa")
        return model.float(), load_processor(model_dir)
    model = build_tiny_model(PRESETS[preset])
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    return model, None


def format_table(result: dict) -> str:
    qtypes = list(result["n"])
    lines = ["| setting | keep | " + " | ".join(f"{q} (n={result['n'][q]})" for q in qtypes) + " | all |",
             "|---" * (len(qtypes) + 3) + "|"]
    for s in (s for s in SETTINGS + GLIMPSE_SETTINGS if s in result):
        cells = " | ".join(f"{100 * result[s][q]:.1f}" for q in qtypes)
        lines.append(f"| {s} | {100 * result['keep_ratio'][s]['all']:.1f}% | {cells} | {100 * result[s]['all']:.1f} |")
    if "glimpse" in result:
        cells = " | ".join(f"{100 * result['keep_ratio']['glimpse'][q]:.1f}%" for q in qtypes)
        lines.append(f"| glimpse keep ratio | | {cells} | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from workers.modeling.tiny import build_processor

    p = argparse.ArgumentParser(prog="python -m workers.training.keep_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model dir (its world.json gives the world)")
    p.add_argument("--checkpoint", type=Path, help="train_base checkpoint (last.pt) to probe instead of the saved weights")
    p.add_argument("--world-from", type=Path, help="dir whose world.json to use (default --model)")
    p.add_argument("--preset", default="small-v2")
    p.add_argument("--modules", type=Path, help="GlimpsePrune modules dir: adds the glimpse and random rows")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--cap", type=float, help="the keep rule's max_remain_ratio (default: none)")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--seed", type=int, default=5151)
    p.add_argument("--prune-layer", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = load_world(args.world_from or args.model, seed=args.seed)
    model, processor = load_model(args.model, args.checkpoint, args.preset)
    if processor is None:
        pixels = world.image_size**2
        processor = build_processor(min_pixels=pixels, max_pixels=pixels, spec=PRESETS[args.preset])
    engine = None
    if args.modules:
        from workers.modeling.engine import GlimpseEngine
        from workers.modeling.glimpse import GlimpseModules
        from workers.modeling.keep_rule import KeepRule

        modules = GlimpseModules.from_directory(args.modules)
        if modules.config.reduce_layer != args.prune_layer:
            raise SystemExit(f"--prune-layer {args.prune_layer} != the modules' reduce layer {modules.config.reduce_layer}")
        engine = GlimpseEngine(model.eval(), processor, modules, KeepRule(args.threshold, max_remain_ratio=args.cap))
    result = probe(model, processor, world, args.rows, args.prune_layer, engine=engine)
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
