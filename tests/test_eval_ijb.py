"""IJB 1:1 protocol: alignment, pooling, chunked scoring, TAR@FAR on a fixture with known answers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from engine.evaluation.ijb import (
    ARCFACE_TEMPLATE,
    align_face,
    evaluate_ijb,
    load_ijb_meta,
    pool_templates,
    score_pairs,
    similarity_transform,
    verification_from_features,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rotation(deg):
    r = np.deg2rad(deg)
    return np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])


def test_similarity_transform_recovers_a_known_similarity():
    s, rot, t = 1.7, rotation(23.0), np.array([12.5, -4.0])
    dst = ARCFACE_TEMPLATE @ (s * rot).T + t
    m = similarity_transform(ARCFACE_TEMPLATE, dst)
    np.testing.assert_allclose(m, np.hstack([s * rot, t[:, None]]), atol=1e-9)
    # noisy points: the least-squares answer has zero-mean residuals and beats the noiseless guess
    noisy = dst + np.random.default_rng(0).normal(0, 0.5, dst.shape)
    m2 = similarity_transform(ARCFACE_TEMPLATE, noisy)
    fit = ARCFACE_TEMPLATE @ m2[:, :2].T + m2[:, 2]
    np.testing.assert_allclose((noisy - fit).mean(0), 0, atol=1e-9)
    assert ((noisy - fit) ** 2).sum() <= ((noisy - dst) ** 2).sum()


def test_align_face_samples_the_source_where_the_similarity_says():
    """Source pixel values are their own coordinates (R = x, G = y), which bilinear sampling
    reproduces exactly; aligned pixel (u, v) must hold the source coordinates that map onto it."""
    h = w = 220
    ys, xs = np.mgrid[0:h, 0:w]
    src = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    s, rot, t = 1.3, rotation(-12.0), np.array([30.0, 20.0])        # aligned -> source
    landmarks = ARCFACE_TEMPLATE @ (s * rot).T + t
    out = align_face(Image.fromarray(src), landmarks).astype(np.float64)
    v, u = np.mgrid[0:112, 0:112]
    expected = np.stack([u, v], -1).reshape(-1, 2) @ (s * rot).T + t           # (112*112, 2) x, y
    inside = ((expected >= 0) & (expected <= 219)).all(1)
    assert inside.mean() > 0.9
    got = out[..., :2].reshape(-1, 2)
    assert np.abs(got[inside] - expected[inside]).max() <= 1.0       # uint8 rounding
    far_outside = ((expected < -1) | (expected > 220)).any(1)
    assert far_outside.sum() > 100 and np.all(got[far_outside] == 0)     # black outside the source


def test_pool_templates_media_mean_then_template_sum_with_detector_scores():
    feats = np.array([[1, 0], [0, 1], [2, 2], [0, -1]], dtype=np.float32)
    templates = np.array([1, 1, 1, 2])
    medias = np.array([1, 1, 2, 1])            # template 2's media 1 is not template 1's media 1
    scores = np.array([1.0, 3.0, 0.5, 2.0])
    unit = lambda v: np.asarray(v) / np.linalg.norm(v)  # noqa: E731
    ids, pooled = pool_templates(feats, templates, medias, scores)
    assert ids.tolist() == [1, 2]
    np.testing.assert_allclose(pooled[0], unit([0.5 + 1.0, 1.5 + 1.0]), atol=1e-6)   # [.5,1.5] + [1,1]
    np.testing.assert_allclose(pooled[1], [0, -1], atol=1e-6)
    _, plain = pool_templates(feats, templates, medias)
    np.testing.assert_allclose(plain[0], unit([2.5, 2.5]), atol=1e-6)                 # [.5,.5] + [2,2]
    _, normed = pool_templates(feats * np.array([[3], [1], [1], [1]], np.float32), templates, medias,
                               normalize_images=True)
    np.testing.assert_allclose(normed[0], unit([1.2071068, 1.2071068]), atol=1e-6)


def test_blocked_and_chunked_pair_scores_equal_direct_ones_and_unknown_templates_are_named():
    rng = np.random.default_rng(0)
    ids = np.array([3, 7, 9, 20])
    feats = rng.normal(size=(4, 5)).astype(np.float32)
    pairs = rng.choice(ids, size=(101, 2))
    want = np.array([feats[list(ids).index(a)] @ feats[list(ids).index(b)] for a, b in pairs])
    np.testing.assert_allclose(score_pairs(ids, feats, pairs, chunk_size=7, method="gather"), want, rtol=1e-5)
    np.testing.assert_allclose(score_pairs(ids, feats, pairs, method="matrix", block_size=3), want, rtol=1e-5)
    np.testing.assert_allclose(score_pairs(ids, feats, pairs), want, rtol=1e-5)
    for method in ("gather", "matrix"):
        with pytest.raises(ValueError, match="pairs.txt: pair 1 refers to template 8"):
            score_pairs(ids, feats, np.array([[3, 7], [8, 9]]), chunk_size=1, method=method, source="pairs.txt")


# --- a small IJB-like set with known answers --------------------------------------------------------
# Every crop is one flat colour; the stand-in backbone returns the mean colour, so a template's
# feature is a known vector. Colours (in the [-1, 1] input scale): A, B, C on the axes, D = A + B
# direction, E = A + C direction.
#   templates 1..4: A, B, C, D (one media, one image each)
#   template 11: media 1 = {A + d, A - d} (detector scores 0.9, 0.9), media 2 = {A} (0.2) -> direction A
#   template 12: B   template 13: C   template 14: E
# positives: (1,11) (2,12) (3,13) score 1; (4,14) = cos(D, E) ~ 0.50 (hard)
# negatives: the 6 pairs among 1..4, and (1,12) (2,13) (3,14) (4,11): four ~0.707, six ~0.008
# TAR@FAR: 1e-6 and 0.1 and 0.3 -> 3/4 (threshold ~0.707); 0.4 and 0.5 -> 4/4 (threshold ~0.008)

COLOURS = {"A": (255, 128, 128), "B": (128, 255, 128), "C": (128, 128, 255), "D": (255, 255, 128),
           "E": (255, 128, 255), "A+d": (255, 138, 118), "A-d": (255, 118, 138)}
IMAGES = [  # name, template, media, colour, detector score, crop size (landmarks put the face in it)
    ("1.png", 1, 100, "A", 0.8, 112), ("2.png", 2, 200, "B", 0.7, 140), ("3.png", 3, 300, "C", 0.9, 112),
    ("4.png", 4, 400, "D", 0.6, 160), ("5.png", 11, 1, "A+d", 0.9, 112), ("6.png", 11, 1, "A-d", 0.9, 130),
    ("7.png", 11, 2, "A", 0.2, 112), ("8.png", 12, 3, "B", 1.0, 112), ("9.png", 13, 4, "C", 0.5, 150),
    ("10.png", 14, 5, "E", 0.95, 112),
]
PAIRS = [(1, 11, 1), (2, 12, 1), (3, 13, 1), (4, 14, 1), (1, 2, 0), (1, 3, 0), (1, 4, 0), (2, 3, 0),
         (2, 4, 0), (3, 4, 0), (1, 12, 0), (2, 13, 0), (3, 14, 0), (4, 11, 0)]


def write_ijb_fixture(root, target="ijbc"):
    os.makedirs(os.path.join(root, "meta"))
    os.makedirs(os.path.join(root, "loose_crop"))
    with open(os.path.join(root, "meta", f"{target}_face_tid_mid.txt"), "w") as tid, \
            open(os.path.join(root, "meta", f"{target}_name_5pts_score.txt"), "w") as lmk:
        for name, template, media, colour, score, size in IMAGES:
            Image.new("RGB", (size, size), COLOURS[colour]).save(os.path.join(root, "loose_crop", name))
            shift = (size - 112) / 2
            landmarks = ARCFACE_TEMPLATE * (1 + (size - 112) / 400) + shift * 0.5   # face inside the crop
            tid.write(f"{name} {template} {media}\n")
            lmk.write(name + " " + " ".join(f"{v:.4f}" for v in landmarks.reshape(-1)) + f" {score}\n")
    with open(os.path.join(root, "meta", f"{target}_template_pair_label.txt"), "w") as f:
        f.writelines(f"{a} {b} {y}\n" for a, b, y in PAIRS)


class MeanColour(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.mean(dim=(2, 3)) * self.scale


def reference_scores(detector_score=True):
    """Straightforward re-statement of the pooling from the fixture's colours."""
    colour = {k: (np.array(v, float) - 127.5) / 127.5 for k, v in COLOURS.items()}
    media = {}
    for _, template, m, c, score, _ in IMAGES:
        f = 2 * colour[c] * (score if detector_score else 1.0)       # image + mirror
        media.setdefault((template, m), []).append(f)
    templates = {}
    for (template, _), fs in media.items():
        templates[template] = templates.get(template, 0) + np.mean(fs, axis=0)
    unit = {t: v / np.linalg.norm(v) for t, v in templates.items()}
    return np.array([unit[a] @ unit[b] for a, b, _ in PAIRS])


def reference_tar(scores, labels, far):
    """Brute force: every threshold candidate, largest TAR with FAR <= far."""
    best = 0.0
    for thr in np.r_[-np.inf, np.sort(scores)]:
        accepted = scores > thr
        if accepted[~labels].mean() <= far:
            best = max(best, accepted[labels].mean())
    return best


@pytest.mark.parametrize("detector_score", [True, False])
def test_ijb_protocol_on_a_fixture_with_known_answers(tmp_path, detector_score):
    root = str(tmp_path / "IJBC")
    write_ijb_fixture(root)
    meta = load_ijb_meta(root, "IJBC")
    assert meta.names[4] == "5.png" and meta.templates.tolist()[4:7] == [11, 11, 11]
    result = evaluate_ijb(MeanColour(), root, "IJBC", batch_size=4, detector_score=detector_score,
                          roc_png=str(tmp_path / "roc.png"), progress=False,
                          num_workers=0 if detector_score else 1)     # crops read in a worker, too
    _, scores = verification_from_features(meta, _features(root, meta), detector_score)
    np.testing.assert_allclose(scores, reference_scores(detector_score), atol=1e-5)
    labels = np.array([y for *_, y in PAIRS], bool)
    tars = {p.far: p.tar for p in result.points}
    assert tars[1e-6] == 0.75 and tars[1e-1] == 0.75          # the hard positive (0.50) < negatives (0.707)
    for far, tar in tars.items():
        assert tar == reference_tar(scores, labels, far), far
    points = {p.far: p for p in verification_from_features(meta, _features(root, meta), detector_score,
                                                           fars=(0.3, 0.4, 0.5))[0].points}
    assert (points[0.3].tar, points[0.4].tar, points[0.5].tar) == (0.75, 1.0, 1.0)
    assert points[0.4].threshold == pytest.approx(0.0078, abs=1e-3)
    assert (result.num_images, result.num_templates, result.num_pairs) == (10, 8, 14)
    assert os.path.getsize(tmp_path / "roc.png") > 1000
    assert Image.open(tmp_path / "roc.png").format == "PNG"


def _features(root, meta):
    from engine.evaluation import embed_images
    from engine.evaluation.ijb import IJBCrops

    return embed_images(MeanColour(), IJBCrops(root, meta.names, meta.landmarks), batch_size=3)


def test_ijb_metadata_errors_name_the_file(tmp_path):
    root = str(tmp_path / "IJBB")
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid.txt"):
        load_ijb_meta(root, "IJBB")
    write_ijb_fixture(root, "ijbb")
    with open(os.path.join(root, "meta", "ijbb_name_5pts_score.txt"), "a") as f:
        f.write("11.png 1 2 3\n")
    with pytest.raises(ValueError, match=r"ijbb_name_5pts_score.txt:11: expected 12 fields"):
        load_ijb_meta(root, "IJBB")


def test_eval_ijb_command_prints_json_and_writes_the_roc(tmp_path):
    root = str(tmp_path / "IJBC")
    write_ijb_fixture(root)
    from models import build_backbone
    torch.manual_seed(0)
    torch.save(build_backbone("tiny", embedding_size=8).state_dict(), tmp_path / "backbone.pt")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "eval_ijb.py"), "--checkpoint",
           str(tmp_path / "backbone.pt"), "--backbone", "tiny", "--embedding-size", "8", "--root", root,
           "--batch-size", "4", "--workers", "0", "--roc", str(tmp_path / "ijbc.png"), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["num_pairs"] == 14 and [p["far"] for p in result["tar_at_far"]] == [1e-6, 1e-5, 1e-4,
                                                                                      1e-3, 1e-2, 1e-1]
    assert os.path.isfile(tmp_path / "ijbc.png")
