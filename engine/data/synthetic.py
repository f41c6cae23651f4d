"""Synthetic face identities for demos and tests.

Each identity is a stable set of face parameters (outline shape, skin tone, hair colour and style, eye
spacing/size/colour, eyebrows, nose, mouth, ears, optional glasses, beard and moles); each image of it
draws fresh nuisance (pose and shift/scale/rotation, expression, background clutter, clothing, lighting
gradient, brightness and a mild colour cast, occlusion patch, blur, noise). Identity lives in shape, geometry and relative
colours, which a small CNN picks up quickly; the nuisance moves and recolours the pixels enough that
raw-pixel cosine similarity verifies identities poorly.

Rendering is cheap: an identity's head is drawn once per pose/expression variant (a 2x RGBA sprite,
`SPRITE_VARIANTS` of them, from (seed, identity, variant)); each image then warps one variant onto a
fresh background with a single nearest-neighbour affine transform and applies lighting and noise in
numpy. About a millisecond of CPU per image including JPEG encoding.

Everything is a pure function of (seed, identity, image index): `synthetic_image` is deterministic and
identities can be generated lazily, in any order, by any process. Held-out identities are the ids
`num_identities ... num_identities + heldout_identities - 1` (never in the training shards).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os

import numpy as np
from PIL import Image, ImageDraw

from .verification_bin import write_verification_bin
from .writers import SampleSource, ShardTask, encode_jpeg, plan_shards, write_shards

SIZE = 112
_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                    np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False))], axis=1)  # (24, 2)
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_XX = (_XX - SIZE / 2) / (SIZE / 2)
_YY = (_YY - SIZE / 2) / (SIZE / 2)

_SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 105], [198, 134, 66], [141, 85, 36],
                  [92, 56, 30], [255, 205, 180], [230, 180, 150]], dtype=np.float32)
_HAIR = np.array([[20, 16, 14], [60, 40, 25], [110, 70, 35], [185, 150, 90], [230, 205, 140], [150, 60, 25],
                  [140, 140, 140], [235, 235, 235], [60, 60, 120], [150, 40, 110]], dtype=np.float32)
_IRIS = np.array([[70, 40, 20], [40, 90, 160], [60, 120, 60], [110, 110, 120], [20, 20, 20], [140, 100, 40]],
                 dtype=np.float32)
_LIPS = np.array([[190, 80, 80], [150, 60, 70], [210, 120, 120], [120, 50, 50], [200, 60, 110]],
                 dtype=np.float32)


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(int(w) & 0xFFFFFFFF for w in words)])


def _mix(palette: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    i, j = rng.integers(0, len(palette), 2)
    t = rng.random()
    return np.clip(palette[i] * (1 - t * 0.4) + palette[j] * t * 0.4 + rng.normal(0, jitter, 3), 0, 255)


def identity_params(identity: int, seed: int) -> dict:
    """The stable appearance of one identity (canonical frame: face centred at (0, 0), pixels)."""
    r = _rng(seed, 0x1D, identity)
    hair = _mix(_HAIR, r, 12)
    return {
        "face_w": r.uniform(25, 37), "face_h": r.uniform(33, 44), "face_n": r.uniform(1.7, 3.4),
        "chin": r.uniform(-0.15, 0.45),  # >0 tapers the lower face
        "skin": _mix(_SKIN, r, 10),
        "hair": hair, "hairline": r.uniform(-0.75, -0.3), "hair_volume": r.uniform(1.0, 1.35),
        "hair_long": r.uniform(-0.2, 1.4), "fringe": int(r.integers(0, 4)), "bald": r.random() < 0.08,
        "eye_dx": r.uniform(9, 16), "eye_y": r.uniform(-12, -2), "eye_w": r.uniform(3.5, 6.5),
        "eye_h": r.uniform(1.8, 3.8), "iris": _mix(_IRIS, r, 10), "eye_tilt": r.uniform(-0.25, 0.25),
        "brow_dy": r.uniform(4, 9), "brow_w": r.uniform(5, 10), "brow_t": r.uniform(1.2, 3.5),
        "brow_tilt": r.uniform(-0.45, 0.45), "brow_shade": r.uniform(0.5, 1.0),
        "nose_len": r.uniform(8, 18), "nose_w": r.uniform(3, 9), "nose_style": int(r.integers(0, 3)),
        "mouth_y": r.uniform(13, 24), "mouth_w": r.uniform(7, 15), "mouth_t": r.uniform(1.5, 4.5),
        "mouth_curve": r.uniform(-3, 3), "lips": _mix(_LIPS, r, 12),
        "ear_size": r.uniform(4, 9), "ear_y": r.uniform(-6, 4),
        "glasses": r.random() < 0.2, "glasses_round": r.random() < 0.5,
        "glasses_colour": r.integers(0, 200, 3).astype(np.float32),
        "beard": int(r.integers(0, 4)) if r.random() < 0.3 else 0,
        "moles": r.uniform([-0.8, -0.6], [0.8, 0.8], (int(r.integers(0, 3)), 2)),
    }


def _ellipse(cx, cy, rx, ry, n=2.0):
    """(24, 2) points of a superellipse (n=2: ellipse)."""
    unit = _CIRCLE if n == 2.0 else np.sign(_CIRCLE) * np.abs(_CIRCLE) ** (2.0 / n)
    return unit * (rx, ry) + (cx, cy)


def _bar(x0, y0, x1, y1, t):
    """Quadrilateral of a thick line segment."""
    d = np.array([x1 - x0, y1 - y0], dtype=np.float64)
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-6) * t / 2
    return np.array([[x0 + n[0], y0 + n[1]], [x1 + n[0], y1 + n[1]], [x1 - n[0], y1 - n[1]], [x0 - n[0], y0 - n[1]]])


SPRITE_SCALE = 2  # sprites are drawn at 2x and reduced after the per-image transform (anti-aliasing)
SPRITE_VARIANTS = 4  # per identity: pose (yaw/pitch) and expression variants, chosen per image
_SPRITE_SIZE = SIZE * SPRITE_SCALE
_SPRITE_CENTRE = (_SPRITE_SIZE / 2, _SPRITE_SIZE / 2 + 4 * SPRITE_SCALE)


def _colour(rgb, k=1.0):
    return tuple(int(v) for v in np.clip(np.asarray(rgb) * k, 0, 255))


def render_sprite(p: dict, r: np.random.Generator) -> Image.Image:
    """One pose/expression variant of an identity's head on a transparent (224, 224) RGBA canvas."""
    img = Image.new("RGBA", (_SPRITE_SIZE, _SPRITE_SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    k, (cx, cy) = SPRITE_SCALE, _SPRITE_CENTRE

    offset = np.array([cx, cy])

    def place(points):
        return (np.asarray(points, dtype=np.float64).reshape(-1, 2) * k + offset).ravel().tolist()

    colour = _colour
    yaw, pitch = r.uniform(-0.9, 0.9), r.uniform(-1, 1)
    fw, fh, skin, hair = p["face_w"], p["face_h"], p["skin"], p["hair"]
    fx = yaw * 5.0  # features slide sideways with yaw, the outline much less
    fy = pitch * 3.0
    # Neck.
    draw.polygon(place([[-fw * 0.45, fh * 0.5], [fw * 0.45, fh * 0.5], [fw * 0.5, fh + 14], [-fw * 0.5, fh + 14]]),
                 fill=colour(skin, 0.85))
    # Long hair behind the head.
    if not p["bald"] and p["hair_long"] > 0:
        v = p["hair_volume"]
        back = _ellipse(0, -fh * 0.1, fw * v + 3, fh * v)
        back[:, 1] = np.where(back[:, 1] > 0, back[:, 1] * (0.3 + p["hair_long"]), back[:, 1])
        draw.polygon(place(back), fill=colour(hair))
    # Ears (the far ear hides behind the face with yaw).
    for side in (-1, 1):
        if side * yaw < 0.6:
            draw.polygon(place(_ellipse(side * (fw - 1) - yaw * 2, p["ear_y"], p["ear_size"] * 0.6, p["ear_size"])),
                         fill=colour(skin, 0.9))
    # Face outline: superellipse, lower half tapered towards the chin.
    face = _ellipse(0, 0, fw, fh, p["face_n"])
    lower = face[:, 1] > 0
    face[lower, 0] *= 1 - p["chin"] * (face[lower, 1] / fh) ** 2
    face[:, 0] -= yaw * 1.5
    draw.polygon(place(face), fill=colour(skin))
    # Hair on top (cap above the hairline) with a fringe style.
    if not p["bald"]:
        v = p["hair_volume"]
        cap = _ellipse(0, -fh * 0.05, fw * v + 1, fh * v)
        line_y = p["hairline"] * fh
        cap[:, 1] = np.minimum(cap[:, 1], line_y + (fh * 0.25 if p["fringe"] == 1 else 0) * np.cos(cap[:, 0] / fw))
        if p["fringe"] == 2:  # side sweep
            cap[:, 1] += np.where(cap[:, 1] >= line_y - 1, (cap[:, 0] + fw) / (2 * fw) * 8, 0)
        draw.polygon(place(cap), fill=colour(hair))
        if p["fringe"] == 3:  # widow's peak
            draw.polygon(place([[-8, line_y], [8, line_y], [0, line_y + 9]]), fill=colour(hair))
    # Beard / moustache.
    if p["beard"]:
        if p["beard"] in (1, 3):
            draw.polygon(place(_bar(fx - p["mouth_w"], fy + p["mouth_y"] - 4, fx + p["mouth_w"],
                                    fy + p["mouth_y"] - 4, 3.5)), fill=colour(hair, 0.9))
        if p["beard"] >= 2:
            chin = face[lower].copy()
            chin[:, 1] = np.maximum(chin[:, 1], fy + p["mouth_y"] - 2)
            draw.polygon(place(chin), fill=colour(hair, 0.9))
    # Eyebrows.
    brow_colour = colour(hair, p["brow_shade"])
    raise_ = r.uniform(-1.5, 1.5)
    for side in (-1, 1):
        x = fx + side * p["eye_dx"]
        y = fy + p["eye_y"] - p["brow_dy"] - raise_
        t = p["brow_tilt"] * side
        draw.polygon(place(_bar(x - p["brow_w"] * 0.5, y + t * 3, x + p["brow_w"] * 0.5, y - t * 3, p["brow_t"])),
                     fill=brow_colour)
    # Eyes: sclera, iris, pupil.
    openness = r.uniform(0.55, 1.1)
    for side in (-1, 1):
        x = fx + side * p["eye_dx"] * (1 - 0.15 * side * yaw)
        y = fy + p["eye_y"]
        w = p["eye_w"] * (1 - 0.25 * side * yaw)
        h = max(p["eye_h"] * openness, 0.8)
        sclera = _ellipse(x, y, w, h)
        sclera[:, 1] += side * p["eye_tilt"] * (sclera[:, 0] - x)
        draw.polygon(place(sclera), fill=(240, 240, 235))
        ir = min(h, w * 0.55)
        draw.polygon(place(_ellipse(x + yaw * 1.5, y, ir, ir)), fill=colour(p["iris"]))
        draw.polygon(place(_ellipse(x + yaw * 1.5, y, ir * 0.45, ir * 0.45)), fill=(10, 10, 10))
    # Nose.
    nx, ny, nl, nw = fx * 1.4, fy + p["eye_y"] + 2, p["nose_len"], p["nose_w"]
    if p["nose_style"] == 0:
        draw.polygon(place([[nx, ny], [nx + nw * 0.5, ny + nl], [nx - nw * 0.5, ny + nl]]), fill=colour(skin, 0.78))
    elif p["nose_style"] == 1:
        draw.polygon(place(_bar(nx, ny, nx + nw * 0.3, ny + nl, 2.5)), fill=colour(skin, 0.7))
        draw.polygon(place(_ellipse(nx, ny + nl, nw * 0.6, 2.2)), fill=colour(skin, 0.7))
    else:
        for side in (-1, 1):
            draw.polygon(place(_ellipse(nx + side * nw * 0.35, ny + nl, 1.6, 1.3)), fill=colour(skin, 0.45))
        draw.polygon(place(_bar(nx - nw * 0.2, ny + 3, nx - nw * 0.35, ny + nl - 2, 1.5)), fill=colour(skin, 0.8))
    # Mouth: lips as a curved band, sometimes open.
    mx, my, mw = fx * 1.2, fy + p["mouth_y"], p["mouth_w"] * (1 - 0.2 * abs(yaw))
    xs = np.linspace(-mw, mw, 9)
    curve = p["mouth_curve"] * (xs / mw) ** 2 + r.uniform(-1, 1) * (xs / mw) ** 2
    open_ = max(r.uniform(-2, 4), 0)
    upper = np.stack([mx + xs, my + curve - p["mouth_t"] * 0.5 * np.cos(xs / mw * 1.3)], axis=1)
    lower_lip = np.stack([mx + xs, my + curve + (p["mouth_t"] * 0.5 + open_) * np.cos(xs / mw * 1.3)], axis=1)
    draw.polygon(place(np.concatenate([upper, lower_lip[::-1]])), fill=colour(p["lips"]))
    if open_ > 1:
        draw.polygon(place(_ellipse(mx, my + open_ * 0.5, mw * 0.6, open_ * 0.5)), fill=(40, 15, 15))
    # Moles.
    for mx_, my_ in p["moles"]:
        draw.polygon(place(_ellipse(fx + mx_ * fw * 0.8, fy + my_ * fh * 0.8, 1.4, 1.4)), fill=colour(skin, 0.35))
    # Glasses.
    if p["glasses"]:
        gc = colour(p["glasses_colour"])
        for side in (-1, 1):
            x, y = fx + side * p["eye_dx"], fy + p["eye_y"]
            rim = _ellipse(x, y, p["eye_w"] + 3, p["eye_h"] + 3, 2.0 if p["glasses_round"] else 5.0)
            draw.line(place(np.concatenate([rim, rim[:1]])), fill=gc, width=2 * k)
        draw.line(place([[fx - p["eye_dx"] + p["eye_w"] + 3, fy + p["eye_y"]],
                         [fx + p["eye_dx"] - p["eye_w"] - 3, fy + p["eye_y"]]]), fill=gc, width=2 * k)
    return img


class IdentityRenderer:
    """Renders the images of one identity; sprites (pose/expression variants) are drawn once and cached."""

    def __init__(self, identity: int, seed: int):
        self.identity, self.seed = int(identity), int(seed)
        self.params = identity_params(identity, seed)
        self._sprites: dict[int, Image.Image] = {}

    def sprite(self, variant: int) -> Image.Image:
        if variant not in self._sprites:
            self._sprites[variant] = render_sprite(self.params, _rng(self.seed, 0x5B, self.identity, variant))
        return self._sprites[variant]

    def image(self, index: int) -> np.ndarray:
        """Image `index`: (112, 112, 3) uint8, a pure function of (seed, identity, index)."""
        u = iter(_rng(self.seed, 0x1A, self.identity, index).random(128).tolist())  # all per-image randomness

        def uniform(lo, hi):
            return lo + (hi - lo) * next(u)

        def rgb():
            return int(next(u) * 256), int(next(u) * 256), int(next(u) * 256)

        # Background and clutter.
        img = Image.new("RGB", (SIZE, SIZE), rgb())
        draw = ImageDraw.Draw(img)
        for _ in range(3 + int(next(u) * 5)):
            kind, c = next(u), rgb()
            x0, y0, w, h = uniform(-10, SIZE), uniform(-10, SIZE), uniform(10, 60), uniform(10, 60)
            if kind < 0.4:
                draw.rectangle([x0, y0, x0 + w, y0 + h], fill=c)
            elif kind < 0.8:
                draw.ellipse([x0, y0, x0 + w, y0 + h], fill=c)
            else:
                draw.line([x0, y0, x0 + w * (1 if next(u) < 0.5 else -1), y0 + h], fill=c, width=2 + int(next(u) * 5))
        # Similarity transform with a little anisotropy (out-of-plane pose), shift, scale.
        angle, scale, aniso = uniform(-0.3, 0.3), uniform(0.82, 1.12), uniform(0.88, 1.1)
        ox, oy = SIZE / 2 + uniform(-9, 9), SIZE / 2 + 4 + uniform(-9, 9)
        cos, sin = math.cos(angle), math.sin(angle)
        sx, sy = scale * aniso, scale / aniso
        # Clothing: a wide band below the head, under the same transform.
        band = ((-70, 40), (70, 40), (70, 110), (-70, 110))
        draw.polygon([(ox + cos * sx * x - sin * sy * y, oy + sin * sx * x + cos * sy * y) for x, y in band],
                     fill=rgb())
        # Head sprite (2x): output pixel o -> sprite pixel c_s + k M^-1 (o - c_o), M = R(angle) diag(sx, sy).
        k = SPRITE_SCALE
        a, b, c, d = k * cos / sx, k * sin / sx, -k * sin / sy, k * cos / sy
        head = self.sprite(int(next(u) * SPRITE_VARIANTS)).transform(
            (SIZE, SIZE), Image.AFFINE,
            (a, b, _SPRITE_CENTRE[0] - a * ox - b * oy, c, d, _SPRITE_CENTRE[1] - c * ox - d * oy),
            resample=Image.NEAREST)
        img.paste(head, (0, 0), head)
        # Occlusion patch (hand, mask, object) over the face.
        if next(u) < 0.3:
            c, w, h = rgb(), uniform(12, 38), uniform(12, 38)
            x0, y0 = ox + uniform(-30, 30) - w / 2, oy + uniform(-30, 30) - h / 2
            (draw.rectangle if next(u) < 0.5 else draw.ellipse)([x0, y0, x0 + w, y0 + h], fill=c)
        # Blur (mix with a 3x3 box filter), lighting gradient, brightness, colour cast, sensor noise.
        out = np.asarray(img, dtype=np.float32)
        blur = uniform(-0.5, 1.0)
        if blur > 0:
            box = out.copy()
            box[1:-1] = out[:-2] + out[1:-1] + out[2:]
            box[:, 1:-1] = box[:, :-2] + box[:, 1:-1] + box[:, 2:]
            out = out * (1 - blur) + box * (blur / 9)  # borders: close enough
        theta, strength, brightness = uniform(0, 2 * math.pi), uniform(0.1, 0.55), uniform(0.65, 1.3)
        gain = (brightness * strength * math.cos(theta)) * _XX + (brightness * strength * math.sin(theta)) * _YY
        gain += brightness
        cast = np.array([uniform(0.94, 1.06) for _ in range(3)], dtype=np.float32)
        out *= gain[:, :, None] * cast
        out += _noise(self.seed, next(u), next(u), next(u)) * uniform(0, 10)
        np.clip(out, 0, 255, out=out)
        return out.astype(np.uint8)


def synthetic_image(identity: int, index: int, seed: int) -> np.ndarray:
    """Image `index` of identity `identity`: (112, 112, 3) uint8, a pure function of its arguments."""
    return IdentityRenderer(identity, seed).image(index)


_NOISE_BANK: dict = {}


def _noise(seed: int, u0: float, u1: float, u2: float) -> np.ndarray:
    """A (112, 112, 3) standard-normal noise field: a crop of a per-seed bank picked by three uniforms."""
    bank = _NOISE_BANK.get(seed)
    if bank is None:
        bank = _rng(seed, 0x40).standard_normal((4, SIZE + 32, SIZE + 32, 3), dtype=np.float32)
        _NOISE_BANK.clear()
        _NOISE_BANK[seed] = bank
    k, dy, dx = int(u0 * 4), int(u1 * 32), int(u2 * 32)
    return bank[k, dy:dy + SIZE, dx:dx + SIZE]


# ------------------------------------------------------------------------------------ counts and pairs
def _hash_uniform(seed: int, identities: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) per identity from a splitmix64 hash of (seed, identity, salt); vectorised."""
    with np.errstate(over="ignore"):
        z = (identities.astype(np.uint64) + np.uint64((seed * 0x9E3779B1 + salt * 0x85EBCA77) & 0xFFFFFFFFFFFF)
             ) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def images_per_identity_range(images_per_identity) -> tuple[int, int]:
    """(min, max) from a (min, max) pair or a mean (long tail with that mean, at least 2 images)."""
    if isinstance(images_per_identity, (tuple, list)):
        lo, hi = int(images_per_identity[0]), int(images_per_identity[1])
    else:
        mean = float(images_per_identity)
        lo = max(2, int(round(mean / 2)))
        hi = int(round(lo + 4 * (mean - lo) - 1))  # E[lo + floor((hi - lo + 1) u^3)] = lo + (hi - lo + 1) / 4
    if lo < 1 or hi < lo:
        raise ValueError(f"images_per_identity must give 1 <= min <= max, got {images_per_identity}")
    return lo, hi


def image_counts(identities: np.ndarray, seed: int, images_per_identity) -> np.ndarray:
    """Long-tailed images per identity (most near the minimum, a few near the maximum), deterministic."""
    lo, hi = images_per_identity_range(images_per_identity)
    u = _hash_uniform(seed, np.asarray(identities), 0xC0)
    return np.minimum(lo + np.floor((hi - lo + 1) * u ** 3), hi).astype(np.int64)


def verification_pairs(first_identity: int, num_identities: int, num_pairs: int, seed: int):
    """[(identity_a, index_a, identity_b, index_b, same)] with half positive, half negative pairs, interleaved."""
    if num_identities < 2:
        raise ValueError("verification pairs need at least 2 held-out identities")
    r = _rng(seed, 0xB1)
    pairs = []
    for i in range(num_pairs):
        a = first_identity + int(r.integers(0, num_identities))
        if i % 2 == 0:
            b = a
        else:
            b = first_identity + int((a - first_identity + r.integers(1, num_identities)) % num_identities)
        pairs.append((a, 2 * i, b, 2 * i + 1, a == b))
    return pairs


class SyntheticSource(SampleSource):
    def __init__(self, seed: int, images_per_identity):
        self.seed = seed
        self.images_per_identity = images_per_identity
        self.description = f"synthetic(seed={seed})"

    def samples(self, task, skipped):
        ids = np.arange(task.first_class, task.end_class)
        for identity, count in zip(ids.tolist(), image_counts(ids, self.seed, self.images_per_identity).tolist()):
            renderer = IdentityRenderer(identity, self.seed)
            for j in range(count):
                jpg = encode_jpeg(renderer.image(j), quality=90)
                yield {"__key__": f"{identity:08d}_{j:06d}", "jpg": jpg, "cls": identity}


def _render_identity_images(args) -> list[bytes]:
    """JPEGs of images `indices` of one identity (one renderer, so its sprites are drawn once)."""
    identity, indices, seed = args
    renderer = IdentityRenderer(identity, seed)
    return [encode_jpeg(renderer.image(i), quality=90) for i in indices]


def render_pair_images(pairs, seed: int, workers: int) -> list[bytes]:
    """JPEG bytes listed pairwise (2*i, 2*i+1) for `pairs` from `verification_pairs`."""
    wanted: dict[int, list[int]] = {}
    for a, ia, b, ib, _ in pairs:
        wanted.setdefault(a, []).append(ia)
        wanted.setdefault(b, []).append(ib)
    jobs = [(identity, indices, seed) for identity, indices in sorted(wanted.items())]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            rendered = pool.map(_render_identity_images, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    else:
        rendered = [_render_identity_images(job) for job in jobs]
    images = {(identity, i): jpg for (identity, indices, _), jpgs in zip(jobs, rendered)
              for i, jpg in zip(indices, jpgs)}
    return [images[key] for a, ia, b, ib, _ in pairs for key in ((a, ia), (b, ib))]


def write_synthetic(out_dir: str, num_identities: int, *, images_per_identity=(4, 40), heldout_identities: int = 200,
                    heldout_pairs: int = 1000, seed: int = 0, shard_size: int = 2000, workers: int = 2,
                    prefix: str = "train", progress: bool = True) -> dict:
    """Write `<prefix>-NNNNNN.tar` shards of `num_identities` synthetic identities, `<prefix>-manifest.json`
    and `heldout.bin` (verification pairs of `heldout_identities` other identities). Returns the manifest."""
    if num_identities < 1:
        raise ValueError(f"num_identities must be >= 1, got {num_identities}")
    if heldout_pairs % 2:
        raise ValueError(f"heldout_pairs must be even (half positive, half negative), got {heldout_pairs}")
    counts = image_counts(np.arange(num_identities), seed, images_per_identity)
    tasks = [ShardTask(i, a, b) for i, (a, b) in enumerate(plan_shards(counts, shard_size))]
    manifest = write_shards(SyntheticSource(seed, images_per_identity), tasks, out_dir, prefix=prefix,
                            num_classes=num_identities, total_images=int(counts.sum()), workers=workers,
                            progress=progress, extra_manifest={
                                "synthetic": {"seed": seed, "images_per_identity": images_per_identity,
                                              "heldout_identities": heldout_identities,
                                              "heldout_pairs": heldout_pairs}})
    if heldout_identities and heldout_pairs:
        pairs = verification_pairs(num_identities, heldout_identities, heldout_pairs, seed)
        images = render_pair_images(pairs, seed, workers)
        path = os.path.join(out_dir, "heldout.bin")
        write_verification_bin(path, images, [same for *_, same in pairs])
        manifest["heldout_bin"] = path
    return manifest
