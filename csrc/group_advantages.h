// Host entry points of the group_advantages op family (GRPO / Dr.GRPO group-normalized advantages).
//
//   rewards    [R]  fp16 / bf16 / fp32 / fp64, any stride (made contiguous by the launcher)
//   group_ids  [R]  int64, arbitrary labels: unsorted, non-contiguous values (negative, 10**12,
//                   INT64_MIN / INT64_MAX included), groups of any sizes; R < 2**30
//   scale_std  true: (r - mean) / (std + eps); false: r - mean (Dr.GRPO)
//   eps        added to the std (scale_std only)
//   returns    [R] fp64 for fp64 rewards, else fp32
//
// Per group g: n = size, mean, std = unbiased (Bessel, n - 1) standard deviation. A group of one
// rollout gets advantage 0. All statistics are accumulated in fp64 and *shifted*: with
// c_g = the reward of the group's first member (lowest index),
//   d_i   = r_i - c_g                     (fp64, exact for fp32/bf16/fp16 rewards)
//   mu_g  = sum d / n                     (pass 1)
//   m2_g  = sum (d - mu_g)^2              (pass 2: two-pass variance, no cancellation)
//   adv_i = (d_i - mu_g) [/ (sqrt(m2_g / (n - 1)) + eps)]
// so a group whose rewards are all equal gives exactly 0 (every d_i is exactly 0), whatever the
// dtype; with eps == 0 too (a zero denominator gives 0, not 0 / 0). Non-finite rewards are
// rejected by the Python layer (one sync); the kernels themselves just propagate NaN/inf into
// their group.
//
// Densification of the labels happens inside each backend, never on the host side of a device:
//   cpu:    open-addressing hash table (labels -> first-seen order), then the two passes.
//   cuda:   device hash table (atomicCAS on the 64-bit label, 2R..4R slots), slot = group id;
//           no host synchronization at all (buffers are sized from R, not from the group count).
#pragma once
#include <torch/extension.h>

at::Tensor group_advantages_cpu(const at::Tensor& rewards, const at::Tensor& group_ids,
                                bool scale_std, double eps);

#ifdef AXPO_WITH_CUDA
// Same contract, CUDA tensors, launched on the current stream, no host sync.
at::Tensor group_advantages_cuda(const at::Tensor& rewards, const at::Tensor& group_ids,
                                 bool scale_std, double eps);
#endif
