"""Verification accuracy (10-fold), TAR@FAR and threshold on LFW / CFP-FP / AgeDB-30 style `.bin` sets.

    python tools/eval_verification.py --checkpoint runs/x/backbone.pt --backbone r50 \
        --bins data/lfw.bin data/cfp_fp.bin data/agedb_30.bin [--json]

`--checkpoint` is a `backbone.pt` state dict (read weights-only) or a training checkpoint directory
(DeepSpeed layout; consolidated on the fly). Under `torchrun`/`deepspeed` every rank embeds a slice.
"""
import argparse
import ast
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def parse_options(items):
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--backbone-option {item!r}: expected KEY=VALUE")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="backbone.pt or a checkpoint directory")
    parser.add_argument("--backbone", required=True, help="registered backbone name (r50, mbf, vit_t, ...)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra build_backbone option, e.g. depth=6 (repeatable)")
    parser.add_argument("--bins", nargs="+", required=True, help=".bin pair sets")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (CPU)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    import torch

    from engine.evaluation import evaluate_verification_set, load_verification_set
    from engine.evaluation.verification import format_table, results_json
    from engine.export import load_backbone
    from parallel.groups import init_parallel, shutdown_parallel

    state = init_parallel()
    model = load_backbone(args.backbone, args.checkpoint, args.embedding_size,
                          **parse_options(args.backbone_option)).to(state.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    results = []
    for path in args.bins:
        vset = load_verification_set(path, progress=state.is_main and not args.json)
        results.append(evaluate_verification_set(model, vset, args.batch_size, group=state.data_group,
                                                 channels_last=args.channels_last,
                                                 progress=state.is_main and not args.json))
    if state.is_main:
        print(results_json(results) if args.json else format_table(results))
    shutdown_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
