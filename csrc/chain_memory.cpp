// csrc._C: the checkpoint planner and store for backpropagation through the sampling chain.
//
// Importing csrc._C runs the registrations below; Python reaches the ops through
// torch.ops.chain_memory.* and the store through torch.classes.chain_memory.Store (wrapped in csrc/__init__.py).
#include <Python.h>

#include <torch/custom_class.h>
#include <torch/library.h>

#include <tuple>

#include "planner.h"
#include "store.h"

extern "C" {
// A dummy module: `import csrc._C` only has to load this library so the TORCH_LIBRARY blocks run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      NULL,  // documentation
      -1,    // size of per-interpreter state; -1: global state
      NULL,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace chain_memory {
namespace {

std::tuple<std::vector<int64_t>, int64_t, int64_t, bool, double> plan_op(
    at::IntArrayRef act_bytes, at::IntArrayRef input_bytes, at::ArrayRef<double> flops, int64_t budget,
    double flops_per_s, double device_bytes_per_s, double host_bytes_per_s, int64_t prefetch_depth,
    int64_t resolution) {
  TORCH_CHECK(act_bytes.size() == input_bytes.size() && act_bytes.size() == flops.size(),
              "plan: act_bytes, input_bytes and flops need one entry per item, got ", act_bytes.size(), ", ",
              input_bytes.size(), " and ", flops.size());
  Plan plan;
  try {
    plan = make_plan(act_bytes.vec(), input_bytes.vec(), flops.vec(), budget,
                     Rates{flops_per_s, device_bytes_per_s, host_bytes_per_s}, prefetch_depth, resolution);
  } catch (const std::invalid_argument& err) {
    TORCH_CHECK(false, err.what());
  }
  return {plan.decisions, plan.reserve, plan.quantum, plan.feasible, plan.cost};
}

std::vector<double> option_costs_op(int64_t act_bytes, int64_t input_bytes, double flops, double flops_per_s,
                                    double device_bytes_per_s, double host_bytes_per_s) {
  double cost[kNumDecisions];
  int64_t bytes[kNumDecisions];
  option_costs(act_bytes, input_bytes, flops, Rates{flops_per_s, device_bytes_per_s, host_bytes_per_s}, cost, bytes);
  return std::vector<double>(cost, cost + kNumDecisions);
}

bool cuda_built() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

// All schemas in one block. The planner takes lists, not tensors: it is a CPU computation on a few hundred items.
TORCH_LIBRARY(chain_memory, m) {
  m.def("plan(int[] act_bytes, int[] input_bytes, float[] flops, int budget, float flops_per_s, "
        "float device_bytes_per_s, float host_bytes_per_s, int prefetch_depth, int resolution) "
        "-> (int[] decisions, int reserve, int quantum, bool feasible, float cost)",
        &plan_op);
  m.def("option_costs(int act_bytes, int input_bytes, float flops, float flops_per_s, float device_bytes_per_s, "
        "float host_bytes_per_s) -> float[]",
        &option_costs_op);
  m.def("cuda_built() -> bool", &cuda_built);
  m.class_<Store>("Store")
      .def(torch::init<int64_t, int64_t, bool>())
      .def("put", &Store::put)
      .def("share", &Store::share)
      .def("get", &Store::get)
      .def("prefetch_group", &Store::prefetch_group)
      .def("release", &Store::release)
      .def("synchronize", &Store::synchronize)
      .def("stats", &Store::stats)
      .def("reset_peaks", &Store::reset_peaks)
      .def("trim", &Store::trim)
      .def("set_max_inflight_bytes", &Store::set_max_inflight_bytes);
}

}  // namespace chain_memory
