// Host entry points of axpo._C for the policy-loss ("pl") op family (axpo.ops.policy_loss).
//
// Per token (b, t), in the accumulation dtype acc_t (double for fp64 logprobs, else float):
//   d  = logp - old;  dc = clamp(d, -20, 20);  r = exp(dc)
//   pg1 = -A * r;  pg2 = -A * clamp(r, lo, hi);  c1 = max(pg1, pg2)
//   dual clip (dual_c > 0) and A < 0:  pg = min(c1, -A * dual_c);  else pg = c1
//   kl (kl_estimator 1/2/3/4 = k1/k2/k3/k3 * r, 0 = no ref): k1 = logp - ref, k2 = (logp - ref)^2 / 2,
//      k3 = exp(ref - logp) - (ref - logp) - 1
// Tokens with mask == 0 contribute nothing (their values are never combined with anything).
//
// Inputs, all [B, T] with any row stride (stride(0)) and unit column stride unless noted:
//   logp  fp16 / bf16 / fp32 / fp64
//   old   acc_t
//   adv   acc_t, column stride 0 (one advantage per row) or 1
//   mask  uint8 (0 / nonzero)
//   ref   acc_t, read only if kl_estimator != 0 (pass any [B, T] tensor otherwise)
//   roll  acc_t, the rollout engine's log-probs, read only if corr != 0
// lo = 1 - clip_low, hi = 1 + clip_high, dual_c = clip_ratio_c or <= 0 for no dual clip;
// all are converted to acc_t first, as torch does with Python scalars.
// Rollout correction (corr): 0 none; 1 statistics only (rows 8-10 below; the sequence mask is
// applied to the per-row sums by the caller); 2 token-level truncated importance sampling: pg of
// each token is weighted by w = min(exp(old - roll), cap) (a constant: no gradient through w).
#pragma once
#include <torch/extension.h>

// Rows of the per-row sums returned by pl_fwd_*: [kPlStats, B] acc_t.
constexpr int64_t kPlStats = 11;
constexpr int64_t kPlCoreStats = 8;  // rows 0-7; rows 8-10 are the rollout correction's
//   0 pg_sum       sum over masked tokens of pg
//   1 kl_sum       sum of kl (0 without ref)
//   2 count        number of masked tokens
//   3 clip_low     count of (pg2 > pg1) & (A < 0)
//   4 clip_high    count of (pg2 > pg1) & (A > 0)
//   5 clip_dual    count of (c1 > -A * dual_c) & (A < 0) (0 without dual clip)
//   6 neg_kl_sum   sum of -dc (verl's ppo_kl numerator)
//   7 ratio_sum    sum of r
//   8 weight_sum   sum of the correction weight w (the count when corr != 2)
//   9 truncated    count of exp(old - roll) > cap (corr 2; else 0)
//  10 roll_lr_sum  sum of old - roll (corr != 0; else 0): the sequence mask's log-ratio
at::Tensor pl_fwd_cpu(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                      const at::Tensor& mask, const at::Tensor& ref, double lo, double hi,
                      double dual_c, int64_t kl_estimator, const at::Tensor& roll, int64_t corr,
                      double cap);

// Gradient w.r.t. logp of sum_b (g[0, b] * pg_sum_b + g[1, b] * kl_sum_b), written to grad_logp
// ([B, T], logp's dtype, unit column stride). g: [2, B] acc_t contiguous. kl_estimator 0 skips the
// KL term (pass 0 when its coefficient is 0, so an infinite k3 gives no 0 * inf). Tie rules as
// autograd of the reference: clamp passes the gradient on [min, max] inclusive; max / min give
// half to each side of a tie.
void pl_bwd_cpu(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                const at::Tensor& mask, const at::Tensor& ref, double lo, double hi, double dual_c,
                int64_t kl_estimator, const at::Tensor& roll, int64_t corr, double cap,
                const at::Tensor& g, at::Tensor& grad_logp);

// The same on CUDA tensors (csrc/cuda/policy_loss.cu; built only with CUDA).
at::Tensor pl_fwd_cuda(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                       const at::Tensor& mask, const at::Tensor& ref, double lo, double hi,
                       double dual_c, int64_t kl_estimator, const at::Tensor& roll, int64_t corr,
                       double cap);
void pl_bwd_cuda(const at::Tensor& logp, const at::Tensor& old, const at::Tensor& adv,
                 const at::Tensor& mask, const at::Tensor& ref, double lo, double hi, double dual_c,
                 int64_t kl_estimator, const at::Tensor& roll, int64_t corr, double cap,
                 const at::Tensor& g, at::Tensor& grad_logp);
