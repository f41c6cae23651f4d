"""Synthetic identities: deterministic, identities differ, long-tailed counts, held-out pairs in lfw.bin format."""
import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from engine.data import load_manifest, synthetic_image, write_synthetic
from engine.data.synthetic import SPRITE_VARIANTS, IdentityRenderer, image_counts, images_per_identity_range


class BytesAndBoolsOnly(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a .bin")


def test_synthetic_image_is_a_pure_function_of_seed_identity_index():
    a = synthetic_image(3, 5, seed=11)
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8
    synthetic_image(4, 0, seed=11)  # other calls in between change nothing
    assert np.array_equal(a, synthetic_image(3, 5, seed=11))
    assert not np.array_equal(a, synthetic_image(3, 6, seed=11))
    assert not np.array_equal(a, synthetic_image(3, 5, seed=12))


def test_identity_appearance_is_stable_across_its_pose_variants_and_differs_between_identities():
    def heads(identity):  # the identity's head drawn in its pose/expression variants (before nuisance)
        r = IdentityRenderer(identity, seed=0)
        return [np.asarray(r.sprite(k).reduce(2), np.float64) for k in range(SPRITE_VARIANTS)]

    def distance(a, b):  # mean RGB difference where either head is drawn
        mask = (a[..., 3] > 0) | (b[..., 3] > 0)
        return np.abs(a[..., :3] - b[..., :3])[mask].mean()

    variants = [heads(i) for i in range(10)]
    within = np.mean([distance(v[0], v[k]) for v in variants for k in range(1, SPRITE_VARIANTS)])
    between = np.mean([distance(variants[i][0], variants[j][0]) for i in range(10) for j in range(i + 1, 10)])
    assert between > 2.5 * within
    # Every image of an identity differs, and images of different identities differ.
    assert len({synthetic_image(3, j, seed=0).tobytes() for j in range(20)}) == 20
    assert len({synthetic_image(i, 0, seed=0).tobytes() for i in range(20)}) == 20


def test_images_per_identity_are_long_tailed_and_deterministic():
    counts = image_counts(np.arange(20000), seed=3, images_per_identity=(2, 100))
    assert counts.min() >= 2 and counts.max() <= 100
    assert np.median(counts) < counts.mean() < 40 and counts.max() > 90
    assert np.array_equal(counts[:100], image_counts(np.arange(100), seed=3, images_per_identity=(2, 100)))
    lo, hi = images_per_identity_range(20)
    assert abs(image_counts(np.arange(20000), 0, 20).mean() - 20) < 1.0 and lo >= 2


def read_samples(directory, manifest):
    out = {}
    for name in manifest["shards"]:
        with tarfile.open(f"{directory}/{name}") as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


def test_write_synthetic_is_deterministic_and_holds_out_identities(tmp_path):
    kw = dict(images_per_identity=(2, 6), heldout_identities=10, heldout_pairs=40, seed=5, shard_size=25)
    m1 = write_synthetic(str(tmp_path / "a"), 30, workers=2, progress=False, **kw)
    m2 = write_synthetic(str(tmp_path / "b"), 30, workers=1, progress=False, **kw)
    assert m1["shards"] == m2["shards"] and len(m1["shards"]) > 1
    for name in m1["shards"]:  # same seed -> byte-identical shards, whatever the worker count
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "heldout.bin").read_bytes() == (tmp_path / "b" / "heldout.bin").read_bytes()

    manifest = load_manifest(str(tmp_path / "a"))
    samples = read_samples(tmp_path / "a", manifest)
    labels = [int(v) for k, v in samples.items() if k.endswith(".cls")]
    assert manifest["num_classes"] == 30 and sorted(set(labels)) == list(range(30))
    assert manifest["num_images"] == len(labels) == sum(manifest["images_per_class"])
    assert np.bincount(labels).tolist() == manifest["images_per_class"]
    key = "00000007_000001"
    stored = np.asarray(Image.open(io.BytesIO(samples[key + ".jpg"])), np.float64)
    assert np.abs(stored - synthetic_image(7, 1, seed=5)).mean() < 6  # the JPEG of that image

    with open(tmp_path / "a" / "heldout.bin", "rb") as f:
        bins, issame = BytesAndBoolsOnly(f).load()
    assert isinstance(bins, list) and isinstance(issame, list) and len(bins) == 2 * len(issame) == 80
    assert sum(issame) == 20 and all(isinstance(s, bool) for s in issame)
    held = [np.asarray(Image.open(io.BytesIO(b)), np.float64) for b in bins]
    assert all(h.shape == (112, 112, 3) for h in held)
    # Held-out images are not training images: compare with the training images of every identity.
    train = {k: np.asarray(Image.open(io.BytesIO(v)), np.float64) for k, v in samples.items() if k.endswith(".jpg")}
    nearest = min(np.abs(held[0] - t).mean() for t in train.values())
    assert nearest > 10


def test_write_synthetic_rejects_odd_pair_count(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_synthetic(str(tmp_path), 5, heldout_pairs=7, progress=False)
