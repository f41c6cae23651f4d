"""IJB-B / IJB-C 1:1 template verification.

Layout of the released evaluation data (`root` = the IJBC or IJBB folder):

    meta/{ijbc,ijbb}_face_tid_mid.txt          <image name> <template id> <media id>
    meta/{ijbc,ijbb}_name_5pts_score.txt       <image name> x1 y1 ... x5 y5 <detector score>
    meta/{ijbc,ijbb}_template_pair_label.txt   <template id> <template id> <1 same | 0 different>
    loose_crop/<image name>

Protocol (as arcface_torch's eval_ijbc.py): each crop is aligned to the 112x112 five-point template
with a similarity transform; its embedding is emb(image) + emb(mirror); optionally scaled by the
detector score (and optionally unit-normalized first; by default the norm is kept as a quality
weight); images of one media are averaged, a template is the sum of its media, unit-normalized;
a pair's score is the cosine of its templates. TAR@FAR follows engine.evaluation.metrics.

Memory: the image features (N, D) and one sorted float32 copy, template features (T, D), and O(pairs)
for the pair ids (int32), their rows and order, the scores (float32) and one sorted copy of them;
scoring works through one (2048, T) similarity block at a time (see `score_pairs`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .embedding import embed_images, l2_normalize
from .metrics import OperatingPoint, SortedScores

# five-point template of arcface models at 112x112: eyes, nose tip, mouth corners (x, y)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = {"IJBC": "ijbc", "IJBB": "ijbb"}


# --------------------------------------------------------------------------------------------------
# alignment

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) matrix [sR | t] of the similarity (rotation, uniform scale, translation) that maps the
    points `src (K, 2)` onto `dst (K, 2)` in the least-squares sense (Umeyama 1991, no reflection)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    var_s = (xs ** 2).sum() / len(src)
    scale = (sing * d).sum() / var_s
    t = mu_d - scale * rotation @ mu_s
    return np.hstack([scale * rotation, t[:, None]])


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = 112,
               template: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """(size, size, 3) uint8 RGB crop in which `landmarks (5, 2)` land on the template; bilinear,
    black outside the source. Coordinates are pixel indices (pixel centers at integers, as in
    OpenCV's warpAffine, which the landmark files assume)."""
    m = similarity_transform(landmarks, template)                 # source pixel -> aligned pixel
    a, t = m[:, :2], m[:, 2]
    a_inv = np.linalg.inv(a)
    t_inv = -a_inv @ t
    # PIL samples output pixel centers at +0.5 and maps them with (a, b, c, d, e, f) to input
    # coordinates whose pixel centers are at +0.5 too: shift into and out of index coordinates.
    offset = t_inv + 0.5 - a_inv @ np.array([0.5, 0.5])
    coeffs = (a_inv[0, 0], a_inv[0, 1], offset[0], a_inv[1, 0], a_inv[1, 1], offset[1])
    out = image.convert("RGB").transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                         fillcolor=(0, 0, 0))
    return np.asarray(out)


# --------------------------------------------------------------------------------------------------
# metadata

@dataclass
class IJBMeta:
    target: str
    names: list[str]            # (N,) image file names under loose_crop/
    landmarks: np.ndarray       # (N, 5, 2) float32
    scores: np.ndarray          # (N,) float32 detector scores
    templates: np.ndarray       # (N,) int64 template id of each image
    medias: np.ndarray          # (N,) int64 media id of each image
    pairs: np.ndarray           # (P, 2) int32 template ids
    labels: np.ndarray          # (P,) bool


def _meta_path(root: str, target: str, kind: str) -> str:
    return os.path.join(root, "meta", f"{TARGETS[target]}_{kind}.txt")


def _read_rows(path: str, columns: int) -> list[list[str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB metadata not found: {path}")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != columns:
                raise ValueError(f"{path}:{number}: expected {columns} fields, got {len(parts)}")
            rows.append(parts)
    return rows


def load_ijb_meta(root: str, target: str = "IJBC") -> IJBMeta:
    """Reads the three metadata files; images are joined by name, errors name the file and line."""
    target = target.upper()
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    tid_path = _meta_path(root, target, "face_tid_mid")
    lmk_path = _meta_path(root, target, "name_5pts_score")
    pair_path = _meta_path(root, target, "template_pair_label")
    tid_rows = _read_rows(tid_path, 3)
    lmk_rows = _read_rows(lmk_path, 12)
    try:
        landmark_of = {r[0]: (np.array(r[1:11], np.float32).reshape(5, 2), np.float32(r[11])) for r in lmk_rows}
        names = [r[0] for r in tid_rows]
        templates = np.array([int(r[1]) for r in tid_rows], dtype=np.int64)
        medias = np.array([int(r[2]) for r in tid_rows], dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"{tid_path} / {lmk_path}: unreadable number ({exc})") from exc
    missing = [n for n in names if n not in landmark_of]
    if missing:
        raise ValueError(f"{lmk_path}: no landmarks for {len(missing)} image(s) of {tid_path}, "
                         f"e.g. {missing[:3]}")
    landmarks = np.stack([landmark_of[n][0] for n in names]) if names else np.zeros((0, 5, 2), np.float32)
    scores = np.array([landmark_of[n][1] for n in names], dtype=np.float32)
    if not os.path.isfile(pair_path):
        raise FileNotFoundError(f"IJB metadata not found: {pair_path}")
    try:
        table = np.loadtxt(pair_path, dtype=np.int32, ndmin=2)   # 15.7M rows: 190 MB
    except ValueError as exc:
        raise ValueError(f"{pair_path}: {exc}") from exc
    if table.shape[1] != 3:
        raise ValueError(f"{pair_path}: expected 3 columns, got {table.shape[1]}")
    return IJBMeta(target, names, landmarks, scores, templates, medias, table[:, :2].copy(),
                   table[:, 2].astype(bool))


class IJBCrops:
    """Aligned (112, 112, 3) uint8 faces of an IJB image list, decoded on demand (DataLoader-safe)."""

    def __init__(self, root: str, names, landmarks):
        self.folder = os.path.join(root, "loose_crop")
        self.names, self.landmarks = list(names), np.asarray(landmarks)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        path = os.path.join(self.folder, self.names[i])
        try:
            with Image.open(path) as img:
                return align_face(img, self.landmarks[i])
        except OSError as exc:
            raise ValueError(f"{path}: cannot read image ({exc})") from exc


# --------------------------------------------------------------------------------------------------
# pooling and scoring

def pool_templates(image_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                   detector_scores: np.ndarray | None = None, normalize_images: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(template ids (T,) sorted, unit template features (T, D) float32) from image features (N, D):
    optional unit-normalization and detector-score scaling per image, mean per media, sum per template.

    A media is keyed by (template, media id), so a media shared by two templates counts in each.
    Works on one sorted float32 copy of the features; sums accumulate in float64.
    """
    templates, medias = np.asarray(templates), np.asarray(medias)
    if len(templates) == 0:
        raise ValueError("no images to pool")
    order = np.lexsort((medias, templates))
    feats = np.asarray(image_feats, dtype=np.float32)[order]            # (N, D), grouped by media
    if normalize_images:
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if detector_scores is not None:
        feats *= np.asarray(detector_scores, dtype=np.float32)[order][:, None]
    t_sorted, m_sorted = templates[order], medias[order]
    media_start = np.flatnonzero(np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])])
    media_size = np.diff(np.r_[media_start, len(order)])
    media_mean = np.add.reduceat(feats, media_start, axis=0, dtype=np.float64) / media_size[:, None]
    media_template = t_sorted[media_start]
    template_start = np.flatnonzero(np.r_[True, media_template[1:] != media_template[:-1]])
    template_sum = np.add.reduceat(media_mean, template_start, axis=0)
    return media_template[template_start], l2_normalize(template_sum).astype(np.float32)


def _template_rows(template_ids: np.ndarray, pairs: np.ndarray, source: str, chunk_size: int) -> np.ndarray:
    """(P, 2) int32 rows of `template_ids` for template-id pairs; unknown ids are an error."""
    rows = np.empty(pairs.shape, dtype=np.int32)
    for lo in range(0, len(pairs), chunk_size):
        chunk = pairs[lo:lo + chunk_size]
        found = np.minimum(np.searchsorted(template_ids, chunk), len(template_ids) - 1)
        unknown = template_ids[found] != chunk
        if unknown.any():
            row, col = np.argwhere(unknown)[0]
            raise ValueError(f"{source}: pair {lo + int(row)} refers to template {int(chunk[row, col])}, "
                             "which has no image")
        rows[lo:lo + len(chunk)] = found
    return rows


def score_pairs(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray,
                chunk_size: int = 65_536, method: str = "auto", block_size: int = 2048,
                source: str = "pairs") -> np.ndarray:
    """(P,) float32 cosine scores of template pairs, in bounded memory.

    `matrix`: for blocks of `block_size` first templates, the (block, T) similarity matrix by one GEMM,
    from which that block's pairs are read (pairs visited in order of first template); O(T^2 D) compute,
    fast when pairs are dense among templates (IJB-C: 15.7M pairs over 23k templates).
    `gather`: `chunk_size` pairs at a time, both features gathered and multiplied; O(P D) compute but
    memory-bound. `auto` picks `matrix` when T^2 <= 50 P.
    Extra memory: O(P) int32/int64 indices plus one (block, T) or (chunk, D) float32 buffer.
    """
    pairs = np.asarray(pairs)
    if method == "auto":
        method = "matrix" if len(template_ids) ** 2 <= 50 * max(len(pairs), 1) else "gather"
    rows = _template_rows(template_ids, pairs, source, chunk_size)
    scores = np.empty(len(pairs), dtype=np.float32)
    feats = np.ascontiguousarray(template_feats, dtype=np.float32)
    if method == "gather":
        for lo in range(0, len(pairs), chunk_size):
            r = rows[lo:lo + chunk_size]
            scores[lo:lo + len(r)] = np.einsum("ij,ij->i", feats[r[:, 0]], feats[r[:, 1]])
        return scores
    if method != "matrix":
        raise ValueError(f"method must be auto, matrix or gather, got {method!r}")
    order = np.argsort(rows[:, 0], kind="stable")
    first_sorted = rows[order, 0]
    for start in range(0, len(feats), block_size):
        lo, hi = np.searchsorted(first_sorted, [start, start + block_size])
        if lo == hi:
            continue
        sims = feats[start:start + block_size] @ feats.T                      # (block, T)
        idx = order[lo:hi]
        scores[idx] = sims[rows[idx, 0] - start, rows[idx, 1]]
    return scores


@dataclass
class IJBResult:
    target: str
    num_images: int
    num_templates: int
    num_pairs: int
    points: list[OperatingPoint]
    roc_far: np.ndarray = field(repr=False, default=None)
    roc_tar: np.ndarray = field(repr=False, default=None)
    roc_png: str | None = None
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(target=self.target, num_images=self.num_images, num_templates=self.num_templates,
                    num_pairs=self.num_pairs, tar_at_far=[p.to_dict() for p in self.points],
                    roc_png=self.roc_png, seconds=self.seconds)

    def table(self) -> str:
        head = " | ".join(f"{p.far:.0e}".ljust(8) for p in self.points)
        vals = " | ".join((f"{100 * p.tar:.2f}" + ("" if p.resolved else "*")).ljust(8) for p in self.points)
        lines = [f"{self.target}: {self.num_pairs} pairs, {self.num_templates} templates, "
                 f"{self.num_images} images", f"FAR       | {head}", f"TAR (%)   | {vals}"]
        if any(not p.resolved for p in self.points):
            lines.append("* fewer than 1/FAR negative pairs: no false accept allowed at this FAR")
        return "\n".join(lines)


def verification_from_features(meta: IJBMeta, image_feats: np.ndarray, detector_score: bool = True,
                               normalize_images: bool = False, fars=IJB_FARS,
                               method: str = "auto") -> tuple[IJBResult, np.ndarray]:
    """Pooling, pair scores and operating points from flip-summed image features `(N, D)`."""
    template_ids, template_feats = pool_templates(
        image_feats, meta.templates, meta.medias, meta.scores if detector_score else None, normalize_images)
    scores = score_pairs(template_ids, template_feats, meta.pairs, method=method,
                         source=f"{meta.target} template pairs")
    ranked = SortedScores(scores, meta.labels)
    roc_far, roc_tar = ranked.roc()
    result = IJBResult(meta.target, len(meta.names), len(template_ids), len(scores),
                       ranked.operating_points(fars), roc_far, roc_tar)
    return result, scores


def plot_roc(results: list[IJBResult], path: str, labels: list[str] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, r in enumerate(results):
        ax.plot(r.roc_far, 100 * r.roc_tar, label=labels[i] if labels else r.target)
    for far in IJB_FARS:
        ax.axvline(far, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate (%)")
    ax.set_title(f"{results[0].target} 1:1 verification ROC")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate_ijb(backbone, root: str, target: str = "IJBC", batch_size: int = 128, num_workers: int = 0,
                 group=None, flip: bool = True, detector_score: bool = True, normalize_images: bool = False,
                 roc_png: str | None = None, features_out: str | None = None, progress: bool = True,
                 channels_last: bool = False) -> IJBResult:
    """The whole protocol for one backbone; every rank of `group` embeds a slice of the crops."""
    timings = {}
    start = time.monotonic()
    meta = load_ijb_meta(root, target)
    timings["metadata"] = time.monotonic() - start
    start = time.monotonic()
    crops = IJBCrops(root, meta.names, meta.landmarks)
    feats = embed_images(backbone, crops, batch_size=batch_size, flip=flip, group=group,
                         num_workers=num_workers, channels_last=channels_last,
                         progress=f"embed {meta.target}" if progress else None)
    timings["embedding"] = time.monotonic() - start
    if features_out:
        np.save(features_out, feats)
    start = time.monotonic()
    result, _ = verification_from_features(meta, feats, detector_score, normalize_images)
    timings["scoring"] = time.monotonic() - start
    result.seconds = {k: round(v, 3) for k, v in timings.items()}
    if roc_png:
        result.roc_png = plot_roc([result], roc_png)
    return result


def result_json(result: IJBResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
