"""Streaming loader: rank x worker splits, resampled epochs, identity-aware modes, bad input, determinism."""
import io
import logging
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from engine.data import ShardError, build_loader


def jpeg(seed):
    r = np.random.default_rng(seed)
    rgb = np.repeat(np.repeat(r.integers(0, 256, (14, 14, 3), dtype=np.uint8), 8, 0), 8, 1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, samples):
    """samples: [(key, jpg bytes, cls)] written with webdataset's TarWriter."""
    with wds.TarWriter(str(path)) as w:
        for key, data, cls in samples:
            w.write({"__key__": key, "jpg": data, "cls": cls})


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """8 shards, identities grouped: class c has 1 + c % 4 images; 24 classes, 60 images."""
    root = tmp_path_factory.mktemp("shards")
    paths, keys, label = [], {}, 0
    for s in range(8):
        samples = []
        for _ in range(3):
            for j in range(1 + label % 4):
                key = f"{label:08d}_{j:06d}"
                samples.append((key, jpeg(label * 100 + j), label))
                keys[key] = label
            label += 1
        paths.append(str(root / f"part-{s:06d}.tar"))
        write_shard(paths[-1], samples)
    return paths, keys, label


def epoch_keys(loader):
    keys = []
    for batch in loader:
        keys += batch[-1]
    return keys


def test_ranks_and_workers_read_disjoint_samples_covering_the_epoch(shard_set):
    paths, keys, num_classes = shard_set
    for world_size, workers in ((2, 2), (4, 2), (3, 1)):
        per_rank = [epoch_keys(build_loader(paths, 5, num_classes=num_classes, rank=r, world_size=world_size,
                                            num_workers=workers, with_keys=True)) for r in range(world_size)]
        flat = [k for ks in per_rank for k in ks]
        assert len(flat) == len(set(flat)) == len(keys), (world_size, workers)
        assert set(flat) == set(keys)


def test_labels_match_keys_and_images_are_normalized(shard_set):
    paths, keys, num_classes = shard_set
    loader = build_loader(paths[:2], 4, num_classes=num_classes, rank=0, world_size=1, num_workers=0,
                          with_keys=True, flip=False)
    for images, labels, batch_keys in loader:
        assert images.dtype.is_floating_point and images.shape[1:] == (3, 112, 112)
        assert labels.dtype == np.int64 or str(labels.dtype) == "torch.int64"
        for image, label, key in zip(images.numpy(), labels.tolist(), batch_keys):
            assert keys[key] == label
            j = int(key.split("_")[1])
            ref = np.asarray(Image.open(io.BytesIO(jpeg(label * 100 + j))), np.float32).transpose(2, 0, 1) / 127.5 - 1
            assert np.abs(image - ref).max() <= 2 / 127.5 + 1e-6
            assert image.min() >= -1 and image.max() <= 1


def test_flip_mirrors_about_half_of_the_images(shard_set):
    paths, keys, num_classes = shard_set
    plain = {}
    for images, _, batch_keys in build_loader(paths, 8, num_classes=num_classes, rank=0, world_size=1,
                                              num_workers=0, with_keys=True, flip=False):
        plain.update(zip(batch_keys, images.numpy()))
    flipped = 0
    for images, _, batch_keys in build_loader(paths, 8, num_classes=num_classes, rank=0, world_size=1,
                                              num_workers=0, with_keys=True, flip=True):
        for key, image in zip(batch_keys, images.numpy()):
            if np.array_equal(image, plain[key][:, :, ::-1]):
                flipped += 1
            else:
                assert np.array_equal(image, plain[key])
    assert 15 <= flipped <= 45  # of 60, p = 1/2


def test_resampled_gives_every_rank_the_same_number_of_full_batches(shard_set):
    paths, _, num_classes = shard_set
    counts = []
    for rank in range(3):  # 8 shards over 3 ranks: uneven shares in finite mode
        loader = build_loader(paths, 7, num_classes=num_classes, rank=rank, world_size=3, num_workers=2,
                              resampled=True, batches_per_epoch=5)
        assert len(loader) == 5
        for epoch in range(2):
            loader.set_epoch(epoch)
            sizes = [len(labels) for _, labels in loader]
            counts.append(sizes)
    assert all(sizes == [7] * 5 for sizes in counts)


def test_same_seed_same_stream_other_seed_other_order(shard_set):
    paths, _, num_classes = shard_set

    def run(seed, epoch=0):
        loader = build_loader(paths, 6, num_classes=num_classes, rank=0, world_size=1, num_workers=2, seed=seed,
                              with_keys=True)
        loader.set_epoch(epoch)
        out = [(images.numpy(), labels.numpy(), keys) for images, labels, keys in loader]
        return [k for *_, ks in out for k in ks], np.concatenate([i for i, *_ in out])

    keys_a, images_a = run(1)
    keys_b, images_b = run(1)
    assert keys_a == keys_b and np.array_equal(images_a, images_b)
    assert run(2)[0] != keys_a
    assert run(1, epoch=1)[0] != keys_a


def test_pairs_mode_pairs_two_images_of_the_same_identity(shard_set):
    paths, keys, num_classes = shard_set
    loader = build_loader(paths, 8, num_classes=num_classes, rank=0, world_size=1, num_workers=2, mode="pairs",
                          with_keys=True)
    firsts = []
    for images_a, images_b, labels, pair_keys in loader:
        assert images_a.shape == images_b.shape == (len(labels), 3, 112, 112)
        for label, (ka, kb) in zip(labels.tolist(), pair_keys):
            assert keys[ka] == keys[kb] == label
            if sum(1 for k in keys if keys[k] == label) > 1:
                assert ka != kb
            firsts.append(ka)
    assert sorted(firsts) == sorted(keys)  # every sample once as the anchor


def test_identity_mode_yields_each_identity_once_with_two_of_its_images(shard_set):
    paths, keys, num_classes = shard_set
    seen = []
    for rank in range(2):
        loader = build_loader(paths, 4, num_classes=num_classes, rank=rank, world_size=2, num_workers=2,
                              mode="identity", with_keys=True)
        for _, _, labels, pair_keys in loader:
            for label, (ka, kb) in zip(labels.tolist(), pair_keys):
                assert keys[ka] == keys[kb] == label
                assert ka != kb or label % 4 == 0  # classes with one image repeat it
                seen.append(label)
    assert sorted(seen) == list(range(num_classes))


def test_corrupt_jpeg_is_skipped_counted_and_reported_with_shard_and_key(tmp_path, caplog):
    good = [(f"{i:08d}_000000", jpeg(i), i) for i in range(6)]
    bad = good[:3] + [("00000009_000000", b"\xff\xd8\xff\xe0 broken", 9)] + good[3:]
    write_shard(tmp_path / "a.tar", bad)
    write_shard(tmp_path / "b.tar", [(f"{i:08d}_000001", jpeg(50 + i), i) for i in range(4)])
    loader = build_loader([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], 4, num_classes=10, rank=0,
                          world_size=1, num_workers=0, with_keys=True)
    with caplog.at_level(logging.WARNING):
        keys = epoch_keys(loader)
    assert len(keys) == 10 and "00000009_000000" not in keys
    assert loader.decode_errors() == 1
    assert "00000009_000000" in caplog.text and "a.tar" in caplog.text

    # With worker processes the count is still seen by the main process.
    loader = build_loader([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], 4, num_classes=10, rank=0,
                          world_size=1, num_workers=2, with_keys=True)
    assert len(epoch_keys(loader)) == 10 and loader.decode_errors() == 1


def test_truncated_tar_keeps_earlier_samples_and_the_stream_goes_on(tmp_path, caplog):
    write_shard(tmp_path / "a.tar", [(f"{i:08d}_000000", jpeg(i), i) for i in range(10)])
    write_shard(tmp_path / "b.tar", [(f"{i:08d}_000001", jpeg(50 + i), i) for i in range(5)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) * 6 // 10])
    loader = build_loader([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], 3, num_classes=10, rank=0,
                          world_size=1, num_workers=0, with_keys=True, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        keys = epoch_keys(loader)
    from_a = [k for k in keys if k.endswith("_000000")]
    assert 3 <= len(from_a) < 10 and from_a == [f"{i:08d}_000000" for i in range(len(from_a))]
    assert sum(k.endswith("_000001") for k in keys) == 5
    assert loader.decode_errors() >= 1 and "a.tar" in caplog.text


def test_label_outside_num_classes_is_an_error_naming_shard_and_key(tmp_path):
    write_shard(tmp_path / "a.tar", [("00000001_000000", jpeg(1), 1), ("00000012_000000", jpeg(2), 12)])
    for workers in (0, 1):
        loader = build_loader([str(tmp_path / "a.tar")], 2, num_classes=10, rank=0, world_size=1,
                              num_workers=workers)
        with pytest.raises(ShardError, match=r"a\.tar.*00000012_000000.*label 12"):
            list(loader)


def test_missing_shard_is_an_error_naming_it(tmp_path):
    write_shard(tmp_path / "a.tar", [("00000001_000000", jpeg(1), 1)])
    with pytest.raises(ShardError, match="nope-000003.tar"):
        build_loader([str(tmp_path / "a.tar"), str(tmp_path / "nope-000003.tar")], 2, num_classes=10, rank=0,
                     world_size=1)
    write_shard(tmp_path / "b-000000.tar", [("00000001_000000", jpeg(1), 1)])
    with pytest.raises(ShardError, match=r"b-000001\.tar does not exist$"):
        build_loader(str(tmp_path / "b-{000000..000001}.tar"), 2, num_classes=10, rank=0, world_size=1)
    # A shard that disappears after the loader was built.
    write_shard(tmp_path / "c.tar", [("00000001_000000", jpeg(1), 1)])
    loader = build_loader([str(tmp_path / "a.tar"), str(tmp_path / "c.tar")], 2, num_classes=10, rank=0,
                          world_size=1, num_workers=0)
    os.remove(tmp_path / "c.tar")
    with pytest.raises(ShardError, match=r"c\.tar does not exist"):
        list(loader)


def test_empty_shard_list_and_too_few_shards(shard_set):
    paths, _, num_classes = shard_set
    with pytest.raises(ValueError, match="no shards"):
        build_loader([], 2, num_classes=num_classes, rank=0, world_size=1)
    with pytest.raises(ValueError, match="2 shards for 3 ranks"):
        build_loader(paths[:2], 2, num_classes=num_classes, rank=0, world_size=3)
    with pytest.warns(UserWarning, match="rank 1 has 1 shards for 2 workers"):
        loader = build_loader(paths[:3], 2, num_classes=num_classes, rank=1, world_size=2, num_workers=2)
    assert loader.num_workers == 1
    # Resampled mode draws with replacement: fewer shards than ranks x workers is fine.
    loader = build_loader(paths[:1], 2, num_classes=num_classes, rank=2, world_size=3, num_workers=2,
                          resampled=True, batches_per_epoch=3)
    assert sum(1 for _ in loader) == 3


def test_shard_cut_at_a_member_boundary_is_caught_by_the_manifest_count(tmp_path, caplog):
    import tarfile

    from engine.data import write_synthetic

    manifest = write_synthetic(str(tmp_path), 6, images_per_identity=(3, 3), heldout_identities=0, heldout_pairs=0,
                               shard_size=9, workers=1, progress=False)
    first = tmp_path / manifest["shards"][0]
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    cut = members[4].offset  # the tar ends cleanly after two whole samples (jpg + cls each)
    first.write_bytes(first.read_bytes()[:cut])
    loader = build_loader(str(tmp_path), 4, num_classes=6, rank=0, world_size=1, num_workers=0, with_keys=True)
    with caplog.at_level(logging.WARNING):
        keys = epoch_keys(loader)
    assert len(keys) == manifest["num_images"] - 7
    assert loader.decode_errors() == 1 and "ended after 2 of 9 samples" in caplog.text
