// Per-token log-prob + entropy on the CPU: one streaming pass over each row (see ../logprob_entropy.h).
//
// Each row is walked in L1-sized tiles: the tile is converted to the accumulation type into a
// stack buffer (scaled by 1/T), reduced (max, then sum exp and sum exp * (x - max)) with loops
// the compiler vectorizes, and merged into the row's running state. Rows are split over
// threads with at::parallel_for. The float path uses a polynomial exp that vectorizes (a libm
// call would not); hot functions are compiled for AVX-512, AVX2 and baseline x86-64 and picked
// at load time (target_clones), so the wheel runs on any x86-64 CPU.
#include "../logprob_entropy.h"
#include "../registry.h"
#include "fast_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>


namespace {

constexpr int64_t kTile = 2048;  // elements per tile: 8 KiB of fp32, stays in L1

// exp for the accumulation type. float: the vectorizable polynomial; -inf and anything below
// the smallest normal result give exactly 0, NaN propagates (NaN * 0). Written with selects on
// the argument and a 0 / 1 factor, not a select on the result: GCC 12 does not if-convert a
// select of the polynomial's result, and that one select kept the whole loop scalar (measured:
// ~9 ns per element instead of ~1 on AVX-512).
AXPO_CPU_INLINE float exp_acc(float x) {
  const float xc = x < -87.f ? -87.f : x;
  return axpo::cpu::exp_clamped(xc) * (x >= -87.33654f ? 1.f : 0.f);
}
AXPO_CPU_INLINE double exp_acc(double x) { return std::exp(x); }

// x floored where exp_acc(x) is 0, so that exp_acc(x) * floored(x) is 0 (not 0 * -inf = NaN)
// without a select on the product (which would keep the loop scalar, as above).
AXPO_CPU_INLINE float floored(float x) { return x < -88.f ? -88.f : x; }
AXPO_CPU_INLINE double floored(double x) { return x < -746.0 ? -746.0 : x; }

template <typename acc_t>
struct RowState {
  acc_t m = -std::numeric_limits<acc_t>::infinity();  // running max of x
  acc_t s = 0;                                        // sum exp(x - m)
  acc_t w = 0;                                        // sum exp(x - m) * (x - m)

  // Merges a tile's (mt, st, wt). A side with s == 0 contributes nothing: this keeps
  // -inf - -inf out of the arithmetic when whole tiles or rows are masked.
  AXPO_CPU_INLINE void merge(acc_t mt, acc_t st, acc_t wt) {
    if (st == 0) return;
    if (s == 0) { m = mt; s = st; w = wt; return; }
    const acc_t mn = m > mt ? m : mt;
    const acc_t a = exp_acc(m - mn), b = exp_acc(mt - mn);
    w = a * (w + s * (m - mn)) + b * (wt + st * (mt - mn));
    s = a * s + b * st;
    m = mn;
  }
};

template <typename scalar_t, typename acc_t>
AXPO_CPU_INLINE void load_scaled(const scalar_t* src, acc_t* dst, int64_t n, acc_t inv_temp) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]) * inv_temp;
}

// Folds one row's chunk [0, n) into st. Returns nothing: state is in/out.
template <typename scalar_t, typename acc_t, bool kEntropy>
AXPO_CPU_INLINE void fold_row(const scalar_t* row, int64_t n, acc_t inv_temp, RowState<acc_t>& st) {
  alignas(64) acc_t buf[kTile];
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t len = n - t0 < kTile ? n - t0 : kTile;
    load_scaled(row + t0, buf, len, inv_temp);
    acc_t mt = neg_inf;
#pragma omp simd reduction(max : mt)
    for (int64_t j = 0; j < len; ++j) mt = buf[j] > mt ? buf[j] : mt;
    if (mt == neg_inf) continue;  // the whole tile is masked
    acc_t s = 0, w = 0;
    if constexpr (kEntropy) {
#pragma omp simd reduction(+ : s, w)
      for (int64_t j = 0; j < len; ++j) {
        const acc_t d = buf[j] - mt;
        const acc_t e = exp_acc(d);
        s += e;
        w += e * floored(d);  // 0 where e is 0 (0 * -inf would be NaN)
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < len; ++j) s += exp_acc(buf[j] - mt);
    }
    st.merge(mt, s, w);
  }
}

template <typename scalar_t, typename acc_t>
AXPO_CPU_INLINE acc_t label_x(const scalar_t* row, int64_t label, int64_t v_offset, int64_t n,
                     acc_t inv_temp) {
  const int64_t j = label - v_offset;
  if (j < 0 || j >= n) return std::numeric_limits<acc_t>::quiet_NaN();
  return static_cast<acc_t>(row[j]) * inv_temp;
}

// Full rows: logprob, entropy, lse for rows [begin, end).
template <typename scalar_t, typename acc_t, bool kEntropy>
AXPO_CPU_INLINE void fwd_rows(const scalar_t* logits,  // [N, V], row stride `stride`
                     const int64_t* labels,   // [N]
                     acc_t* out,              // [3, N]
                     int64_t N, int64_t V, int64_t stride, acc_t inv_temp,
                     int64_t ignore_index, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* row = logits + i * stride;
    RowState<acc_t> st;
    fold_row<scalar_t, acc_t, kEntropy>(row, V, inv_temp, st);
    const acc_t log_s = std::log(st.s);
    const acc_t lse = st.m + log_s;
    const int64_t y = labels[i];
    out[i] = y == ignore_index ? acc_t(0) : label_x(row, y, 0, V, inv_temp) - lse;
    out[N + i] = kEntropy ? log_s - st.w / st.s : acc_t(0);
    out[2 * N + i] = lse;
  }
}

// One vocab chunk: update state [4, N] (m, s, w, xl) for rows [begin, end).
template <typename scalar_t, typename acc_t, bool kEntropy>
AXPO_CPU_INLINE void chunk_rows(const scalar_t* logits,  // [N, C], row stride `stride`
                       const int64_t* labels,   // [N]
                       acc_t* state,            // [4, N]
                       int64_t N, int64_t C, int64_t stride, int64_t v_offset,
                       acc_t inv_temp, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* row = logits + i * stride;
    RowState<acc_t> st{state[i], state[N + i], state[2 * N + i]};
    fold_row<scalar_t, acc_t, kEntropy>(row, C, inv_temp, st);
    state[i] = st.m;
    state[N + i] = st.s;
    state[2 * N + i] = st.w;
    const int64_t j = labels[i] - v_offset;
    if (j >= 0 && j < C) state[3 * N + i] = static_cast<acc_t>(row[j]) * inv_temp;
  }
}

template <typename scalar_t, typename acc_t, bool kEntropyGrad>
AXPO_CPU_INLINE void bwd_rows(const scalar_t* logits,   // [N, C], row stride `stride`
                     const int64_t* labels,    // [N]
                     const acc_t* lse,         // [N]
                     const acc_t* entropy,     // [N]
                     const acc_t* g_lp,        // [N]
                     const acc_t* g_ent,       // [N]
                     scalar_t* grad,           // [N, C], row stride `gstride`; may alias logits
                     int64_t C, int64_t stride, int64_t gstride, int64_t v_offset,
                     acc_t inv_temp, int64_t ignore_index, int64_t begin, int64_t end) {
  alignas(64) acc_t buf[kTile];
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* row = logits + i * stride;
    scalar_t* grow = grad + i * gstride;
    const int64_t y = labels[i];
    const acc_t glp = y == ignore_index ? acc_t(0) : g_lp[i];
    const acc_t gh = kEntropyGrad ? g_ent[i] : acc_t(0);
    const acc_t h = kEntropyGrad ? entropy[i] : acc_t(0);
    const acc_t l = lse[i];
    const int64_t jy = y - v_offset;
    // Read before the row is overwritten (grad may alias logits).
    const acc_t xy = (jy >= 0 && jy < C) ? static_cast<acc_t>(row[jy]) * inv_temp : acc_t(0);
    for (int64_t t0 = 0; t0 < C; t0 += kTile) {
      const int64_t len = C - t0 < kTile ? C - t0 : kTile;
      load_scaled(row + t0, buf, len, inv_temp);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const acc_t lp = buf[j] - l;
        const acc_t p = exp_acc(lp);
        acc_t g = -glp * p;
        if constexpr (kEntropyGrad) g -= gh * (p * (floored(lp) + h));
        buf[j] = g * inv_temp;
      }
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) grow[t0 + j] = static_cast<scalar_t>(buf[j]);
    }
    if (jy >= 0 && jy < C) {
      const acc_t lp = xy - l;
      const acc_t p = exp_acc(lp);
      acc_t g = glp * (acc_t(1) - p);
      if constexpr (kEntropyGrad) g -= gh * (p * (floored(lp) + h));
      grow[jy] = static_cast<scalar_t>(g * inv_temp);
    }
  }
}

// Non-template entry points carry the ISA clones; the templates above inline into each clone.
#define AXPO_LPE_INSTANTIATE(NAME, scalar_t, acc_t)                                              \
  AXPO_CPU_CLONES void fwd_##NAME(const scalar_t* x, const int64_t* y, acc_t* o, int64_t N,      \
                                  int64_t V, int64_t st, acc_t it, int64_t ig, bool ent,         \
                                  int64_t b, int64_t e) {                                        \
    if (ent) fwd_rows<scalar_t, acc_t, true>(x, y, o, N, V, st, it, ig, b, e);                   \
    else fwd_rows<scalar_t, acc_t, false>(x, y, o, N, V, st, it, ig, b, e);                      \
  }                                                                                              \
  AXPO_CPU_CLONES void chunk_##NAME(const scalar_t* x, const int64_t* y, acc_t* s, int64_t N,    \
                                    int64_t C, int64_t st, int64_t vo, acc_t it, bool ent,       \
                                    int64_t b, int64_t e) {                                      \
    if (ent) chunk_rows<scalar_t, acc_t, true>(x, y, s, N, C, st, vo, it, b, e);                 \
    else chunk_rows<scalar_t, acc_t, false>(x, y, s, N, C, st, vo, it, b, e);                    \
  }                                                                                              \
  AXPO_CPU_CLONES void bwd_##NAME(const scalar_t* x, const int64_t* y, const acc_t* l,           \
                                  const acc_t* h, const acc_t* glp, const acc_t* gh,             \
                                  scalar_t* g, int64_t C, int64_t st, int64_t gst, int64_t vo,   \
                                  acc_t it, int64_t ig, bool eg, int64_t b, int64_t e) {         \
    if (eg) bwd_rows<scalar_t, acc_t, true>(x, y, l, h, glp, gh, g, C, st, gst, vo, it, ig, b, e); \
    else bwd_rows<scalar_t, acc_t, false>(x, y, l, h, glp, gh, g, C, st, gst, vo, it, ig, b, e);   \
  }                                                                                              \
  inline void fwd_dispatch(const scalar_t* x, const int64_t* y, acc_t* o, int64_t N, int64_t V, \
                           int64_t st, acc_t it, int64_t ig, bool ent, int64_t b, int64_t e) {   \
    fwd_##NAME(x, y, o, N, V, st, it, ig, ent, b, e);                                           \
  }                                                                                              \
  inline void chunk_dispatch(const scalar_t* x, const int64_t* y, acc_t* s, int64_t N,          \
                             int64_t C, int64_t st, int64_t vo, acc_t it, bool ent, int64_t b,  \
                             int64_t e) {                                                        \
    chunk_##NAME(x, y, s, N, C, st, vo, it, ent, b, e);                                         \
  }                                                                                              \
  inline void bwd_dispatch(const scalar_t* x, const int64_t* y, const acc_t* l, const acc_t* h, \
                           const acc_t* glp, const acc_t* gh, scalar_t* g, int64_t C,            \
                           int64_t st, int64_t gst, int64_t vo, acc_t it, int64_t ig, bool eg,   \
                           int64_t b, int64_t e) {                                               \
    bwd_##NAME(x, y, l, h, glp, gh, g, C, st, gst, vo, it, ig, eg, b, e);                       \
  }

AXPO_LPE_INSTANTIATE(f32, float, float)
AXPO_LPE_INSTANTIATE(f64, double, double)
AXPO_LPE_INSTANTIATE(bf16, c10::BFloat16, float)
AXPO_LPE_INSTANTIATE(f16, c10::Half, float)

// Rows per parallel task: enough work per task to amortize the scheduling.
inline int64_t grain_rows(int64_t row_len) {
  const int64_t g = (int64_t(1) << 16) / (row_len > 0 ? row_len : 1);
  return g > 1 ? g : 1;
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), name, " must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, name, " must be 2-D [N, C], got shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, name,
              " must have unit stride in the vocab dim, got strides ", logits.strides());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()) &&
                  logits.scalar_type() != at::kFloat8_e4m3fn,
              name, " must be fp16, bf16, fp32 or fp64, got ", logits.scalar_type());
}

void check_vec(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor lpe_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, double inv_temp,
                       int64_t ignore_index, bool compute_entropy) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "logits must have a non-empty vocab dim, got shape ", logits.sizes());
  check_vec(labels, "labels", N, at::kLong);
  auto out = at::empty({3, N}, logits.options().dtype(acc_type(logits.scalar_type())));
  if (N == 0) return out;
  const int64_t stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "lpe_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t b, int64_t e) {
      fwd_dispatch(x, y, o, N, V, stride, static_cast<acc_t>(inv_temp), ignore_index,
                   compute_entropy, b, e);
    });
  });
  return out;
}

void lpe_fwd_chunk_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t v_offset,
                       double inv_temp, at::Tensor& state, bool compute_entropy) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0), C = logits.size(1);
  check_vec(labels, "labels", N, at::kLong);
  const auto acc = acc_type(logits.scalar_type());
  TORCH_CHECK(state.device().is_cpu() && state.dim() == 2 && state.size(0) == 4 &&
                  state.size(1) == N && state.scalar_type() == acc && state.is_contiguous(),
              "state must be a contiguous CPU tensor [4, ", N, "] of ", acc, ", got ",
              state.sizes(), " ", state.scalar_type());
  if (N == 0 || C == 0) return;
  const int64_t stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "lpe_fwd_chunk_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    acc_t* s = state.data_ptr<acc_t>();
    at::parallel_for(0, N, grain_rows(C), [&](int64_t b, int64_t e) {
      chunk_dispatch(x, y, s, N, C, stride, v_offset, static_cast<acc_t>(inv_temp),
                     compute_entropy, b, e);
    });
  });
}

void lpe_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t v_offset,
                 double inv_temp, int64_t ignore_index, const at::Tensor& lse,
                 const at::Tensor& entropy, const at::Tensor& grad_logprob,
                 const at::Tensor& grad_entropy, bool has_entropy_grad, at::Tensor& grad_logits) {
  check_logits(logits, "logits");
  const int64_t N = logits.size(0), C = logits.size(1);
  const auto acc = acc_type(logits.scalar_type());
  check_vec(labels, "labels", N, at::kLong);
  check_vec(lse, "lse", N, acc);
  check_vec(grad_logprob, "grad_logprob", N, acc);
  if (has_entropy_grad) {
    check_vec(entropy, "entropy", N, acc);
    check_vec(grad_entropy, "grad_entropy", N, acc);
  }
  TORCH_CHECK(grad_logits.device().is_cpu() && grad_logits.sizes() == logits.sizes() &&
                  grad_logits.scalar_type() == logits.scalar_type() &&
                  (C <= 1 || grad_logits.stride(1) == 1),
              "grad_logits must be a CPU tensor like logits ", logits.sizes(), " ",
              logits.scalar_type(), " with unit vocab stride, got ", grad_logits.sizes(), " ",
              grad_logits.scalar_type(), " strides ", grad_logits.strides());
  if (N == 0 || C == 0) return;
  const int64_t stride = logits.stride(0), gstride = grad_logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "lpe_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    const acc_t* l = lse.data_ptr<acc_t>();
    const acc_t* h = has_entropy_grad ? entropy.data_ptr<acc_t>() : nullptr;
    const acc_t* glp = grad_logprob.data_ptr<acc_t>();
    const acc_t* gh = has_entropy_grad ? grad_entropy.data_ptr<acc_t>() : nullptr;
    scalar_t* g = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(C), [&](int64_t b, int64_t e) {
      bwd_dispatch(x, y, l, h, glp, gh, g, C, stride, gstride, v_offset,
                   static_cast<acc_t>(inv_temp), ignore_index, has_entropy_grad, b, e);
    });
  });
}

AXPO_BIND(logprob_entropy) {
  m.def("lpe_fwd_cpu", &lpe_fwd_cpu, "log-prob + entropy forward, full rows (CPU)");
  m.def("lpe_fwd_chunk_cpu", &lpe_fwd_chunk_cpu, "log-prob + entropy: fold a vocab chunk (CPU)");
  m.def("lpe_bwd_cpu", &lpe_bwd_cpu, "log-prob + entropy backward over a vocab chunk (CPU)");
#ifdef AXPO_WITH_CUDA
  m.def("lpe_fwd_cuda", &lpe_fwd_cuda, "log-prob + entropy forward, full rows (CUDA)");
  m.def("lpe_fwd_chunk_cuda", &lpe_fwd_chunk_cuda, "log-prob + entropy: fold a vocab chunk (CUDA)");
  m.def("lpe_bwd_cuda", &lpe_bwd_cuda, "log-prob + entropy backward over a vocab chunk (CUDA)");
#endif
}
