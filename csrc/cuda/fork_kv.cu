// KV-cache fork on CUDA (contract: ../fork_kv.h): one kernel launch for all L tensors.
//
// The host builds a table of per-tensor descriptors (source/destination pointers, byte strides,
// head count, row bytes, vector width, first block) in a pinned host buffer, followed by the
// index arrays when those live on the CPU, and sends it with ONE non-blocking H2D copy
// (Tensor::copy_ from pinned memory, so the caching host allocator keeps the buffer alive until
// the copy is done). No host sync per layer, none at all in this entry point.
//
// Work decomposition: every (tensor, output row, head) is one destination segment of out_len rows
// of row_bytes = D * element size (contiguous in the output). A segment is split into chunks of
// whole rows of about kChunkBytes; one block copies one chunk. Blocks are numbered across all
// tensors; a block finds its tensor by binary search over the descriptors' block_begin.
// Copies are bytewise (any dtype; mixed dtypes across tensors) in vectors of the widest size in
// {16, 8, 4, 2, 1} bytes that divides the row bytes, the source byte strides and both base
// addresses, so every vector lies entirely inside one row and inside either the padding (zeros
// written) or the span (copied).
//
// Safety: the kernel re-checks every row's (src_row, src_start, length) against (B, T, out_len)
// and treats an invalid row as length 0, so it never reads out of bounds even when the host-side
// validation was skipped.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../fork_kv.h"
#include "common.cuh"
#include "stream.h"

namespace axpo {
namespace fork_kv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkBytes = 64 * 1024;  // destination bytes per block (whole rows): 16 x 16 B per thread

struct Desc {
  const char* src;      // tensor base
  char* dst;            // output base, contiguous [M, H, out_len, D]
  int64_t sb, sh, st;   // source byte strides: batch, head, token
  int64_t block_begin;  // first block of this tensor
  int32_t heads;        // H
  int32_t row_bytes;    // D * element size
  int32_t rows_per_chunk;
  int32_t chunks_per_seg;
  int32_t vec;          // vector width in bytes: 16, 8, 4, 2 or 1
  int32_t pad_;
};

struct Params {
  const Desc* descs;       // [L] in device memory
  const int64_t* src_rows;  // [M]
  const int64_t* src_start; // [M]
  const int64_t* length;    // [M]
  int64_t B, T, out_len;
  int32_t num_desc;
};

template <int V>
struct VecT;
template <>
struct VecT<16> { using type = uint4; };
template <>
struct VecT<8> { using type = uint2; };
template <>
struct VecT<4> { using type = uint32_t; };
template <>
struct VecT<2> { using type = uint16_t; };
template <>
struct VecT<1> { using type = uint8_t; };

// Copies rows [r0, r1) of one destination segment: rows < pad are zeros, row r >= pad comes from
// source token (start + r - pad).
template <int V>
__device__ __forceinline__ void copy_rows(char* __restrict__ dst_seg, const char* __restrict__ src_span,
                                          int64_t st, int32_t row_bytes, int64_t r0, int64_t r1,
                                          int64_t pad) {
  using vec_t = typename VecT<V>::type;
  const int32_t vecs_per_row = row_bytes / V;
  // a chunk holds at most max(kChunkBytes, row_bytes) < 2^30 bytes: 32-bit vector indices suffice
  const int32_t n = static_cast<int32_t>(r1 - r0) * vecs_per_row;
  vec_t zero;
  memset(&zero, 0, sizeof(zero));
#pragma unroll 4
  for (int32_t k = threadIdx.x; k < n; k += blockDim.x) {
    const int64_t r = r0 + k / vecs_per_row;
    const int32_t c = k % vecs_per_row;
    vec_t* d = reinterpret_cast<vec_t*>(dst_seg + r * row_bytes) + c;
    if (r < pad) {
      *d = zero;
    } else {
      *d = __ldg(reinterpret_cast<const vec_t*>(src_span + (r - pad) * st) + c);
    }
  }
}

__global__ void __launch_bounds__(kThreads) fork_kv_kernel(Params p) {
  const int64_t block = blockIdx.x;
  // the tensor of this block: last descriptor with block_begin <= block
  int lo = 0, hi = p.num_desc - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.descs[mid].block_begin <= block) lo = mid; else hi = mid - 1;
  }
  const Desc d = p.descs[lo];
  const int64_t local = block - d.block_begin;
  const int64_t seg = local / d.chunks_per_seg;
  const int64_t chunk = local % d.chunks_per_seg;
  const int64_t i = seg / d.heads, h = seg % d.heads;
  int64_t row = p.src_rows[i], start = p.src_start[i], len = p.length[i];
  const bool valid = row >= 0 && row < p.B && start >= 0 && len >= 0 && len <= p.out_len &&
                     start <= p.T - len;
  if (!valid) { row = 0; start = 0; len = 0; }  // zeros, and no read anywhere
  const int64_t pad = p.out_len - len;
  const int64_t r0 = chunk * d.rows_per_chunk;
  const int64_t r1 = min(r0 + static_cast<int64_t>(d.rows_per_chunk), p.out_len);
  char* dst_seg = d.dst + seg * p.out_len * d.row_bytes;
  // pointer to the (virtual) source of destination row `pad`; only dereferenced for r >= pad
  const char* src_span = d.src + row * d.sb + h * d.sh + start * d.st;
  switch (d.vec) {
    case 16: copy_rows<16>(dst_seg, src_span, d.st, d.row_bytes, r0, r1, pad); break;
    case 8: copy_rows<8>(dst_seg, src_span, d.st, d.row_bytes, r0, r1, pad); break;
    case 4: copy_rows<4>(dst_seg, src_span, d.st, d.row_bytes, r0, r1, pad); break;
    case 2: copy_rows<2>(dst_seg, src_span, d.st, d.row_bytes, r0, r1, pad); break;
    default: copy_rows<1>(dst_seg, src_span, d.st, d.row_bytes, r0, r1, pad); break;
  }
}

int vec_width(std::initializer_list<int64_t> values) {
  for (int v : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t x : values) ok = ok && (x % v == 0);
    if (ok) return v;
  }
  return 1;
}

void check_indices(const at::Tensor& x, const char* name, int64_t m, const at::Device& dev) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == m, name, " must be 1-D of size ", m,
              " (like src_rows), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kLong, name, " must be int64, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() || x.device() == dev, name, " must be on the CPU or on ", dev,
              ", got ", x.device());
}

}  // namespace
}  // namespace fork_kv
}  // namespace axpo

std::vector<at::Tensor> fork_kv_cuda(const std::vector<at::Tensor>& tensors, const at::Tensor& src_rows,
                                     const at::Tensor& src_start, const at::Tensor& length,
                                     int64_t out_len) {
  using namespace axpo::fork_kv;
  TORCH_CHECK(out_len >= 0, "out_len must be >= 0, got ", out_len);
  if (tensors.empty()) return {};
  const at::Device dev = tensors[0].device();
  TORCH_CHECK(dev.is_cuda(), "tensors[0] must be a CUDA tensor, got ", dev);
  const int64_t M = src_rows.dim() == 1 ? src_rows.size(0) : -1;
  check_indices(src_rows, "src_rows", M, dev);
  check_indices(src_start, "src_start", M, dev);
  check_indices(length, "length", M, dev);
  AxpoCudaDeviceGuard guard(dev.index());
  const int64_t B = tensors[0].dim() == 4 ? tensors[0].size(0) : -1;
  const int64_t T = tensors[0].dim() == 4 ? tensors[0].size(2) : -1;
  TORCH_CHECK(out_len <= (int64_t(1) << 31), "out_len = ", out_len, " is too large");

  std::vector<at::Tensor> srcs, outs;
  srcs.reserve(tensors.size());
  outs.reserve(tensors.size());
  std::vector<Desc> descs;
  descs.reserve(tensors.size());
  int64_t blocks = 0;
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    TORCH_CHECK(t.dim() == 4, "tensors[", j, "] must be 4-D [B, H, T, D], got shape ", t.sizes());
    TORCH_CHECK(t.device() == dev, "tensors[", j, "] is on ", t.device(), " but tensors[0] is on ", dev);
    TORCH_CHECK(t.size(0) == B && t.size(2) == T, "tensors[", j, "] has shape ", t.sizes(),
                ": every tensor must have the B = ", B, " and T = ", T, " of tensors[0]");
    at::Tensor s = t.size(3) > 1 && t.stride(3) != 1 ? t.contiguous() : t;
    at::Tensor o = at::empty({M, s.size(1), out_len, s.size(3)},
                             s.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t es = s.element_size();
    const int64_t row_bytes = s.size(3) * es;
    TORCH_CHECK(row_bytes < (int64_t(1) << 30) && s.size(1) < (int64_t(1) << 31),
                "tensors[", j, "]: head dim or head count too large");
    const int64_t segs = M * s.size(1);
    if (segs > 0 && out_len > 0 && row_bytes > 0) {
      const int64_t rows_per_chunk = std::min<int64_t>(out_len, std::max<int64_t>(1, kChunkBytes / row_bytes));
      const int64_t chunks = (out_len + rows_per_chunk - 1) / rows_per_chunk;
      Desc d{};
      d.src = static_cast<const char*>(s.data_ptr());
      d.dst = static_cast<char*>(o.data_ptr());
      d.sb = s.stride(0) * es;
      d.sh = s.stride(1) * es;
      d.st = s.stride(2) * es;
      d.block_begin = blocks;
      d.heads = static_cast<int32_t>(s.size(1));
      d.row_bytes = static_cast<int32_t>(row_bytes);
      d.rows_per_chunk = static_cast<int32_t>(rows_per_chunk);
      d.chunks_per_seg = static_cast<int32_t>(chunks);
      // a stride of a size-1 dim is never used with a non-zero index: let it not spoil alignment
      d.vec = vec_width({row_bytes, s.size(0) > 1 ? d.sb : 0, s.size(1) > 1 ? d.sh : 0,
                         s.size(2) > 1 ? d.st : 0, static_cast<int64_t>(reinterpret_cast<uintptr_t>(d.src) % 16),
                         static_cast<int64_t>(reinterpret_cast<uintptr_t>(d.dst) % 16)});
      descs.push_back(d);
      blocks += segs * chunks;
    }
    srcs.push_back(std::move(s));
    outs.push_back(std::move(o));
  }
  if (blocks == 0) return outs;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "fork_kv_cuda: too much work for one launch (", blocks, " blocks)");

  // One pinned host buffer: descriptors, then the index arrays that live on the CPU.
  const at::Tensor* idx[3] = {&src_rows, &src_start, &length};
  const int64_t desc_bytes = static_cast<int64_t>(descs.size() * sizeof(Desc));
  int64_t total = desc_bytes;
  int64_t idx_off[3] = {-1, -1, -1};
  for (int k = 0; k < 3; ++k) {
    if (idx[k]->device().is_cpu()) {
      idx_off[k] = total;
      total += M * static_cast<int64_t>(sizeof(int64_t));
    }
  }
  at::Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* hp = host.data_ptr<uint8_t>();
  std::memcpy(hp, descs.data(), desc_bytes);
  at::Tensor idx_dev[3];
  for (int k = 0; k < 3; ++k) {
    if (idx_off[k] >= 0) {
      const at::Tensor c = idx[k]->contiguous();
      if (M > 0) std::memcpy(hp + idx_off[k], c.data_ptr<int64_t>(), M * sizeof(int64_t));
    } else {
      idx_dev[k] = idx[k]->contiguous();
    }
  }
  at::Tensor table = at::empty({total}, at::TensorOptions().dtype(at::kByte).device(dev));
  table.copy_(host, /*non_blocking=*/true);  // the one H2D copy, ordered on the current stream

  const uint8_t* tp = table.data_ptr<uint8_t>();
  Params p{};
  p.descs = reinterpret_cast<const Desc*>(tp);
  const int64_t* ptrs[3];
  for (int k = 0; k < 3; ++k) {
    ptrs[k] = idx_off[k] >= 0 ? reinterpret_cast<const int64_t*>(tp + idx_off[k]) : idx_dev[k].data_ptr<int64_t>();
  }
  p.src_rows = ptrs[0];
  p.src_start = ptrs[1];
  p.length = ptrs[2];
  p.B = B;
  p.T = T;
  p.out_len = out_len;
  p.num_desc = static_cast<int32_t>(descs.size());
  cudaStream_t stream = axpo_current_cuda_stream(dev.index());
  fork_kv_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(p);
  axpo::check_launch("fork_kv_cuda: fork_kv_kernel");
  return outs;
}
