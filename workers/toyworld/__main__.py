"""``python -m workers.toyworld --out DIR --rows N [...]``: write toy-world Parquet shards."""

from __future__ import annotations

import argparse
from typing import Sequence

from workers.toyworld.shards import write_shards
from workers.toyworld.world import WorldConfig


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workers.toyworld",
                                     description="Write synthetic visual-question Parquet shards.")
    parser.add_argument("--out", required=True, help="directory or URI (s3://bucket/prefix)")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=12)
    parser.add_argument("--two-image-share", type=float, default=0.0,
                        help="share of rows with two images, the question about one of them")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    config = WorldConfig(image_size=args.image_size, min_objects=args.min_objects,
                         max_objects=args.max_objects, seed=args.seed, two_image_share=args.two_image_share)
    paths = write_shards(config, args.rows, args.out, rows_per_shard=args.rows_per_shard)
    for path in paths:
        print(path)
    print(f"wrote {args.rows} rows in {len(paths)} shard(s): seed={config.seed}, "
          f"image_size={config.image_size}, objects {config.min_objects}..{config.max_objects}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
