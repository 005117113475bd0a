"""Command line: generate the synthetic shapes dataset in COCO layout.

    python -m instseg_ops.models.data.shapes --out DIR --train 1000 --val 200 [--size 256] [--seed 0]

writes DIR/{train,val}/*.png and DIR/annotations/instances_{train,val}.json, with a progress
bar per split on a terminal (--quiet: no output).
The generator itself lives in ``synthetic`` (re-exported here).
"""
import argparse
import sys
import time

from .synthetic import CATEGORIES, generate_split, render_sample

__all__ = ["main", "generate_split", "render_sample", "CATEGORIES"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m instseg_ops.models.data.shapes", description=__doc__.split("\n")[1])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=1000, help="number of training images (0: none)")
    p.add_argument("--val", type=int, default=200, help="number of validation images (0: none)")
    p.add_argument("--size", type=int, default=256, help="image height and width (default 256)")
    p.add_argument("--size-range", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="draw each image's height and width uniformly in [MIN, MAX] instead of --size")
    p.add_argument("--max-objects", type=int, default=8, help="shapes drawn per image: 1..N (default 8)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each split derives its own")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")
    args = p.parse_args(argv)
    for split, n in (("train", args.train), ("val", args.val)):
        if n <= 0:
            continue
        t0 = time.perf_counter()
        ann = generate_split(args.out, split, n, size=args.size, size_range=args.size_range,
                             seed=args.seed, max_objects=args.max_objects, progress=not args.quiet)
        if not args.quiet:
            print(f"{split}: {n} images -> {ann} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
