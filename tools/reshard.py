"""Re-slice a checkpoint's head for another number of ranks, offline:

    python tools/reshard.py runs/x/checkpoint/step_00001200 runs/x/checkpoint_w8 --world-size 8

The source is a checkpoint directory (or a checkpoint root: its `latest` is used). Rows, optimizer
state and queues of class-range heads are re-sliced by class id into the new ranges; see README.md,
"Checkpoints and resuming". Resuming at another world size does the same on the fly; this tool is
for inspecting or shipping the re-sliced files.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX) or checkpoint root")
    parser.add_argument("output", help="new checkpoint directory (must not exist or be empty)")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks of the head group")
    args = parser.parse_args(argv)

    from engine.checkpoint import CheckpointError, reshard_checkpoint

    try:
        manifest = reshard_checkpoint(args.checkpoint, args.output, args.world_size)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: head for {manifest['head_world_size']} rank(s), class ranges "
          f"{manifest['class_ranges']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
