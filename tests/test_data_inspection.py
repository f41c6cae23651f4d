"""inspect_shards: counts and PNGs for a good set; the integrity check names the shard and key of bad input."""
import os
import tarfile

import webdataset as wds

from engine.data import write_synthetic
from engine.data.inspection import inspect_shards


def test_inspect_counts_plots_and_flags_corrupt_and_truncated_shards(tmp_path):
    out = tmp_path / "set"
    manifest = write_synthetic(str(out), 12, images_per_identity=(2, 5), heldout_identities=0, heldout_pairs=0,
                               shard_size=10, workers=1, progress=False)
    report = inspect_shards(str(out), str(tmp_path / "report"), workers=2, progress=False)
    assert report["ok"] and report["num_images"] == manifest["num_images"]
    assert report["num_classes_present"] == 12 and report["num_shards"] == len(manifest["shards"]) >= 3
    assert report["images_per_class"]["max"] == max(manifest["images_per_class"])
    for key in ("histogram_png", "grid_png"):
        assert os.path.getsize(report[key]) > 1000

    # Corrupt one image of shard 1 (rewritten with the same samples otherwise).
    first, second = (out / manifest["shards"][i] for i in (0, 1))
    with tarfile.open(first) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    victim = sorted(k for k in members if k.endswith(".jpg"))[1]
    members[victim] = members[victim][:200]
    keys = sorted({name.rsplit(".", 1)[0] for name in members})
    with wds.TarWriter(str(first)) as w:
        for key in keys:
            w.write({"__key__": key, "jpg": members[key + ".jpg"], "cls": int(members[key + ".cls"])})
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])

    report = inspect_shards(str(out), None, workers=1, progress=False)
    assert not report["ok"]
    text = "\n".join(report["problems"])
    assert f"{first}: sample {victim[:-4]}: undecodable image" in text
    assert f"{second}: unreadable tar data" in text or f"{second}: " in text
    assert any(str(second) in p and "manifest says" in p for p in report["problems"])
