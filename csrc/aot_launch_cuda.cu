// The CUDA launch of aot_launch.h: the driver API through dlopen("libcuda.so.1"), so the extension still imports on
// a machine without a driver. A cubin's module is loaded once per device at its first launch there (the function
// handle cached in its Entry, the dynamic shared memory attribute set then); a launch is one cuLaunchKernel (or
// cuLaunchKernelEx with the cluster dims of a num_ctas > 1 case, as Triton launches it) on torch's current stream,
// with no per-pointer driver query. No device code here: a .cu so that only CUDA builds compile it.
//   compile-check without a GPU: tools/nvcc_check.sh
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <dlfcn.h>

#include <array>
#include <functional>
#include <mutex>

#include "aot_launch.h"

namespace fasttrain::aot {
namespace {

struct Driver {
  decltype(&cuGetErrorString) get_error_string = nullptr;
  decltype(&cuDeviceGet) device_get = nullptr;
  decltype(&cuDeviceGetAttribute) device_get_attribute = nullptr;
  decltype(&cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
  decltype(&cuCtxSetCurrent) ctx_set_current = nullptr;
  decltype(&cuModuleLoadData) module_load_data = nullptr;
  decltype(&cuModuleGetFunction) module_get_function = nullptr;
  decltype(&cuFuncSetAttribute) func_set_attribute = nullptr;
  decltype(&cuLaunchKernel) launch_kernel = nullptr;
  decltype(&cuLaunchKernelEx) launch_kernel_ex = nullptr;
  // aot::tune's timing
  decltype(&cuEventCreate) event_create = nullptr;
  decltype(&cuEventRecord) event_record = nullptr;
  decltype(&cuEventSynchronize) event_synchronize = nullptr;
  decltype(&cuEventElapsedTime) event_elapsed_time = nullptr;
  decltype(&cuEventDestroy) event_destroy = nullptr;
  decltype(&cuStreamIsCapturing) stream_is_capturing = nullptr;
};

template <typename F>
void bind(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  TORCH_CHECK(fn != nullptr, "aot: libcuda.so.1 has no ", name);
}

const Driver& driver() {
  static const Driver d = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(lib != nullptr, "aot: cannot load libcuda.so.1 (", dlerror(), ")");
    Driver out;
    bind(lib, "cuGetErrorString", out.get_error_string);
    bind(lib, "cuDeviceGet", out.device_get);
    bind(lib, "cuDeviceGetAttribute", out.device_get_attribute);
    bind(lib, "cuDevicePrimaryCtxRetain", out.primary_ctx_retain);
    bind(lib, "cuCtxSetCurrent", out.ctx_set_current);
    bind(lib, "cuModuleLoadData", out.module_load_data);
    bind(lib, "cuModuleGetFunction", out.module_get_function);
    bind(lib, "cuFuncSetAttribute", out.func_set_attribute);
    bind(lib, "cuLaunchKernel", out.launch_kernel);
    bind(lib, "cuLaunchKernelEx", out.launch_kernel_ex);
    bind(lib, "cuEventCreate", out.event_create);
    bind(lib, "cuEventRecord", out.event_record);
    bind(lib, "cuEventSynchronize", out.event_synchronize);
    bind(lib, "cuEventElapsedTime", out.event_elapsed_time);  // every driver's (cuda.h may name the _v2)
    bind(lib, "cuEventDestroy_v2", out.event_destroy);
    bind(lib, "cuStreamIsCapturing", out.stream_is_capturing);
    return out;
  }();
  return d;
}

void check(CUresult status, const char* what) {
  if (status == CUDA_SUCCESS) return;
  const char* text = nullptr;
  driver().get_error_string(status, &text);
  TORCH_CHECK(false, "aot: ", what, " failed: ", text ? text : "unknown error", " (", static_cast<int>(status), ")");
}

// The device's primary context (torch's) made current on this thread: a thread that made no CUDA runtime call yet
// (an autograd worker) may have none.
void make_current(c10::DeviceIndex device) {
  CUdevice dev;
  CUcontext ctx;
  check(driver().device_get(&dev, device), "cuDeviceGet");
  check(driver().primary_ctx_retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
  check(driver().ctx_set_current(ctx), "cuCtxSetCurrent");
}

std::mutex load_mutex;

CUfunction function(const Entry& e, c10::DeviceIndex device) {
  TORCH_CHECK(device >= 0 && device < static_cast<int>(e.functions.size()), "aot: device index ", device,
              " out of range");
  if (void* f = e.functions[device]) return static_cast<CUfunction>(f);
  std::lock_guard<std::mutex> lock(load_mutex);
  if (void* f = e.functions[device]) return static_cast<CUfunction>(f);
  make_current(device);
  CUmodule module;
  CUfunction fn;
  check(driver().module_load_data(&module, e.cubin.data()), "cuModuleLoadData");
  check(driver().module_get_function(&fn, module, e.name.c_str()), "cuModuleGetFunction");
  if (e.shared > 48 * 1024) {  // above the default limit a kernel must opt in to its dynamic shared memory
    check(driver().func_set_attribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, e.shared),
          "cuFuncSetAttribute");
  }
  e.functions[device] = fn;
  return fn;
}

CUresult launch_once(const Launch& l, CUfunction fn, CUstream stream) {
  const Entry& e = *l.entry;
  if (e.num_ctas == 1) {
    return driver().launch_kernel(fn, l.grid.x, l.grid.y, l.grid.z, 32 * e.warps, 1, 1, e.shared, stream, l.params,
                                  nullptr);
  }
  CUlaunchAttribute attrs[2] = {};
  attrs[0].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
  attrs[0].value.clusterDim.x = e.num_ctas;
  attrs[0].value.clusterDim.y = 1;
  attrs[0].value.clusterDim.z = 1;
  attrs[1].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE;
  attrs[1].value.clusterSchedulingPolicyPreference = CU_CLUSTER_SCHEDULING_POLICY_SPREAD;
  CUlaunchConfig config = {};
  config.gridDimX = l.grid.x * e.num_ctas;
  config.gridDimY = l.grid.y;
  config.gridDimZ = l.grid.z;
  config.blockDimX = 32 * e.warps;
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = e.shared;
  config.hStream = stream;
  config.attrs = attrs;
  config.numAttrs = 2;
  return driver().launch_kernel_ex(&config, fn, l.params, nullptr);
}

void launch_cuda(const Launch& l) {
  if (static_cast<uint64_t>(l.grid.x) * l.grid.y * l.grid.z == 0) return;
  // The tensors' device current (its primary context with it), as a handle is loaded and a launch made in it.
  const c10::cuda::CUDAGuard guard(l.device);
  CUfunction fn = function(*l.entry, l.device);
  CUstream stream = reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream(l.device).stream());
  CUresult status = launch_once(l, fn, stream);
  if (status == CUDA_ERROR_INVALID_CONTEXT) {  // a thread without a current context: give it torch's, once
    make_current(l.device);
    status = launch_once(l, fn, stream);
  }
  check(status, "cuLaunchKernel");
}

int multiprocessors_cuda(c10::DeviceIndex device) {
  static std::array<int, 64> counts{};
  TORCH_CHECK(device >= 0 && device < static_cast<int>(counts.size()), "aot: device index ", device,
              " out of range");
  if (counts[device] == 0) {
    CUdevice dev;
    int n = 0;
    check(driver().device_get(&dev, device), "cuDeviceGet");
    check(driver().device_get_attribute(&n, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev), "cuDeviceGetAttribute");
    counts[device] = n;
  }
  return counts[device];
}

CUstream current_stream(c10::DeviceIndex device) {
  return reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream(device).stream());
}

bool capturing_cuda(c10::DeviceIndex device) {
  const c10::cuda::CUDAGuard guard(device);
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  check(driver().stream_is_capturing(current_stream(device), &status), "cuStreamIsCapturing");
  return status != CU_STREAM_CAPTURE_STATUS_NONE;
}

// Milliseconds between two events recorded around run's launches on the current stream (a host sync).
double time_cuda(c10::DeviceIndex device, const std::function<void()>& run) {
  const c10::cuda::CUDAGuard guard(device);
  make_current(device);
  CUstream stream = current_stream(device);
  CUevent start, end;
  check(driver().event_create(&start, CU_EVENT_DEFAULT), "cuEventCreate");
  check(driver().event_create(&end, CU_EVENT_DEFAULT), "cuEventCreate");
  float ms = 0.0f;
  CUresult status = driver().event_record(start, stream);
  if (status == CUDA_SUCCESS) {
    run();
    status = driver().event_record(end, stream);
  }
  if (status == CUDA_SUCCESS) status = driver().event_synchronize(end);
  if (status == CUDA_SUCCESS) status = driver().event_elapsed_time(&ms, start, end);
  driver().event_destroy(start);
  driver().event_destroy(end);
  check(status, "timing a tuning candidate (cuEvent*)");
  return ms;
}

const bool installed = [] {
  set_cuda(&launch_cuda, &multiprocessors_cuda);
  set_cuda_timing(&time_cuda, &capturing_cuda);
  return true;
}();

}  // namespace
}  // namespace fasttrain::aot
