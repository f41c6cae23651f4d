"""Data-pipeline throughput: decode + flip + normalize per worker, and the full loader, on 112x112 JPEGs;
each with simplejpeg (the loader's decoder) and with plain PIL decoding as a baseline."""
from __future__ import annotations

import os
import random
import resource
import tempfile
import time

import numpy as np

from .loader import IMAGE_SIZE, build_loader, decode_rgb, decode_rgb_pil, to_tensor_layout
from .synthetic import write_synthetic

DECODERS = {"simplejpeg": decode_rgb, "pil": decode_rgb_pil}


def read_jpegs(shards_dir: str, limit: int) -> list[bytes]:
    import tarfile

    from .manifest import load_manifest, shard_paths
    out = []
    for path in shard_paths(load_manifest(shards_dir)):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    out.append(tar.extractfile(member).read())
                    if len(out) >= limit:
                        return out
    return out


def bench_decode(jpegs: list[bytes], decoder: str, repeat: int = 3) -> dict:
    """One process, one core: decode -> random flip -> normalize into a (3,112,112) float32 buffer."""
    decode = DECODERS[decoder]
    buffer = np.empty((3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    rng = random.Random(0)
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        for data in jpegs:
            to_tensor_layout(decode(data), buffer, rng.random() < 0.5)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return {"bench": "decode_flip_normalize", "decoder": decoder, "images": len(jpegs),
            "images_per_s_wall": round(len(jpegs) / best_wall, 1),
            "images_per_s_per_core_cpu_time": round(len(jpegs) / best_cpu, 1),
            "loadavg_1min": round(os.getloadavg()[0], 2)}


def bench_loader(shards_dir: str, num_classes: int, decoder: str, workers: int, batch_size: int,
                 batches: int) -> dict:
    """The full loader (resampled, shuffle buffer, batching, worker processes), wall-clock images/s."""
    loader = build_loader(shards_dir, batch_size, num_classes=num_classes, rank=0, world_size=1,
                          num_workers=workers, resampled=True, batches_per_epoch=batches,
                          decoder=DECODERS[decoder])
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    first = None
    n = 0
    for _, labels in loader:
        n += len(labels)
        if first is None:
            first = time.perf_counter()
            n0 = n
    end = time.perf_counter()
    cpu = _cpu_seconds() - cpu_start  # main process + the (joined) worker processes
    steady = (n - n0) / (end - first) if end > first else float("nan")
    return {"bench": "loader", "decoder": decoder, "workers": workers, "batch_size": batch_size,
            "images": n, "images_per_s_wall": round(n / (end - start), 1),
            "images_per_s_after_first_batch": round(steady, 1), "first_batch_s": round(first - start, 3),
            "images_per_cpu_s": round(n / cpu, 1), "loadavg_1min": round(os.getloadavg()[0], 2)}


def _cpu_seconds() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def run(shards_dir: str | None = None, *, images: int = 3000, workers: int = 2, batch_size: int = 128,
        batches: int = 40, decode_images: int = 2000):
    """Yields one JSON-able dict per configuration."""
    with tempfile.TemporaryDirectory() as tmp:
        if shards_dir is None:
            shards_dir = os.path.join(tmp, "shards")
            write_synthetic(shards_dir, max(10, images // 20), images_per_identity=(10, 30), heldout_identities=0,
                            heldout_pairs=0, shard_size=max(1, images // (4 * max(workers, 1))),
                            workers=workers, progress=False)
        from .manifest import load_manifest
        num_classes = load_manifest(shards_dir)["num_classes"]
        jpegs = read_jpegs(shards_dir, decode_images)
        for decoder in DECODERS:
            yield bench_decode(jpegs, decoder)
        for decoder in DECODERS:
            yield bench_loader(shards_dir, num_classes, decoder, workers, batch_size, batches)
