"""The demo: synthetic identities, 2 CPU ranks through `deepspeed --num_gpus 2`, held-out verification.

    .venv/bin/python tools/demo.py [--out runs/demo] [--config configs/demo.yaml] [--set key=value ...]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run directory (data, checkpoint, logs)")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from engine.config import ConfigError
    from engine.demo import run_demo

    try:
        run_demo(args.out, args.config, args.ranks, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
