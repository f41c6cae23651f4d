"""Operating points of a pair-score verification: TAR at a fixed FAR, ROC curves, k-fold accuracy.

Conventions: higher score = more alike (cosine similarity); a pair is accepted when its score is
strictly above the threshold. TAR@FAR f is the largest TAR over thresholds whose false-accept rate
is at most f: with negatives sorted in decreasing order v_0 >= v_1 >= ..., and k = floor(f * N_neg),
the threshold is v_k (at most k negatives lie strictly above it). When f * N_neg < 1 the only
admissible thresholds accept no negative at all; the result is still defined but marked unresolved,
since the set has too few negatives to measure that FAR.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class OperatingPoint:
    far: float              # requested false-accept rate
    tar: float              # true-accept rate at that threshold
    threshold: float        # accept when score > threshold
    achieved_far: float     # false-accept rate actually reached (<= far)
    resolved: bool          # far * num_negatives >= 1

    def to_dict(self) -> dict:
        return dict(far=self.far, tar=self.tar, threshold=self.threshold,
                    achieved_far=self.achieved_far, resolved=self.resolved)


class SortedScores:
    """Scores split by label and sorted once (O(pairs) float32), answering many FAR queries."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray):
        scores = np.asarray(scores, dtype=np.float32)
        labels = np.asarray(labels).astype(bool, copy=False)
        if scores.shape != labels.shape or scores.ndim != 1:
            raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal 1-D shapes")
        self.pos = np.sort(scores[labels])
        self.neg = np.sort(scores[~labels])          # ascending
        if len(self.pos) == 0 or len(self.neg) == 0:
            raise ValueError(f"need positive and negative pairs, got {len(self.pos)} and {len(self.neg)}")

    def _thresholds(self, fars: np.ndarray) -> np.ndarray:
        n_neg = len(self.neg)
        k = np.floor(np.asarray(fars, dtype=np.float64) * n_neg + 1e-9).astype(np.int64)
        # v_k of the decreasing order is neg[n_neg - 1 - k]; k >= n_neg admits every pair
        thr = np.full(k.shape, -np.inf, dtype=np.float64)
        inside = k < n_neg
        thr[inside] = self.neg[n_neg - 1 - k[inside]]
        return thr

    @staticmethod
    def above(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
        """Share of `sorted_values` strictly above each threshold."""
        return (len(sorted_values) - np.searchsorted(sorted_values, thresholds, side="right")) / len(sorted_values)

    def operating_points(self, fars) -> list[OperatingPoint]:
        fars = np.asarray(list(fars), dtype=np.float64)
        thr = self._thresholds(fars)
        tar = self.above(self.pos, thr)
        achieved = self.above(self.neg, thr)
        return [OperatingPoint(float(f), float(t), float(h), float(a), bool(f * len(self.neg) >= 1))
                for f, t, h, a in zip(fars, tar, thr, achieved)]

    def roc(self, num: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """(far, tar) on a log grid from 1/N_neg to 1 (each point as in `operating_points`)."""
        lo = 1.0 / len(self.neg)
        fars = np.logspace(np.log10(lo), 0.0, num)
        thr = self._thresholds(fars)
        return self.above(self.neg, thr), self.above(self.pos, thr)


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars=(1e-3, 1e-4)) -> list[OperatingPoint]:
    return SortedScores(scores, labels).operating_points(fars)


DEFAULT_DISTANCE_THRESHOLDS = np.arange(0.0, 4.0, 0.01)


@dataclass
class KFoldResult:
    fold_accuracies: np.ndarray   # (K,)
    best_thresholds: np.ndarray   # (K,) squared-distance thresholds chosen on the other folds

    @property
    def mean(self) -> float:
        return float(self.fold_accuracies.mean())

    @property
    def std(self) -> float:
        return float(self.fold_accuracies.std())


def kfold_accuracy(distances: np.ndarray, issame: np.ndarray, n_folds: int = 10,
                   thresholds: np.ndarray = DEFAULT_DISTANCE_THRESHOLDS) -> KFoldResult:
    """The LFW protocol: pairs split into `n_folds` consecutive folds (no shuffle; the first P mod K
    folds one pair longer); for each fold the threshold (predict "same" when distance < threshold)
    with the best accuracy on the other folds (the first such on ties) is applied to it.

    distances: (P,) squared L2 distances of normalized embeddings (in [0, 4]).
    """
    distances = np.asarray(distances, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    folds = np.array_split(np.arange(len(distances)), n_folds)
    if min(len(f) for f in folds) == 0:
        raise ValueError(f"{len(distances)} pairs cannot fill {n_folds} folds")
    # correct[f, t]: pairs of fold f classified right at threshold t
    correct = np.empty((n_folds, len(thresholds)), dtype=np.int64)
    for i, fold in enumerate(folds):
        d, s = distances[fold], issame[fold]
        same_sorted, diff_sorted = np.sort(d[s]), np.sort(d[~s])
        same_below = np.searchsorted(same_sorted, thresholds, side="left")          # same & d < t
        diff_at_or_above = len(diff_sorted) - np.searchsorted(diff_sorted, thresholds, side="left")
        correct[i] = same_below + diff_at_or_above
    total = correct.sum(axis=0)
    accuracies, best = np.empty(n_folds), np.empty(n_folds)
    for i, fold in enumerate(folds):
        j = int(np.argmax(total - correct[i]))
        accuracies[i] = correct[i, j] / len(fold)
        best[i] = thresholds[j]
    return KFoldResult(accuracies, best)
