"""Verification accuracy on LFW / CFP-FP / AgeDB-30 style pair sets."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from .bins import VerificationSet
from .embedding import embed_images, l2_normalize
from .metrics import kfold_accuracy, tar_at_far

DEFAULT_FARS = (1e-3, 1e-4)


@dataclass
class VerificationResult:
    name: str
    num_pairs: int
    accuracy: float                 # mean of the 10 fold accuracies
    accuracy_std: float
    best_threshold: float           # mean chosen threshold, squared L2 distance of unit embeddings
    fold_accuracies: list[float]
    tar_at_far: list = field(default_factory=list)   # OperatingPoint per FAR, on cosine similarity
    xnorm: float = 0.0              # mean L2 norm of the flip-summed embeddings before normalizing

    @property
    def best_threshold_cosine(self) -> float:
        return 1.0 - self.best_threshold / 2.0

    def to_dict(self) -> dict:
        return dict(name=self.name, num_pairs=self.num_pairs, accuracy=self.accuracy,
                    accuracy_std=self.accuracy_std, best_threshold=self.best_threshold,
                    best_threshold_cosine=self.best_threshold_cosine, fold_accuracies=self.fold_accuracies,
                    tar_at_far=[p.to_dict() for p in self.tar_at_far], xnorm=self.xnorm)


def verification_metrics(embeddings: np.ndarray, issame: np.ndarray, name: str = "",
                         n_folds: int = 10, fars=DEFAULT_FARS) -> VerificationResult:
    """Metrics from `(2P, D)` embeddings (pair i = rows 2i, 2i+1) and `(P,)` labels."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or len(embeddings) != 2 * len(issame):
        raise ValueError(f"{name or 'verification'}: {embeddings.shape} embeddings for {len(issame)} pairs")
    xnorm = float(np.linalg.norm(embeddings, axis=1).mean())
    unit = l2_normalize(embeddings)
    a, b = unit[0::2], unit[1::2]
    distances = np.square(a - b).sum(axis=1)                  # (P,) in [0, 4]
    folds = kfold_accuracy(distances, issame, n_folds=n_folds)
    cosine = (a * b).sum(axis=1)
    return VerificationResult(
        name=name, num_pairs=len(issame), accuracy=folds.mean, accuracy_std=folds.std,
        best_threshold=float(folds.best_thresholds.mean()),
        fold_accuracies=[float(v) for v in folds.fold_accuracies],
        tar_at_far=tar_at_far(cosine, issame, fars), xnorm=xnorm)


def evaluate_verification_set(backbone: torch.nn.Module, vset: VerificationSet, batch_size: int = 128,
                              group=None, channels_last: bool = False, progress: bool = False,
                              fars=DEFAULT_FARS) -> VerificationResult:
    """Embeds the set (image + mirror, summed; split over `group`'s ranks) and scores it."""
    emb = embed_images(backbone, vset.images, batch_size=batch_size, flip=True, group=group,
                       channels_last=channels_last, progress=f"embed {vset.name}" if progress else None)
    return verification_metrics(emb, vset.issame, name=vset.name, fars=fars)


def format_table(results: list[VerificationResult]) -> str:
    fars = [p.far for p in results[0].tar_at_far] if results else []
    header = ["set", "pairs", "accuracy (%)", "threshold (cos)"] + [f"TAR@FAR={f:g} (%)" for f in fars]
    rows = []
    for r in results:
        tars = [f"{100 * p.tar:.2f}" + ("" if p.resolved else "*") for p in r.tar_at_far]
        rows.append([r.name, str(r.num_pairs), f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f}",
                     f"{r.best_threshold_cosine:.3f}"] + tars)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(not p.resolved for r in results for p in r.tar_at_far):
        lines.append("* fewer than 1/FAR negative pairs: no false accept allowed at this FAR")
    return "\n".join(lines)


def results_json(results: list[VerificationResult]) -> str:
    return json.dumps([r.to_dict() for r in results], indent=2)
