"""Inspect a shard set: counts, class histogram (PNG), sample grid (PNG), integrity check; prints JSON.

    python tools/inspect_shards.py /shards/demo --out /shards/demo/inspect
    python tools/inspect_shards.py "/shards/ms1mv3/train-{000000..000581}.tar" --workers 8

Exit status 1 when the integrity check finds a problem.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.inspection import inspect_shards  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="brace pattern, manifest file, or directory holding a manifest")
    parser.add_argument("--out", default=None, help="directory for class_histogram.png and sample_grid.png")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--grid", type=int, default=64, help="images in the sample grid")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    report = inspect_shards(args.shards, args.out, workers=args.workers, grid=args.grid, progress=not args.quiet)
    print(json.dumps(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
