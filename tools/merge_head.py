"""Write a checkpoint's whole head (every class's row, optimizer state and queues) as one file:

    python tools/merge_head.py runs/x/checkpoint head.pt

The file loads with `torch.load(path, weights_only=True)`: {"type", "num_classes", "embedding_size",
"layout", "per_class": {name: tensor (num_classes, ...)}} for class-range heads, or {"state": ...}
with the merged tables of a keyed head (DCQ, F2C). See README.md, "Checkpoints and resuming".
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX) or checkpoint root")
    parser.add_argument("output", help="output file (.pt)")
    args = parser.parse_args(argv)

    from engine.checkpoint import CheckpointError, merge_head

    try:
        info = merge_head(args.checkpoint, args.output)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: {info['size']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
