// Host entry points of axpo._C for the KV-cache fork op family ("fork_kv").
//
// Prefix KV-cache forking for branch resampling. For every input tensor t (the keys and values
// of every layer of a transformers cache) and every output row i:
//   out_t[i, :, out_len - length[i] : out_len, :] = t[src_rows[i], :, src_start[i] : src_start[i] + length[i], :]
//   out_t[i, :, : out_len - length[i], :]         = 0   (left padding, as batched generation expects)
//
//   tensors    list of L tensors [B, H_t, T, D_t]: the same B and T for all; H_t, D_t and the dtype
//              may differ between tensors (the copy is bytewise: any dtype, mixed allowed); all on
//              one device; any strides (a tensor whose last dim is not unit-stride is copied
//              contiguous first; other strides are used as they are).
//   src_rows   int64 [M]  in [0, B)
//   src_start  int64 [M]  >= 0
//   length     int64 [M]  >= 0, src_start + length <= T, length <= out_len
//   out_len    >= 0
// Returns L new contiguous tensors [M, H_t, out_len, D_t] in the input dtypes.
//
// Range errors: the CPU entry point checks every row (TORCH_CHECK naming the argument and the
// row). The CUDA entry point cannot read device-resident indices without a sync, so its kernel
// treats an invalid row as length 0 (all zeros) and never reads out of bounds; the Python layer
// (axpo/ops/fork_kv.py) validates on the host before either is called.
//
// Not differentiable: KV caches at generation time need no gradient.
#pragma once
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> fork_kv_cpu(const std::vector<at::Tensor>& tensors, const at::Tensor& src_rows,
                                    const at::Tensor& src_start, const at::Tensor& length,
                                    int64_t out_len);

#ifdef AXPO_WITH_CUDA
// Same contract, CUDA tensors, one kernel launch for all L tensors on the current stream. The
// index tensors may live on the CPU or on the tensors' device: CPU ones travel in the same
// pinned host buffer as the per-tensor descriptor table (one non-blocking H2D copy).
std::vector<at::Tensor> fork_kv_cuda(const std::vector<at::Tensor>& tensors, const at::Tensor& src_rows,
                                     const at::Tensor& src_start, const at::Tensor& length,
                                     int64_t out_len);
#endif
