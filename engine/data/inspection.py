"""Inspect a shard set: counts, class histogram (+ PNG), sample grid PNG, integrity check.

Integrity means: every tar reads to its end, every sample has a decodable 112x112 image and an integer
label in [0, num_classes), keys are unique, each shard holds what its manifest entry says, and (for sets
written grouped by identity) each identity is contiguous within one shard.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tarfile

import numpy as np
import webdataset as wds
from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .loader import decode_rgb, resolve_shards


def scan_shard(args) -> dict:
    """One shard: labels in order, problems found, and up to `keep` (label, jpg) samples for the grid."""
    url, num_classes, keep = args
    labels, problems, samples, keys = [], [], [], set()
    stream = wds.gopen(url, "rb")
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            key = sample["__key__"]
            if key in keys:
                problems.append(f"{url}: key {key} appears twice")
            keys.add(key)
            if "cls" not in sample or "jpg" not in sample:
                problems.append(f"{url}: sample {key} lacks {'cls' if 'cls' not in sample else 'jpg'}")
                continue
            try:
                label = int(sample["cls"])
            except ValueError:
                problems.append(f"{url}: sample {key}: label {sample['cls'][:20]!r} is not an integer")
                continue
            if label < 0 or (num_classes is not None and label >= num_classes):
                problems.append(f"{url}: sample {key}: label {label} outside [0, {num_classes})")
            try:
                shape = decode_rgb(sample["jpg"]).shape
                if shape != (112, 112, 3):
                    problems.append(f"{url}: sample {key}: image is {shape[1]}x{shape[0]}, expected 112x112")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{url}: sample {key}: undecodable image ({type(exc).__name__}: {exc})")
                continue
            labels.append(label)
            if len(samples) < keep and (not samples or samples[-1][0] != label):
                samples.append((label, sample["jpg"]))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        problems.append(f"{url}: unreadable tar data after {len(keys)} samples ({exc})")
    finally:
        stream.close()
    return {"url": url, "labels": labels, "problems": problems, "samples": samples}


def inspect_shards(shards, out_dir: str | None = None, *, workers: int = 2, grid: int = 64,
                   progress: bool = True) -> dict:
    """Scan a shard set (pattern, list, manifest or directory); write `class_histogram.png` and
    `sample_grid.png` into `out_dir` when given. Returns a JSON-able report."""
    urls, manifest = resolve_shards(shards)
    num_classes = manifest["num_classes"] if manifest else None
    keep = max(1, -(-grid // len(urls)))
    jobs = [(u, num_classes, keep) for u in urls]
    results = []
    with tqdm(total=len(urls), unit="shard", desc="inspecting", disable=not progress) as bar:
        if workers > 1 and len(urls) > 1:
            with mp.get_context("fork").Pool(min(workers, len(urls))) as pool:
                for r in pool.imap(scan_shard, jobs):
                    results.append(r)
                    bar.update()
        else:
            for job in jobs:
                results.append(scan_shard(job))
                bar.update()
    problems = [p for r in results for p in r["problems"]]
    all_labels = np.concatenate([np.asarray(r["labels"], np.int64) for r in results]) if results else np.zeros(0)
    counts = np.bincount(all_labels, minlength=num_classes or 0) if len(all_labels) else np.zeros(0, np.int64)
    if manifest is not None:
        expected = {e["name"]: e["num_images"] for e in manifest.get("shard_index", [])}
        for r in results:
            name = os.path.basename(r["url"])
            if name in expected and len(r["labels"]) != expected[name]:
                problems.append(f"{r['url']}: {len(r['labels'])} good samples, manifest says {expected[name]}")
        if len(counts) == len(manifest["images_per_class"]) and counts.tolist() != manifest["images_per_class"]:
            bad = int(np.flatnonzero(counts != np.asarray(manifest["images_per_class"]))[0])
            problems.append(f"class {bad}: {counts[bad]} images in the shards, manifest says "
                            f"{manifest['images_per_class'][bad]}")
        if manifest.get("grouped_by_identity"):
            owner: dict = {}
            for r in results:
                labels = np.asarray(r["labels"])
                if len(labels) and np.any(np.diff(labels) < 0):
                    problems.append(f"{r['url']}: identities are not contiguous (labels go down)")
                for label in np.unique(labels).tolist():
                    if label in owner:
                        problems.append(f"class {label} is split over {owner[label]} and {r['url']}")
                    owner[label] = r["url"]
    present = counts[counts > 0]
    report = {
        "num_shards": len(urls),
        "num_images": int(len(all_labels)),
        "num_classes_present": int(len(present)),
        "num_classes": num_classes,
        "images_per_class": {"min": int(present.min()) if len(present) else 0,
                             "median": float(np.median(present)) if len(present) else 0.0,
                             "mean": float(present.mean()) if len(present) else 0.0,
                             "max": int(present.max()) if len(present) else 0},
        "images_per_shard": {os.path.basename(r["url"]): len(r["labels"]) for r in results},
        "ok": not problems,
        "problems": problems[:100],
        "num_problems": len(problems),
    }
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        report["histogram_png"] = plot_class_histogram(counts, os.path.join(out_dir, "class_histogram.png"))
        samples = [s for r in results for s in r["samples"]][:grid]
        report["grid_png"] = plot_sample_grid(samples, os.path.join(out_dir, "sample_grid.png"))
    return report


def plot_class_histogram(counts: np.ndarray, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    present = counts[counts > 0]
    if len(present):
        left.hist(present, bins=min(60, max(5, int(present.max() - present.min() + 1))), color="tab:blue")
    left.set_xlabel("images per class")
    left.set_ylabel("classes")
    left.set_title(f"{len(present)} classes, {int(counts.sum())} images")
    right.plot(np.sort(present)[::-1], color="tab:orange")
    right.set_yscale("log")
    right.set_xlabel("class rank")
    right.set_ylabel("images (log)")
    right.set_title("long tail")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sample_grid(samples, path: str, columns: int = 8) -> str:
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(samples) // columns))
    sheet = Image.new("RGB", (columns * 112, rows * 124), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, jpg) in enumerate(samples):
        x, y = (i % columns) * 112, (i // columns) * 124
        try:
            sheet.paste(Image.fromarray(decode_rgb(jpg)), (x, y))
        except Exception:  # noqa: BLE001 - the integrity report names it; the grid shows a blank
            pass
        draw.text((x + 2, y + 112), f"class {label}", fill=(0, 0, 0))
    sheet.save(path)
    return path
