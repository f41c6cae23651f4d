"""Periodic verification during training, independent of the training loop that calls it.

    hook = VerificationHook(["lfw.bin", "cfp_fp.bin"], every_n_steps=2000, batch_size=128,
                            best_by="lfw", log=lambda tag, value, step: ...)
    ...
    accuracies = hook.maybe_run(step, backbone, state, final=is_last_step)   # None when not due
    if accuracies is not None and hook.last_was_best: save the "best" export

`log(tag, value, step)` receives `verification/<set>/accuracy`, `.../accuracy_std`, `.../xnorm`,
`.../tar@far=<f>` and `verification/<set>/best_accuracy`; the caller routes them to TensorBoard,
Prometheus or its log. Every rank must call `maybe_run` at the same steps when embedding is split
over ranks (the default, and the only choice when ZeRO-3 partitions the parameters).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .bins import VerificationSet, load_verification_set
from .verification import VerificationResult, evaluate_verification_set

LogFn = Callable[[str, float, int], None]


class VerificationHook:
    def __init__(
        self,
        bin_paths: Sequence[str],
        every_n_steps: int,
        batch_size: int = 128,
        best_by: str | None = None,
        log: LogFn | None = None,
        all_ranks: bool = True,
        image_size: int = 112,
        channels_last: bool = False,
    ):
        """bin_paths: `.bin` pair sets, named by file stem (`lfw`); every_n_steps: run when
        step % every_n_steps == 0 (0 disables periodic runs; a `final` call still runs); best_by: the
        set whose accuracy decides "best so far" (None: the mean over sets); all_ranks: every rank
        embeds a slice (True) or rank 0 embeds everything while the others skip (False; not with
        ZeRO-3)."""
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.sets: list[VerificationSet] = [load_verification_set(p, image_size) for p in bin_paths]
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"verification sets need distinct file names, got {names}")
        if best_by is not None and best_by not in names:
            raise ValueError(f"best_by={best_by!r} is not one of the sets {names}")
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.best_by = best_by
        self.log = log
        self.all_ranks = all_ranks
        self.channels_last = channels_last
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.last_was_best = False
        self.last_results: list[VerificationResult] = []
        self._last_step_run: int | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sets]

    def due(self, step: int, final: bool = False) -> bool:
        if not self.sets or step == self._last_step_run:
            return False
        return final or (self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0)

    def maybe_run(self, step: int, backbone, state, final: bool = False) -> dict[str, float] | None:
        """Accuracy per set name when due at `step` (on every rank), else None. `state` is the run's
        ParallelState (its data_group splits the embedding work)."""
        if not self.due(step, final):
            return None
        self._last_step_run = step
        rank = getattr(state, "rank", 0)
        group = getattr(state, "data_group", None) if self.all_ranks else None
        if not self.all_ranks and rank != 0:
            results = None
        else:
            results = [evaluate_verification_set(backbone, s, self.batch_size, group=group,
                                                 channels_last=self.channels_last) for s in self.sets]
        results = self._share_from_rank_zero(results, state)
        self.last_results = results
        accuracies = {r.name: r.accuracy for r in results}
        score = accuracies[self.best_by] if self.best_by else sum(accuracies.values()) / len(accuracies)
        self.last_was_best = self.best_score is None or score > self.best_score
        if self.last_was_best:
            self.best_score, self.best_step = score, step
        if self.log is not None and rank == 0:
            for r in results:
                prefix = f"verification/{r.name}"
                self.log(f"{prefix}/accuracy", r.accuracy, step)
                self.log(f"{prefix}/accuracy_std", r.accuracy_std, step)
                self.log(f"{prefix}/xnorm", r.xnorm, step)
                for p in r.tar_at_far:
                    self.log(f"{prefix}/tar@far={p.far:g}", p.tar, step)
            self.log(f"verification/{self.best_by or 'mean'}/best_accuracy", self.best_score, step)
        return accuracies

    def _share_from_rank_zero(self, results, state):
        """With all_ranks every rank computed identical results from the gathered embeddings; with
        rank 0 alone the others receive its results so all agree on `last_was_best`."""
        if self.all_ranks or getattr(state, "world_size", 1) == 1:
            return results
        import torch.distributed as dist
        box = [results]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def state_dict(self) -> dict:
        """Best-so-far bookkeeping, to be saved with the training checkpoint."""
        return {"best_score": self.best_score, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_score = state.get("best_score")
        self.best_step = state.get("best_step")
