// The Python module fasttrain._C. Importing it registers the torch.library ops (torch.ops.fasttrain.*) defined in
// the other translation units; the functions below only report how the extension was built.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include "aot_launch.h"
#include "cpu_blas.h"

namespace {

bool built_with_cuda() {
#ifdef FASTTRAIN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

const char* cpu_tile_blas() { return fasttrain::tile_blas() != nullptr ? "sgemm_" : "at::mm"; }

}  // namespace

namespace fasttrain {
void bind_aot_short(pybind11::module_& m);  // aot_short.cpp
}  // namespace fasttrain

PYBIND11_MODULE(_C, m) {
  m.doc() = "fasttrain native kernels (CPU always; CUDA when built with it)";
  fasttrain::bind_aot_short(m);
  m.def("built_with_cuda", &built_with_cuda, "True if the CUDA sources were compiled into this extension");
  m.def("openmp_max_threads", &omp_get_max_threads, "OpenMP threads the CPU kernels may use");
  m.def("cpu_tile_blas", &cpu_tile_blas,
        "What the CPU attention kernels' tile matmuls call: sgemm_ (libtorch's BLAS, straight) or at::mm");
  // The ahead-of-time kernels' registry and launch recorder (aot_launch.h; fasttrain/_aot.py fills the registry).
  namespace aot = fasttrain::aot;
  m.def("aot_kernels", &aot::kernel_names, "The Triton kernels the C++ ops launch from shipped cubins");
  m.def(
      "aot_register",
      [](const std::string& kernel, const std::string& dtype, std::vector<int64_t> constexprs,
         const std::vector<std::string>& constexpr_names, const std::vector<std::string>& arg_names,
         const std::vector<std::string>& arg_types, const std::vector<std::string>& divisible, int warps, int num_ctas,
         int shared, int cubin_params, int64_t global_scratch, int64_t profile_scratch, std::string name,
         std::string label, const pybind11::bytes& cubin, int64_t global_scratch_align) {
        aot::register_entry(kernel, dtype, std::move(constexprs), constexpr_names, arg_names, arg_types, divisible,
                            warps, num_ctas, shared, cubin_params, global_scratch, global_scratch_align,
                            profile_scratch, std::move(name), std::move(label), std::string(cubin));
      },
      pybind11::arg("kernel"), pybind11::arg("dtype"), pybind11::arg("constexprs"), pybind11::arg("constexpr_names"),
      pybind11::arg("arg_names"), pybind11::arg("arg_types"), pybind11::arg("divisible"), pybind11::arg("warps"),
      pybind11::arg("num_ctas"), pybind11::arg("shared"), pybind11::arg("cubin_params"),
      pybind11::arg("global_scratch"), pybind11::arg("profile_scratch"), pybind11::arg("name"), pybind11::arg("label"),
      pybind11::arg("cubin"), pybind11::arg("global_scratch_align") = 1,
      "Register one compiled case (an index.json entry and its cubin's bytes; global_scratch_align: the metadata's)");
  m.def("aot_registered", &aot::registered, "How many compiled cases are registered");
  m.def("aot_clear", &aot::clear, "Forget every registered case (tests)");
  m.def("aot_tune_reset", &aot::tune_reset, pybind11::arg("times") = std::vector<double>{},
        "Forget every tuned choice; recorded tuning then takes its candidates' times from `times`, in order (tests)");
  m.def("aot_tune_choices", &aot::tune_choices, "Every tuned choice as (kernel, key, candidate) (persisted tuning)");
  m.def("aot_tune_preload", &aot::tune_preload, pybind11::arg("choices"),
        "Take (kernel, key, candidate) choices read back from a file where none is made yet (persisted tuning)");
  m.def("aot_tune_saver", &aot::set_tune_saver, pybind11::arg("saver").none(true),
        "The function called after each new timed choice (None: none), with the GIL taken");
  m.def("aot_record", &aot::record, pybind11::arg("on"), pybind11::arg("multiprocessors") = 132,
        pybind11::arg("keep") = true,
        "Record launches instead of making them (CPU tensors accepted), with this SM count; clears the records. "
        "keep=False drops each launch once packed (a no-op launch, for host-time benchmarks)");
  m.def(
      "aot_records",
      []() {
        pybind11::list out;
        for (const auto& r : aot::records()) {
          pybind11::dict d;
          d["kernel"] = r.kernel;
          d["dtype"] = r.dtype;
          d["case"] = r.label;
          d["constexprs"] = r.constexprs;
          d["grid"] = pybind11::make_tuple(r.grid.x, r.grid.y, r.grid.z);
          d["num_warps"] = r.warps;
          d["num_ctas"] = r.num_ctas;
          d["shared"] = r.shared;
          d["types"] = r.types;
          pybind11::list values;
          for (size_t i = 0; i < r.types.size(); ++i) {
            if (r.types[i] == "fp32") {
              values.append(r.floats[i]);
            } else {
              values.append(r.ints[i]);
            }
          }
          d["args"] = values;
          d["scratch_params"] = r.scratch_params;
          d["scratch_bytes"] = r.scratch_bytes;
          out.append(d);
        }
        return out;
      },
      "The launches recorded since aot_record(True): kernel, case, grid, warps, shared memory, packed arguments");
}
