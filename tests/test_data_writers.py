"""Shard writers: image folder and MXNet RecordIO (both layouts) round trips through the loader, the record
reader against an independent writer of the documented format, atomic shard names, manifests."""
import io
import json
import os
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from engine.data import build_loader, load_manifest, write_folder_shards, write_rec_shards
from engine.data import writers as writers_module
from engine.data.recordio import RecordIOReader, scan_layout

MAGIC = 0xCED7230A


def smooth_image(seed, size=112):
    """A distinct, smooth (JPEG-friendly) RGB image."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    channels = [128 + 100 * np.sin(2 * np.pi * (r.uniform(0.5, 2) * xx + r.uniform(0.5, 2) * yy + r.uniform()))
                for _ in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def jpeg_bytes(rgb, quality=95):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pil_decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((112, 112), Image.BILINEAR), np.float32)


def to_model_range(rgb):
    return rgb.transpose(2, 0, 1) / 127.5 - 1.0


def collect(loader):
    """{key: (image (3,112,112), label)} over one epoch; fails on a repeated key."""
    seen = {}
    for images, labels, keys in loader:
        for image, label, key in zip(images.numpy(), labels.tolist(), keys):
            assert key not in seen, f"{key} came twice in one epoch"
            seen[key] = (image, label)
    return seen


def assert_round_trip(seen, expected):
    """expected: {key: (source image bytes, label)}; images compared with the source decoded by PIL."""
    assert sorted(seen) == sorted(expected)
    for key, (src, label) in expected.items():
        image, got_label = seen[key]
        assert got_label == label, key
        reference = to_model_range(pil_decode(src))
        # Same pixels up to JPEG decoder rounding (and re-encoding for non-JPEG / non-112 sources).
        assert np.abs(image - reference).mean() < 0.03, key


# ------------------------------------------------------------------------------------------ folder
def make_folder(root):
    """Identities with 1..4 images; JPEG and PNG, one 100x90 image; names sort in a known order."""
    layout = {"bob": 3, "alice": 1, "carol": 4, "dave": 2, "erin": 3}
    files = {}
    seed = 0
    for name, n in layout.items():
        os.makedirs(os.path.join(root, name))
        for j in range(n):
            seed += 1
            rgb = smooth_image(seed)
            if name == "dave" and j == 1:
                rgb = smooth_image(seed, size=100)[:90]
            ext = "png" if (seed % 3 == 0) else "jpg"
            path = os.path.join(root, name, f"img.{j:02d}.{ext}")
            Image.fromarray(rgb).save(path, quality=95)
            files[(name, j)] = open(path, "rb").read()
    os.makedirs(os.path.join(root, "empty_identity"))
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an identity")
    return layout, files


def test_folder_round_trip_every_image_and_label_once(tmp_path):
    layout, files = make_folder(tmp_path / "faces")
    out = tmp_path / "shards"
    manifest = write_folder_shards(str(tmp_path / "faces"), str(out), shard_size=4, workers=2, progress=False)

    names = sorted(layout)  # classes are identities in name order; keys are class_index-in-sorted-files
    assert manifest["label_map"] == {n: i for i, n in enumerate(names)}
    assert manifest["num_classes"] == len(names)
    assert manifest["images_per_class"] == [layout[n] for n in names]
    assert manifest["num_images"] == sum(layout.values())
    assert load_manifest(str(out))["shards"] == manifest["shards"]
    assert len(manifest["shards"]) > 2 and all(os.path.exists(out / s) for s in manifest["shards"])
    # Every identity lives in one shard, contiguously.
    for entry in manifest["shard_index"]:
        with tarfile.open(out / entry["name"]) as tar:
            labels = [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
        assert labels == sorted(labels) and entry["first_class"] == labels[0] and entry["last_class"] == labels[-1]

    expected = {f"{names.index(n):08d}_{j:06d}": (files[(n, j)], names.index(n))
                for n in names for j in range(layout[n])}
    for world_size in (1, 2):
        seen = {}
        for rank in range(world_size):
            loader = build_loader(str(out), 3, num_classes=len(names), rank=rank, world_size=world_size,
                                  num_workers=3 - world_size, flip=False, with_keys=True, shuffle_buffer=5)
            part = collect(loader)
            assert not set(part) & set(seen)
            seen.update(part)
        assert_round_trip(seen, expected)


def test_folder_writer_skips_unreadable_image_and_reports_it(tmp_path, caplog):
    root = tmp_path / "faces"
    os.makedirs(root / "a")
    Image.fromarray(smooth_image(1)).save(root / "a" / "0.jpg")
    (root / "a" / "1.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    manifest = write_folder_shards(str(root), str(tmp_path / "out"), workers=1, progress=False)
    assert manifest["num_images"] == 1 and manifest["skipped_inputs"] == 1
    assert "1.jpg" in caplog.text


def test_failed_shard_leaves_no_file_under_a_final_name(tmp_path, monkeypatch):
    root = tmp_path / "faces"
    for name in ("a", "b"):
        os.makedirs(root / name)
        Image.fromarray(smooth_image(len(name))).save(root / name / "0.jpg")

    real = writers_module.to_face_jpeg
    calls = {"n": 0}

    def failing(data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # not an unreadable image: the run itself stops mid-shard
        return real(data)

    monkeypatch.setattr(writers_module, "to_face_jpeg", failing)
    with pytest.raises(KeyboardInterrupt):
        write_folder_shards(str(root), str(tmp_path / "out"), shard_size=10, workers=1, progress=False)
    assert os.listdir(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------ RecordIO
class MinimalRecWriter:
    """Independent writer of the MXNet RecordIO format (as mx.recordio.MXIndexedRecordIO + pack)."""

    def __init__(self, rec_path, idx_path):
        self.rec = open(rec_path, "wb")
        self.idx = open(idx_path, "w")

    def write_payload(self, record_id, payload):
        self.idx.write(f"{record_id}\t{self.rec.tell()}\n")
        # Split at 4-byte aligned occurrences of the magic word, dropping it (dmlc RecordIOWriter).
        parts, start = [], 0
        for i in range(0, len(payload) - len(payload) % 4, 4):
            if struct.unpack_from("<I", payload, i)[0] == MAGIC:
                parts.append(payload[start:i])
                start = i + 4
        parts.append(payload[start:])
        for k, part in enumerate(parts):
            cflag = 0 if len(parts) == 1 else (1 if k == 0 else (3 if k == len(parts) - 1 else 2))
            self.rec.write(struct.pack("<II", MAGIC, (cflag << 29) | len(part)))
            self.rec.write(part + b"\x00" * ((4 - len(part) % 4) % 4))

    def write(self, record_id, labels, image=b"", id_=0):
        labels = [labels] if np.isscalar(labels) else list(labels)
        if len(labels) == 1:
            header = struct.pack("<IfQQ", 0, labels[0], id_, 0)
        else:
            header = struct.pack("<IfQQ", len(labels), 0.0, id_, 0) + struct.pack(f"<{len(labels)}f", *labels)
        self.write_payload(record_id, header + image)

    def close(self):
        self.rec.close()
        self.idx.close()


def test_record_reader_joins_parts_split_at_the_magic_word(tmp_path):
    payload = struct.pack("<IfQQ", 0, 5.0, 7, 0) + b"abcd" + struct.pack("<I", MAGIC) + b"xy" + \
        struct.pack("<I", MAGIC) + b"tail!"
    w = MinimalRecWriter(tmp_path / "t.rec", tmp_path / "t.idx")
    w.write_payload(0, payload)
    w.write(1, [3.0, 9.5], b"IMG")
    w.close()
    reader = RecordIOReader(str(tmp_path / "t.rec"))
    assert reader.read_payload(0) == payload
    record = reader.read(1)
    assert record.label == 3.0 and record.labels == (3.0, 9.5) and record.image == b"IMG"


def write_insightface_rec(path, identities, image_bytes):
    """Record 0 header, images 1..N grouped by identity, then one record per identity."""
    w = MinimalRecWriter(path / "train.rec", path / "train.idx")
    images, ranges, rid = [], [], 1
    for label, n in identities:
        ranges.append((rid, rid + n))
        for _ in range(n):
            images.append((rid, label))
            rid += 1
    id_start = rid
    w.write(0, [id_start, id_start + len(identities)])
    for (r, label), img in zip(images, image_bytes):
        w.write(r, label, img, id_=r)
    for k, (start, end) in enumerate(ranges):
        w.write(id_start + k, [start, end])
    w.close()
    return [(r, label) for r, label in images]


def test_rec_insightface_layout_round_trip(tmp_path):
    identities = [(0, 3), (1, 1), (2, 4), (3, 2)]  # (class, images)
    n = sum(c for _, c in identities)
    sources = [jpeg_bytes(smooth_image(100 + i)) for i in range(n)]
    images = write_insightface_rec(tmp_path, identities, sources)

    reader = RecordIOReader(str(tmp_path / "train.rec"))
    layout = scan_layout(reader)
    assert layout.kind == "insightface" and layout.record_ids.tolist() == [r for r, _ in images]

    manifest = write_rec_shards(str(tmp_path / "train.rec"), str(tmp_path / "out"), shard_size=3, workers=2,
                                progress=False)
    assert manifest["num_classes"] == 4 and manifest["images_per_class"] == [3, 1, 4, 2]
    assert manifest.get("label_map") is None
    expected, index = {}, {}
    for (_rid, label), src in zip(images, sources):
        j = index.setdefault(label, 0)
        index[label] += 1
        expected[f"{label:08d}_{j:06d}"] = (src, label)
    seen = collect(build_loader(str(tmp_path / "out"), 4, num_classes=4, rank=0, world_size=1, num_workers=2,
                                flip=False, with_keys=True))
    assert_round_trip(seen, expected)


def test_rec_plain_im2rec_layout_with_sparse_multi_float_labels(tmp_path):
    labels = [7, 3, 7, 12, 3, 7]  # unordered, non-contiguous; stored as (label, 0.25) float pairs
    sources = [jpeg_bytes(smooth_image(200 + i)) for i in range(len(labels))]
    sources[3] = jpeg_bytes(smooth_image(203, size=96))  # not 112x112: re-encoded at 112x112
    w = MinimalRecWriter(tmp_path / "data.rec", tmp_path / "data.idx")
    for i, (label, src) in enumerate(zip(labels, sources)):
        w.write(i, [label, 0.25], src)
    w.close()

    manifest = write_rec_shards(str(tmp_path / "data.rec"), str(tmp_path / "out"), shard_size=2, workers=1,
                                progress=False)
    remap = {3: 0, 7: 1, 12: 2}
    assert manifest["label_map"] == {str(k): v for k, v in remap.items()}
    assert manifest["images_per_class"] == [2, 3, 1]
    with open(load_manifest(str(tmp_path / "out"))["directory"] + "/train-manifest.json") as f:
        assert json.load(f)["source"].startswith("rec:")
    expected, index = {}, {}
    for label, src in zip(labels, sources):  # im2rec order is kept within an identity
        c = remap[label]
        j = index.setdefault(c, 0)
        index[c] += 1
        expected[f"{c:08d}_{j:06d}"] = (src, c)
    seen = collect(build_loader(manifest["path"], 2, num_classes=3, rank=0, world_size=1, num_workers=0,
                                flip=False, with_keys=True))
    assert_round_trip(seen, expected)
