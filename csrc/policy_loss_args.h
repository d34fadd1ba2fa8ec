// Argument checks and raw pointers of the policy-loss ("pl") kernels, shared by the CPU and the
// CUDA host code (the contract is ../policy_loss.h). Host-only: no device code here.
#pragma once
#include <torch/extension.h>

#include <cstdint>

namespace axpo {
namespace pl {

struct Ptrs {
  const void* logp;     // [B, T] logp's dtype
  const void* old;      // [B, T] acc_t
  const void* adv;      // [B, T] acc_t, column stride 0 or 1
  const uint8_t* mask;  // [B, T]
  const void* ref;      // [B, T] acc_t (old's pointer when there is no ref: never read)
  const void* roll;     // [B, T] acc_t rollout log-probs (old's pointer without correction)
  int64_t s_logp, s_old, s_adv, s_mask, s_ref, s_roll;  // row strides (elements)
  int64_t T;
};

struct Prepared {
  Ptrs p;
  int64_t B, T;
  bool adv_row;  // one advantage per row (column stride 0)
  int kl;        // kl_estimator
};

inline at::ScalarType pl_acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// [B, T] tensor on a `device_type` device, of `dtype`, whose columns are contiguous (column
// stride 1, or 0 if allowed).
inline void check_bt(const at::Tensor& x, const char* name, int64_t B, int64_t T, at::ScalarType dtype,
                     at::DeviceType device_type, bool allow_col_stride0 = false) {
  TORCH_CHECK(x.device().type() == device_type, name, " must be a ", c10::DeviceTypeName(device_type),
              " tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == T, name, " must have shape [", B,
              ", ", T, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(T <= 1 || x.stride(1) == 1 || (allow_col_stride0 && x.stride(1) == 0), name,
              " must have column stride 1", allow_col_stride0 ? " or 0" : "", ", got strides ",
              x.strides());
}

inline Prepared prepare(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                        const at::Tensor& mask, const at::Tensor& ref, int64_t kl_estimator,
                        const at::Tensor& roll, int64_t corr, double cap, at::DeviceType device_type) {
  TORCH_CHECK(logp.device().type() == device_type, "logp must be a ", c10::DeviceTypeName(device_type),
              " tensor, got ", logp.device());
  TORCH_CHECK(logp.dim() == 2, "logp must be 2-D [B, T], got shape ", logp.sizes());
  const auto st = logp.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              "logp must be fp16, bf16, fp32 or fp64, got ", st);
  TORCH_CHECK(kl_estimator >= 0 && kl_estimator <= 4,
              "kl_estimator must be 0 (none), 1, 2, 3 or 4 (k1, k2, k3, k3 * ratio), got ", kl_estimator);
  const int64_t B = logp.size(0), T = logp.size(1);
  const auto acc = pl_acc_type(st);
  check_bt(logp, "logp", B, T, st, device_type);
  check_bt(old, "old", B, T, acc, device_type);
  check_bt(adv, "adv", B, T, acc, device_type, /*allow_col_stride0=*/true);
  check_bt(mask, "mask", B, T, at::kByte, device_type);
  if (kl_estimator != 0) check_bt(ref, "ref", B, T, acc, device_type);
  TORCH_CHECK(corr >= 0 && corr <= 2, "corr must be 0 (none), 1 (statistics: sequence mask) or 2 (tis), got ", corr);
  TORCH_CHECK(corr != 2 || cap > 0, "cap must be > 0 for corr = 2 (tis), got ", cap);
  if (corr != 0) {
    check_bt(roll, "roll", B, T, acc, device_type);
    TORCH_CHECK(roll.device() == logp.device(), "roll must be on ", logp.device(), ", got ", roll.device());
  }
  for (const at::Tensor* x : {&old, &adv, &mask}) {
    TORCH_CHECK(x->device() == logp.device(), "all inputs must be on ", logp.device(), ", got ", x->device());
  }
  if (kl_estimator != 0) {
    TORCH_CHECK(ref.device() == logp.device(), "ref must be on ", logp.device(), ", got ", ref.device());
  }
  Prepared r;
  r.B = B;
  r.T = T;
  r.adv_row = T > 1 && adv.stride(1) == 0;
  r.kl = static_cast<int>(kl_estimator);
  r.p.logp = logp.data_ptr();
  r.p.old = old.data_ptr();
  r.p.adv = adv.data_ptr();
  r.p.mask = mask.data_ptr<uint8_t>();
  r.p.ref = kl_estimator != 0 ? ref.data_ptr() : old.data_ptr();  // placeholder, never read
  r.p.s_logp = logp.stride(0);
  r.p.s_old = old.stride(0);
  r.p.s_adv = adv.stride(0);
  r.p.s_mask = mask.stride(0);
  r.p.s_ref = kl_estimator != 0 ? ref.stride(0) : old.stride(0);
  r.p.roll = corr != 0 ? roll.data_ptr() : old.data_ptr();  // placeholder, never read
  r.p.s_roll = corr != 0 ? roll.stride(0) : old.stride(0);
  r.p.T = T;
  return r;
}

}  // namespace pl
}  // namespace axpo
