"""Export a trained backbone: consolidated fp32 weights (`backbone.pt`) and/or ONNX, parity-checked.

    python tools/export_onnx.py --checkpoint runs/x/checkpoint --backbone r50 \
        --weights-out runs/x/backbone.pt --output runs/x/r50.onnx

`--checkpoint` is a DeepSpeed checkpoint directory (ZeRO shards are merged to fp32) or a `backbone.pt`.
The ONNX model takes `input (batch, 3, 112, 112)` float in [-1, 1] and returns `embedding (batch, D)`;
it is run in onnxruntime against PyTorch on random input and the command fails if they differ by more
than `--tolerance`. Prints one JSON object.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from eval_verification import parse_options  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="DeepSpeed checkpoint directory or backbone.pt")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one named by 'latest')")
    parser.add_argument("--backbone", help="registered backbone name; needed for --output")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--backbone-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--weights-out", help="write the consolidated fp32 state dict here (backbone.pt)")
    parser.add_argument("--output", help="write the ONNX model here")
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                        help="ONNX exporter (see engine/export.py for the choice)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |onnxruntime - PyTorch|")
    args = parser.parse_args(argv)
    if not args.weights_out and not args.output:
        parser.error("nothing to do: give --weights-out and/or --output")
    if args.output and not args.backbone:
        parser.error("--output needs --backbone")

    from engine.export import (
        OnnxParityError,
        export_onnx,
        load_backbone_state_dict,
        save_backbone_state_dict,
    )
    from models import build_backbone

    report = {"checkpoint": args.checkpoint}
    state = load_backbone_state_dict(args.checkpoint, args.tag)
    if args.weights_out:
        save_backbone_state_dict(state, args.weights_out)
        report["weights"] = args.weights_out
        report["tensors"] = len(state)
    if args.output:
        model = build_backbone(args.backbone, embedding_size=args.embedding_size,
                               **parse_options(args.backbone_option))
        model.load_state_dict(state, strict=True)
        try:
            onnx_report = export_onnx(model, args.output, exporter=args.exporter, opset=args.opset,
                                      tolerance=args.tolerance)
        except OnnxParityError as err:
            print(json.dumps({**report, "error": str(err)}))
            return 1
        report["onnx"] = onnx_report.to_dict()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
