"""The distributed margin-softmax cross-entropy, fused and chunked.

Every rank holds the gathered embeddings `x_global (Bg, D)` and its own active centers
`centers (A, D)`; the classes of all ranks together form the softmax. Per rank, in class chunks:

    pass 1  cos = normalize(x) . normalize(centers[chunk])^T, margin on target entries, running
            row max and sum-exp (online softmax)
    reduce  row max (all-reduce MAX), sum-exp (all-reduce SUM), target logit (all-reduce SUM)
    pass 2  p = exp(logit - max) / sum; d logit = (p - onehot) / N_valid, accumulated into
            d x_global and d centers chunk by chunk

so the (Bg, A) logit matrix never exists at once. Communication is O(Bg), independent of C.
The gradients are computed during the forward call (the loss is a scalar: backward only scales
them); `x_global`'s gradient is this rank's partial sum, which the gather's backward reduce-scatters.

Column conventions (all optional beyond the first):
- `target_col (Bg,)`: column in `centers` of each row's target on this rank, -1 where the target
  lives elsewhere (or in `row_centers`);
- `row_centers (Bg, D)` + `row_center_mask (Bg,)`: one extra column per row, seen only by that row,
  holding its target (DCQ's positive key); rows with mask True take their target there. Like
  `target_col`, a row's mask is True on exactly one rank (the one that holds its extra column, e.g.
  the row's home rank); the other ranks pass False for it and their `row_centers` rows are ignored;
- `column_labels (A,)` + `row_labels (Bg,)`: entries whose column label equals the row's label are
  excluded from the softmax (probability 0, no gradient) unless they are the row's target (DCQ masks
  same-identity queue keys);
- `valid (Bg,)`: rows that take part in the loss (identical on every rank); the loss is the mean
  over valid rows. Invalid rows get no gradient and need no target (they may have no column at all).

Every valid row has exactly one target over all ranks (a `target_col` entry or a masked row column);
the count travels with the target-logit all-reduce and a violation raises ValueError naming the row.

Optional output `top_negatives = h > 0` (hard-negative mining, MutualFace's queue update): pass 1 also
keeps, per row, the h highest negative cosines among this rank's columns with an online per-chunk
top-k merge, into `stats["top_negative_cos"] (Bg, h)` (clamped cosine, descending) and
`stats["top_negative_col"] (Bg, h)` (column in `centers`). The target column, excluded entries and
entries removed by the inter-class filter never count; a row with fewer than h such columns is padded
with -inf / -1. Ties are broken towards the lower column, so the result does not depend on the chunk
size. Cosines only: no communication is added.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.collectives import GatheredRows, all_reduce_
from parallel.host_sync import DeferredErrors, first_true, host_reads_are_cheap
from parallel.kernels import exp_rows_, project_out_rows_, scale_columns_
from parallel.margins import Margin

DEFAULT_CACHE_BYTES = 256 << 20  # pass-1 logits kept for pass 2 (see margin_softmax_loss)
_NEG = -1.0e30  # finite "minus infinity" for running maxima, so exp(m_old - m_new) never sees inf - inf


def accumulation_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def cpu_has_native_bfloat16_gemms() -> bool:
    """True where oneDNN multiplies bfloat16 in hardware (AVX-512 BF16 / AMX). Elsewhere it runs a
    reference kernel far slower than float32 (0.36 vs 25 GFLOP/s on one AVX2 core)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.lru_cache(maxsize=None)
def warn_if_bfloat16_gemms_are_emulated(compute_dtype: torch.dtype, device_type: str) -> None:
    """Says once that bfloat16 GEMMs on this CPU are emulated; the lean storage (bfloat16 rows) keeps
    its memory savings with float32 GEMMs."""
    if compute_dtype != torch.bfloat16 or device_type != "cpu":
        return
    if not cpu_has_native_bfloat16_gemms():
        warnings.warn("head.compute_dtype=bfloat16: this CPU has no native bfloat16 matrix multiply, so the "
                      "head's GEMMs will be far slower than in float32; keep head.storage_dtype=bfloat16 for "
                      "the memory and set head.compute_dtype=float32", stacklevel=3)


@dataclass
class SoftmaxInputs:
    x_global: torch.Tensor
    centers: torch.Tensor
    target_col: torch.Tensor
    row_centers: torch.Tensor | None = None
    row_center_mask: torch.Tensor | None = None
    column_labels: torch.Tensor | None = None
    row_labels: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    center_norms: torch.Tensor | None = None


class _FusedMarginSoftmax(torch.autograd.Function):
    """Loss forward; the gradients are formed during forward and only scaled in backward. With
    `scatter` (GatheredRows), the first input is this rank's x (B, D) and the gradient of x_global was
    reduce-scattered to it during forward."""

    @staticmethod
    def forward(ctx, x_in, centers, row_centers, inputs, margin, group, chunk_size, compute_dtype, stats,
                top_negatives, cache_bytes, errors, center_grad_buffer, scatter):
        need_grad = any(ctx.needs_input_grad[:3])
        ctx.scatter = scatter if ctx.needs_input_grad[0] else None
        loss, grads = fused_margin_softmax(inputs, margin, group, chunk_size, compute_dtype,
                                           need_grad=need_grad, stats=stats, top_negatives=top_negatives,
                                           center_grad=ctx.needs_input_grad[1], cache_bytes=cache_bytes,
                                           errors=errors, center_grad_buffer=center_grad_buffer,
                                           scatter=ctx.scatter)
        ctx.grads = grads
        ctx.dtypes = (x_in.dtype, centers.dtype, row_centers.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # the gradients formed in forward are handed over, scaled in place (no copy of (A, D), no host sync)
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("margin_softmax_loss: backward ran twice through the same forward; its gradients "
                               "were formed in forward and handed out by the first backward (run the forward again)")
        if ctx.scatter is not None:
            grads = (ctx.scatter.wait_scatter(),) + tuple(grads[1:])
        # d loss is 1 when the loss is backpropagated alone: skip a pass over (A, D) where looking is free
        unit = host_reads_are_cheap(grad_loss.device) and bool(grad_loss == 1)
        out = [None if g is None else (g if unit else g.mul_(grad_loss.to(g.dtype))).to(dt)
               for g, dt in zip(grads, ctx.dtypes)]
        del grads
        return (*out, None, None, None, None, None, None, None, None, None, None, None)


def margin_softmax_loss(x_global: torch.Tensor | GatheredRows, centers: torch.Tensor, target_col: torch.Tensor, *,
                        margin: Margin, group=None, chunk_size: int = 8192,
                        compute_dtype: torch.dtype = torch.float32,
                        row_centers: torch.Tensor | None = None, row_center_mask: torch.Tensor | None = None,
                        column_labels: torch.Tensor | None = None, row_labels: torch.Tensor | None = None,
                        valid: torch.Tensor | None = None, stats: dict | None = None,
                        top_negatives: int = 0, cache_bytes: int = DEFAULT_CACHE_BYTES,
                        errors: DeferredErrors | None = None,
                        center_grad_buffer: torch.Tensor | None = None,
                        center_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Mean margin-softmax CE over the global batch, with all ranks' `centers` as the classes.

    Differentiable with respect to `x_global`, `centers` and `row_centers`. See the module docstring.
    `stats`, if given, receives per-row figures of the step (global target logit, log partition) and,
    with `top_negatives = h > 0`, this rank's h hardest negatives of every row. `cache_bytes`: pass 1
    keeps the logits of its chunks up to this size for pass 2, which then skips their GEMM (the last
    chunk is always kept); the result does not depend on it. `errors`: where host reads are not cheap
    (parallel/host_sync.py), a row without exactly one target is reported there (raised at the next
    step) and left out of the loss instead of stopping the step to read the count; without it the
    count is read and the error raised at once. `center_grad_buffer`, optional: a tensor of the centers'
    shape and dtype the centers' gradient is written into (a head recycles the last step's gradient, so
    a shard-sized buffer is not allocated, and page-faulted in, every step); its contents are overwritten.
    It may be `centers` itself (same storage): each chunk of rows is then replaced by its gradient once
    the chunk is done, so a head whose centers are a private copy of its rows holds one (A, D) tensor
    instead of two; `centers` then holds the gradient after the call. `center_norms (A,)`, optional:
    the centers' L2 norms where the caller has them already (measured while gathering the rows), so
    the centers are not read once more for them.

    `x_global` may be the GatheredRows of a gather of this rank's x (parallel/collectives.py): the loss
    is then differentiable with respect to that x, and the reduce-scatter of x_global's gradient
    starts as soon as the gradient is complete, in flight while the centers' gradient is formed (when
    every chunk's logits are kept: otherwise at the end of the call).
    """
    if cache_bytes < 0:
        raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if top_negatives < 0:
        raise ValueError(f"top_negatives must be >= 0, got {top_negatives}")
    if top_negatives and stats is None:
        raise ValueError("top_negatives > 0 needs a stats dict to receive top_negative_cos / top_negative_col")
    scatter = x_global if isinstance(x_global, GatheredRows) else None
    x_in = x_global.local if scatter is not None else x_global
    if scatter is not None:
        x_global = scatter.value
    warn_if_bfloat16_gemms_are_emulated(compute_dtype, x_global.device.type)
    inputs = SoftmaxInputs(x_global.detach(), centers.detach(), target_col,
                           None if row_centers is None else row_centers.detach(), row_center_mask,
                           column_labels, row_labels, valid, center_norms)
    if center_norms is not None and center_norms.shape != (centers.shape[0],):
        raise ValueError(f"center_norms must be ({centers.shape[0]},), got {tuple(center_norms.shape)}")
    if row_centers is None:
        row_centers = x_global.new_empty(0)
    return _FusedMarginSoftmax.apply(x_in, centers, row_centers, inputs, margin, group, chunk_size,
                                     compute_dtype, stats, top_negatives, cache_bytes, errors, center_grad_buffer,
                                     scatter)


def _top_by_value_then_col(values: torch.Tensor, cols: torch.Tensor, k: int):
    """Per row, the k entries of largest value, ties to the lower column: exact and order-free.
    values (N, M) with -inf for empty entries, cols (N, M) long -> (N, k) each, sorted."""
    by_col = torch.argsort(cols, dim=1, stable=True)
    values, cols = values.gather(1, by_col), cols.gather(1, by_col)
    by_value = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), cols.gather(1, by_value)


def _chunk_top_negatives(neg_cos: torch.Tensor, lo: int, k: int):
    """Top-k of one chunk's negative cosines (Bg, c) (-inf where not a negative), ties to the lower
    column: a top-k finds each row's k-th value, a second top-k over a tie-aware priority picks the
    columns. Returns values (Bg, k) and global columns (Bg, k), -1 where the value is -inf."""
    c = neg_cos.shape[1]
    kth = neg_cos.topk(k, dim=1).values[:, -1:]                                   # (Bg, 1)
    col_rank = torch.arange(c, device=neg_cos.device, dtype=torch.float64) / c  # [0, 1)
    priority = torch.where(neg_cos > kth, 2.0,
                           torch.where(neg_cos == kth, 1.0 - col_rank, -1.0).to(torch.float64))
    idx = priority.topk(k, dim=1).indices
    values = neg_cos.gather(1, idx)
    cols = torch.where(torch.isneginf(values), torch.full_like(idx, -1), idx + lo)
    return values, cols


def fused_margin_softmax(inp: SoftmaxInputs, margin: Margin, group, chunk_size: int,
                         compute_dtype: torch.dtype, need_grad: bool = True, stats: dict | None = None,
                         top_negatives: int = 0, center_grad: bool = True, cache_bytes: int = 0,
                         errors: DeferredErrors | None = None, center_grad_buffer: torch.Tensor | None = None,
                         scatter: GatheredRows | None = None):
    """Returns (loss (), (d x_global (Bg, D), d centers (A, D), d row_centers (Bg, D) or None)).
    With `scatter`, d x_global is handed to `scatter.start_scatter` instead (None in the result).

    The gradients are those of the mean loss on this rank's columns (None if not need_grad; d centers
    None if not center_grad). Where host reads are not cheap (parallel/host_sync.py) the step makes
    none: a row without exactly one target is reported through `errors` and left out of the loss.
    """
    x = inp.x_global
    device = x.device
    acc = accumulation_dtype(compute_dtype)
    bg = x.shape[0]
    a = inp.centers.shape[0]
    s = float(margin.scale)
    may_read = host_reads_are_cheap(device)

    x_norm = torch.linalg.vector_norm(x.to(acc), dim=1).clamp_min(1e-12)          # (Bg,)
    x_hat = (x.to(acc) / x_norm[:, None])                                          # (Bg, D) acc
    x_hat_c = x_hat.to(compute_dtype)
    # (A,), a chunk at a time: no full-size copy of low-precision centers
    if inp.center_norms is not None:
        c_norm_inv = inp.center_norms.to(device=device, dtype=acc)
    else:
        c_norm_inv = torch.cat([torch.linalg.vector_norm(inp.centers[lo:lo + chunk_size].to(acc), dim=1)
                                for lo in range(0, a, chunk_size)]) if a else inp.centers.new_empty(0, dtype=acc)
    c_norm_inv = 1.0 / c_norm_inv.clamp_min(1e-12)
    col_scale = c_norm_inv * s          # one multiply turns the GEMM's x_hat . w_j into the logit s cos_ij

    target_col = inp.target_col.to(device=device, dtype=torch.long)
    has_target = target_col >= 0                                                   # (Bg,) on this rank
    with_row_centers = (inp.row_center_mask is not None and inp.row_centers is not None
                        and inp.row_centers.numel() > 0)
    row_mask = (inp.row_center_mask.to(device=device, dtype=torch.bool) if with_row_centers
                else torch.zeros(bg, dtype=torch.bool, device=device))
    valid = (inp.valid.to(device=device, dtype=acc) if inp.valid is not None
             else torch.ones(bg, dtype=acc, device=device))
    exclude = inp.column_labels is not None and inp.row_labels is not None
    if (inp.column_labels is None) != (inp.row_labels is None):
        raise ValueError("column_labels and row_labels go together: pass both or neither")
    if exclude and (inp.column_labels.shape != (a,) or inp.row_labels.shape != (bg,)):
        raise ValueError(f"column_labels must be ({a},) and row_labels ({bg},), got "
                         f"{tuple(inp.column_labels.shape)} and {tuple(inp.row_labels.shape)}")
    if may_read and bool((row_mask & has_target).any()):
        row = int((row_mask & has_target).nonzero()[0, 0])
        raise ValueError(f"row {row} has its target both in row_centers and in column {int(target_col[row])}")
    tau = float(margin.interclass_filter)

    row_max = torch.full((bg,), _NEG, dtype=acc, device=device)
    row_sum = torch.zeros(bg, dtype=acc, device=device)
    target_logit = torch.zeros(bg, dtype=acc, device=device)
    target_dpsi = torch.zeros(bg, dtype=acc, device=device)

    # The per-row extra column (DCQ positive): a dot product per row, not a GEMM.
    if with_row_centers:
        rc = inp.row_centers.to(acc)
        rc_norm_inv = 1.0 / torch.linalg.vector_norm(rc, dim=1).clamp_min(1e-12)
        rc_hat = rc * rc_norm_inv[:, None]
        row_raw = (x_hat_c.to(acc) * rc_hat.to(compute_dtype).to(acc)).sum(1)
        row_cos = row_raw.clamp(-1.0, 1.0)
        psi, dpsi = margin.target(row_cos)
        row_logit = s * psi
        target_logit = torch.where(row_mask, row_logit, target_logit)
        target_dpsi = torch.where(row_mask, dpsi, target_dpsi)
        row_max = torch.where(row_mask, row_logit, row_max)
        row_sum = torch.where(row_mask, torch.ones_like(row_sum), row_sum)

    h = int(top_negatives)
    top_cos = torch.full((bg, h), float("-inf"), dtype=acc, device=device)         # (Bg, h)
    top_col = torch.full((bg, h), -1, dtype=torch.long, device=device)             # (Bg, h)

    chunks = [(lo, min(a, lo + chunk_size)) for lo in range(0, a, chunk_size)]
    # pass-1 results reused by pass 2 (no second GEMM for them): the last chunk always, earlier chunks
    # while their logits fit in `cache_bytes`
    kept: dict[int, tuple] = {}
    kept_bytes = 0
    shifts: list[torch.Tensor] = []   # per chunk (Bg,): a recomputed chunk is shifted alike, bit for bit

    def clear_target(mask, target):
        """mask (Bg, c) bool with each row's target entry cleared (rows whose target is in the chunk)."""
        in_chunk, col = target[0], target[1]
        return mask.scatter_(1, col, mask.gather(1, col) & ~in_chunk[:, None])

    def chunk_logits(lo, hi, want_cos=False):
        """One chunk: logits (Bg, c) acc = s*cos with each row's target entry s*psi, the target figures
        (in_chunk (Bg,), col (Bg, 1) clamped into the chunk, s*psi_t, dpsi_t, all (Bg,),
        meaningful where in_chunk), the masks of clamped (|raw cos| > 1) and filtered entries (None when
        there are none), the chunk's rows `w` and, if asked, the clamped cosines. No host read unless
        cheap: the target entries are gathered and scattered for every row."""
        w = inp.centers[lo:hi].to(compute_dtype)                                   # (c, D), no copy if same
        logits = (x_hat_c @ w.t()).to(acc)                                         # (Bg, c) x_hat . w_j
        value_range = scale_columns_(logits, col_scale[lo:hi]) if may_read else None  # s * raw cos
        if value_range is None:
            logits.mul_(col_scale[lo:hi][None, :])
            if may_read:
                value_range = [float(v) for v in logits.aminmax()]
        clamped = None
        if not may_read or value_range[0] < -s or value_range[1] > s:
            clamped = logits.abs() > s
            logits.clamp_(-s, s)
        cos = logits / s if want_cos else None
        in_chunk = has_target & (target_col >= lo) & (target_col < hi)
        col = (target_col - lo).clamp_(0, hi - lo - 1)[:, None]                    # (Bg, 1)
        logit_t = logits.gather(1, col).squeeze(1)
        cos_t = logit_t / s
        psi, dpsi = margin.target(cos_t)
        psi_t = s * psi
        logits.scatter_(1, col, torch.where(in_chunk, psi_t, logit_t)[:, None])
        target = (in_chunk, col, psi_t, dpsi)
        filtered = None
        if tau > 0:
            filtered = clear_target(logits > tau * s, target)
            logits.masked_fill_(filtered, 0.0)
        if exclude:
            same = clear_target(inp.row_labels[:, None] == inp.column_labels[lo:hi][None, :], target)
            logits.masked_fill_(same, float("-inf"))
        return logits, target, clamped, filtered, w, cos

    # pass 1: online max / sum-exp; target logits from the owning chunk. A chunk's logits become
    # exp(logit - shift) in place, shift (Bg,) being the running row maximum: pass 2 rescales them.
    for i, (lo, hi) in enumerate(chunks):
        logits, target, clamped, filtered, w, cos = chunk_logits(lo, hi, want_cos=bool(h))
        in_chunk, col, psi_t, dpsi = target
        target_logit = torch.where(in_chunk, psi_t, target_logit)
        target_dpsi = torch.where(in_chunk, dpsi, target_dpsi)
        if h:
            # negatives only: logits of -inf are excluded entries, targets and filtered ones never count
            neg = cos.masked_fill_(torch.isneginf(logits), float("-inf"))
            neg.scatter_(1, col, torch.where(in_chunk[:, None], float("-inf"), neg.gather(1, col)))
            if filtered is not None:
                neg.masked_fill_(filtered, float("-inf"))
            v, c = _chunk_top_negatives(neg, lo, min(h, hi - lo))
            top_cos, top_col = _top_by_value_then_col(torch.cat([top_cos, v], 1), torch.cat([top_col, c], 1), h)
        # the exps kept for pass 2 carry its column factor 1 / |w_j| already (the sums do not)
        exps, chunk_sum, shift = exp_rows_(logits, row_max, given_shift=False,
                                           col_scale=c_norm_inv[lo:hi] if need_grad else None)
        row_sum = row_sum * torch.exp(row_max - shift) + chunk_sum
        row_max = shift
        shifts.append(shift)
        if need_grad:
            size = exps.numel() * exps.element_size()
            if i == len(chunks) - 1 or kept_bytes + size <= cache_bytes:
                # a converted chunk of rows (low-precision centers) is cheaper to convert again than to keep
                keep_w = w if (i == len(chunks) - 1 or inp.centers.dtype == compute_dtype) else None
                kept[i] = (exps, target, clamped, filtered, keep_w)
                kept_bytes += size

    global_max = all_reduce_(row_max.clone(), group, op=dist.ReduceOp.MAX)
    global_sum = all_reduce_(row_sum * torch.exp(row_max - global_max), group)
    # target logit and the number of targets of every row, in one all-reduce
    targets = all_reduce_(torch.stack([target_logit, has_target.to(acc) + row_mask.to(acc)]), group)
    global_target, target_count = targets[0], targets[1]
    is_valid = valid > 0
    miscounted = is_valid & (target_count != 1)
    if may_read or errors is None:
        if bool(miscounted.any()):
            row = int(miscounted.nonzero()[0, 0])
            raise ValueError(f"row {row} of the global batch is valid but has {int(target_count[row])} targets "
                             "over all ranks (exactly one expected)")
    else:
        found, row = first_true(miscounted)
        errors.report(found, torch.cat([row.view(1).to(acc), target_count.index_select(0, row.view(1))]), lambda d: ValueError(
            f"row {int(d[0])} of the global batch is valid but has {int(d[1])} targets over all ranks "
            "(exactly one expected); it was left out of that step's loss"))
        valid = torch.where(miscounted, torch.zeros_like(valid), valid)
        is_valid = valid > 0
    log_z = torch.log(global_sum) + global_max
    n_valid = valid.sum().clamp_min(1.0)
    # an invalid row may have no column at all (log_z = -inf): select, never multiply by 0
    per_row = torch.where(is_valid, (log_z - global_target) * valid, torch.zeros_like(log_z))
    loss = per_row.sum() / n_valid
    if stats is not None:
        stats["target_logit"] = global_target.detach()
        stats["log_z"] = log_z.detach()
        if h:
            stats["top_negative_cos"] = top_cos
            stats["top_negative_col"] = top_col
    if not need_grad:
        return loss, (None, None, None)

    # pass 2: probabilities and gradients, last chunk first (its logits are still at hand).
    # d loss / d cos_ij = s * row_weight_i * p_ij, p_ij = exp(logit_ij - max_i) / sum_i; at the target
    # it is (s * row_weight_i * p_ij - s * row_weight_i) * d psi / d cos. With the chunk holding
    # exps_ij = exp(logit_ij - shift_i): g_ij = r_i * exps_ij (targets: times d psi) plus the sparse
    # target term t_i = -s * row_weight_i * d psi_i, where r_i = s * row_weight_i / sum_i * exp(shift_i - max_i).
    # The row factor r goes to the (Bg, D) side of both GEMMs and the target term is O(Bg * D); the
    # column factor 1 / |w_j| was applied by pass 1's exp, so this pass only touches the target entries
    # (and the clamped or filtered ones) of the (Bg, c) chunk before its GEMMs.
    inv_sum = torch.where(global_sum > 0, 1.0 / global_sum, torch.zeros_like(global_sum))
    row_weight = valid / n_valid                                           # (Bg,)
    coef = s * row_weight * inv_sum                                        # (Bg,)
    grad_x_hat = torch.zeros_like(x_hat)                                   # (Bg, D) acc
    # detached columns (DCQ keys, F2C pool slots) need no gradient: skip that GEMM
    # (A, D) in the centers' own dtype: a bfloat16 leaf gets its gradient rounded chunk by chunk
    grad_dtype = inp.centers.dtype if inp.centers.dtype != torch.float16 else acc
    grad_centers = None
    in_place = False   # the gradient overwrites the centers chunk by chunk (see margin_softmax_loss)
    if center_grad:
        reusable = (center_grad_buffer is not None and center_grad_buffer.shape == inp.centers.shape
                    and center_grad_buffer.dtype == grad_dtype and center_grad_buffer.device == device
                    and center_grad_buffer.is_contiguous())
        grad_centers = (center_grad_buffer if reusable
                        else torch.empty(inp.centers.shape, dtype=grad_dtype, device=device))
        in_place = reusable and a > 0 and grad_centers.data_ptr() == inp.centers.data_ptr()
        # a chunk's U is formed beside its rows, which the radial term still reads
        u_chunk = (x.new_empty((min(a, chunk_size), x.shape[1]), dtype=acc)
                   if in_place and grad_dtype == acc == compute_dtype else None)

    def x_gradient(i):
        """Chunk i's share of d x_hat, accumulated into grad_x_hat; returns what its centers' gradient
        needs: gi (Bg, c) in the GEMM dtype, the row factor r (Bg,), the sparse target term (Bg,), the
        target columns (Bg, 1) and the rows w (c, D) in the GEMM dtype."""
        lo, hi = chunks[i]
        if i in kept:
            exps, target, clamped, filtered, w = kept.pop(i)
            if w is None:
                w = inp.centers[lo:hi].to(compute_dtype)
        else:
            logits, target, clamped, filtered, w, _ = chunk_logits(lo, hi)
            exps = exp_rows_(logits, shifts[i], given_shift=True, col_scale=c_norm_inv[lo:hi])[0]
        in_chunk, col, _, _ = target
        r = coef * torch.exp(shifts[i] - global_max)                       # (Bg,)
        dpsi_t = torch.where(in_chunk, target_dpsi, torch.ones_like(target_dpsi))
        exps.scatter_(1, col, exps.gather(1, col) * dpsi_t[:, None])
        sparse = torch.where(in_chunk, -s * row_weight * target_dpsi, torch.zeros_like(target_dpsi))
        if clamped is not None:
            exps.masked_fill_(clamped, 0.0)
            sparse = sparse.masked_fill_(clamped.gather(1, col).squeeze(1), 0.0)
        if filtered is not None:
            exps.masked_fill_(filtered, 0.0)
        # raw_ij = x_hat_i . w_j * inv_j; with gi_ij = g_ij * inv_j: d x_hat_i = sum_j gi_ij w_j and,
        # U_j = sum_i gi_ij x_hat_i, d w_j = U_j - w_j * inv_j^2 * (w_j . U_j)
        inv = c_norm_inv[lo:hi]
        gi = exps.to(compute_dtype)                       # (Bg, c), = g_ij * inv_j since pass 1's exp
        sparse = sparse * inv.gather(0, col.squeeze(1))                     # (Bg,) target term of gi
        w_t = w.index_select(0, col.squeeze(1)).to(acc)                     # (Bg, D) each row's target row
        grad_x_hat.addcmul_(r[:, None], (gi @ w).to(acc)).addcmul_(sparse[:, None], w_t)
        return gi, r, sparse, col, w

    def center_gradient(i, gi, r, sparse, col, w):
        """Chunk i's rows of grad_centers (over the rows themselves when in place)."""
        lo, hi = chunks[i]
        if w is None:
            w = inp.centers[lo:hi].to(compute_dtype)
        inv = c_norm_inv[lo:hi]
        x_r = (x_hat * r[:, None]).to(compute_dtype)                        # (Bg, D)
        if grad_centers.dtype == acc == compute_dtype:
            # (c, D), formed in place (beside the rows when it replaces them)
            u = torch.mm(gi.t(), x_r, out=u_chunk[:hi - lo] if in_place else grad_centers[lo:hi])
        else:
            u = (gi.t() @ x_r).to(acc)
        u.index_add_(0, col.squeeze(1), x_hat * sparse[:, None])            # rows without a target add 0
        if grad_centers.dtype == acc:
            # straight into the gradient: over the rows themselves, over U, or into the separate buffer
            project_out_rows_(u, w.to(acc), inv, out=grad_centers[lo:hi])
        else:
            grad_centers[lo:hi] = project_out_rows_(u, w.to(acc), inv)

    # With a reduce-scatter to start and every chunk's logits kept, d x_global is completed over all
    # chunks first, so the transfer is in flight while the centers' gradient is formed; otherwise one
    # pass does both for each chunk (a chunk formed again costs its GEMM once, not twice).
    overlap = scatter is not None and center_grad and len(kept) == len(chunks)
    done = []
    for i in reversed(range(len(chunks))):
        parts = x_gradient(i)
        if not center_grad:
            continue
        if overlap:   # a converted copy of the rows is not kept for later: converting again is cheaper
            gi, r, sparse, col, w = parts
            done.append((i, (gi, r, sparse, col, w if w.dtype == inp.centers.dtype else None)))
        else:
            center_gradient(i, *parts)
    grad_row = None
    if with_row_centers:
        p_row = torch.exp(target_logit - global_max) * inv_sum
        g_row = (p_row - 1.0) * row_weight * s * target_dpsi * row_mask
        g_row = g_row * ((row_raw >= -1.0) & (row_raw <= 1.0))
        grad_x_hat += g_row[:, None] * rc_hat
        gr = g_row[:, None] * x_hat                                          # d rc_hat
        grad_row = (gr - rc_hat * (rc_hat * gr).sum(1, keepdim=True)) * rc_norm_inv[:, None]
    grad_x = (grad_x_hat - x_hat * (x_hat * grad_x_hat).sum(1, keepdim=True)) / x_norm[:, None]
    if scatter is not None:
        scatter.start_scatter(grad_x)
        grad_x = None
    for i, parts in done:
        center_gradient(i, *parts)
    return loss, (grad_x, grad_centers, grad_row)
