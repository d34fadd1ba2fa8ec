// KV-cache fork on the CPU (contract: ../fork_kv.h).
//
// Work item = (tensor, output row, head): one contiguous destination run of out_len * D bytes,
// a memset of the left padding then one memcpy of the span (one memcpy per token when the
// source's token stride is not D elements). Items of all tensors are flattened into one range
// split over threads with at::parallel_for, so many small layers still fill every core.
#include "../fork_kv.h"
#include "../registry.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace {

struct Desc {
  const char* src;
  char* dst;
  int64_t sb, sh, st;  // source strides in bytes (batch, head, token)
  int64_t heads;
  int64_t row_bytes;   // D * element size
  int64_t item_begin;  // first flattened (row, head) item of this tensor
};

void check_indices(const at::Tensor& x, const char* name, int64_t m) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == m, name, " must be 1-D of size ", m,
              " (like src_rows), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kLong, name, " must be int64, got ", x.scalar_type());
}

}  // namespace

std::vector<at::Tensor> fork_kv_cpu(const std::vector<at::Tensor>& tensors, const at::Tensor& src_rows,
                                    const at::Tensor& src_start, const at::Tensor& length,
                                    int64_t out_len) {
  TORCH_CHECK(out_len >= 0, "out_len must be >= 0, got ", out_len);
  const int64_t M = src_rows.dim() == 1 ? src_rows.size(0) : -1;
  check_indices(src_rows, "src_rows", M);
  check_indices(src_start, "src_start", M);
  check_indices(length, "length", M);
  TORCH_CHECK(src_rows.device().is_cpu() && src_start.device().is_cpu() && length.device().is_cpu(),
              "fork_kv_cpu: src_rows, src_start and length must be CPU tensors");
  if (tensors.empty()) return {};
  const int64_t B = tensors[0].dim() == 4 ? tensors[0].size(0) : -1;
  const int64_t T = tensors[0].dim() == 4 ? tensors[0].size(2) : -1;
  std::vector<at::Tensor> srcs, outs;
  srcs.reserve(tensors.size());
  outs.reserve(tensors.size());
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    TORCH_CHECK(t.dim() == 4, "tensors[", j, "] must be 4-D [B, H, T, D], got shape ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), "tensors[", j, "] must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.size(0) == B && t.size(2) == T, "tensors[", j, "] has shape ", t.sizes(),
                ": every tensor must have the B = ", B, " and T = ", T, " of tensors[0]");
    srcs.push_back(t.size(3) > 1 && t.stride(3) != 1 ? t.contiguous() : t);
    outs.push_back(at::empty({M, t.size(1), out_len, t.size(3)}, t.options().memory_format(at::MemoryFormat::Contiguous)));
  }
  const auto rows_c = src_rows.contiguous(), start_c = src_start.contiguous(), len_c = length.contiguous();
  const int64_t* rows = rows_c.data_ptr<int64_t>();
  const int64_t* start = start_c.data_ptr<int64_t>();
  const int64_t* len = len_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK(rows[i] >= 0 && rows[i] < B, "src_rows[", i, "] = ", rows[i], " is outside [0, ", B, ")");
    TORCH_CHECK(start[i] >= 0, "src_start[", i, "] = ", start[i], " must be >= 0");
    TORCH_CHECK(len[i] >= 0, "length[", i, "] = ", len[i], " must be >= 0");
    TORCH_CHECK(start[i] + len[i] <= T, "src_start[", i, "] + length[", i, "] = ", start[i] + len[i],
                " exceeds the sequence length T = ", T);
    TORCH_CHECK(len[i] <= out_len, "length[", i, "] = ", len[i], " exceeds out_len = ", out_len);
  }

  std::vector<Desc> descs(srcs.size());
  int64_t items = 0, total_bytes = 0;
  for (size_t j = 0; j < srcs.size(); ++j) {
    const at::Tensor& s = srcs[j];
    const int64_t es = s.element_size();
    descs[j] = Desc{static_cast<const char*>(s.data_ptr()), static_cast<char*>(outs[j].data_ptr()),
                    s.stride(0) * es, s.stride(1) * es, s.stride(2) * es, s.size(1), s.size(3) * es, items};
    items += M * s.size(1);
    total_bytes += M * s.size(1) * out_len * s.size(3) * es;
  }
  if (items == 0 || out_len == 0) return outs;
  // ~256 KiB of output per task: enough to amortize scheduling, small enough to balance.
  const int64_t avg_item = std::max<int64_t>(total_bytes / items, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(256) << 10) / avg_item);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    // the tensor holding item `begin`: last descriptor whose item_begin <= begin
    size_t j = std::upper_bound(descs.begin(), descs.end(), begin,
                                [](int64_t v, const Desc& d) { return v < d.item_begin; }) - descs.begin() - 1;
    for (int64_t it = begin; it < end; ++it) {
      while (j + 1 < descs.size() && it >= descs[j + 1].item_begin) ++j;
      const Desc& d = descs[j];
      if (d.row_bytes == 0) continue;
      const int64_t local = it - d.item_begin;
      const int64_t i = local / d.heads, h = local % d.heads;
      const int64_t n = len[i], pad = out_len - n;
      char* dst = d.dst + local * out_len * d.row_bytes;
      if (pad > 0) std::memset(dst, 0, pad * d.row_bytes);
      if (n == 0) continue;
      const char* src = d.src + rows[i] * d.sb + h * d.sh + start[i] * d.st;
      dst += pad * d.row_bytes;
      if (d.st == d.row_bytes) {
        std::memcpy(dst, src, n * d.row_bytes);
      } else {
        for (int64_t p = 0; p < n; ++p) std::memcpy(dst + p * d.row_bytes, src + p * d.st, d.row_bytes);
      }
    }
  });
  return outs;
}

AXPO_BIND(fork_kv) {
  m.def("fork_kv_cpu", &fork_kv_cpu, "KV-cache fork: left-padded copies of row spans of every tensor (CPU)",
        pybind11::arg("tensors"), pybind11::arg("src_rows"), pybind11::arg("src_start"),
        pybind11::arg("length"), pybind11::arg("out_len"));
#ifdef AXPO_WITH_CUDA
  m.def("fork_kv_cuda", &fork_kv_cuda, "KV-cache fork: one launch for all tensors (CUDA)",
        pybind11::arg("tensors"), pybind11::arg("src_rows"), pybind11::arg("src_start"),
        pybind11::arg("length"), pybind11::arg("out_len"));
#endif
}
