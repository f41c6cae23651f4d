"""Streaming loader over WebDataset shards: split by rank and worker, shuffle buffer, decode, flip, normalize.

Per worker the pipeline is

    shard urls -> tar samples (webdataset) -> label check -> [identity grouping] -> shuffle buffer
               -> decode (simplejpeg, PIL fallback) + random flip + normalize to [-1, 1] -> batches

- Finite mode (`resampled=False`): each epoch the shard list is permuted (same permutation on every rank,
  from (seed, epoch)), rank r takes shards r, r+W, ... and its workers split those again, so ranks and
  workers read disjoint samples and every image comes out exactly once per epoch. Ranks may end the epoch
  with different batch counts: use this mode for conversion checks and evaluation, not for training
  several ranks in lockstep.
- Resampled mode (`resampled=True`): every worker draws shards with replacement from its own
  (seed, epoch, rank, worker) random stream, forever; the loader stops each epoch after exactly
  `batches_per_epoch` batches, so all ranks take the same number of steps (no hang at epoch end).
- Modes: "instance" yields `(images (B,3,112,112) float32, labels (B,) int64)`; "pairs" (DCQ) yields
  `(images_a, images_b, labels)` where b is another image of a's identity; "identity" (F²C identity
  loader) yields the same triple with one item per identity: two images of it. Pairs are formed from
  a per-identity buffer: shards hold whole identities contiguously (see writers.py), so the buffer
  holds one identity at a time.
- Bad input: an undecodable image, or a sample without an image, is skipped, counted and reported once
  with its shard and key; a truncated or corrupt tar ends that shard (its earlier samples are kept) and
  is reported; a label outside [0, num_classes) and a missing shard are errors naming the shard (and key).
"""
from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import random
import tarfile
import warnings

import braceexpand
import numpy as np
import simplejpeg
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .manifest import MANIFEST_NAME, load_manifest, shard_paths

log = logging.getLogger(__name__)

IMAGE_SIZE = 112
# Worker processes and the shared skip counter use one start method: fork where the platform has it.
_CONTEXT = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
MODES = ("instance", "pairs", "identity")


class ShardError(RuntimeError):
    """Input that stops the run: a missing shard, a label outside [0, num_classes)."""


# ------------------------------------------------------------------------------------------- decoding
def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG (or any PIL-readable image) bytes -> (H, W, 3) uint8 RGB. simplejpeg first, PIL as fallback."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except (ValueError, TypeError):
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))


def decode_rgb_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def to_tensor_layout(rgb: np.ndarray, out: np.ndarray, flip: bool) -> None:
    """(112, 112, 3) uint8 -> `out` (3, 112, 112) float32 in [-1, 1], mirrored left-right if `flip`."""
    if rgb.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, expected {IMAGE_SIZE}x{IMAGE_SIZE} RGB")
    chw = rgb.transpose(2, 0, 1)
    if flip:
        chw = chw[:, :, ::-1]
    np.multiply(chw, np.float32(1 / 127.5), out=out, casting="unsafe")
    out -= 1.0


# ------------------------------------------------------------------------------------------- shard list
def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_shards(shards) -> tuple[list[str], dict | None]:
    """(shard urls, manifest or None) from a brace pattern, a list, a manifest file or a directory."""
    manifest = None
    if isinstance(shards, (str, os.PathLike)):
        shards = os.fspath(shards)
        if os.path.isdir(shards) or shards.endswith(MANIFEST_NAME):
            manifest = load_manifest(shards)
            urls = shard_paths(manifest)
        else:
            urls = list(braceexpand.braceexpand(shards))
    else:
        urls = [os.fspath(s) for s in shards]
    if not urls:
        raise ValueError(f"no shards in {shards!r}")
    missing = [u for u in urls if not is_remote(u) and not os.path.exists(u)]
    if missing:
        raise ShardError(f"shard {missing[0]} does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return urls, manifest


# ------------------------------------------------------------------------------------------- dataset
class _Reporter:
    """Counts skipped samples across worker processes; logs each (shard, key) once per process."""

    def __init__(self, counter):
        self.counter = counter
        self.seen: set = set()

    def skip(self, url: str, key: str, reason: str) -> None:
        with self.counter.get_lock():
            self.counter.value += 1
        if (url, key) not in self.seen:
            self.seen.add((url, key))
            log.warning("skipped sample %s in shard %s: %s", key, url, reason)


class ShardStream(torch.utils.data.IterableDataset):
    """The per-worker pipeline; a DataLoader runs one copy per worker (see module docstring)."""

    def __init__(self, urls, batch_size, *, num_classes, rank, world_size, seed, resampled, shuffle_buffer, mode,
                 flip, with_keys, expected_counts, counter, decoder=decode_rgb):
        super().__init__()
        self.urls = list(urls)
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.mode = mode
        self.flip = flip
        self.with_keys = with_keys
        self.expected_counts = expected_counts or {}
        self.counter = counter
        self.decoder = decoder
        self.batches_per_epoch = None  # resampled mode: set by the loader
        self.epoch = 0

    # -- shard selection
    def worker_urls(self, worker: int, num_workers: int):
        if self.resampled:
            rng = random.Random(f"shards/{self.seed}/{self.epoch}/{self.rank}/{worker}")
            while True:
                yield rng.choice(self.urls)
        else:
            order = list(self.urls)
            random.Random(f"order/{self.seed}/{self.epoch}").shuffle(order)
            yield from order[self.rank::self.world_size][worker::num_workers]

    # -- reading
    def shard_samples(self, url: str, reporter: _Reporter):
        """Samples of one shard: dicts with __key__, __url__, jpg, cls (int). Stops at a tar error."""
        if not is_remote(url) and not os.path.exists(url):
            raise ShardError(f"shard {url} does not exist")
        stream = wds.gopen(url, "rb")
        count, key = 0, None
        try:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            for sample in group_by_keys(files):
                key = sample["__key__"]
                count += 1
                if "cls" not in sample:
                    reporter.skip(url, key, "sample has no 'cls' entry")
                    continue
                image = sample.get("jpg", sample.get("jpeg", sample.get("png")))
                if image is None:
                    reporter.skip(url, key, "sample has no 'jpg' entry")
                    continue
                try:
                    label = int(sample["cls"])
                except ValueError:
                    raise ShardError(f"shard {url}: sample {key}: label {sample['cls'][:20]!r} is not an integer") from None
                if not 0 <= label < self.num_classes:
                    raise ShardError(f"shard {url}: sample {key}: label {label} outside [0, {self.num_classes})")
                yield {"__key__": key, "__url__": url, "jpg": image, "cls": label}
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            reporter.skip(url, f"after {key}" if key else "start", f"unreadable tar data ({exc}); rest of shard skipped")
            return
        finally:
            stream.close()
        expected = self.expected_counts.get(os.path.basename(url))
        if expected is not None and count < expected:
            reporter.skip(url, f"after {key}", f"shard ended after {count} of {expected} samples (truncated?)")

    def identity_groups(self, samples):
        """Consecutive samples of one identity (shards hold identities contiguously) -> lists."""
        group = []
        for sample in samples:
            if group and (sample["cls"] != group[0]["cls"] or sample["__url__"] != group[0]["__url__"]):
                yield group
                group = []
            group.append(sample)
        if group:
            yield group

    def items(self, worker, num_workers, reporter, rng):
        def all_samples():
            for url in self.worker_urls(worker, num_workers):
                yield from self.shard_samples(url, reporter)

        if self.mode == "instance":
            yield from all_samples()
            return
        for group in self.identity_groups(all_samples()):
            n = len(group)
            if self.mode == "pairs":
                for i, a in enumerate(group):
                    b = group[(i + 1 + rng.randrange(n - 1)) % n] if n > 1 else a
                    yield {**a, "jpg_b": b["jpg"], "key_b": b["__key__"]}
            else:
                i, j = (rng.sample(range(n), 2) if n > 1 else (0, 0))
                yield {**group[i], "jpg_b": group[j]["jpg"], "key_b": group[j]["__key__"]}

    def shuffled(self, items, rng):
        """Shuffle buffer of `shuffle_buffer` items, filled before the first item leaves it: identities
        are contiguous inside shards, so a partly filled buffer would give the first batches of every
        epoch only a few identities (a loss spike at each epoch start). It holds undecoded bytes, so
        filling it is cheap."""
        if self.shuffle_buffer <= 1:
            yield from items
            return
        initial = self.shuffle_buffer
        items = iter(items)
        buffer = []
        for item in items:
            buffer.append(item)
            if len(buffer) < self.shuffle_buffer:
                item = next(items, None)
                if item is not None:
                    buffer.append(item)
            if len(buffer) >= initial:
                k = rng.randrange(len(buffer))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reporter = _Reporter(self.counter)
        rng = random.Random(f"samples/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        pairs = self.mode != "instance"
        B = self.batch_size

        def new_batch():
            """Batch tensors; in a worker process they are allocated in shared memory, so handing them to
            the main process costs no copy. Returns the tensors and numpy views to decode into."""
            tensors = [torch.empty((B, 3, IMAGE_SIZE, IMAGE_SIZE)) for _ in range(2 if pairs else 1)]
            tensors.append(torch.empty(B, dtype=torch.int64))
            if info is not None:
                tensors = [t.share_memory_() for t in tensors]
            return tensors, [t.numpy() for t in tensors]

        tensors, (images, *rest) = new_batch()
        images_b, labels = rest if pairs else (None, rest[0])
        keys = []
        n = 0
        # Resampled: this worker's share of the epoch's batches (the DataLoader takes them in turn).
        share = None
        if self.resampled:
            share = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
            if share == 0:
                return
        for item in self.shuffled(self.items(worker, num_workers, reporter, rng), rng):
            try:
                to_tensor_layout(self.decoder(item["jpg"]), images[n], self.flip and rng.random() < 0.5)
                if pairs:
                    to_tensor_layout(self.decoder(item["jpg_b"]), images_b[n], self.flip and rng.random() < 0.5)
            except Exception as exc:  # noqa: BLE001 - any undecodable image is skipped, counted, reported
                reporter.skip(item["__url__"], item["__key__"], f"cannot decode image: {type(exc).__name__}: {exc}")
                continue
            labels[n] = item["cls"]
            keys.append(item["__key__"] if not pairs else (item["__key__"], item["key_b"]))
            n += 1
            if n == B:
                yield self._batch(tensors, keys, n)
                if share is not None:
                    share -= 1
                    if share == 0:
                        return
                tensors, (images, *rest) = new_batch()
                images_b, labels = rest if pairs else (None, rest[0])
                keys, n = [], 0
        if n and share is None:
            yield self._batch(tensors, keys, n)

    def _batch(self, tensors, keys, n):
        out = [t[:n] if n < self.batch_size else t for t in tensors]
        if self.with_keys:
            out.append(list(keys))
        return tuple(out)


def _worker_init(_):
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------- loader
class ShardLoader:
    """Iterable over batches for one rank; `set_epoch(e)` reshuffles, `decode_errors()` counts skips."""

    def __init__(self, stream: ShardStream, num_workers: int, batches_per_epoch: int | None,
                 num_images: int | None):
        self.stream = stream
        self.num_workers = num_workers
        self.batches_per_epoch = batches_per_epoch
        self.num_images = num_images
        self.epoch = 0
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def decode_errors(self) -> int:
        """Samples skipped so far (undecodable images, malformed samples, unreadable tar data), counted over
        all workers and every time they are met (resampling meets a bad sample again; its log line is once)."""
        return int(self.stream.counter.value)

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("the number of batches of a finite-mode epoch is not known in advance")
        return self.batches_per_epoch

    def __iter__(self):
        self.epoch = self._next_epoch
        self._next_epoch += 1
        self.stream.epoch = self.epoch
        loader = torch.utils.data.DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=_worker_init,
            prefetch_factor=2 if self.num_workers else None, persistent_workers=False,
            multiprocessing_context=_CONTEXT if self.num_workers else None)
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if self.batches_per_epoch is not None and count != self.batches_per_epoch:
            raise RuntimeError(f"resampled epoch gave {count} batches instead of {self.batches_per_epoch}")


def build_loader(shards, batch_size: int, *, num_classes: int, rank: int, world_size: int, num_workers: int = 2,
                 seed: int = 0, resampled: bool = False, batches_per_epoch: int | None = None,
                 shuffle_buffer: int = 1000, mode: str = "instance", flip: bool = True, with_keys: bool = False,
                 decoder=decode_rgb) -> ShardLoader:
    """Batches for rank `rank` of `world_size` (see the module docstring for modes and guarantees).

    shards: brace pattern (`/data/train-{000000..000099}.tar`), list of paths, a manifest file or a
    directory holding one. batches_per_epoch: resampled mode only; default num_images / (B * W) from the
    manifest. with_keys: append the list of sample keys to every batch (tests, debugging).
    decoder: bytes -> (H, W, 3) uint8 (default simplejpeg with PIL fallback).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    urls, manifest = resolve_shards(shards)
    expected_counts = None
    num_images = None
    if manifest is not None:
        if manifest["num_classes"] > num_classes:
            raise ValueError(f"{manifest['directory']}: the shards hold {manifest['num_classes']} classes, "
                             f"more than num_classes={num_classes}")
        num_images = manifest["num_images"]
        expected_counts = {e["name"]: e["num_images"] for e in manifest.get("shard_index", [])}
        if mode != "instance" and not manifest.get("grouped_by_identity", False):
            warnings.warn(f"{manifest['directory']}: shards are not grouped by identity; mode {mode!r} will pair "
                          "few images", stacklevel=2)
    if resampled:
        if batches_per_epoch is None:
            if num_images is None:
                raise ValueError("resampled mode needs batches_per_epoch (or shards given by a manifest)")
            per_step = batch_size * world_size
            if mode == "identity":
                num_images = manifest["num_classes"]
            batches_per_epoch = max(1, num_images // per_step)
    else:
        if batches_per_epoch is not None:
            raise ValueError("batches_per_epoch applies to resampled mode only")
        if len(urls) < world_size:
            raise ValueError(f"{len(urls)} shards for {world_size} ranks: rank {len(urls)} and above would get no "
                             "data; write more shards or use resampled=True")
        mine = len(urls[rank::world_size])
        if mine < max(num_workers, 1):
            warnings.warn(f"rank {rank} has {mine} shards for {num_workers} workers; using {mine} workers "
                          f"(write at least {world_size * num_workers} shards to use them all)", stacklevel=2)
            num_workers = mine
    counter = _CONTEXT.Value("q", 0)
    stream = ShardStream(urls, batch_size, num_classes=num_classes, rank=rank, world_size=world_size, seed=seed,
                         resampled=resampled, shuffle_buffer=shuffle_buffer, mode=mode, flip=flip,
                         with_keys=with_keys, expected_counts=expected_counts, counter=counter, decoder=decoder)
    stream.batches_per_epoch = batches_per_epoch
    return ShardLoader(stream, num_workers, batches_per_epoch, num_images)

