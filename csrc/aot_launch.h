// Launching Triton kernels compiled ahead of time (tools/aot.py, cubins shipped in the wheel) from C++, in Triton's
// calling convention: the runtime arguments in the kernel's parameter order with the constexprs left out, each in its
// compiled type (a pointer as a 64-bit device address, i32 as int32_t, fp32 as float), then the scratch pointers
// Triton appends (global, then profile, as many as the cubin's function takes beyond the arguments); blockDim.x = 32 *
// launched warps, the dynamic shared memory of the metadata. A cubin that needs global scratch (sm_90 kernels that
// build TMA descriptors on the device) gets what Triton's launcher asks its allocator for: grid cells * num_ctas *
// the metadata's size bytes, here a byte tensor from torch's caching allocator on the launch's device (stream-ordered,
// so freeing it after the launch is safe); the profile scratch pointer is null, and registration refuses a cubin that
// needs profile scratch.
//
// The registry is filled once, from Python (fasttrain/_aot.py reads index.json and hands each entry's metadata and
// cubin bytes to register_entry: no JSON parsing here). An op finds its case by (kernel, dtype, constexpr values in
// parameter order, and the element type of each pointer) with one hash lookup on integers, and launches it through `launch`, which checks every value
// against the compiled case (types, i32 range, the arguments compiled as multiples of 16) before it reaches the
// launch hook: the CUDA build's driver launch (aot_launch_cuda.cu), or a recorder that keeps the launch instead of
// making it (tests and the host-time benchmark run the whole call path on CPU tensors with it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

namespace fasttrain::aot {

// The kernels the C++ ops launch. A new op family adds its kernels here and to kKernels in aot_launch.cpp.
enum class Kernel : uint8_t {
  NormForward,
  NormBackward,
  Rotary,
  CrossEntropyForward,
  CrossEntropyBackward,
  DecodeAppend,
  Decode,
  DecodeCombine,
  AttentionForward,
  AttentionBackwardPreprocess,
  AttentionBackwardDkdv,
  AttentionBackwardDq,
};

enum class ArgType : uint8_t { Ptr, I32, I64, F32 };

constexpr int kMaxArgs = 56;        // the attention backward's dK/dV kernel takes 49
constexpr int kMaxConstexprs = 16;  // the attention backward's dK/dV kernel takes 14
constexpr int kMaxPointers = 16;

// One runtime argument as an op passes it: a tensor's address (0 for an absent one), an integer or a float.
struct Value {
  ArgType kind;  // Ptr, I64 (any integer: converted to the compiled width) or F32 (any float)
  union {
    uint64_t ptr;
    int64_t i;
    double f;
  };
};

inline Value ptr(const at::Tensor& t) {
  Value v{ArgType::Ptr, {}};
  v.ptr = t.defined() ? reinterpret_cast<uint64_t>(t.data_ptr()) : 0;
  return v;
}
inline Value ptr(const std::optional<at::Tensor>& t) { return t ? ptr(*t) : ptr(at::Tensor()); }
inline Value integer(int64_t x) {
  Value v{ArgType::I64, {}};
  v.i = x;
  return v;
}
inline Value real(double x) {
  Value v{ArgType::F32, {}};
  v.f = x;
  return v;
}

// One compiled case: what registration received, and the per-device function handles the CUDA launch caches.
struct Entry {
  Kernel kernel;
  at::ScalarType dtype;  // the case's nominal dtype (tools/aot.py --dtype)
  std::vector<at::ScalarType> pointers;  // element type of each pointer argument, in order
  std::string label;  // tools/aot.py's case label
  std::string name;   // the cubin's entry function
  std::vector<int64_t> constexprs;
  std::vector<ArgType> args;
  uint64_t divisible = 0;  // bit i: runtime argument i was compiled as a multiple of 16
  int warps = 0;           // as launched (Triton's metadata num_warps)
  int num_ctas = 1;
  int shared = 0;   // dynamic shared memory, bytes
  int scratch = 2;  // scratch pointers after the arguments (Triton's global and profile scratch)
  int64_t global_scratch = 0;      // bytes per program (per CTA) of global scratch; 0: the pointer is null
  int64_t global_scratch_align = 1;  // its alignment, bytes (the caching allocator's blocks are 512-byte aligned)
  std::string cubin;
  mutable std::array<void*, 64> functions{};  // CUfunction per device index, loaded at first launch there
};

struct Grid {
  uint32_t x = 1, y = 1, z = 1;
};

// The launch hook's arguments: params[i] points at the packed value of kernel parameter i (runtime arguments, then
// the two scratch pointers), values are the op's values as given (for the recorder).
struct Launch {
  const Entry* entry;
  Grid grid;
  c10::DeviceIndex device;
  void** params;
  int n_params;
  const Value* values;
  int n_values;
  int64_t scratch_bytes;  // the global scratch allocated for this launch (0: none)
};

using LaunchFn = void (*)(const Launch&);
using MultiprocessorsFn = int (*)(c10::DeviceIndex);

// The launch and the SM count a CUDA build installs at load (nullptr without CUDA).
void set_cuda(LaunchFn launch, MultiprocessorsFn multiprocessors);

// The case of `kernel` compiled with these pointer element types (its pointer arguments in order; the op names one
// for an absent tensor too, as its shipped set compiles it) and constexpr values (parameter order), or an error.
const Entry& find(Kernel kernel, std::initializer_list<at::ScalarType> pointers, std::initializer_list<int64_t> constexprs);

// The same case, or nullptr when it was not shipped (an op probing the tiles it may tune among).
const Entry* lookup(Kernel kernel, std::initializer_list<at::ScalarType> pointers,
                    std::initializer_list<int64_t> constexprs);

// Checks values against entry (count, kinds, i32 range, multiples of 16), packs them and hands the launch to the hook
// (the recorder while recording, else the CUDA launch). device: the tensors' device index (-1 for CPU tensors, which
// only the recorder takes).
void launch(const Entry& entry, Grid grid, c10::DeviceIndex device, std::initializer_list<Value> values);
// The same with the values in an array (an op that assembles its argument list in parts).
void launch(const Entry& entry, Grid grid, c10::DeviceIndex device, const Value* values, size_t count);

// Multiprocessors of a CUDA device (the recorder's fixed count while recording).
int multiprocessors(c10::DeviceIndex device);

// Whether launches are being recorded (CPU tensors are taken only then).
bool recording();

// Autotuning among shipped tiles, once per shape class: the index of the candidate chosen for (kernel, key), from the
// cache, else found by running each candidate (run(i) makes candidate i's launches on torch's current stream) and
// timing it, then cached. One candidate: 0, untimed. While a CUDA graph is being captured nothing can be timed: 0 (the
// first candidate, whose tile is the JIT's first config) and nothing cached. While recording, each candidate runs once
// (its launches recorded) and its time is the next of tune_times' list; with the list empty, 0 and nothing cached.
int tune(Kernel kernel, std::initializer_list<int64_t> key, int candidates, c10::DeviceIndex device,
         const std::function<void(int)>& run);

// The CUDA build's timing (aot_launch_cuda.cu): milliseconds of `run` on the device's current stream by CUDA events,
// and whether that stream is being captured into a graph.
using TimeFn = double (*)(c10::DeviceIndex, const std::function<void()>&);
using CapturingFn = bool (*)(c10::DeviceIndex);
void set_cuda_timing(TimeFn time, CapturingFn capturing);

// Tests: forget every tuned choice and time the recorded candidates by `times`, in order.
void tune_reset(std::vector<double> times);

// Persisted tuning (fasttrain/_aot.py keeps the file): every choice made, as (kernel name, key, candidate); choices
// read back from a file, taken where the tuner has made none for that key (a kernel name no op launches is skipped);
// and the function called after each new timed choice, outside the tuner's lock (empty: none).
using TuneChoice = std::tuple<std::string, std::vector<int64_t>, int64_t>;
std::vector<TuneChoice> tune_choices();
void tune_preload(const std::vector<TuneChoice>& choices);
void set_tune_saver(std::function<void()> saver);

// Registration and the recorder, for fasttrain/_aot.py and the tests (bound in bindings.cpp).
std::vector<std::string> kernel_names();
void register_entry(const std::string& kernel, const std::string& dtype, std::vector<int64_t> constexprs,
                    const std::vector<std::string>& constexpr_names, const std::vector<std::string>& arg_names,
                    const std::vector<std::string>& arg_types, const std::vector<std::string>& divisible, int warps,
                    int num_ctas, int shared, int cubin_params, int64_t global_scratch, int64_t global_scratch_align,
                    int64_t profile_scratch, std::string name, std::string label, std::string cubin);
int64_t registered();
void clear();
struct Record {
  std::string kernel, dtype, label;
  std::vector<int64_t> constexprs;
  Grid grid;
  int warps, num_ctas, shared;
  std::vector<std::string> types;   // per runtime argument: "ptr", "i32", "i64", "fp32"
  std::vector<double> floats;       // per runtime argument: the packed float (fp32 ones), else 0
  std::vector<int64_t> ints;        // per runtime argument: the packed integer or address, else 0
  int scratch_params;               // parameters packed after the runtime arguments (the scratch pointers)
  int64_t scratch_bytes;            // global scratch bytes the launch allocated (while recording: would allocate)
};
// keep=false: launches are packed and checked, then dropped (a no-op launch, for timing the host path).
void record(bool on, int multiprocessors, bool keep);
std::vector<Record> records();

}  // namespace fasttrain::aot
