// CUDA kernels of the policy-loss ("pl") op family. Contract: ../policy_loss.h; the same math,
// tie rules and NaN behaviour as csrc/cpu/policy_loss.cpp and kernels/policy_loss.py.
//
//   pl_fwd_kernel: grid (B, tiles of kTile tokens), one block per tile; each block reduces the 8
//                  per-token statistics of its tile (block tree reduction, no atomics: the result
//                  is deterministic) into partial[8, B, tiles]; the host sums over tiles.
//   pl_bwd_kernel: one thread per token (grid over B x T), the gradient from g[2, B].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../policy_loss.h"
#include "../policy_loss_args.h"
#include "common.cuh"
#include "stream.h"

namespace axpo {
namespace pl {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 2048;  // tokens per forward block: 8 per thread

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
struct Consts {
  acc_t lo, hi, c;  // 1 - clip_low, 1 + clip_high, clip_ratio_c (dual clip)
  bool tis;         // rollout correction 2: pg weighed by min(exp(old - roll), cap)
  acc_t cap;
};

// The rollout-correction weight of a token: min(exp(lr), cap) under TIS, else 1 (NaN stays NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t rollout_weight(acc_t lr, const Consts<acc_t>& k, bool* truncated) {
  const acc_t rr = exp_acc(lr);
  *truncated = k.tis && rr > k.cap;
  return k.tis ? (rr > k.cap ? k.cap : rr) : acc_t(1);
}

// The loss pieces of one token (../policy_loss.h); `dual`: dual clip on.
template <typename acc_t>
struct Token {
  acc_t dc, r, na, pg1, pg2, c1, pg3, pg;
  bool in_clamp, neg;

  __device__ __forceinline__ Token(acc_t lp, acc_t old, acc_t a, const Consts<acc_t>& k, bool dual) {
    const acc_t d = lp - old;
    in_clamp = d >= acc_t(-20) && d <= acc_t(20);
    dc = d < acc_t(-20) ? acc_t(-20) : (d > acc_t(20) ? acc_t(20) : d);  // NaN stays NaN
    r = exp_acc(dc);
    na = -a;
    pg1 = na * r;
    const acc_t rc = r < k.lo ? k.lo : (r > k.hi ? k.hi : r);
    pg2 = na * rc;
    c1 = pg2 > pg1 ? pg2 : pg1;  // torch.maximum; a NaN pg1 is kept
    neg = a < acc_t(0);
    pg = c1;
    pg3 = acc_t(0);
    if (dual) {
      pg3 = na * k.c;
      const acc_t c2 = pg3 < c1 ? pg3 : c1;  // torch.min(pg3, c1); a NaN c1 is kept
      pg = neg ? c2 : c1;
    }
  }

  // d pg / d logp with autograd's tie rules (clamp inclusive, max / min halves).
  __device__ __forceinline__ acc_t grad(const Consts<acc_t>& k, bool dual) const {
    const bool tie = pg1 == pg2;
    const acc_t g1 = pg1 > pg2 ? acc_t(1) : (tie ? acc_t(0.5) : acc_t(0));
    const acc_t g2 = pg2 > pg1 ? acc_t(1) : (tie ? acc_t(0.5) : acc_t(0));
    const bool in_r = r >= k.lo && r <= k.hi;
    acc_t gc1 = acc_t(1);
    if (dual && neg) gc1 = c1 < pg3 ? acc_t(1) : (c1 == pg3 ? acc_t(0.5) : acc_t(0));
    const acc_t dr = gc1 * (g1 * na + (in_r ? g2 * na : acc_t(0)));
    return in_clamp ? dr * r : acc_t(0);
  }
};

// kl (kKl = 1, 2, 3, 4: k1, k2, k3, k3 * r) and its derivative w.r.t. logp.
template <typename acc_t, int kKl>
__device__ __forceinline__ acc_t kl_value(acc_t lp, acc_t ref, acc_t r) {
  if constexpr (kKl == 1) return lp - ref;
  if constexpr (kKl == 2) { const acc_t x = lp - ref; return acc_t(0.5) * (x * x); }
  if constexpr (kKl == 3 || kKl == 4) {
    const acc_t x = ref - lp;
    const acc_t k3 = exp_acc(x) - x - acc_t(1);
    return kKl == 4 ? k3 * r : k3;
  }
  return acc_t(0);
}
template <typename acc_t, int kKl>
__device__ __forceinline__ acc_t kl_grad(acc_t lp, acc_t ref, acc_t r, bool in_clamp) {
  if constexpr (kKl == 1) return acc_t(1);
  if constexpr (kKl == 2) return lp - ref;
  if constexpr (kKl == 3) return acc_t(1) - exp_acc(ref - lp);
  if constexpr (kKl == 4) {
    const acc_t x = ref - lp;
    const acc_t e = exp_acc(x);
    return (acc_t(1) - e) * r + (in_clamp ? (e - x - acc_t(1)) * r : acc_t(0));
  }
  return acc_t(0);
}

template <typename scalar_t, typename acc_t, int kKl, bool kCorr>
__global__ void __launch_bounds__(kThreads) pl_fwd_kernel(
    // data pointers
    Ptrs p,            // logp [B, T] scalar_t; old / adv / ref / roll [B, T] acc_t; mask [B, T] uint8
    acc_t* partial,    // [kPlStats, B, tiles] per-tile sums
    // shapes / strides
    int64_t B, int64_t tiles, int64_t s_adv_t,  // s_adv_t: adv's column stride (0 or 1)
    // constants
    Consts<acc_t> k, bool dual) {
  const int64_t b = blockIdx.x, tile = blockIdx.y;
  const scalar_t* lp_row = static_cast<const scalar_t*>(p.logp) + b * p.s_logp;
  const acc_t* old_row = static_cast<const acc_t*>(p.old) + b * p.s_old;
  const acc_t* adv_row = static_cast<const acc_t*>(p.adv) + b * p.s_adv;
  const uint8_t* m_row = p.mask + b * p.s_mask;
  const acc_t* ref_row = static_cast<const acc_t*>(p.ref) + b * p.s_ref;
  const acc_t* roll_row = static_cast<const acc_t*>(p.roll) + b * p.s_roll;
  acc_t sums[kPlStats];
#pragma unroll
  for (int q = 0; q < kPlStats; ++q) sums[q] = acc_t(0);
  const int64_t t_end = min(p.T, (tile + 1) * int64_t(kTile));
  for (int64_t t = tile * int64_t(kTile) + threadIdx.x; t < t_end; t += kThreads) {
    if (m_row[t] == 0) continue;  // masked tokens are never combined with anything
    const acc_t lp = static_cast<acc_t>(lp_row[t]);
    const acc_t a = adv_row[t * s_adv_t];
    const Token<acc_t> tok(lp, old_row[t], a, k, dual);
    const bool clipped = tok.pg2 > tok.pg1;
    acc_t w = acc_t(1);
    if constexpr (kCorr) {
      const acc_t lr = old_row[t] - roll_row[t];
      bool truncated;
      w = rollout_weight(lr, k, &truncated);
      sums[9] += truncated ? acc_t(1) : acc_t(0);
      sums[10] += lr;
    }
    sums[8] += w;
    sums[0] += tok.pg * w;
    if constexpr (kKl != 0) sums[1] += kl_value<acc_t, kKl>(lp, ref_row[t], tok.r);
    sums[2] += acc_t(1);
    sums[3] += clipped && tok.neg ? acc_t(1) : acc_t(0);
    sums[4] += clipped && a > acc_t(0) ? acc_t(1) : acc_t(0);
    sums[5] += dual && tok.c1 > tok.pg3 && tok.neg ? acc_t(1) : acc_t(0);
    sums[6] -= tok.dc;
    sums[7] += tok.r;
  }
  __shared__ acc_t smem[kPlStats][kThreads];
#pragma unroll
  for (int q = 0; q < kPlStats; ++q) smem[q][threadIdx.x] = sums[q];
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
#pragma unroll
      for (int q = 0; q < kPlStats; ++q) smem[q][threadIdx.x] += smem[q][threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x < kPlStats) {
    partial[(threadIdx.x * B + b) * tiles + tile] = smem[threadIdx.x][0];
  }
}

template <typename scalar_t, typename acc_t, int kKl, bool kCorr>
__global__ void __launch_bounds__(kThreads) pl_bwd_kernel(
    // data pointers
    Ptrs p,            // as in pl_fwd_kernel
    const acc_t* g,    // [2, B]: g_pg, g_kl
    scalar_t* grad,    // [B, T] row stride s_grad
    // shapes / strides
    int64_t B, int64_t s_adv_t, int64_t s_grad,
    // constants
    Consts<acc_t> k, bool dual) {
  const int64_t b = blockIdx.y;
  const int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= p.T) return;
  scalar_t* out = grad + b * s_grad + t;
  if (static_cast<const uint8_t*>(p.mask)[b * p.s_mask + t] == 0) {
    *out = static_cast<scalar_t>(acc_t(0));
    return;
  }
  const acc_t lp = static_cast<acc_t>(static_cast<const scalar_t*>(p.logp)[b * p.s_logp + t]);
  const acc_t old = static_cast<const acc_t*>(p.old)[b * p.s_old + t];
  const acc_t a = static_cast<const acc_t*>(p.adv)[b * p.s_adv + t * s_adv_t];
  const Token<acc_t> tok(lp, old, a, k, dual);
  acc_t dpg = tok.grad(k, dual);
  if constexpr (kCorr) {
    bool truncated;
    dpg *= rollout_weight(old - static_cast<const acc_t*>(p.roll)[b * p.s_roll + t], k, &truncated);
  }
  acc_t d = g[b] * dpg;
  if constexpr (kKl != 0) {
    const acc_t ref = static_cast<const acc_t*>(p.ref)[b * p.s_ref + t];
    d += g[B + b] * kl_grad<acc_t, kKl>(lp, ref, tok.r, tok.in_clamp);
  }
  *out = static_cast<scalar_t>(d);
}

// Calls f(std::integral_constant<int, KL>, std::bool_constant<CORR>) for the runtime
// kl_estimator (0..4) and whether the rollout log-probs are read.
template <typename F>
void with_kl(int kl, bool corr, F&& f) {
  auto go = [&](auto kk) {
    if (corr) f(kk, std::true_type{});
    else f(kk, std::false_type{});
  };
  switch (kl) {
    case 1: go(std::integral_constant<int, 1>{}); break;
    case 2: go(std::integral_constant<int, 2>{}); break;
    case 3: go(std::integral_constant<int, 3>{}); break;
    case 4: go(std::integral_constant<int, 4>{}); break;
    default: go(std::integral_constant<int, 0>{}); break;
  }
}

}  // namespace
}  // namespace pl
}  // namespace axpo

at::Tensor pl_fwd_cuda(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                       const at::Tensor& mask, const at::Tensor& ref, double lo, double hi,
                       double dual_c, int64_t kl_estimator, const at::Tensor& roll, int64_t corr,
                       double cap) {
  using namespace axpo::pl;
  const Prepared pr = prepare(logp, old, adv, mask, ref, kl_estimator, roll, corr, cap, at::kCUDA);
  const auto acc = pl_acc_type(logp.scalar_type());
  AxpoCudaDeviceGuard guard(logp.get_device());
  if (pr.B == 0 || pr.T == 0) return at::zeros({kPlStats, pr.B}, logp.options().dtype(acc));
  TORCH_CHECK(pr.B < (int64_t(1) << 31), "logp must have fewer than 2**31 rows, got ", pr.B);
  const int64_t tiles = (pr.T + kTile - 1) / kTile;
  TORCH_CHECK(tiles <= 65535, "logp must have at most ", 65535 * int64_t(kTile), " columns, got ", pr.T);
  auto partial = at::empty({kPlStats, pr.B, tiles}, logp.options().dtype(acc));
  const bool dual = dual_c > 0;
  const int64_t s_adv_t = pr.adv_row ? 0 : 1;
  const cudaStream_t stream = axpo_current_cuda_stream(logp.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logp.scalar_type(), "pl_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Consts<acc_t> k{static_cast<acc_t>(lo), static_cast<acc_t>(hi),
                          static_cast<acc_t>(dual ? dual_c : 0.0), corr == 2, static_cast<acc_t>(cap)};
    with_kl(pr.kl, corr != 0, [&](auto kl, auto with_roll) {
      pl_fwd_kernel<scalar_t, acc_t, decltype(kl)::value, decltype(with_roll)::value>
          <<<dim3(static_cast<unsigned>(pr.B), static_cast<unsigned>(tiles)), kThreads, 0, stream>>>(
              pr.p, partial.data_ptr<acc_t>(), pr.B, tiles, s_adv_t, k, dual);
      axpo::check_launch("pl_fwd_cuda: pl_fwd_kernel");
    });
  });
  return partial.sum(-1);
}

void pl_bwd_cuda(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                 const at::Tensor& mask, const at::Tensor& ref, double lo, double hi, double dual_c,
                 int64_t kl_estimator, const at::Tensor& roll, int64_t corr, double cap,
                 const at::Tensor& g, at::Tensor& grad_logp) {
  using namespace axpo::pl;
  const Prepared pr = prepare(logp, old, adv, mask, ref, kl_estimator, roll, corr, cap, at::kCUDA);
  const auto acc = pl_acc_type(logp.scalar_type());
  TORCH_CHECK(g.device() == logp.device() && g.dim() == 2 && g.size(0) == 2 && g.size(1) == pr.B &&
                  g.scalar_type() == acc && g.is_contiguous(),
              "g must be a contiguous tensor [2, ", pr.B, "] of ", acc, " on ", logp.device(), ", got ",
              g.sizes(), " ", g.scalar_type(), " on ", g.device());
  check_bt(grad_logp, "grad_logp", pr.B, pr.T, logp.scalar_type(), at::kCUDA);
  TORCH_CHECK(grad_logp.device() == logp.device(), "grad_logp must be on ", logp.device(), ", got ",
              grad_logp.device());
  AxpoCudaDeviceGuard guard(logp.get_device());
  if (pr.B == 0 || pr.T == 0) return;
  TORCH_CHECK(pr.B <= 65535, "logp must have at most 65535 rows for the CUDA backward, got ", pr.B);
  const bool dual = dual_c > 0;
  const int64_t s_adv_t = pr.adv_row ? 0 : 1;
  const cudaStream_t stream = axpo_current_cuda_stream(logp.get_device());
  const unsigned blocks_t = static_cast<unsigned>((pr.T + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logp.scalar_type(), "pl_bwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Consts<acc_t> k{static_cast<acc_t>(lo), static_cast<acc_t>(hi),
                          static_cast<acc_t>(dual ? dual_c : 0.0), corr == 2, static_cast<acc_t>(cap)};
    // only TIS changes the gradient: the statistics-only correction runs the plain backward
    with_kl(pr.kl, corr == 2, [&](auto kl, auto with_roll) {
      pl_bwd_kernel<scalar_t, acc_t, decltype(kl)::value, decltype(with_roll)::value>
          <<<dim3(blocks_t, static_cast<unsigned>(pr.B)), kThreads, 0, stream>>>(
              pr.p, g.data_ptr<acc_t>(), grad_logp.data_ptr<scalar_t>(), pr.B, s_adv_t,
              grad_logp.stride(0), k, dual);
      axpo::check_launch("pl_bwd_cuda: pl_bwd_kernel");
    });
  });
}
