"""Verification sets: safe .bin reading, flip-fused embeddings, the 10-fold protocol, TAR@FAR, the hook."""
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from engine.evaluation import (
    UnsafeBinError,
    VerificationHook,
    VerificationResult,
    embed_images,
    format_table,
    kfold_accuracy,
    load_verification_set,
    read_bin,
    tar_at_far,
    verification_metrics,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encode(array, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def random_faces(n, seed=0, size=112):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_bin(path, encoded, issame, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump((encoded, issame), f, protocol=protocol)


def pair_set(num_pairs, seed=0):
    """Pairs of an image with itself (same) or with another image (different), alternating."""
    faces = random_faces(num_pairs + 1, seed)
    images, issame = [], []
    for i in range(num_pairs):
        same = i % 2 == 0
        images += [faces[i], faces[i] if same else faces[i + 1]]
        issame.append(same)
    return images, issame


# --- reading .bin files ------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [2, 4])
def test_bin_images_decode_to_the_encoded_pixels(tmp_path, protocol):
    faces = random_faces(4, seed=1)
    small = random_faces(1, seed=2, size=96)[0]                 # resized on load
    encoded = [encode(faces[0]), encode(faces[1]), encode(faces[2], "JPEG"), encode(small)]
    path = tmp_path / "set.bin"
    write_bin(path, encoded, [True, False], protocol=protocol)  # protocol 2: bytes via _codecs.encode
    vset = load_verification_set(str(path))
    assert vset.name == "set" and vset.num_pairs == 2 and vset.issame.tolist() == [True, False]
    assert vset.images.shape == (4, 112, 112, 3) and vset.images.dtype == np.uint8
    assert np.array_equal(vset.images[0], faces[0]) and np.array_equal(vset.images[1], faces[1])
    jpeg_ref = np.asarray(Image.open(io.BytesIO(encoded[2])).convert("RGB")).astype(int)
    assert np.abs(vset.images[2].astype(int) - jpeg_ref).max() <= 2
    assert np.array_equal(vset.images[3], np.asarray(Image.fromarray(small).resize((112, 112), Image.BILINEAR)))


def test_python2_style_bin_with_str_payloads_reads_as_bytes(tmp_path):
    # what insightface's Python 2 files contain: protocol 2, SHORT_BINSTRING/BINSTRING image payloads
    png = encode(random_faces(1)[0])
    body = b"".join(b"T" + len(png).to_bytes(4, "little") + png for _ in range(2))
    # PROTO 2, ( [str, str], [True] ) as Python 2 writes it
    data = b"\x80\x02]q\x00(" + body + b"e]q\x01\x88a\x86q\x02."
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    images, issame = read_bin(str(path))
    assert images == [png, png] and issame.tolist() == [True]


class _RunsCode:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("how", ["os.system", "builtins.eval", "nested", "codecs_other"])
def test_crafted_bin_is_refused_and_runs_nothing(tmp_path, how):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    if how == "os.system":
        payload = _RunsCode(os.system, command)
    elif how == "builtins.eval":
        payload = _RunsCode(eval, f"open({str(marker)!r}, 'w').close()")
    elif how == "nested":
        payload = ([b"ok", _RunsCode(os.system, command)], [True])
    else:
        payload = _RunsCode(__import__("codecs").encode, "x")   # _codecs.encode with one argument
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    # the payload really would run code under a plain pickle.load
    if how in ("os.system", "builtins.eval"):
        probe = tmp_path / "probe"
        pickle.loads(pickle.dumps(_RunsCode(os.system, f"touch {probe}")))
        assert probe.exists()
    with pytest.raises(UnsafeBinError, match="refused"):
        load_verification_set(str(path))
    assert not marker.exists()


def test_missing_and_malformed_bins_are_errors_naming_the_file(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_bin(str(missing))
    cases = {
        "truncated.bin": pickle.dumps(([b"a", b"b"], [True]))[:-5],
        "not_a_pair.bin": pickle.dumps([b"a", b"b", b"c"]),
        "odd_count.bin": pickle.dumps(([b"a", b"b", b"c"], [True])),
        "bad_label.bin": pickle.dumps(([b"a", b"b"], ["yes"])),
        "bad_image.bin": pickle.dumps(([b"a", 3], [True])),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=name):
            read_bin(str(path))
    undecodable = tmp_path / "garbage.bin"
    write_bin(undecodable, [b"not an image", b"nor this"], [True])
    with pytest.raises(ValueError, match=r"garbage.bin: image 0: cannot decode"):
        load_verification_set(str(undecodable))


# --- the 10-fold protocol and TAR@FAR ----------------------------------------------------------------

def reference_kfold(dist, issame, n_folds=10):
    """Straightforward re-statement: folds of consecutive pairs, sizes as sklearn's KFold, thresholds
    0.00, 0.01, ..., 3.99 as insightface's verification.py."""
    thresholds = [t / 100 for t in range(400)]
    n = len(dist)
    sizes = [n // n_folds + (1 if i < n % n_folds else 0) for i in range(n_folds)]
    bounds = np.cumsum([0] + sizes)
    accs, best = [], []
    for k in range(n_folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[k]:bounds[k + 1]] = True
        train_acc = [np.mean((dist[~test] < t) == issame[~test]) for t in thresholds]
        t = thresholds[int(np.argmax(train_acc))]
        best.append(t)
        accs.append(np.mean((dist[test] < t) == issame[test]))
    return np.array(accs), np.array(best)


@pytest.mark.parametrize("num_pairs", [600, 607])
def test_kfold_accuracy_matches_a_straightforward_reimplementation(num_pairs):
    rng = np.random.default_rng(num_pairs)
    issame = rng.random(num_pairs) < 0.5
    dist = np.where(issame, rng.normal(1.0, 0.35, num_pairs), rng.normal(1.6, 0.35, num_pairs)).clip(0, 4)
    got = kfold_accuracy(dist, issame)
    want_acc, want_thr = reference_kfold(dist, issame)
    np.testing.assert_allclose(got.fold_accuracies, want_acc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.best_thresholds, want_thr, rtol=0, atol=1e-12)
    assert 0.6 < got.mean < 0.95     # a non-trivial task


def unit_pair(cos, dim, rng):
    """Two unit vectors (scaled arbitrarily) with cosine `cos`."""
    a = rng.normal(size=dim)
    a /= np.linalg.norm(a)
    b = rng.normal(size=dim)
    b -= a * (a @ b)
    b /= np.linalg.norm(b)
    return 3.0 * a, 0.5 * (cos * a + np.sqrt(1 - cos ** 2) * b)


def test_verification_metrics_on_constructed_pairs_give_the_known_answer():
    """600 pairs: same pairs at cosine 0.8 (distance 0.4), different at cosine 0.1 (distance 1.8),
    except 3 same pairs of fold 4 placed at cosine -0.5 (distance 3.0): fold 4 scores 57/60."""
    rng = np.random.default_rng(0)
    issame = np.arange(600) % 2 == 0
    cos = np.where(issame, 0.8, 0.1)
    wrong = [240, 250, 298]                    # fold 4 holds pairs 240..299
    cos[wrong] = -0.5
    emb = np.concatenate([np.stack(unit_pair(c, 16, rng)) for c in cos])
    r = verification_metrics(emb, issame, name="constructed")
    expected = np.ones(10)
    expected[4] = 57 / 60
    np.testing.assert_allclose(r.fold_accuracies, expected, atol=1e-12)
    assert r.accuracy == pytest.approx(expected.mean()) and r.accuracy_std == pytest.approx(expected.std())
    assert r.best_threshold == pytest.approx(0.41)     # first grid point above the same-pair distance 0.4
    # cosine scores: negatives all 0.1 -> at FAR 1e-3 (k = 0) the threshold is 0.1, accepting the
    # 297 same pairs at 0.8 and not the 3 at -0.5
    p = r.tar_at_far[0]
    assert (p.far, p.threshold, p.achieved_far) == (1e-3, pytest.approx(0.1), 0.0)
    assert p.tar == pytest.approx(297 / 300) and p.resolved is False       # 300 negatives < 1/1e-3


def test_tar_at_far_known_answer():
    neg = np.arange(1000, dtype=np.float32) / 1000            # 0.000 ... 0.999
    pos = np.array([0.9985, 0.9975, 0.995, 0.5, 0.25], dtype=np.float32)
    scores = np.concatenate([neg, pos])
    labels = np.r_[np.zeros(1000, bool), np.ones(5, bool)]
    p1, p2, p3 = tar_at_far(scores, labels, [1e-3, 2e-3, 0.5])
    # FAR 1e-3 admits 1 negative above the threshold: threshold = 0.998 -> positives above: 0.9985
    assert p1.threshold == pytest.approx(0.998) and p1.tar == pytest.approx(1 / 5)
    assert p1.achieved_far == pytest.approx(1e-3) and p1.resolved
    assert p2.threshold == pytest.approx(0.997) and p2.tar == pytest.approx(2 / 5)
    assert p3.threshold == pytest.approx(0.499) and p3.tar == pytest.approx(4 / 5)


# --- embeddings --------------------------------------------------------------------------------------

class LinearFace(torch.nn.Module):
    """A deterministic stand-in backbone: a fixed linear map of a pooled image (not flip-symmetric)."""

    def __init__(self, dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(3 * 8 * 8, dim, generator=g))

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj


def test_embeddings_are_the_sum_over_image_and_mirror_and_batches_do_not_matter():
    images = random_faces(7, seed=3)
    model = LinearFace()
    got = embed_images(model, images, batch_size=3)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        want = model(x) + model(x.flip(3))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embed_images(model, images, batch_size=7), got, rtol=1e-5, atol=1e-5)


def _embed_on_ranks(state, images, bin_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from models import build_backbone
    model = build_backbone("tiny", embedding_size=16).eval()
    emb = embed_images(model, images, batch_size=2, group=state.data_group)
    hooks = {mode: VerificationHook([bin_path], every_n_steps=5, batch_size=4, all_ranks=mode)
             for mode in (True, False)}
    results = {mode: hook.maybe_run(5, model, state) for mode, hook in hooks.items()}
    return emb, results, hooks[False].last_was_best


def test_embeddings_and_hook_split_over_ranks_equal_the_single_process_result(spawn_ranks, tmp_path):
    images = random_faces(5, seed=4)              # slices of 3 and 2 images, batches of 2
    pairs, issame = pair_set(20)
    write_bin(tmp_path / "v.bin", [encode(i) for i in pairs], issame)
    results = spawn_ranks(_embed_on_ranks, 2, args=(images, str(tmp_path / "v.bin")))
    from parallel.groups import ParallelState
    single, single_hook, _ = _embed_on_ranks(ParallelState.single("cpu"), images, str(tmp_path / "v.bin"))
    assert single_hook[True] == single_hook[False] and set(single_hook[True]) == {"v"}
    for emb, hook_results, best in results:
        np.testing.assert_allclose(emb, single, rtol=1e-5, atol=1e-5)
        assert hook_results[True] == pytest.approx(single_hook[True])     # every rank embeds a slice
        assert hook_results[False] == pytest.approx(single_hook[True])    # rank 0 embeds, then shares
        assert best is True


# --- the training hook and the command line ----------------------------------------------------------

class Collapsed(torch.nn.Module):
    """Maps every face to the same embedding: the 10-fold protocol gives exactly 50% on a balanced set."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.w.expand(x.shape[0], 4)


def test_hook_runs_on_schedule_logs_and_tracks_the_best(tmp_path):
    images, issame = pair_set(40)
    write_bin(tmp_path / "a.bin", [encode(i) for i in images], issame)
    write_bin(tmp_path / "b.bin", [encode(i) for i in images[:40]], issame[:20])
    logged = []
    hook = VerificationHook([str(tmp_path / "a.bin"), str(tmp_path / "b.bin")], every_n_steps=10,
                            batch_size=16, best_by="a", log=lambda t, v, s: logged.append((t, v, s)))
    from parallel.groups import ParallelState
    state = ParallelState.single("cpu")
    good, bad = LinearFace(dim=32), Collapsed()
    assert hook.maybe_run(5, good, state) is None
    assert hook.maybe_run(10, bad, state) == {"a": 0.5, "b": 0.5} and hook.last_was_best
    assert hook.maybe_run(10, good, state) is None                 # already ran at this step
    assert hook.maybe_run(20, good, state) == {"a": 1.0, "b": 1.0} and hook.last_was_best
    assert hook.maybe_run(23, bad, state, final=True) == {"a": 0.5, "b": 0.5}
    assert not hook.last_was_best and hook.best_step == 20
    assert ("verification/a/accuracy", 1.0, 20) in logged and ("verification/a/best_accuracy", 1.0, 23) in logged
    assert good.training  # the mode the caller left is restored


def test_hook_rejects_unknown_best_by(tmp_path):
    images, issame = pair_set(4)
    write_bin(tmp_path / "a.bin", [encode(i) for i in images], issame)
    with pytest.raises(ValueError, match="best_by='lfw' is not one of the sets"):
        VerificationHook([str(tmp_path / "a.bin")], 10, best_by="lfw")


def test_eval_verification_command_prints_table_and_json(tmp_path):
    from models import build_backbone
    torch.manual_seed(0)
    torch.save(build_backbone("tiny", embedding_size=32).state_dict(), tmp_path / "backbone.pt")
    images, issame = pair_set(20)
    write_bin(tmp_path / "lfw.bin", [encode(i) for i in images], issame)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "eval_verification.py"), "--checkpoint",
           str(tmp_path / "backbone.pt"), "--backbone", "tiny", "--embedding-size", "32",
           "--bins", str(tmp_path / "lfw.bin"), "--batch-size", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)           # stdout is the JSON alone
    assert result[0]["name"] == "lfw" and result[0]["num_pairs"] == 20
    assert result[0]["accuracy"] == 1.0     # identical images in every same pair, random ones otherwise
    table = format_table([VerificationResult(**{k: v for k, v in result[0].items() if k in (
        "name", "num_pairs", "accuracy", "accuracy_std", "best_threshold", "fold_accuracies")})])
    assert table.splitlines()[2].split()[:3] == ["lfw", "20", "100.00"]
