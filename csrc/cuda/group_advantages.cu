// CUDA kernels of the group_advantages op family. Contract: ../group_advantages.h.
//
// Densification happens on the device: a hash table of cap = next_pow2(2R) 64-bit keys (empty =
// all ones), filled with atomicCAS and linear probing; an element's slot is its group id. The
// label whose bit pattern equals the empty key (-1) gets the extra slot `cap`. Every per-group
// buffer is sized cap + 1 (from R, not from the number of groups), so nothing is copied back to
// the host: the whole op is 4 kernels on the current stream, **no host synchronization**.
//
//   k_insert:  slot[i] = hash slot of ids[i];  first[slot] = min index (atomicMin)
//   k_sum:     d_i = r_i - r[first[slot]] (fp64);  cnt[slot] += 1;  sum[slot] += d_i
//   k_m2:      m2[slot] += (d_i - sum/cnt)^2                      (only when scaling by the std)
//   k_out:     adv_i = n > 1 ? (d_i - mean) [/ (sqrt(m2 / (n - 1)) + eps)] : 0
//
// Shifting by a member of the group makes an all-equal group exactly 0 (every d_i is 0); the
// two-pass variance avoids the cancellation of sum(x^2) - n mean^2. Atomic adds run in fp64 and
// are aggregated per warp when all 32 lanes hit one slot (large or sorted groups), so one big
// group does not serialize on one address. fp64 atomics make the sums' rounding order-dependent
// (run-to-run differences of ~1 ulp of fp64, invisible in the fp32 output).
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

#include "../group_advantages.h"
#include "common.cuh"
#include "stream.h"

namespace axpo {
namespace group_adv {
namespace {

constexpr int kThreads = 256;
constexpr unsigned long long kEmpty = ~0ull;

template <typename scalar_t>
__device__ __forceinline__ double load_d(const scalar_t* p, int64_t i) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return p[i];
  } else {
    return static_cast<double>(static_cast<float>(p[i]));
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Adds v to buf[slot]; one atomic per warp when the whole (full) warp shares the slot.
__device__ __forceinline__ void add_to_slot(double* buf, int slot, double v, bool full_warp) {
  if (full_warp) {
    const int s0 = __shfl_sync(0xffffffffu, slot, 0);
    if (__all_sync(0xffffffffu, slot == s0)) {
      const double t = warp_sum(v);
      if ((threadIdx.x & 31) == 0) atomicAdd(buf + s0, t);
      return;
    }
  }
  atomicAdd(buf + slot, v);
}

__global__ void k_insert(const int64_t* __restrict__ ids,  // [R]
                         unsigned long long* __restrict__ keys,  // [cap], all kEmpty
                         int* __restrict__ slot,                 // [R] out
                         int* __restrict__ first,                // [cap + 1], all INT_MAX
                         int64_t R, int top_shift, unsigned long long mask) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= R) return;
  const unsigned long long key = static_cast<unsigned long long>(ids[i]);
  int s;
  if (key == kEmpty) {
    s = static_cast<int>(mask + 1);  // the extra slot `cap`
  } else {
    unsigned long long h = (key * 0x9E3779B97F4A7C15ull) >> top_shift;
    for (;;) {  // cap >= 2R: a free slot always exists, the loop ends
      const unsigned long long prev = atomicCAS(keys + h, kEmpty, key);
      if (prev == kEmpty || prev == key) break;
      h = (h + 1) & mask;
    }
    s = static_cast<int>(h);
  }
  slot[i] = s;
  atomicMin(first + s, static_cast<int>(i));
}

template <typename scalar_t>
__global__ void k_sum(const scalar_t* __restrict__ r, const int* __restrict__ slot,
                      const int* __restrict__ first, int* __restrict__ cnt,
                      double* __restrict__ sum, int64_t R) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool full_warp = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x | 31) < R;
  if (i >= R) return;
  const int s = slot[i];
  const double d = load_d(r, i) - load_d(r, first[s]);
  atomicAdd(cnt + s, 1);
  add_to_slot(sum, s, d, full_warp);
}

template <typename scalar_t>
__global__ void k_m2(const scalar_t* __restrict__ r, const int* __restrict__ slot,
                     const int* __restrict__ first, const int* __restrict__ cnt,
                     const double* __restrict__ sum, double* __restrict__ m2, int64_t R) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool full_warp = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x | 31) < R;
  if (i >= R) return;
  const int s = slot[i];
  const double dev = load_d(r, i) - load_d(r, first[s]) - sum[s] / cnt[s];
  add_to_slot(m2, s, dev * dev, full_warp);
}

template <typename scalar_t, typename out_t>
__global__ void k_out(const scalar_t* __restrict__ r, const int* __restrict__ slot,
                      const int* __restrict__ first, const int* __restrict__ cnt,
                      const double* __restrict__ sum, const double* __restrict__ m2,
                      out_t* __restrict__ out, int64_t R, bool scale_std, double eps) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= R) return;
  const int s = slot[i];
  const int n = cnt[s];
  double a = 0.0;
  if (n > 1) {
    a = load_d(r, i) - load_d(r, first[s]) - sum[s] / n;
    if (scale_std) {
      const double den = sqrt(m2[s] / (n - 1)) + eps;
      a = den == 0 ? 0.0 : a / den;  // eps == 0 and std == 0: 0, not 0 / 0 (NaN stays NaN)
    }
  }
  out[i] = static_cast<out_t>(a);
}

}  // namespace
}  // namespace group_adv
}  // namespace axpo

at::Tensor group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& group_ids,
                                 bool scale_std, double eps) {
  using namespace axpo::group_adv;
  TORCH_CHECK(rewards.is_cuda(), "rewards must be a CUDA tensor, got ", rewards.device());
  TORCH_CHECK(group_ids.device() == rewards.device(), "group_ids must be on ", rewards.device(),
              " like rewards, got ", group_ids.device());
  TORCH_CHECK(rewards.dim() == 1, "rewards must be 1-D [R], got shape ", rewards.sizes());
  TORCH_CHECK(group_ids.dim() == 1 && group_ids.size(0) == rewards.size(0),
              "group_ids must have shape [", rewards.size(0), "] like rewards, got ",
              group_ids.sizes());
  TORCH_CHECK(group_ids.scalar_type() == at::kLong, "group_ids must be int64, got ",
              group_ids.scalar_type());
  const auto dt = rewards.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "rewards must be fp16, bf16, fp32 or fp64, got ", dt);
  const int64_t R = rewards.size(0);
  TORCH_CHECK(R < (int64_t(1) << 30), "rewards must have fewer than 2**30 elements, got ", R);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);

  AxpoCudaDeviceGuard guard(rewards.get_device());
  auto out = at::empty({R}, rewards.options().dtype(dt == at::kDouble ? at::kDouble : at::kFloat));
  if (R == 0) return out;
  const at::Tensor r = rewards.contiguous();
  const at::Tensor ids = group_ids.contiguous();

  int bits = 4;
  while ((int64_t(1) << bits) < 2 * R) ++bits;
  const int64_t cap = int64_t(1) << bits;
  const auto opt = rewards.options();
  // kEmpty is the int64 -1 bit pattern.
  at::Tensor keys = at::full({cap}, -1, opt.dtype(at::kLong));
  at::Tensor first = at::full({cap + 1}, std::numeric_limits<int>::max(), opt.dtype(at::kInt));
  at::Tensor cnt = at::zeros({cap + 1}, opt.dtype(at::kInt));
  at::Tensor sum = at::zeros({cap + 1}, opt.dtype(at::kDouble));
  at::Tensor m2 = scale_std ? at::zeros({cap + 1}, opt.dtype(at::kDouble)) : sum;
  at::Tensor slot = at::empty({R}, opt.dtype(at::kInt));

  const cudaStream_t stream = axpo_current_cuda_stream(rewards.get_device());
  const unsigned blocks = static_cast<unsigned>((R + kThreads - 1) / kThreads);
  k_insert<<<blocks, kThreads, 0, stream>>>(
      ids.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>()),
      slot.data_ptr<int>(), first.data_ptr<int>(), R, 64 - bits,
      static_cast<unsigned long long>(cap - 1));
  axpo::check_launch("group_advantages_cuda: k_insert");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "group_advantages_cuda", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* rp = r.data_ptr<scalar_t>();
    k_sum<scalar_t><<<blocks, kThreads, 0, stream>>>(rp, slot.data_ptr<int>(),
                                                      first.data_ptr<int>(), cnt.data_ptr<int>(),
                                                      sum.data_ptr<double>(), R);
    axpo::check_launch("group_advantages_cuda: k_sum");
    if (scale_std) {
      k_m2<scalar_t><<<blocks, kThreads, 0, stream>>>(rp, slot.data_ptr<int>(),
                                                       first.data_ptr<int>(), cnt.data_ptr<int>(),
                                                       sum.data_ptr<double>(),
                                                       m2.data_ptr<double>(), R);
      axpo::check_launch("group_advantages_cuda: k_m2");
    }
    k_out<scalar_t, out_t><<<blocks, kThreads, 0, stream>>>(
        rp, slot.data_ptr<int>(), first.data_ptr<int>(), cnt.data_ptr<int>(),
        sum.data_ptr<double>(), m2.data_ptr<double>(), out.data_ptr<out_t>(), R, scale_std, eps);
    axpo::check_launch("group_advantages_cuda: k_out");
  });
  return out;
}
