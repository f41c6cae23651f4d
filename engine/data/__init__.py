"""Data: shard writers (image folder, MXNet RecordIO, synthetic identities), the shard-set manifest,
the streaming loader and the verification `.bin` writer."""
from .loader import ShardError, build_loader
from .manifest import load_manifest
from .synthetic import synthetic_image, write_synthetic
from .verification_bin import write_verification_bin
from .writers import write_folder_shards, write_rec_shards

__all__ = ["build_loader", "ShardError", "load_manifest", "synthetic_image", "write_synthetic", "write_verification_bin",
           "write_folder_shards", "write_rec_shards"]
