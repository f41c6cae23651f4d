"""Head checkpoint throughput: write a class-range head as W files (atomic, fsynced), verify their
CRC-32, re-slice it for W' ranks. One JSON object per configuration:

    python tools/bench_checkpoint.py --classes 500000 --dim 128 --world 4 --new-world 3
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[500_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--new-world", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)

    import torch

    from engine.checkpoint import bench_head_reshard

    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        for classes in args.classes:
            print(json.dumps(bench_head_reshard(scratch, classes, args.dim, args.world, args.new_world,
                                                getattr(torch, args.dtype))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
