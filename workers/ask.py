"""Ask one question about one image: `python -m workers.ask --model DIR --image IMG --question TEXT`.

Prints the answer, the keep ratio and the kept/total visual tokens; `--overlay OUT.png` saves the
image with pruned token cells dimmed (each visual token is a 28x28-pixel cell of the resized image).
"""
from __future__ import annotations

import argparse
import sys

from PIL import Image, ImageDraw


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m workers.ask", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="base model: local dir, fsspec URL or hub id")
    ap.add_argument("--modules", help="glimpse modules: local dir, URL or hub id (omit: no pruning)")
    ap.add_argument("--image", required=True, action="append",
                    help="image file; repeat for a multi-image question (images in prompt order)")
    ap.add_argument("--question", required=True)
    ap.add_argument("--threshold", type=float, default=None, help="keep rule threshold (default: the modules' config)")
    ap.add_argument("--max-remain-ratio", type=float, default=None, help="cap on the kept fraction, e.g. 0.111")
    ap.add_argument("--no-prune", action="store_true", help="run the plain model even if modules are given")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--overlay", help="save the image with the kept tokens highlighted to this PNG")
    return ap.parse_args(argv)


def overlay(image: Image.Image, grid_hw: tuple, keep) -> Image.Image:
    """Dim the cells of pruned tokens. grid_hw: merged-token grid (h, w); keep: bool [h*w]."""
    h, w = grid_hw
    out = image.convert("RGB").copy()
    shade = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    cw, ch = out.width / w, out.height / h
    for idx, kept in enumerate(keep.tolist()):
        r, c = divmod(idx, w)
        box = (c * cw, r * ch, (c + 1) * cw, (r + 1) * ch)
        draw.rectangle(box, fill=(0, 0, 0, 0) if kept else (0, 0, 0, 170), outline=(255, 64, 64, 255) if kept else None)
    return Image.alpha_composite(out.convert("RGBA"), shade).convert("RGB")


def main(argv=None) -> int:
    args = parse_args(argv)
    from workers.modeling.api import GenerationRequest, SamplingParams
    from workers.modeling.keep_rule import KeepRule
    from workers.modeling.loading import ModelLoadError, load_engine

    images = []
    for path in args.image:
        try:
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as exc:
            print(f"error: {path}: cannot read image ({exc})", file=sys.stderr)
            return 2
    try:
        engine = load_engine(args.model, None if args.no_prune else args.modules, device=args.device)
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if engine.prunes and (args.threshold is not None or args.max_remain_ratio is not None):
        base = engine.rule
        engine.rule = KeepRule(
            threshold=args.threshold if args.threshold is not None else base.threshold,
            max_remain_ratio=args.max_remain_ratio if args.max_remain_ratio is not None else base.max_remain_ratio,
            min_remain_num=base.min_remain_num,
        )
    import torch

    request = GenerationRequest(images=tuple(images), prompt=args.question)
    result = engine.generate([request], SamplingParams(max_new_tokens=args.max_new_tokens), return_masks=True)[0]
    print(f"answer: {result.text}")
    print(f"keep ratio: {result.keep_ratio:.3f} ({result.kept_tokens}/{result.visual_tokens} visual tokens kept)")
    if len(images) > 1 or args.overlay:  # the per-image split needs each image's grid: processed once more
        keep = torch.as_tensor(result.keep_mask if result.keep_mask is not None else [True] * result.visual_tokens)
        merge = engine.core.visual.spatial_merge_size
        grids = [tuple((g[1:] // merge).tolist()) for g in engine.build_inputs([request]).image_grid_thw]
        parts = torch.split(keep, [h * w for h, w in grids])  # the row's visual tokens, image by image
    if len(images) > 1:
        print("per image: " + ", ".join(f"{k + 1}: {int(p.sum())}/{p.numel()}" for k, p in enumerate(parts)))
    print(f"time: prefill {result.prefill_s * 1000:.1f} ms, decode {result.decode_s * 1000:.1f} ms ({result.output_tokens} tokens)")
    if args.overlay:
        tiles = [overlay(image, grid, part) for image, grid, part in zip(images, grids, parts)]
        sheet = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), max(t.height for t in tiles)), "white")
        x = 0
        for tile in tiles:  # side by side, prompt order
            sheet.paste(tile, (x, 0))
            x += tile.width + 8
        sheet.save(args.overlay)
        print(f"overlay: {args.overlay}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
