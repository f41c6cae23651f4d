"""Write WebDataset shards (+ manifest) from an image folder, an MXNet RecordIO file, or synthetic identities.

    python tools/make_shards.py folder /data/webface42m /shards/webface --shard-size 10000 --workers 16
    python tools/make_shards.py rec /data/ms1mv3/train.rec /shards/ms1mv3 --workers 8
    python tools/make_shards.py synthetic /shards/demo --identities 1000 --images 4 40 --heldout-identities 200
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data import write_folder_shards, write_rec_shards, write_synthetic  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shard-size", type=int, default=10000, help="images per shard (whole identities)")
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    common.add_argument("--prefix", default="train", help="shard file prefix: <prefix>-000000.tar")
    common.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("folder", parents=[common], help="root/<identity>/<image>.jpg|png")
    p.add_argument("root")
    p.add_argument("out_dir")
    p = sub.add_parser("rec", parents=[common], help="InsightFace / im2rec train.rec + train.idx")
    p.add_argument("rec")
    p.add_argument("out_dir")
    p.add_argument("--idx", default=None, help="index file (default: the .rec path with .idx)")
    p = sub.add_parser("synthetic", parents=[common], help="procedural face identities (demo, tests)")
    p.add_argument("out_dir")
    p.add_argument("--identities", type=int, default=1000)
    p.add_argument("--images", type=int, nargs="+", default=[4, 40],
                   help="images per identity: MIN MAX, or a mean (long-tailed)")
    p.add_argument("--heldout-identities", type=int, default=200)
    p.add_argument("--heldout-pairs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    common_kw = dict(shard_size=args.shard_size, workers=args.workers, prefix=args.prefix, progress=not args.quiet)
    if args.source == "folder":
        manifest = write_folder_shards(args.root, args.out_dir, **common_kw)
    elif args.source == "rec":
        manifest = write_rec_shards(args.rec, args.out_dir, idx_path=args.idx, **common_kw)
    else:
        if len(args.images) not in (1, 2):
            parser.error("--images takes MIN MAX or a mean")
        images = tuple(args.images) if len(args.images) == 2 else args.images[0]
        manifest = write_synthetic(args.out_dir, args.identities, images_per_identity=images,
                                   heldout_identities=args.heldout_identities, heldout_pairs=args.heldout_pairs,
                                   seed=args.seed, **common_kw)
    summary = {k: manifest[k] for k in ("num_classes", "num_images", "source", "pattern", "path")}
    summary["num_shards"] = len(manifest["shards"])
    if "heldout_bin" in manifest:
        summary["heldout_bin"] = manifest["heldout_bin"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
