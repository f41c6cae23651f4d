"""Writer of verification pair sets in the `.bin` format of lfw.bin / cfp_fp.bin / agedb_30.bin.

The file is a pickle of `(bins, issame_list)`: `bins` lists encoded images pairwise (images 2*i and
2*i+1 form pair i), `issame_list` holds one bool per pair. Reading belongs to the evaluation code,
which uses a restricted unpickler.
"""
from __future__ import annotations

import os
import pickle


def write_verification_bin(path: str, jpeg_bytes_list, issame_list) -> None:
    bins = [bytes(b) for b in jpeg_bytes_list]
    issame = [bool(s) for s in issame_list]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; need exactly two images a pair")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
