"""Times one head step (forward, backward, optimizer; with --backbone a whole training step) on W
local gloo ranks, ours next to a naive implementation measured in the same run, with the memory
planner's prediction. Prints one JSON object per configuration.

    python tools/bench_head.py --classes 1000000 --dim 512 --batch 128 --world 2 --sample-rate 0.1
    python tools/bench_head.py --sweep --output sweep.jsonl --plot sweep.png
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.head_bench import SWEEP_CLASSES, SWEEP_HEADS, bench_config, plot_sweep, sweep  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", help="default: 100000; with --sweep: 100K to 10M")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="samples per rank")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sample-rate", type=float, nargs="+", default=[0.1])
    p.add_argument("--head", nargs="+", choices=SWEEP_HEADS,
                   help="head types (default: partial; with --sweep: every type)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float64"])
    p.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--momentum-dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--backbone", help="time a whole training step with this backbone (e.g. tiny, mbf)")
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--allocator", default="training", choices=["training", "exact"],
                   help="glibc settings of the ranks: training's (peak RSS includes freed memory the allocator "
                        "keeps) or exact (large frees returned: peak RSS = peak of live tensors)")
    p.add_argument("--sweep", action="store_true", help="every --classes and --head, fp32 and lean bf16 (bfloat16 rows, "
                                                                 "int8 momentum); skips what the planner says will not fit")
    p.add_argument("--output", help="also append the JSON lines to this file")
    p.add_argument("--plot", help="with --sweep or --replot: write a PNG of time and memory against C")
    p.add_argument("--replot", metavar="JSONL", help="no run: plot the sweep records of this file (several runs "
                                                     "appended with --output) into --plot")
    args = p.parse_args()

    def emit(record):
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")

    if args.replot:
        if not args.plot:
            p.error("--replot needs --plot")
        with open(args.replot) as f:
            plot_sweep([json.loads(line) for line in f if line.strip()], args.plot)
        return
    if args.sweep:
        records = sweep(dim=args.dim, batch=args.batch, world=args.world, sample_rate=args.sample_rate[0],
                        heads=args.head or SWEEP_HEADS, classes=args.classes or SWEEP_CLASSES,
                        steps=args.steps, warmup=args.warmup, emit=emit)
        if args.plot:
            plot_sweep(records, args.plot)
        return
    for classes in args.classes or [100_000]:
        for rate in args.sample_rate:
            for head in args.head or ["partial"]:
                for dtype in args.dtype:
                    emit(bench_config(classes, args.dim, args.batch, args.world, rate, head=head, dtype=dtype,
                                      chunk_size=args.chunk_size, steps=args.steps, warmup=args.warmup,
                                      naive=not args.no_naive, storage_dtype=args.storage_dtype,
                                      momentum_dtype=args.momentum_dtype, backbone=args.backbone,
                                      allocator=args.allocator))


if __name__ == "__main__":
    main()
