// Host entry points of axpo._C. One family per op; each backend file implements its half.
//
// Log-prob + entropy ("lpe"), shared by token_logprob_entropy and linear_logprob_entropy:
//   logits  [N, C]  fp16 / bf16 / fp32 / fp64, stride(1) == 1, any stride(0) >= C
//   labels  [N]     int64; a label outside [0, V) that is not ignore_index never reads memory
//   Accumulation dtype acc_t: double for fp64 logits, float otherwise. x = logit * inv_temp.
//   State per row (running over vocab chunks), tensor [4, N] acc_t, rows:
//     0: m   running max of x           (init -inf)
//     1: s   sum exp(x - m)             (init 0)
//     2: w   sum exp(x - m) * (x - m)   (init 0; 0 * -inf counts as 0; skipped without entropy)
//     3: xl  x at the label             (init NaN; set when the label lies in this chunk)
//   lse = m + log s;  entropy = log s - w / s;  logprob = xl - lse (0 where label == ignore).
#pragma once
#include <torch/extension.h>

// Full rows (C == V). Returns [3, N] acc_t: logprob, entropy (0 if !compute_entropy), lse.
at::Tensor lpe_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, double inv_temp,
                       int64_t ignore_index, bool compute_entropy);
// One vocab chunk [N, C] holding vocab ids [v_offset, v_offset + C): updates state in place.
void lpe_fwd_chunk_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t v_offset,
                       double inv_temp, at::Tensor& state, bool compute_entropy);
// Gradient w.r.t. the chunk's logits, written to grad_logits [N, C] (logits' dtype; may alias
// logits). lse, entropy, grad_logprob, grad_entropy: [N] acc_t. With has_entropy_grad false,
// entropy and grad_entropy are not read.
//   dx_j = g_lp * ([j == label] - p_j) - g_H * p_j * (log p_j + H),  p_j = exp(x_j - lse)
//   dlogit_j = dx_j * inv_temp; rows with label == ignore_index get no g_lp term.
void lpe_bwd_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t v_offset,
                 double inv_temp, int64_t ignore_index, const at::Tensor& lse,
                 const at::Tensor& entropy, const at::Tensor& grad_logprob,
                 const at::Tensor& grad_entropy, bool has_entropy_grad, at::Tensor& grad_logits);

#ifdef AXPO_WITH_CUDA
// Same contracts, CUDA tensors, launched on the current stream.
at::Tensor lpe_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels, double inv_temp,
                        int64_t ignore_index, bool compute_entropy);
void lpe_fwd_chunk_cuda(const at::Tensor& logits, const at::Tensor& labels, int64_t v_offset,
                        double inv_temp, at::Tensor& state, bool compute_entropy);
void lpe_bwd_cuda(const at::Tensor& logits, const at::Tensor& labels, int64_t v_offset,
                  double inv_temp, int64_t ignore_index, const at::Tensor& lse,
                  const at::Tensor& entropy, const at::Tensor& grad_logprob,
                  const at::Tensor& grad_entropy, bool has_entropy_grad, at::Tensor& grad_logits);
#endif
