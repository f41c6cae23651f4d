"""Reading verification pair sets in the `.bin` format of lfw.bin / cfp_fp.bin / agedb_30.bin.

A `.bin` is a pickle of `(images, issame)`: `images` lists encoded images (JPEG or PNG bytes) pairwise,
images 2i and 2i+1 forming pair i; `issame` holds one bool per pair. insightface's files were written
by Python 2 (protocol 2, `str` payloads), hence `encoding="bytes"`.

The pickle is read by `SafeBinUnpickler`, which builds only the plain containers and scalars such a
file holds (tuples, lists, bytes, str, bool, int) and refuses every global, so a crafted file cannot
import or call anything. The one global a Python 3 protocol <= 2 pickle of `bytes` needs,
`_codecs.encode(text, "latin1")`, is answered by a local function that only turns a str into bytes.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency, PIL is the fallback
    simplejpeg = None


class UnsafeBinError(pickle.UnpicklingError):
    """A `.bin` tried to reach a global (a class or function): refused, nothing was called."""


def _latin1_bytes(*args):
    """Stand-in for `_codecs.encode` as Python 3 protocol <= 2 pickles use it for bytes."""
    if len(args) != 2 or not isinstance(args[0], str) or args[1] != "latin1":
        raise UnsafeBinError(f"refused _codecs.encode{tuple(type(a).__name__ for a in args)}: only "
                             "(str, 'latin1') -> bytes is allowed")
    return args[0].encode("latin1")


class SafeBinUnpickler(pickle.Unpickler):
    """Unpickler for verification `.bin` files: no global is ever imported or called."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise UnsafeBinError(
            f"{self.source}: refused to load global {module}.{name}; a verification .bin holds only "
            "lists of image bytes and bools, so this file is either not a .bin or crafted to run code")

    def persistent_load(self, pid):
        raise UnsafeBinError(f"{self.source}: refused persistent id {pid!r}")


@dataclass
class VerificationSet:
    """A decoded pair set: `images (2P, H, W, 3) uint8 RGB`, `issame (P,) bool`."""

    name: str
    path: str
    images: np.ndarray
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


def read_bin(path: str) -> tuple[list[bytes], np.ndarray]:
    """The encoded images and the `(P,)` bool labels of a `.bin`, validated; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification set not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = SafeBinUnpickler(f, path).load()
    except UnsafeBinError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        raise ValueError(f"{path}: not a readable verification .bin ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickle of (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(f"{path}: images and issame must be lists, got "
                         f"{type(images).__name__} and {type(issame).__name__}")
    for i, b in enumerate(images):
        if not isinstance(b, (bytes, bytearray)):
            raise ValueError(f"{path}: image {i} is {type(b).__name__}, expected encoded image bytes")
    for i, s in enumerate(issame):
        if not isinstance(s, (bool, int)) or s not in (0, 1):
            raise ValueError(f"{path}: issame[{i}] is {s!r}, expected a bool")
    if len(images) != 2 * len(issame) or not issame:
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs; need two images a pair")
    return [bytes(b) for b in images], np.asarray(issame, dtype=bool)


def decode_image(data: bytes, image_size: int = 112, source: str = "image") -> np.ndarray:
    """Encoded JPEG/PNG -> (image_size, image_size, 3) uint8 RGB (resized if the file differs)."""
    try:
        if simplejpeg is not None and data[:2] == b"\xff\xd8":
            array = simplejpeg.decode_jpeg(data, colorspace="RGB")
        else:
            array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as exc:
        raise ValueError(f"{source}: cannot decode ({type(exc).__name__}: {exc})") from exc
    if array.shape[:2] != (image_size, image_size):
        array = np.asarray(Image.fromarray(array).resize((image_size, image_size), Image.BILINEAR))
    return array


def load_verification_set(path: str, image_size: int = 112, name: str | None = None,
                          progress: bool = False) -> VerificationSet:
    """Reads and decodes a `.bin`; `name` defaults to the file name without extension (`lfw`)."""
    encoded, issame = read_bin(path)
    images = np.empty((len(encoded), image_size, image_size, 3), dtype=np.uint8)
    iterator = range(len(encoded))
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"decode {os.path.basename(path)}", unit="img")
    for i in iterator:
        images[i] = decode_image(encoded[i], image_size, source=f"{path}: image {i}")
    name = name or os.path.splitext(os.path.basename(path))[0]
    return VerificationSet(name=name, path=path, images=images, issame=issame)
