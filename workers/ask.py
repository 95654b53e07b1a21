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
    ap.add_argument("--image", required=True, help="image file")
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

    try:
        image = Image.open(args.image).convert("RGB")
    except (OSError, ValueError) as exc:
        print(f"error: {args.image}: cannot read image ({exc})", file=sys.stderr)
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
    request = GenerationRequest(images=(image,), prompt=args.question)
    result = engine.generate([request], SamplingParams(max_new_tokens=args.max_new_tokens), return_masks=True)[0]
    print(f"answer: {result.text}")
    print(f"keep ratio: {result.keep_ratio:.3f} ({result.kept_tokens}/{result.visual_tokens} visual tokens kept)")
    print(f"time: prefill {result.prefill_s * 1000:.1f} ms, decode {result.decode_s * 1000:.1f} ms ({result.output_tokens} tokens)")
    if args.overlay:
        inputs = engine.build_inputs([request])
        grid = tuple((inputs.image_grid_thw[0, 1:] // 2).tolist())
        keep = result.keep_mask if result.keep_mask is not None else [True] * result.visual_tokens
        import torch

        overlay(image, grid, torch.as_tensor(keep)).save(args.overlay)
        print(f"overlay: {args.overlay}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
