// pybind11 module axpo._C: host entry points of every op, one name per backend.
// The choice among backends is made in Python (axpo/ops/_backend.py), never here.
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "axpo C++/CUDA kernels";
#ifdef AXPO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("lpe_fwd_cpu", &lpe_fwd_cpu, "log-prob + entropy forward, full rows (CPU)");
  m.def("lpe_fwd_chunk_cpu", &lpe_fwd_chunk_cpu, "log-prob + entropy: fold a vocab chunk (CPU)");
  m.def("lpe_bwd_cpu", &lpe_bwd_cpu, "log-prob + entropy backward over a vocab chunk (CPU)");
#ifdef AXPO_WITH_CUDA
  m.def("lpe_fwd_cuda", &lpe_fwd_cuda, "log-prob + entropy forward, full rows (CUDA)");
  m.def("lpe_fwd_chunk_cuda", &lpe_fwd_chunk_cuda, "log-prob + entropy: fold a vocab chunk (CUDA)");
  m.def("lpe_bwd_cuda", &lpe_bwd_cuda, "log-prob + entropy backward over a vocab chunk (CUDA)");
#endif
}
