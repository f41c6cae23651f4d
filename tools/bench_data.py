"""Benchmark the data pipeline on 112x112 JPEGs; prints one JSON object per configuration.

    python tools/bench_data.py                       # synthetic shards written to a temp dir
    python tools/bench_data.py --shards /shards/ms1mv3 --workers 8

Configurations: decode + flip + normalize in one process (images/s per core), and the full loader with
--workers worker processes; each with simplejpeg (the loader's decoder) and plain PIL as the baseline.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.bench import run  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None, help="directory with a manifest (default: synthetic temp set)")
    parser.add_argument("--images", type=int, default=3000, help="synthetic images to write when no --shards")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40, help="loader batches per configuration")
    parser.add_argument("--decode-images", type=int, default=2000)
    args = parser.parse_args(argv)
    for result in run(args.shards, images=args.images, workers=args.workers, batch_size=args.batch_size,
                      batches=args.batches, decode_images=args.decode_images):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
