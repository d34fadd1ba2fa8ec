// pybind11 module axpo._C: runs every op family's AXPO_BIND (csrc/registry.h).
// The choice among backends is made in Python (axpo/ops/_backend.py), never here.
#include "registry.h"

namespace axpo {
std::vector<BindFn>& bind_registry() {
  static std::vector<BindFn> fns;
  return fns;
}
}  // namespace axpo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "axpo C++/CUDA kernels";
#ifdef AXPO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  for (auto fn : axpo::bind_registry()) fn(m);
}
