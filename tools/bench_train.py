"""Training throughput and step-time split for a recipe and world size; prints one JSON object.

    .venv/bin/python tools/bench_train.py --config configs/tiny_synthetic.yaml --world-size 2 --steps 10
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--world-size", type=int, default=1, help="ranks on this machine (launched for you)")
    parser.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from engine.bench import run_bench
    from engine.launch import ensure_malloc_env

    if args.world_size <= 1:
        ensure_malloc_env()
    result = run_bench(args.config, args.overrides, args.steps, args.warmup, args.world_size, args.launcher)
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
