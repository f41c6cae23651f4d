"""The shard-set manifest: one JSON file beside the shards.

    {"num_classes": C, "num_images": N, "images_per_class": [n_0, ..., n_{C-1}],
     "source": "folder:/data/webface" | "rec:/data/ms1m/train.rec" | "synthetic(seed=0)",
     "shards": ["train-000000.tar", ...],                  # file names, relative to the manifest
     (file name: <prefix>-manifest.json)
     "shard_index": [{"name": ..., "num_images": n, "first_class": a, "last_class": b}, ...],
     "grouped_by_identity": true,                          # every identity lives in one shard, contiguously
     "label_map": {"original label": class_id, ...}}       # only when labels were remapped

`shard_index` is the small per-shard index that identity-aware sampling and integrity checks use.
"""
from __future__ import annotations

import json
import os

MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("num_classes", "num_images", "images_per_class", "source", "shards")


def manifest_path(path_or_dir: str) -> str:
    """A manifest file itself, or the one `*manifest.json` inside a directory."""
    if not os.path.isdir(path_or_dir):
        return path_or_dir
    found = sorted(n for n in os.listdir(path_or_dir) if n.endswith(MANIFEST_NAME))
    if len(found) != 1:
        raise FileNotFoundError(f"{path_or_dir}: expected one *{MANIFEST_NAME}, found {found or 'none'}; "
                                "pass the manifest file itself")
    return os.path.join(path_or_dir, found[0])


def load_manifest(path_or_dir: str) -> dict:
    """Read and validate a manifest; `shards` stay file names, `directory` is added (absolute)."""
    path = manifest_path(path_or_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest {path} does not exist")
    with open(path, "r") as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"manifest {path} is not valid JSON: {exc}") from None
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest {path} lacks keys {missing}")
    if len(manifest["images_per_class"]) != manifest["num_classes"]:
        raise ValueError(f"manifest {path}: images_per_class has {len(manifest['images_per_class'])} "
                         f"entries but num_classes is {manifest['num_classes']}")
    manifest.setdefault("label_map", None)
    manifest["directory"] = os.path.dirname(os.path.abspath(path))
    return manifest


def shard_paths(manifest: dict) -> list[str]:
    return [os.path.join(manifest["directory"], name) for name in manifest["shards"]]


def write_manifest(out_dir: str, manifest: dict, prefix: str = "train") -> str:
    """Write `<out_dir>/<prefix>-manifest.json` atomically and return its path."""
    body = {k: v for k, v in manifest.items() if k != "directory"}
    if body.get("label_map") is None:
        body.pop("label_map", None)
    path = os.path.join(out_dir, f"{prefix}-{MANIFEST_NAME}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
