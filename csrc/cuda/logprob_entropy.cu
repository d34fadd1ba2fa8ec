// CUDA kernels for the log-prob + entropy ("lpe") op family. Contract: ../logprob_entropy.h.
//
// Per row, with x = logit * inv_temp in acc_t (double for fp64 logits, float otherwise), one
// streaming pass over the vocabulary keeps an online state
//   m = running max of x,  s = sum exp(x - m),  w = sum exp(x - m) * (x - m)   (0 * -inf := 0)
// per thread, merged across threads (warp shuffles, then shared memory) and across vocab chunks.
// A side of a merge is rescaled by exp(m_side - m') only if its s > 0, so fully masked (-inf)
// parts never produce -inf - -inf = NaN. Then
//   lse = m + log s,  entropy = log s - w / s,  logprob = x[label] - lse.
// The label's logit is read by one guarded load, only if 0 <= label - v_offset < C.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../logprob_entropy.h"
#include "common.cuh"
#include "stream.h"

namespace axpo {
namespace lpe {
namespace {

constexpr int kWarpSize = 32;
// Forward: one block per row. 512 threads x 16-byte loads = 4096 bf16 (8 KiB) per sweep: enough
// bytes in flight per SM to stream a 150k vocabulary row at bandwidth with few blocks.
constexpr int kFwdThreads = 512;
// Backward: elementwise; one 16-byte vector per thread per tile.
constexpr int kBwdThreads = 256;
constexpr int kMaxGridY = 65535;

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
struct OnlineState {
  acc_t m;  // running max of x
  acc_t s;  // sum exp(x - m)
  acc_t w;  // sum exp(x - m) * (x - m)
};

// Merges b into a. A side with s == 0 contributes nothing (its m may be -inf).
template <typename acc_t, bool COMPUTE_ENTROPY>
__device__ __forceinline__ void merge_state(OnlineState<acc_t>& a, const OnlineState<acc_t>& b) {
  const acc_t m = fmax(a.m, b.m);
  acc_t s = 0;
  acc_t w = 0;
  // alpha == 1 (no exp) whenever the side already holds the max: the common case.
  if (a.s > 0) {
    const acc_t alpha = a.m == m ? acc_t(1) : acc_exp(a.m - m);
    s += alpha * a.s;
    if constexpr (COMPUTE_ENTROPY) w += alpha * (a.w + a.s * (a.m - m));
  }
  if (b.s > 0) {
    const acc_t alpha = b.m == m ? acc_t(1) : acc_exp(b.m - m);
    s += alpha * b.s;
    if constexpr (COMPUTE_ENTROPY) w += alpha * (b.w + b.s * (b.m - m));
  }
  a.m = m;
  a.s = s;
  if constexpr (COMPUTE_ENTROPY) a.w = w;
}

// Folds N values of x into st: the values form a mini-tile with max mt; one exp per value plus
// one rescale of the old state per tile.
template <typename acc_t, bool COMPUTE_ENTROPY, int N>
__device__ __forceinline__ void update_state(OnlineState<acc_t>& st, const acc_t (&x)[N]) {
  acc_t mt = x[0];
#pragma unroll
  for (int i = 1; i < N; ++i) mt = fmax(mt, x[i]);
  if (mt == neg_inf<acc_t>()) return;  // all -inf: contributes nothing
  OnlineState<acc_t> t{mt, 0, 0};
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (x[i] != neg_inf<acc_t>()) {  // exp(-inf - mt) = 0, and 0 * -inf must count as 0
      const acc_t d = x[i] - mt;
      const acc_t e = acc_exp(d);
      t.s += e;
      if constexpr (COMPUTE_ENTROPY) t.w += e * d;
    }
  }
  merge_state<acc_t, COMPUTE_ENTROPY>(st, t);
}

template <typename acc_t>
__device__ __forceinline__ OnlineState<acc_t> shfl_xor_state(const OnlineState<acc_t>& st,
                                                             int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, st.m, lane_mask),
          __shfl_xor_sync(0xffffffffu, st.s, lane_mask),
          __shfl_xor_sync(0xffffffffu, st.w, lane_mask)};
}

// Block-wide merge; the result is valid in thread 0. blockDim.x must be a multiple of 32.
template <typename acc_t, bool COMPUTE_ENTROPY, int NUM_THREADS>
__device__ __forceinline__ OnlineState<acc_t> block_merge(OnlineState<acc_t> st) {
  constexpr int kNumWarps = NUM_THREADS / kWarpSize;
  __shared__ OnlineState<acc_t> warp_states[kNumWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    merge_state<acc_t, COMPUTE_ENTROPY>(st, shfl_xor_state(st, offset));
  }
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kNumWarps ? warp_states[lane] : OnlineState<acc_t>{neg_inf<acc_t>(), 0, 0};
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      merge_state<acc_t, COMPUTE_ENTROPY>(st, shfl_xor_state(st, offset));
    }
  }
  return st;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) VecT {
  scalar_t v[VEC];
};

// Forward over one chunk of the vocabulary; one block per row.
//   CHUNK == false: the row is the whole vocabulary; starts from the empty state and writes
//                   (logprob, entropy, lse) to out.
//   CHUNK == true:  folds the chunk into state (read and written in place).
template <typename scalar_t, typename acc_t, bool COMPUTE_ENTROPY, bool CHUNK>
__global__ void __launch_bounds__(kFwdThreads) lpe_fwd_kernel(
    const scalar_t* __restrict__ logits,  // [n_rows, n_cols], row stride stride_row
    const int64_t* __restrict__ labels,   // [n_rows] global vocab ids
    acc_t* __restrict__ state,            // [4, n_rows] (m, s, w, xl), in/out; CHUNK only
    acc_t* __restrict__ out,              // [3, n_rows] (logprob, entropy, lse); !CHUNK only
    const int64_t n_rows, const int64_t n_cols, const int64_t stride_row,
    const int64_t v_offset, const acc_t inv_temp, const int64_t ignore_index) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  using vec_t = VecT<scalar_t, VEC>;
  const int64_t row = blockIdx.x;
  const scalar_t* row_ptr = logits + row * stride_row;

  OnlineState<acc_t> st{neg_inf<acc_t>(), 0, 0};

  // Scalar head up to the first 16-byte boundary, vectorized body, scalar tail.
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row_ptr);
  int64_t head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(scalar_t));
  if (addr % sizeof(scalar_t) != 0 || head > n_cols) head = n_cols;  // unaligned: all scalar
  const int64_t n_vec = (n_cols - head) / VEC;
  const int64_t tail_start = head + n_vec * VEC;

  for (int64_t j = threadIdx.x; j < head; j += kFwdThreads) {
    const acc_t x[1] = {static_cast<acc_t>(row_ptr[j]) * inv_temp};
    update_state<acc_t, COMPUTE_ENTROPY, 1>(st, x);
  }
  const vec_t* vec_ptr = reinterpret_cast<const vec_t*>(row_ptr + head);
  for (int64_t i = threadIdx.x; i < n_vec; i += kFwdThreads) {
    const vec_t v = vec_ptr[i];
    acc_t x[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = static_cast<acc_t>(v.v[k]) * inv_temp;
    update_state<acc_t, COMPUTE_ENTROPY, VEC>(st, x);
  }
  for (int64_t j = tail_start + threadIdx.x; j < n_cols; j += kFwdThreads) {
    const acc_t x[1] = {static_cast<acc_t>(row_ptr[j]) * inv_temp};
    update_state<acc_t, COMPUTE_ENTROPY, 1>(st, x);
  }

  st = block_merge<acc_t, COMPUTE_ENTROPY, kFwdThreads>(st);
  if (threadIdx.x != 0) return;

  const int64_t label = labels[row];
  const int64_t rel = label - v_offset;
  acc_t xl = std::numeric_limits<acc_t>::quiet_NaN();
  if constexpr (CHUNK) {
    const OnlineState<acc_t> prev{state[row], state[n_rows + row], state[2 * n_rows + row]};
    xl = state[3 * n_rows + row];
    merge_state<acc_t, COMPUTE_ENTROPY>(st, prev);
  }
  if (rel >= 0 && rel < n_cols) xl = static_cast<acc_t>(row_ptr[rel]) * inv_temp;

  if constexpr (CHUNK) {
    state[row] = st.m;
    state[n_rows + row] = st.s;
    if constexpr (COMPUTE_ENTROPY) state[2 * n_rows + row] = st.w;
    state[3 * n_rows + row] = xl;
  } else {
    const acc_t log_s = acc_log(st.s);
    const acc_t lse = st.m + log_s;
    out[row] = label == ignore_index ? acc_t(0) : xl - lse;
    out[n_rows + row] = COMPUTE_ENTROPY ? log_s - st.w / st.s : acc_t(0);
    out[2 * n_rows + row] = lse;
  }
}

template <typename acc_t, bool HAS_ENTROPY_GRAD>
__device__ __forceinline__ acc_t lpe_grad(acc_t x, bool is_label, acc_t lse, acc_t g_lp,
                                          acc_t entropy, acc_t g_h) {
  const acc_t lp = x - lse;
  const acc_t p = acc_exp(lp);
  acc_t dx = g_lp * ((is_label ? acc_t(1) : acc_t(0)) - p);
  if constexpr (HAS_ENTROPY_GRAD) {
    const acc_t t = p > 0 ? p * (lp + entropy) : acc_t(0);
    dx -= g_h * t;
  }
  return dx;
}

// Backward over one chunk; grid (rows, vocab tiles with a grid-stride loop). Elementwise: each
// element is read, then written at the same index by the same thread, so grad_logits may alias
// logits (hence no __restrict__ on those two).
template <typename scalar_t, typename acc_t, bool HAS_ENTROPY_GRAD>
__global__ void __launch_bounds__(kBwdThreads) lpe_bwd_kernel(
    const scalar_t* logits,                     // [n_rows, n_cols], row stride stride_row
    const int64_t* __restrict__ labels,         // [n_rows] global vocab ids
    const acc_t* __restrict__ lse,              // [n_rows]
    const acc_t* __restrict__ entropy,          // [n_rows]; read only if HAS_ENTROPY_GRAD
    const acc_t* __restrict__ grad_logprob,     // [n_rows]
    const acc_t* __restrict__ grad_entropy,     // [n_rows]; read only if HAS_ENTROPY_GRAD
    scalar_t* grad_logits,                      // [n_rows, n_cols], row stride grad_stride_row
    const int64_t n_cols, const int64_t stride_row, const int64_t grad_stride_row,
    const int64_t v_offset, const acc_t inv_temp, const int64_t ignore_index) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  constexpr int64_t kTile = static_cast<int64_t>(kBwdThreads) * VEC;
  using vec_t = VecT<scalar_t, VEC>;
  const int64_t row = blockIdx.x;
  const scalar_t* in_row = logits + row * stride_row;
  scalar_t* out_row = grad_logits + row * grad_stride_row;

  const int64_t label = labels[row];
  const int64_t label_col = label - v_offset;  // may lie outside [0, n_cols): then never matches
  const acc_t row_lse = lse[row];
  const acc_t g_lp = label == ignore_index ? acc_t(0) : grad_logprob[row];
  acc_t row_entropy = 0;
  acc_t g_h = 0;
  if constexpr (HAS_ENTROPY_GRAD) {
    row_entropy = entropy[row];
    g_h = grad_entropy[row];
  }

  const bool aligned = reinterpret_cast<uintptr_t>(in_row) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out_row) % 16 == 0;
  for (int64_t tile_start = static_cast<int64_t>(blockIdx.y) * kTile; tile_start < n_cols;
       tile_start += static_cast<int64_t>(gridDim.y) * kTile) {
    const int64_t j0 = tile_start + static_cast<int64_t>(threadIdx.x) * VEC;
    if (aligned && j0 + VEC <= n_cols) {
      const vec_t v = *reinterpret_cast<const vec_t*>(in_row + j0);
      vec_t g;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t x = static_cast<acc_t>(v.v[k]) * inv_temp;
        const acc_t dx = lpe_grad<acc_t, HAS_ENTROPY_GRAD>(x, j0 + k == label_col, row_lse, g_lp,
                                                            row_entropy, g_h);
        g.v[k] = static_cast<scalar_t>(dx * inv_temp);
      }
      *reinterpret_cast<vec_t*>(out_row + j0) = g;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int64_t j = j0 + k;
        if (j < n_cols) {
          const acc_t x = static_cast<acc_t>(in_row[j]) * inv_temp;
          const acc_t dx = lpe_grad<acc_t, HAS_ENTROPY_GRAD>(x, j == label_col, row_lse, g_lp,
                                                              row_entropy, g_h);
          out_row[j] = static_cast<scalar_t>(dx * inv_temp);
        }
      }
    }
  }
}

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, const char* fn) {
  TORCH_CHECK(logits.is_cuda(), fn, ": logits must be a CUDA tensor, got device ",
              logits.device());
  TORCH_CHECK(logits.dim() == 2, fn, ": logits must be 2-D [N, C], got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
              fn, ": logits must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, fn,
              ": logits must have stride(1) == 1, got strides ", logits.strides());
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= logits.size(1), fn,
              ": logits rows must not overlap (stride(0) >= C), got strides ", logits.strides(),
              " for shape ", logits.sizes());
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), fn,
              ": logits must have at most 2^31 - 1 rows, got ", logits.size(0));
  TORCH_CHECK(labels.device() == logits.device(), fn, ": labels must be on ", logits.device(),
              " like logits, got ", labels.device());
  TORCH_CHECK(labels.scalar_type() == at::kLong, fn, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), fn,
              ": labels must have shape [N] = [", logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.is_contiguous(), fn, ": labels must be contiguous, got strides ",
              labels.strides());
}

void check_row_vector(const at::Tensor& t, const char* name, const at::Tensor& logits,
                      const char* fn) {
  const auto acc = acc_scalar_type(logits.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), fn, ": ", name, " must be on ", logits.device(),
              " like logits, got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc, fn, ": ", name, " must have dtype ", acc,
              " (accumulation dtype of ", logits.scalar_type(), " logits), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), fn, ": ", name,
              " must have shape [N] = [", logits.size(0), "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), fn, ": ", name, " must be contiguous, got strides ",
              t.strides());
}

template <typename scalar_t, bool CHUNK>
void launch_fwd(const at::Tensor& logits, const at::Tensor& labels, int64_t v_offset,
                double inv_temp, int64_t ignore_index, at::Tensor* state, at::Tensor* out,
                bool compute_entropy) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t n_rows = logits.size(0);
  const int64_t n_cols = logits.size(1);
  if (n_rows == 0) return;
  AxpoCudaDeviceGuard guard(logits.get_device());
  const cudaStream_t stream = axpo_current_cuda_stream(logits.get_device());
  const dim3 grid(static_cast<unsigned>(n_rows));
  const dim3 block(kFwdThreads);
  acc_t* state_ptr = CHUNK ? state->data_ptr<acc_t>() : nullptr;
  acc_t* out_ptr = CHUNK ? nullptr : out->data_ptr<acc_t>();
  const auto* logits_ptr = logits.const_data_ptr<scalar_t>();
  const auto* labels_ptr = labels.const_data_ptr<int64_t>();
  const int64_t stride_row = logits.stride(0);
  if (compute_entropy) {
    lpe_fwd_kernel<scalar_t, acc_t, true, CHUNK><<<grid, block, 0, stream>>>(
        logits_ptr, labels_ptr, state_ptr, out_ptr, n_rows, n_cols, stride_row, v_offset,
        static_cast<acc_t>(inv_temp), ignore_index);
  } else {
    lpe_fwd_kernel<scalar_t, acc_t, false, CHUNK><<<grid, block, 0, stream>>>(
        logits_ptr, labels_ptr, state_ptr, out_ptr, n_rows, n_cols, stride_row, v_offset,
        static_cast<acc_t>(inv_temp), ignore_index);
  }
  axpo::check_launch("lpe_fwd_kernel");
}

}  // namespace
}  // namespace lpe
}  // namespace axpo

// AT_DISPATCH names the element type scalar_t: at::Half / at::BFloat16 (converted to and from
// float on the device by c10), float or double.
at::Tensor lpe_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels, double inv_temp,
                        int64_t ignore_index, bool compute_entropy) {
  using namespace axpo::lpe;
  check_logits_labels(logits, labels, "lpe_fwd_cuda");
  at::Tensor out = at::empty({3, logits.size(0)},
                             logits.options().dtype(acc_scalar_type(logits.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "lpe_fwd_cuda",
                                  [&] {
                                    launch_fwd<scalar_t, false>(logits, labels, 0, inv_temp,
                                                                ignore_index, nullptr, &out,
                                                                compute_entropy);
                                  });
  return out;
}

void lpe_fwd_chunk_cuda(const at::Tensor& logits, const at::Tensor& labels, int64_t v_offset,
                        double inv_temp, at::Tensor& state, bool compute_entropy) {
  using namespace axpo::lpe;
  check_logits_labels(logits, labels, "lpe_fwd_chunk_cuda");
  const auto acc = acc_scalar_type(logits.scalar_type());
  TORCH_CHECK(state.device() == logits.device(), "lpe_fwd_chunk_cuda: state must be on ",
              logits.device(), " like logits, got ", state.device());
  TORCH_CHECK(state.scalar_type() == acc, "lpe_fwd_chunk_cuda: state must have dtype ", acc,
              " (accumulation dtype of ", logits.scalar_type(), " logits), got ",
              state.scalar_type());
  TORCH_CHECK(state.dim() == 2 && state.size(0) == 4 && state.size(1) == logits.size(0),
              "lpe_fwd_chunk_cuda: state must have shape [4, N] = [4, ", logits.size(0),
              "], got ", state.sizes());
  TORCH_CHECK(state.is_contiguous(), "lpe_fwd_chunk_cuda: state must be contiguous, got strides ",
              state.strides());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "lpe_fwd_chunk_cuda", [&] {
                                    launch_fwd<scalar_t, true>(logits, labels, v_offset, inv_temp,
                                                               0, &state, nullptr,
                                                               compute_entropy);
                                  });
}

void lpe_bwd_cuda(const at::Tensor& logits, const at::Tensor& labels, int64_t v_offset,
                  double inv_temp, int64_t ignore_index, const at::Tensor& lse,
                  const at::Tensor& entropy, const at::Tensor& grad_logprob,
                  const at::Tensor& grad_entropy, bool has_entropy_grad, at::Tensor& grad_logits) {
  using namespace axpo::lpe;
  constexpr const char* fn = "lpe_bwd_cuda";
  check_logits_labels(logits, labels, fn);
  check_row_vector(lse, "lse", logits, fn);
  check_row_vector(grad_logprob, "grad_logprob", logits, fn);
  if (has_entropy_grad) {
    check_row_vector(entropy, "entropy", logits, fn);
    check_row_vector(grad_entropy, "grad_entropy", logits, fn);
  }
  TORCH_CHECK(grad_logits.device() == logits.device(), fn, ": grad_logits must be on ",
              logits.device(), " like logits, got ", grad_logits.device());
  TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), fn,
              ": grad_logits must have the dtype of logits (", logits.scalar_type(), "), got ",
              grad_logits.scalar_type());
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), fn, ": grad_logits must have shape ",
              logits.sizes(), " like logits, got ", grad_logits.sizes());
  TORCH_CHECK(grad_logits.size(1) <= 1 || grad_logits.stride(1) == 1, fn,
              ": grad_logits must have stride(1) == 1, got strides ", grad_logits.strides());

  const int64_t n_rows = logits.size(0);
  const int64_t n_cols = logits.size(1);
  if (n_rows == 0 || n_cols == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), fn, [&] {
    using acc_t = typename AccType<scalar_t>::type;
    constexpr int64_t kTile = static_cast<int64_t>(kBwdThreads) * (16 / sizeof(scalar_t));
    const int64_t n_tiles = (n_cols + kTile - 1) / kTile;
    const dim3 grid(static_cast<unsigned>(n_rows),
                    static_cast<unsigned>(n_tiles < kMaxGridY ? n_tiles : kMaxGridY));
    const dim3 block(kBwdThreads);
    AxpoCudaDeviceGuard guard(logits.get_device());
    const cudaStream_t stream = axpo_current_cuda_stream(logits.get_device());
    const auto* logits_ptr = logits.const_data_ptr<scalar_t>();
    const auto* labels_ptr = labels.const_data_ptr<int64_t>();
    const auto* lse_ptr = lse.const_data_ptr<acc_t>();
    const auto* glp_ptr = grad_logprob.const_data_ptr<acc_t>();
    auto* grad_ptr = grad_logits.mutable_data_ptr<scalar_t>();
    if (has_entropy_grad) {
      lpe_bwd_kernel<scalar_t, acc_t, true><<<grid, block, 0, stream>>>(
          logits_ptr, labels_ptr, lse_ptr, entropy.const_data_ptr<acc_t>(), glp_ptr,
          grad_entropy.const_data_ptr<acc_t>(), grad_ptr, n_cols, logits.stride(0),
          grad_logits.stride(0), v_offset, static_cast<acc_t>(inv_temp), ignore_index);
    } else {
      lpe_bwd_kernel<scalar_t, acc_t, false><<<grid, block, 0, stream>>>(
          logits_ptr, labels_ptr, lse_ptr, nullptr, glp_ptr, nullptr, grad_ptr, n_cols,
          logits.stride(0), grad_logits.stride(0), v_offset, static_cast<acc_t>(inv_temp),
          ignore_index);
    }
    axpo::check_launch("lpe_bwd_kernel");
  });
}
