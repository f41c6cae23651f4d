"""Fused CPU kernels for the head's memory-bound steps, built on first use (torch's C++ extension
loader, cached under ~/.cache/torch_extensions like DeepSpeed's own CPU ops).

- `gather_rows_`: the active rows gathered with their L2 norms in the same pass (the softmax needs
  both; PyTorch reads the copy a second time for the norms);
- `sgd_rows_`: the sparse SGD update of the active rows in one pass per row (read the gradient, the
  row and its momentum; write both back), where the plain PyTorch path gathers the block's momentum,
  runs the update over the copies and scatters rows and momentum back;
- `project_out_rows_`: u_j -= w_j * inv_j^2 * (w_j . u_j), the normalization's radial term of the
  centers' gradient, one pass per row instead of a product, a sum and a multiply-add over (c, D);
- `scale_columns_` and `exp_rows_`: the softmax's pass 1 over a (Bg, c) chunk, scale by s / |w_j| with
  the range of the result (the clamp test), then row max, exp(logit - max) in place (times a column
  factor, pass 2's 1 / |w_j|, so pass 2 need not go over the chunk for it) and row sum, with each row
  in L1 (the vector exp is SLEEF's, the one torch's own exp calls), where PyTorch makes two and four
  passes over the chunk;
- `select_rows_`: Partial FC's choice of active rows in one ascending pass (sequential selection
  sampling over the uniform draws already made), where PyTorch ranks them with top-k and sorts.

Each has the PyTorch expression it replaces beside it (used on other devices and dtypes, when the
build is not possible, or with SHARDFACE_CPU_KERNELS=0); the tests check the two agree. Arithmetic
order is that of torch.optim.SGD; the compiler may fuse a multiply and an add (one rounding instead of
two), so results agree to the last bit or two, not bit for bit.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <type_traits>
#include <vector>

template <typename T>
static void sgd_rows_impl(T* weight, T* momentum, const int64_t* index, const T* grad, const T* values,
                          int64_t n, int64_t d, T lr, T mu, T wd) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + 2 < end) {  // the rows two ahead: random rows defeat the hardware prefetcher
        for (int64_t k = 0; k < d; k += 64 / sizeof(T)) {
          __builtin_prefetch(weight + index[i + 2] * d + k, 1);
          __builtin_prefetch(momentum + index[i + 2] * d + k, 1);
        }
      }
      T* w = weight + index[i] * d;
      T* __restrict__ m = momentum + index[i] * d;
      const T* __restrict__ g = grad + i * d;
      const T* v = values ? values + i * d : w;
#pragma GCC ivdep
      for (int64_t k = 0; k < d; ++k) {
        T dp = g[k] + wd * v[k];
        T mk = mu * m[k] + dp;
        m[k] = mk;
        w[k] = v[k] - lr * mk;
      }
    }
  });
}

template <typename T>
static void gather_rows_impl(const T* src, const int64_t* index, T* out, T* norms, int64_t n, int64_t d) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (i + 2 < end) {
        for (int64_t k = 0; k < d; k += 64 / sizeof(T)) __builtin_prefetch(src + index[i + 2] * d + k, 0);
      }
      const T* __restrict__ s = src + index[i] * d;
      T* __restrict__ o = out + i * d;
      T ss = 0;
#pragma omp simd reduction(+:ss)
      for (int64_t k = 0; k < d; ++k) {
        const T v = s[k];
        o[k] = v;
        ss += v * v;
      }
      norms[i] = std::sqrt(ss);
    }
  });
}

// out_i = src[index_i] for every i, with norms_i = |out_i| from the same pass
void gather_rows_(torch::Tensor src, torch::Tensor index, torch::Tensor out, torch::Tensor norms) {
  TORCH_CHECK(src.is_contiguous() && index.is_contiguous() && out.is_contiguous() && norms.is_contiguous()
              && src.dim() == 2 && index.scalar_type() == at::kLong && index.dim() == 1
              && out.size(0) == index.size(0) && out.size(1) == src.size(1) && norms.size(0) == index.size(0),
              "gather_rows_: shapes");
  const int64_t n = index.size(0), rows = src.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "gather_rows_: row ", idx[i], " out of range");
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "gather_rows_", [&] {
    TORCH_CHECK(out.scalar_type() == src.scalar_type() && norms.scalar_type() == src.scalar_type(),
                "gather_rows_: dtypes");
    gather_rows_impl<scalar_t>(src.data_ptr<scalar_t>(), idx, out.data_ptr<scalar_t>(), norms.data_ptr<scalar_t>(),
                               n, src.size(1));
  });
}

void sgd_rows_(torch::Tensor weight, torch::Tensor momentum, torch::Tensor index, torch::Tensor grad,
               c10::optional<torch::Tensor> values, double lr, double mu, double wd) {
  TORCH_CHECK(weight.is_contiguous() && momentum.is_contiguous() && grad.is_contiguous() && index.is_contiguous(),
              "sgd_rows_: contiguous tensors expected");
  TORCH_CHECK(weight.sizes() == momentum.sizes() && weight.dim() == 2, "sgd_rows_: weight and momentum differ");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && grad.size(0) == index.size(0)
              && grad.size(1) == weight.size(1), "sgd_rows_: index (A,) and grad (A, D) expected");
  const int64_t n = index.size(0), d = weight.size(1), rows = weight.size(0);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, "sgd_rows_: row ", idx[i], " out of range");
  if (values.has_value()) TORCH_CHECK(values->is_contiguous() && values->sizes() == grad.sizes(), "sgd_rows_: values");
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "sgd_rows_", [&] {
    TORCH_CHECK(momentum.scalar_type() == weight.scalar_type() && grad.scalar_type() == weight.scalar_type()
                && (!values.has_value() || values->scalar_type() == weight.scalar_type()), "sgd_rows_: dtypes differ");
    sgd_rows_impl<scalar_t>(weight.data_ptr<scalar_t>(), momentum.data_ptr<scalar_t>(), idx,
                            grad.data_ptr<scalar_t>(), values.has_value() ? values->data_ptr<scalar_t>() : nullptr,
                            n, d, (scalar_t)lr, (scalar_t)mu, (scalar_t)wd);
  });
}

template <typename T>
static void project_impl(const T* u, const T* w, const T* inv, T* out, int64_t c, int64_t d) {
  // out may be u or w: each element is read before its own position is written, nothing else
  at::parallel_for(0, c, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T* uj = u + j * d;
      const T* wj = w + j * d;
      T* oj = out + j * d;
      T dot = 0;
#pragma omp simd reduction(+:dot)
      for (int64_t k = 0; k < d; ++k) dot += wj[k] * uj[k];
      const T f = dot * inv[j] * inv[j];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) oj[k] = uj[k] - wj[k] * f;
    }
  });
}

// --- pass 1 of the softmax over one (Bg, c) chunk ----------------------------------------------------
extern "C" __m256 Sleef_expf8_u10avx2(__m256);   // exported by libtorch_cpu (what torch's exp uses)

template <typename T>
static void scale_columns_impl(T* p, const T* __restrict__ sc, int64_t rows, int64_t c, double& lo, double& hi) {
  T mn = INFINITY, mx = -INFINITY;
  for (int64_t i = 0; i < rows; ++i) {
    T* __restrict__ r = p + i * c;
#pragma omp simd reduction(min:mn) reduction(max:mx)
    for (int64_t k = 0; k < c; ++k) {
      T v = r[k] * sc[k];
      r[k] = v;
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
    }
  }
  lo = mn;
  hi = mx;
}

// l *= col_scale (per column); returns (min, max) of the result
std::vector<double> scale_columns_(torch::Tensor l, torch::Tensor col_scale) {
  TORCH_CHECK(l.is_contiguous() && col_scale.is_contiguous() && l.dim() == 2 && col_scale.size(0) == l.size(1),
              "scale_columns_: shapes");
  double lo = INFINITY, hi = -INFINITY;
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "scale_columns_", [&] {
    TORCH_CHECK(col_scale.scalar_type() == l.scalar_type(), "scale_columns_: dtypes");
    scale_columns_impl<scalar_t>(l.data_ptr<scalar_t>(), col_scale.data_ptr<scalar_t>(), l.size(0), l.size(1), lo, hi);
  });
  return {lo, hi};
}

template <typename T>
static T exp_shift_row(T* row, int64_t n, T shift, const T* __restrict__ sc) {
  // row_k = exp(row_k - shift) (times sc_k when sc is given); returns the sum of the exps (unscaled)
  T total = 0;
  int64_t k = 0;
  if constexpr (std::is_same<T, float>::value) {
    const __m256 vs = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= n; k += 8) {
      __m256 v = Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(row + k), vs));
      acc = _mm256_add_ps(acc, v);
      _mm256_storeu_ps(row + k, sc ? _mm256_mul_ps(v, _mm256_loadu_ps(sc + k)) : v);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int q = 0; q < 8; ++q) total += lanes[q];
  }
  for (; k < n; ++k) {
    T e = std::exp(row[k] - shift);
    row[k] = sc ? e * sc[k] : e;
    total += e;
  }
  return total;
}

template <typename T>
static void exp_rows_impl(T* p, T* sh, T* su, const T* sc, int64_t rows, int64_t c, bool given_shift) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* r = p + i * c;
      if (!given_shift) {
        T m = sh[i];
#pragma omp simd reduction(max:m)
        for (int64_t k = 0; k < c; ++k) m = r[k] > m ? r[k] : m;
        sh[i] = m;
      }
      su[i] = exp_shift_row<T>(r, c, sh[i], sc);
    }
  });
}

// per row i: shift_i = max(prev_i, max_j l_ij) (or the given shift), l_ij = exp(l_ij - shift_i), sum_i;
// then l_ij *= col_scale_j when col_scale is not empty (the sums are of the unscaled exps)
void exp_rows_(torch::Tensor l, torch::Tensor shift, torch::Tensor sums, bool given_shift, torch::Tensor col_scale) {
  TORCH_CHECK(l.is_contiguous() && l.dim() == 2 && shift.is_contiguous() && sums.is_contiguous()
              && shift.size(0) == l.size(0) && sums.size(0) == l.size(0), "exp_rows_: shapes");
  const bool scaled = col_scale.numel() > 0;
  TORCH_CHECK(!scaled || (col_scale.is_contiguous() && col_scale.dim() == 1 && col_scale.size(0) == l.size(1)),
              "exp_rows_: col_scale shape");
  AT_DISPATCH_FLOATING_TYPES(l.scalar_type(), "exp_rows_", [&] {
    TORCH_CHECK(shift.scalar_type() == l.scalar_type() && sums.scalar_type() == l.scalar_type()
                && (!scaled || col_scale.scalar_type() == l.scalar_type()), "exp_rows_: dtypes");
    exp_rows_impl<scalar_t>(l.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), sums.data_ptr<scalar_t>(),
                            scaled ? col_scale.data_ptr<scalar_t>() : nullptr, l.size(0), l.size(1), given_shift);
  });
}

void project_out_rows_(torch::Tensor u, torch::Tensor w, torch::Tensor inv, torch::Tensor out) {
  TORCH_CHECK(u.is_contiguous() && w.is_contiguous() && inv.is_contiguous() && out.is_contiguous()
              && u.sizes() == w.sizes() && out.sizes() == u.sizes()
              && u.dim() == 2 && inv.dim() == 1 && inv.size(0) == u.size(0), "project_out_rows_: shapes");
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "project_out_rows_", [&] {
    TORCH_CHECK(w.scalar_type() == u.scalar_type() && inv.scalar_type() == u.scalar_type()
                && out.scalar_type() == u.scalar_type(), "project_out_rows_: dtypes");
    project_impl<scalar_t>(u.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), inv.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), u.size(0), u.size(1));
  });
}
// Partial FC's selection in one ascending pass (sequential selection sampling): the rows marked >= 2
// (positives, hard negatives) are taken, and each other row i, whose priority p_i is its own uniform
// draw in [0, 1), is taken with probability needed / remaining, so the k - forced negatives are a
// uniform sample without replacement and come out sorted. An empty result when more than k are marked.
torch::Tensor select_rows_(torch::Tensor priority, int64_t k) {
  TORCH_CHECK(priority.is_contiguous() && priority.dim() == 1 && priority.scalar_type() == torch::kFloat,
              "select_rows_: priority must be a contiguous float32 vector");
  const float* p = priority.data_ptr<float>();
  const int64_t n = priority.numel();
  int64_t forced = 0;
  for (int64_t i = 0; i < n; ++i) forced += p[i] >= 2.0f;
  if (forced > k || k > n) return torch::empty({0}, priority.options().dtype(torch::kLong));
  auto rows = torch::empty({k}, priority.options().dtype(torch::kLong));
  int64_t* out = rows.data_ptr<int64_t>();
  int64_t needed = k - forced, remaining = n - forced, taken = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] >= 2.0f) {
      out[taken++] = i;
    } else {
      if (static_cast<double>(p[i]) * static_cast<double>(remaining) < static_cast<double>(needed)) {
        out[taken++] = i;
        --needed;
      }
      --remaining;
    }
  }
  return rows;
}
"""


@functools.lru_cache(maxsize=1)
def _module():
    """The built extension, or None (disabled, or the build failed: said once)."""
    if os.environ.get("SHARDFACE_CPU_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None   # the kernels are built for AVX2
    try:
        from torch.utils.cpp_extension import load_inline
        return load_inline(name="shardface_cpu_kernels", cpp_sources=_SOURCE,
                           functions=["gather_rows_", "sgd_rows_", "project_out_rows_", "scale_columns_", "exp_rows_",
                                      "select_rows_"],
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp-simd"], verbose=False)
    except Exception as e:  # noqa: BLE001 - any build problem means the PyTorch path
        warnings.warn(f"shardface CPU kernels could not be built ({type(e).__name__}: {e}); using the PyTorch "
                      "path (slower optimizer step and center gradient)", stacklevel=2)
        return None


def _usable(*tensors: torch.Tensor) -> bool:
    return (all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and tensors[0].dtype in (torch.float32, torch.float64)
            and all(t.dtype == tensors[0].dtype for t in tensors if t.is_floating_point())
            and _module() is not None)


def gather_rows_(source: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """out (A, D) = source[index (A,)], returning the rows' L2 norms (A,) from the same pass; None where
    the kernel does not apply (nothing written: the caller gathers and measures with PyTorch)."""
    if (not _usable(source, out) or index.device.type != "cpu" or index.dtype != torch.long
            or source.dim() != 2 or out.shape != (index.numel(), source.shape[1])):
        return None
    norms = out.new_empty(index.numel())
    _module().gather_rows_(source, index.contiguous(), out, norms)
    return norms


def sgd_rows_(weight: torch.Tensor, momentum: torch.Tensor, index: torch.Tensor, grad: torch.Tensor,
              values: torch.Tensor | None, lr: float, momentum_factor: float, weight_decay: float) -> bool:
    """In place, rows `index (A,)` (unique): d_p = grad + wd * w; m = mu * m + d_p; w = w - lr * m, with w
    read from `values (A, D)` when given (the rows as the caller holds them). False if not applicable
    (the caller runs its PyTorch path)."""
    tensors = [weight, momentum, grad] + ([values] if values is not None else [])
    if not _usable(*tensors) or index.device.type != "cpu":
        return False
    _module().sgd_rows_(weight, momentum, index.contiguous(), grad, values, float(lr), float(momentum_factor),
                        float(weight_decay))
    return True


def select_rows_(priority: torch.Tensor, k: int) -> torch.Tensor | None:
    """Sorted (k,) rows of `priority (C_r,)`: every row marked >= 2 and a uniform sample without
    replacement of the others (whose priority is their uniform draw in [0, 1)); None where the kernel
    does not apply or more than k rows are marked (the caller ranks with top-k)."""
    if priority.device.type != "cpu" or priority.dtype != torch.float32 or _module() is None:
        return None
    rows = _module().select_rows_(priority.contiguous(), int(k))
    return rows if rows.numel() == k else None


def scale_columns_(logits: torch.Tensor, col_scale: torch.Tensor) -> tuple[float, float] | None:
    """logits (N, c) *= col_scale (c,) in place, returning (min, max) of the result in the same pass; None
    where the kernel does not apply (the caller multiplies with PyTorch and looks for itself)."""
    if not _usable(logits, col_scale):
        return None
    lowest, highest = _module().scale_columns_(logits, col_scale)
    return lowest, highest


def exp_rows_(logits: torch.Tensor, shift: torch.Tensor, given_shift: bool,
              col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row i of logits (N, c), in place: shift'_i = max(shift_i, max_j logits_ij) (shift'_i =
    shift_i if `given_shift`), logits_ij = exp(logits_ij - shift'_i), times col_scale_j (c,) if given.
    Returns (the exps, i.e. logits; the row sums of the unscaled exps (N,); shift' (N,), a new tensor:
    `shift` is not modified)."""
    if _usable(logits, shift) and (col_scale is None or _usable(logits, col_scale)):
        out_shift = shift.clone()
        sums = torch.empty_like(shift)
        _module().exp_rows_(logits, out_shift, sums, bool(given_shift),
                            logits.new_empty(0) if col_scale is None else col_scale)
        return logits, sums, out_shift
    if not given_shift:
        shift = torch.maximum(shift, logits.amax(dim=1))
    exps = logits.sub_(shift[:, None]).exp_()
    sums = exps.sum(dim=1)
    if col_scale is not None:
        exps.mul_(col_scale[None, :])
    return exps, sums, shift


def project_out_rows_(u: torch.Tensor, w: torch.Tensor, inv: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """out_j = u_j - w_j * inv_j^2 * (w_j . u_j) for every row j; `out` defaults to u (in place) and may
    also be w (the rows are overwritten by their gradient) or a third tensor; returns out."""
    out = u if out is None else out
    if _usable(u, w, inv, out):
        _module().project_out_rows_(u, w, inv, out)
        return out
    radial = torch.linalg.vecdot(w, u).mul_(inv * inv)
    return torch.addcmul(u, w, radial[:, None], value=-1.0, out=out)
