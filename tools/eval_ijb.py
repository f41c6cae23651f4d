"""IJB-C / IJB-B 1:1 verification: TAR at FAR 1e-6 ... 1e-1 and a ROC curve.

    python tools/eval_ijb.py --checkpoint runs/x/backbone.pt --backbone r100 \
        --root data/IJBC --target IJBC --roc runs/x/ijbc_roc.png [--json]

`--root` holds `meta/` and `loose_crop/` as released. `--checkpoint` is a `backbone.pt` (read
weights-only) or a training checkpoint directory. Under `torchrun`/`deepspeed` each rank embeds a slice.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from eval_verification import parse_options  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="backbone.pt or a checkpoint directory")
    parser.add_argument("--backbone", required=True, help="registered backbone name (r100, mbf, ...)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", required=True, help="IJB folder with meta/ and loose_crop/")
    parser.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers reading and aligning crops")
    parser.add_argument("--no-flip", action="store_true", help="embed the image only, not image + mirror")
    parser.add_argument("--no-detector-score", action="store_true", help="do not weight images by detector score")
    parser.add_argument("--normalize-images", action="store_true",
                        help="unit-normalize image embeddings before pooling (default keeps their norm)")
    parser.add_argument("--roc", default=None, help="write the ROC curve to this PNG")
    parser.add_argument("--features-out", default=None, help="save image features (.npy)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    import torch

    from engine.evaluation.ijb import evaluate_ijb, result_json
    from engine.export import load_backbone
    from parallel.groups import init_parallel, shutdown_parallel

    state = init_parallel()
    model = load_backbone(args.backbone, args.checkpoint, args.embedding_size,
                          **parse_options(args.backbone_option)).to(state.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate_ijb(model, args.root, args.target, batch_size=args.batch_size, num_workers=args.workers,
                          group=state.data_group, flip=not args.no_flip,
                          detector_score=not args.no_detector_score, normalize_images=args.normalize_images,
                          roc_png=args.roc if state.is_main else None,
                          features_out=args.features_out if state.is_main else None,
                          progress=state.is_main and not args.json, channels_last=args.channels_last)
    if state.is_main:
        print(result_json(result) if args.json else result.table())
    shutdown_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
