// The Python module fasttrain._C. Importing it registers the torch.library ops (torch.ops.fasttrain.*) defined in
// the other translation units; the functions below only report how the extension was built.
#include <omp.h>
#include <pybind11/pybind11.h>

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "fasttrain native kernels (CPU always; CUDA when built with it)";
  m.def("built_with_cuda", &built_with_cuda, "True if the CUDA sources were compiled into this extension");
  m.def("openmp_max_threads", &omp_get_max_threads, "OpenMP threads the CPU kernels may use");
  m.def("cpu_tile_blas", &cpu_tile_blas,
        "What the CPU attention kernels' tile matmuls call: sgemm_ (libtorch's BLAS, straight) or at::mm");
}
