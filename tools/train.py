"""Train a recipe: `deepspeed tools/train.py --config configs/X.yaml [--set key=value ...]`.

Also runs under `torchrun --nproc_per_node N tools/train.py ...` and plain `python tools/train.py ...`
(one rank). See README.md, section Training.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")   # no GPU: skip DeepSpeed's accelerator probing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set optim.lr=0.05 (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank is read from the environment")
    args = parser.parse_args(argv)

    from engine.config import ConfigError, load_config
    from engine.launch import ensure_malloc_env

    try:
        load_config(args.config, args.overrides)      # fail fast, before re-exec or joining a job
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    ensure_malloc_env()
    from engine.checkpoint import CheckpointError
    from engine.trainer import NonFiniteLoss, run

    try:
        run(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 3
    except NonFiniteLoss as err:
        print(f"training halted: {err}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
