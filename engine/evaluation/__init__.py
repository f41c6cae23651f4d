"""Evaluation of face embeddings: verification pair sets (LFW / CFP-FP / AgeDB-30 `.bin`), IJB-B/C 1:1
template verification, and a hook that runs verification periodically during training."""
from .bins import SafeBinUnpickler, UnsafeBinError, VerificationSet, load_verification_set, read_bin
from .embedding import embed_images, l2_normalize, to_input
from .hook import VerificationHook
from .metrics import KFoldResult, OperatingPoint, SortedScores, kfold_accuracy, tar_at_far
from .verification import (
    VerificationResult,
    evaluate_verification_set,
    format_table,
    verification_metrics,
)

__all__ = [
    "SafeBinUnpickler", "UnsafeBinError", "VerificationSet", "load_verification_set", "read_bin",
    "embed_images", "l2_normalize", "to_input", "VerificationHook", "KFoldResult", "OperatingPoint",
    "SortedScores", "kfold_accuracy", "tar_at_far", "VerificationResult", "evaluate_verification_set",
    "format_table", "verification_metrics",
]
