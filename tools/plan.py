"""Memory plan per rank for a training step, and the largest number of classes that fits.

    python tools/plan.py --classes 10000000 --world 2 --sample-rate 0.1 --storage-dtype bfloat16 \
        --momentum-dtype int8 --backbone r50 --memory 11GiB
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.plan import PlanInput, largest_classes, plan  # noqa: E402

UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def parse_bytes(text: str) -> int:
    for unit, factor in sorted(UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, required=True)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=128, help="samples per rank")
    p.add_argument("--head", default="partial", choices=["full", "partial", "mutual", "dcq", "f2c"])
    p.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--momentum-dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--update", default="sparse", choices=["sparse", "dense"])
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--backbone")
    p.add_argument("--backbone-optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--mixed-precision", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="backbone precision (bfloat16/float16 add fp32 master weights)")
    p.add_argument("--process-baseline", help="resident memory of an idle rank on your launcher "
                   "(default: the planner's measured figure), e.g. 400MiB")
    p.add_argument("--memory", help="budget per rank (e.g. 11GiB): also print the largest C that fits")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    inputs = PlanInput(classes=a.classes, dim=a.dim, world=a.world, sample_rate=a.sample_rate, batch=a.batch,
                       head=a.head, storage_dtype=a.storage_dtype, compute_dtype=a.compute_dtype, momentum_dtype=a.momentum_dtype,
                       update=a.update, chunk_size=a.chunk_size, queue_size=a.queue_size, backbone=a.backbone,
                       backbone_optimizer=a.backbone_optimizer, zero_stage=a.zero_stage,
                       mixed_precision=a.mixed_precision)
    if a.process_baseline:
        inputs.process_baseline = parse_bytes(a.process_baseline)
    result = plan(inputs).as_dict()
    if a.memory:
        result["budget_bytes"] = parse_bytes(a.memory)
        result["largest_classes_that_fit"] = largest_classes(inputs, result["budget_bytes"])
    if a.json:
        print(json.dumps(result))
        return
    width = max(len(k) for k in result["components"])
    for name, value in result["components"].items():
        print(f"{name:<{width}}  {value / 2**20:12.1f} MiB")
    print(f"{'total per rank':<{width}}  {result['total_bytes'] / 2**20:12.1f} MiB")
    if a.memory:
        print(f"largest C within {a.memory} per rank: {result['largest_classes_that_fit']:,}")


if __name__ == "__main__":
    main()
