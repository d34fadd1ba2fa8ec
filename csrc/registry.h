// Each op family binds its own host functions into axpo._C from its csrc/cpu/<op>.cpp:
//   AXPO_BIND(logprob_entropy) { m.def("lpe_fwd_cpu", &lpe_fwd_cpu, "..."); ... }
// The bind functions register themselves at load time, so adding an op family touches no
// shared file (setup.py compiles every csrc/cpu/*.cpp and csrc/cuda/*.cu).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace axpo {
using BindFn = void (*)(pybind11::module_&);
std::vector<BindFn>& bind_registry();
struct RegisterBind {
  explicit RegisterBind(BindFn fn) { bind_registry().push_back(fn); }
};
}  // namespace axpo

#define AXPO_BIND(family)                                                   \
  static void axpo_bind_##family(pybind11::module_& m);                     \
  static ::axpo::RegisterBind axpo_bind_reg_##family(&axpo_bind_##family); \
  static void axpo_bind_##family(pybind11::module_& m)
