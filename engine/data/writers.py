"""Parallel writers of WebDataset shards from an image folder, an MXNet RecordIO file, or synthetic identities.

Every shard holds whole identities, contiguously, in class order (`grouped_by_identity`): identity-aware
sampling (pairs, one item per identity) then needs only a small per-identity buffer in each worker.
Each sample is `{"__key__": "<class:08d>_<index:06d>", "jpg": bytes, "cls": int}`: two tar members, so
the loader parses as few tar headers as possible. The key names the source: for a folder, `index` is the
position in the identity's sorted file list (the manifest's label_map names the identity folder); for
RecordIO, the position in the identity's record range.

A shard is written under `<name>.partial` and renamed when complete, so a final name never holds a
half-written shard. Shards are written by a process pool; a progress bar shows rate and ETA.
"""
from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import re
from dataclasses import dataclass

import numpy as np
import simplejpeg
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .manifest import write_manifest
from .recordio import RecordIOReader, scan_layout

log = logging.getLogger(__name__)

IMAGE_SIZE = 112
JPEG_QUALITY = 95
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_pattern(prefix: str, num_shards: int) -> str:
    """Brace pattern of a shard set, e.g. `train-{000000..000041}.tar`."""
    return f"{prefix}-{{{0:06d}..{max(num_shards - 1, 0):06d}}}.tar"


def plan_shards(images_per_class: np.ndarray, shard_size: int) -> list[tuple[int, int]]:
    """Split classes 0..C-1 into contiguous ranges [a, b) of about `shard_size` images each.

    Identities are never split: a shard closes at the first class boundary at or past `shard_size`.
    """
    counts = np.asarray(images_per_class, dtype=np.int64)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    cum = np.cumsum(counts)
    ranges, start, done = [], 0, 0
    while start < len(counts):
        end = int(np.searchsorted(cum, done + shard_size, side="left")) + 1
        end = min(max(end, start + 1), len(counts))
        ranges.append((start, end))
        done = int(cum[end - 1])
        start = end
    return ranges


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")


def to_face_jpeg(data: bytes) -> bytes:
    """Stored image bytes: a decodable 112x112 JPEG passes through untouched; anything else is decoded,
    converted to RGB, resized to 112x112 if needed and encoded as JPEG. Raises on undecodable input."""
    if data[:2] == b"\xff\xd8":
        try:
            rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
            if rgb.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE):
                return data
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (IMAGE_SIZE, IMAGE_SIZE):
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return encode_jpeg(np.asarray(img))


@dataclass
class ShardTask:
    index: int
    first_class: int
    end_class: int  # exclusive
    payload: object = None  # source-specific description of the samples


@dataclass
class ShardResult:
    index: int
    name: str
    num_images: int
    first_class: int
    last_class: int
    images_per_class: np.ndarray  # (end_class - first_class,) images actually written
    skipped: list  # [(source description, reason)] inputs that could not be read


class SampleSource:
    """Turns one ShardTask into samples. Forked pool workers inherit it (it is never pickled per task)."""

    description = "source"

    def samples(self, task: ShardTask, skipped: list):
        raise NotImplementedError


_SOURCE: SampleSource | None = None  # set before the pool forks: large sources are not pickled per task


def _write_one(args) -> ShardResult:
    task, out_dir, prefix = args
    source = _SOURCE
    name = shard_name(prefix, task.index)
    final = os.path.join(out_dir, name)
    partial = final + ".partial"
    counts = np.zeros(task.end_class - task.first_class, dtype=np.int64)
    skipped: list = []
    pattern = os.path.join(out_dir, prefix).replace("%", "%%") + "-%06d.tar.partial"
    writer = wds.ShardWriter(pattern, maxcount=1 << 62, maxsize=float("inf"), start_shard=task.index, verbose=0,
                             mtime=0)  # fixed integer mtime: identical shards for identical inputs, no PAX headers
    try:
        for sample in source.samples(task, skipped):
            writer.write(sample)
            counts[sample["cls"] - task.first_class] += 1
        writer.tarstream.close()  # not writer.close(): its `post` hook would run on failures too
        writer.tarstream = None
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, final)
    except BaseException:
        if writer.tarstream is not None:
            try:
                writer.tarstream.close()
            except Exception:  # noqa: BLE001 - the original error matters, not the cleanup's
                pass
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return ShardResult(task.index, name, int(counts.sum()), task.first_class, task.end_class - 1, counts, skipped)


def write_shards(source: SampleSource, tasks: list[ShardTask], out_dir: str, *, prefix: str, num_classes: int,
                 total_images: int, workers: int, extra_manifest: dict | None = None,
                 progress: bool = True) -> dict:
    """Write all tasks' shards with a pool of `workers` processes; write and return the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    stale = [n for n in os.listdir(out_dir) if re.fullmatch(re.escape(prefix) + r"-\d{6}\.tar\.partial", n)]
    for name in stale:
        os.remove(os.path.join(out_dir, name))
    global _SOURCE
    _SOURCE = source
    jobs = [(task, out_dir, prefix) for task in tasks]
    results: list[ShardResult] = []
    bar = tqdm(total=total_images, unit="img", desc=f"writing {prefix} shards", disable=not progress,
               smoothing=0.1, dynamic_ncols=True)
    pool = None
    try:
        if workers <= 1 or len(jobs) <= 1:
            iterator = map(_write_one, jobs)
        else:
            pool = mp.get_context("fork").Pool(min(workers, len(jobs)))
            iterator = pool.imap_unordered(_write_one, jobs)
        for result in iterator:
            results.append(result)
            bar.update(result.num_images)
            for what, why in result.skipped:
                log.warning("skipped unreadable input %s: %s", what, why)
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        _SOURCE = None
    results.sort(key=lambda r: r.index)
    images_per_class = np.zeros(num_classes, dtype=np.int64)
    for r in results:
        images_per_class[r.first_class:r.last_class + 1] = r.images_per_class
    extra_shards = sorted(
        n for n in os.listdir(out_dir)
        if re.fullmatch(re.escape(prefix) + r"-\d{6}\.tar", n) and int(n[-10:-4]) >= len(results))
    if extra_shards:
        log.warning("%s holds shards beyond this set (%s ...); the manifest lists only the new ones",
                    out_dir, extra_shards[0])
    manifest = {
        "num_classes": int(num_classes),
        "num_images": int(images_per_class.sum()),
        "images_per_class": images_per_class.tolist(),
        "source": source.description,
        "shards": [r.name for r in results],
        "pattern": shard_pattern(prefix, len(results)),
        "shard_index": [{"name": r.name, "num_images": r.num_images, "first_class": r.first_class,
                         "last_class": r.last_class} for r in results],
        "grouped_by_identity": True,
        "skipped_inputs": sum(len(r.skipped) for r in results),
    }
    manifest.update(extra_manifest or {})
    path = write_manifest(out_dir, manifest, prefix=prefix)
    manifest["directory"] = os.path.abspath(out_dir)
    manifest["path"] = path
    return manifest


# ----------------------------------------------------------------------------------------- image folder
def _list_images(directory: str) -> list[str]:
    return sorted(e.name for e in os.scandir(directory)
                  if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def _count_images(directory: str) -> int:
    return len(_list_images(directory))


class FolderSource(SampleSource):
    """`root/<identity>/<image>.jpg|png`: identities sorted by name become classes 0..C-1."""

    def __init__(self, root: str, identities: list[str], counts: np.ndarray):
        self.root = root
        self.identities = identities
        self.counts = counts
        self.description = f"folder:{os.path.abspath(root)}"

    def samples(self, task, skipped):
        for label in range(task.first_class, task.end_class):
            directory = os.path.join(self.root, self.identities[label])
            files = _list_images(directory)
            if len(files) != self.counts[label]:
                raise RuntimeError(f"{directory} changed while writing shards: "
                                   f"{len(files)} images now, {self.counts[label]} when scanned")
            for j, name in enumerate(files):
                rel = os.path.join(self.identities[label], name)
                try:
                    with open(os.path.join(self.root, rel), "rb") as f:
                        jpg = to_face_jpeg(f.read())
                except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped and reported
                    skipped.append((os.path.join(self.root, rel), f"{type(exc).__name__}: {exc}"))
                    continue
                yield {"__key__": f"{label:08d}_{j:06d}", "jpg": jpg, "cls": label}


def write_folder_shards(root: str, out_dir: str, *, shard_size: int = 10000, workers: int = 2,
                        prefix: str = "train", progress: bool = True) -> dict:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    dirs = [os.path.join(root, n) for n in names]
    with tqdm(total=len(dirs), unit="id", desc="listing identities", disable=not progress or len(dirs) < 1000) as bar:
        if workers > 1 and len(dirs) > 1000:
            with mp.get_context("fork").Pool(workers) as pool:
                counts = []
                for n in pool.imap(_count_images, dirs, chunksize=256):
                    counts.append(n)
                    bar.update()
        else:
            counts = [_count_images(d) for d in dirs]
    counts = np.array(counts, dtype=np.int64)
    keep = counts > 0
    identities = [n for n, k in zip(names, keep) if k]
    counts = counts[keep]
    if not identities:
        raise ValueError(f"{root}: no identity folder holds a .jpg/.jpeg/.png image")
    tasks = [ShardTask(i, a, b) for i, (a, b) in enumerate(plan_shards(counts, shard_size))]
    label_map = {name: i for i, name in enumerate(identities)}
    return write_shards(FolderSource(root, identities, counts), tasks, out_dir, prefix=prefix,
                        num_classes=len(identities), total_images=int(counts.sum()), workers=workers,
                        extra_manifest={"label_map": label_map}, progress=progress)


# ---------------------------------------------------------------------------------- MXNet RecordIO
class RecordSource(SampleSource):
    def __init__(self, reader: RecordIOReader, kind: str):
        self.reader = reader
        self.description = f"rec:{os.path.abspath(reader.rec_path)} ({kind} layout)"

    def samples(self, task, skipped):
        record_ids, original_labels = task.payload
        label = task.first_class
        index = 0
        previous = None
        for rid, original in zip(record_ids.tolist(), original_labels.tolist()):
            if previous is not None and original != previous:
                label += 1
                index = 0
            previous = original
            record = self.reader.read(rid)
            if int(record.label) != original:
                raise ValueError(f"{self.reader.rec_path}: record {rid} has label {record.label}, but its "
                                 f"identity range says {original}")
            try:
                jpg = to_face_jpeg(record.image)
            except Exception as exc:  # noqa: BLE001
                skipped.append((f"{self.reader.rec_path} record {rid}", f"{type(exc).__name__}: {exc}"))
                continue
            yield {"__key__": f"{label:08d}_{index:06d}", "jpg": jpg, "cls": label}
            index += 1


def write_rec_shards(rec_path: str, out_dir: str, *, idx_path: str | None = None, shard_size: int = 10000,
                     workers: int = 2, prefix: str = "train", progress: bool = True) -> dict:
    reader = RecordIOReader(rec_path, idx_path)
    with tqdm(total=len(reader.keys), unit="rec", desc="scanning record headers", disable=not progress) as bar:
        layout = scan_layout(reader, progress=bar.update)
    reader.close()
    if len(layout.record_ids) == 0:
        raise ValueError(f"{rec_path}: no image records")
    # Identities in ascending original label; classes are their ranks (contiguous 0..C-1).
    order = np.argsort(layout.labels, kind="stable")
    record_ids, original = layout.record_ids[order], layout.labels[order]
    unique, counts = np.unique(original, return_counts=True)
    contiguous = bool(unique[0] == 0 and unique[-1] == len(unique) - 1)
    bounds = np.r_[0, np.cumsum(counts)]
    tasks = []
    for i, (a, b) in enumerate(plan_shards(counts, shard_size)):
        lo, hi = bounds[a], bounds[b]
        tasks.append(ShardTask(i, a, b, (record_ids[lo:hi], original[lo:hi])))
    label_map = None if contiguous else {str(int(u)): i for i, u in enumerate(unique)}
    return write_shards(RecordSource(reader, layout.kind), tasks, out_dir, prefix=prefix,
                        num_classes=len(unique), total_images=int(counts.sum()), workers=workers,
                        extra_manifest={"label_map": label_map}, progress=progress)
