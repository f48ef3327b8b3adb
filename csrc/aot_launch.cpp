// The registry of ahead-of-time compiled Triton kernels, argument packing and the launch hook (aot_launch.h). Built
// in every build: without CUDA only the recorder launches, which is how the CPU tests run the C++ ops.
#include "aot_launch.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace fasttrain::aot {
namespace {

// Each kernel's parameters as the C++ ops pass them: registration checks an entry against these, so a cubin built
// from a kernel whose parameters moved is refused instead of launched with the arguments out of place.
struct KernelSpec {
  Kernel kernel;
  const char* name;
  std::vector<std::string> constexprs;
  std::vector<std::string> args;
};

const std::vector<KernelSpec>& specs() {
  static const std::vector<KernelSpec> kSpecs = {
      {Kernel::NormForward,
       "_norm_forward_kernel",
       {"IS_RMS", "HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS", "BLOCK_M", "BLOCK_N"},
       {"X", "R", "W", "B", "Y", "RO", "Mean", "Rstd", "x_row_stride", "r_row_stride", "out_row_stride", "n_rows",
        "n_cols", "eps"}},
      {Kernel::NormBackward,
       "_norm_backward_kernel",
       {"IS_RMS", "HAS_WEIGHT", "HAS_BIAS", "HAS_DRES", "HAS_DX2", "BLOCK_M", "BLOCK_N"},
       {"DY", "X", "W", "Mean", "Rstd", "DRES", "DX", "DX2", "DW", "DB", "dy_row_stride", "x_row_stride",
        "dres_row_stride", "dx_row_stride", "n_rows", "n_cols", "rows_per_program"}},
      {Kernel::Rotary,
       "_rotary_kernel",
       {"INTERLEAVED", "CONJUGATE", "PER_SEQUENCE", "OFFSET_TENSOR", "COPY_PASS", "BLOCK_T", "BLOCK_H", "BLOCK_R",
        "BLOCK_P"},
       {"X", "Cos", "Sin", "Offsets", "Out", "n_tokens", "seq_len", "n_heads", "n_pos", "offset", "half", "n_pass",
        "stride_xb", "stride_xt", "stride_xh", "stride_ob", "stride_ot", "stride_oh", "table_b_stride",
        "table_t_stride"}},
      {Kernel::CrossEntropyForward,
       "_ce_forward_kernel",
       {"BLOCK_V"},
       {"Logits", "Target", "Loss", "Lse", "row_stride", "n_cols", "ignore_index"}},
      {Kernel::CrossEntropyBackward,
       "_ce_backward_kernel",
       {"BLOCK_V"},
       {"GradRow", "Logits", "Target", "Lse", "GradLogits", "row_stride", "grad_row_stride", "n_cols",
        "ignore_index"}},
      {Kernel::DecodeAppend,
       "_decode_append_kernel",
       {"HEAD_DIM", "ROT_HALF", "ROTARY", "Q_PER_TOKEN", "INTERLEAVED", "HAS_BATCH_IDX", "PAGE", "BLOCK_D", "BLOCK_R"},
       {"Q",          "K",          "V",          "KC",         "VC",         "QR",         "COS",
        "SIN",        "SEQLENS",    "BATCH_IDX",  "BLOCK_TABLE", "stride_qb", "stride_qt",  "stride_qh",
        "stride_kb",  "stride_kt",  "stride_kh",  "stride_vb",  "stride_vt",  "stride_vh",  "stride_kcb",
        "stride_kct", "stride_kch", "stride_vcb", "stride_vct", "stride_vch", "stride_bt",  "stride_qrb",
        "stride_qrt", "stride_qrh", "stride_rot", "tq",         "t_new",      "t_rows",     "n_heads",
        "n_kv_heads", "t_cache",    "t_rot"}},
      {Kernel::Decode,
       "_decode_kernel",
       {"HEAD_DIM", "SPLIT", "HAS_BATCH_IDX", "HAS_LEFTPAD", "PAGE", "BLOCK_M", "BLOCK_N", "BLOCK_D", "SOFTCAP",
        "ALIBI"},
       {"Q",          "KC",          "VC",         "SEQLENS",     "BATCH_IDX",      "LEFTPAD",    "BLOCK_TABLE",
        "Out",        "LSE",         "stride_qb",  "stride_qt",   "stride_qh",      "stride_kcb", "stride_kct",
        "stride_kch", "stride_vcb",  "stride_vct", "stride_vch",  "stride_bt",      "stride_ob",  "stride_ot",
        "stride_oh",  "stride_ls",   "stride_lb",  "stride_lt",   "stride_lh",      "stride_os",  "qk_scale",
        "tq",         "group",       "n_kv_heads", "seqlen_add",  "window_left",    "window_right", "t_cache",
        "t_cache_bucket", "num_splits", "softcap_log2", "Alibi", "stride_ab"}},
      {Kernel::DecodeCombine,
       "_decode_combine_kernel",
       {"HEAD_DIM", "BLOCK_S", "BLOCK_D"},
       {"O_PART", "LSE_PART", "Out", "LSE", "stride_ps", "stride_ls", "stride_ob", "stride_ot", "stride_oh",
        "stride_lb", "stride_lh", "stride_lt", "tq", "n_heads", "num_splits"}},
      {Kernel::AttentionBackwardPreprocess,
       "_attn_bwd_preprocess_kernel",
       {"HEAD_DIM", "HEAD_DIM_PAD", "VARLEN", "HAS_DLSE", "BLOCK_M"},
       {"Out", "DOut", "Delta", "DLse", "stride_ob", "stride_ot", "stride_oh", "stride_db", "stride_dt", "stride_dh",
        "stride_lb", "stride_lh", "CuQ", "CuK", "seqlen_q", "seqlen_k", "left", "right"}},
      {Kernel::AttentionBackwardDkdv,
       "_attn_bwd_dkdv_kernel",
       {"GROUP", "HEAD_DIM", "HEAD_DIM_PAD", "VARLEN", "UPCAST", "TMA_ALIGNED", "FULL_TILES", "BLOCK_M", "BLOCK_N",
        "WARP_SPECIALIZE", "ATOMIC_DQ", "DROPOUT", "SOFTCAP", "ALIBI"},
       {"Q",          "K",          "V",          "DOut",       "Lse",         "Delta",       "DK",
        "DV",         "DQAcc",      "CuQ",        "CuK",        "stride_qb",   "stride_qt",   "stride_qh",
        "stride_kb",  "stride_kt",  "stride_kh",  "stride_vb",  "stride_vt",   "stride_vh",   "stride_db",
        "stride_dt",  "stride_dh",  "stride_lb",  "stride_lh",  "stride_dkb",  "stride_dkt",  "stride_dkh",
        "stride_dvb", "stride_dvt", "stride_dvh", "stride_dqb", "stride_dqt",  "stride_dqh",  "seqlen_q",
        "seqlen_k",   "scale",      "scale_log2", "left",       "right",       "tune_seqlen", "tune_left",
        "tune_right", "Seed",       "dropout_threshold", "dropout_scale", "softcap_log2", "Alibi", "stride_ab"}},
      {Kernel::AttentionBackwardDq,
       "_attn_bwd_dq_kernel",
       {"GROUP", "HEAD_DIM", "HEAD_DIM_PAD", "VARLEN", "UPCAST", "BLOCK_M", "BLOCK_N", "DROPOUT", "SOFTCAP", "ALIBI"},
       {"Q",          "K",          "V",          "DOut",       "Lse",        "Delta",       "DQ",
        "CuQ",        "CuK",        "stride_qb",  "stride_qt",  "stride_qh",  "stride_kb",   "stride_kt",
        "stride_kh",  "stride_vb",  "stride_vt",  "stride_vh",  "stride_db",  "stride_dt",   "stride_dh",
        "stride_lb",  "stride_lh",  "stride_dqb", "stride_dqt", "stride_dqh", "seqlen_q",    "seqlen_k",
        "scale",      "scale_log2", "left",       "right",      "tune_seqlen", "tune_left",  "tune_right",
        "Seed",       "dropout_threshold", "dropout_scale", "softcap_log2", "Alibi", "stride_ab"}},
      {Kernel::AttentionForward,
       "_attn_fwd_kernel",
       {"GROUP", "HEAD_DIM", "HEAD_DIM_PAD", "VARLEN", "UPCAST", "TMA_ALIGNED", "FULL_TILES", "BLOCK_M", "BLOCK_N",
        "WARP_SPECIALIZE", "DROPOUT", "SOFTCAP", "ALIBI"},
       {"Q",         "K",           "V",          "Out",          "Lse",        "CuQ",       "CuK",
        "stride_qb", "stride_qt",   "stride_qh",  "stride_kb",    "stride_kt",  "stride_kh", "stride_vb",
        "stride_vt", "stride_vh",   "stride_ob",  "stride_ot",    "stride_oh",  "stride_lb", "stride_lh",
        "seqlen_q",  "seqlen_k",    "scale_log2", "left",         "right",      "tune_seqlen", "tune_left",
        "tune_right", "Seed",       "dropout_threshold", "dropout_scale", "softcap_log2", "Alibi", "stride_ab"}},
  };
  return kSpecs;
}

// The spec of a kernel, found by value: the enum's order need not be kSpecs' order.
const KernelSpec& spec_of(Kernel kernel) {
  for (const auto& s : specs()) {
    if (s.kernel == kernel) return s;
  }
  TORCH_CHECK(false, "aot: kernel ", static_cast<int>(kernel), " has no spec");
}

struct Key {
  Kernel kernel;
  uint8_t n, np;
  std::array<int64_t, kMaxConstexprs> constexprs;
  std::array<int8_t, kMaxPointers> pointers;
  bool operator==(const Key& o) const {
    return kernel == o.kernel && n == o.n && np == o.np &&
           std::memcmp(constexprs.data(), o.constexprs.data(), n * sizeof(int64_t)) == 0 &&
           std::memcmp(pointers.data(), o.pointers.data(), np) == 0;
  }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = static_cast<uint64_t>(k.kernel);
    for (int i = 0; i < k.n; ++i) h = (h ^ static_cast<uint64_t>(k.constexprs[i])) * 0x100000001b3ull;
    for (int i = 0; i < k.np; ++i) h = (h ^ static_cast<uint64_t>(k.pointers[i])) * 0x100000001b3ull;
    return static_cast<size_t>(h);
  }
};

Key make_key(Kernel kernel, const at::ScalarType* pointers, size_t np, const int64_t* values, size_t n) {
  TORCH_CHECK(n <= kMaxConstexprs, "aot: more than ", kMaxConstexprs, " constexprs");
  TORCH_CHECK(np <= kMaxPointers, "aot: more than ", kMaxPointers, " pointer arguments");
  Key key{kernel, static_cast<uint8_t>(n), static_cast<uint8_t>(np), {}, {}};
  std::copy(values, values + n, key.constexprs.begin());
  for (size_t i = 0; i < np; ++i) key.pointers[i] = static_cast<int8_t>(pointers[i]);
  return key;
}

// Entries are never removed while the process may launch them (clear() is for tests), so references stay valid.
std::unordered_map<Key, std::unique_ptr<Entry>, KeyHash>& table() {
  static std::unordered_map<Key, std::unique_ptr<Entry>, KeyHash> t;
  return t;
}
std::mutex& table_mutex() {
  static std::mutex m;
  return m;
}

LaunchFn cuda_launch = nullptr;
MultiprocessorsFn cuda_multiprocessors = nullptr;

bool g_recording = false;
bool g_keep = true;
int g_record_multiprocessors = 0;
std::vector<Record> g_records;
std::mutex g_records_mutex;

const char* kind_name(ArgType t) {
  switch (t) {
    case ArgType::Ptr:
      return "ptr";
    case ArgType::I32:
      return "i32";
    case ArgType::I64:
      return "i64";
    case ArgType::F32:
      return "fp32";
  }
  return "?";
}

void record_launch(const Launch& l) {
  const Entry& e = *l.entry;
  Record r;
  r.kernel = spec_of(e.kernel).name;
  r.dtype = c10::toString(e.dtype);
  r.label = e.label;
  r.constexprs = e.constexprs;
  r.grid = l.grid;
  r.warps = e.warps;
  r.num_ctas = e.num_ctas;
  r.shared = e.shared;
  const int n = static_cast<int>(e.args.size());
  for (int i = 0; i < n; ++i) {
    r.types.emplace_back(kind_name(e.args[i]));
    double f = 0;
    int64_t v = 0;
    switch (e.args[i]) {
      case ArgType::Ptr:
        v = static_cast<int64_t>(*static_cast<uint64_t*>(l.params[i]));
        break;
      case ArgType::I32:
        v = *static_cast<int32_t*>(l.params[i]);
        break;
      case ArgType::I64:
        v = *static_cast<int64_t*>(l.params[i]);
        break;
      case ArgType::F32:
        f = *static_cast<float*>(l.params[i]);
        break;
    }
    r.ints.push_back(v);
    r.floats.push_back(f);
  }
  r.scratch_params = l.n_params - n;
  r.scratch_bytes = l.scratch_bytes;
  std::lock_guard<std::mutex> lock(g_records_mutex);
  g_records.push_back(std::move(r));
}

ArgType parse_type(const std::string& t) {
  if (!t.empty() && t[0] == '*') return ArgType::Ptr;
  if (t == "i32") return ArgType::I32;
  if (t == "i64") return ArgType::I64;
  if (t == "fp32") return ArgType::F32;
  TORCH_CHECK(false, "aot: unsupported argument type ", t);
}

at::ScalarType parse_dtype(const std::string& d) {
  if (d == "bf16") return at::kBFloat16;
  if (d == "fp16") return at::kHalf;
  if (d == "fp32") return at::kFloat;
  if (d == "i32") return at::kInt;
  if (d == "i64") return at::kLong;
  if (d == "i8") return at::kChar;
  if (d == "u8") return at::kByte;
  TORCH_CHECK(false, "aot: unsupported dtype ", d);
}

}  // namespace

void set_cuda(LaunchFn launch, MultiprocessorsFn multiprocessors) {
  cuda_launch = launch;
  cuda_multiprocessors = multiprocessors;
}

bool recording() { return g_recording; }

int multiprocessors(c10::DeviceIndex device) {
  if (g_recording) return g_record_multiprocessors;
  TORCH_CHECK(cuda_multiprocessors != nullptr, "aot: fasttrain._C was built without CUDA");
  return cuda_multiprocessors(device);
}

const Entry* lookup(Kernel kernel, std::initializer_list<at::ScalarType> pointers,
                    std::initializer_list<int64_t> constexprs) {
  const Key key = make_key(kernel, pointers.begin(), pointers.size(), constexprs.begin(), constexprs.size());
  auto it = table().find(key);
  return it == table().end() ? nullptr : it->second.get();
}

const Entry& find(Kernel kernel, std::initializer_list<at::ScalarType> pointers,
                  std::initializer_list<int64_t> constexprs) {
  const Key key = make_key(kernel, pointers.begin(), pointers.size(), constexprs.begin(), constexprs.size());
  auto& t = table();
  auto it = t.find(key);
  if (it == t.end()) {
    std::string values, types;
    for (int64_t v : constexprs) values += (values.empty() ? "" : ", ") + std::to_string(v);
    for (at::ScalarType p : pointers) types += std::string(types.empty() ? "" : ", ") + c10::toString(p);
    TORCH_CHECK(false, "aot: no shipped cubin for ", spec_of(kernel).name, " with pointers to (",
                types, ") and constexprs (", values, ") (rebuild with CUDA to ship them, or FASTTRAIN_AOT=0)");
  }
  return *it->second;
}

void launch(const Entry& e, Grid grid, c10::DeviceIndex device, std::initializer_list<Value> values) {
  launch(e, grid, device, values.begin(), values.size());
}

void launch(const Entry& e, Grid grid, c10::DeviceIndex device, const Value* values, size_t count) {
  const int n = static_cast<int>(e.args.size());
  TORCH_CHECK(static_cast<int>(count) == n, "aot: ", e.name, " takes ", n, " arguments, got ", count);
  // Each parameter's storage: 8 bytes suit every type the registry takes; + 2 for the scratch pointers.
  std::array<uint64_t, kMaxArgs + 2> storage{};
  std::array<void*, kMaxArgs + 2> params{};
  for (int i = 0; i < n; ++i) {
    const Value& v = values[i];
    void* slot = &storage[i];
    params[i] = slot;
    switch (e.args[i]) {
      case ArgType::Ptr:
        TORCH_CHECK(v.kind == ArgType::Ptr, "aot: ", e.name, " argument ", i, " must be a tensor");
        TORCH_CHECK(!(e.divisible >> i & 1) || v.ptr % 16 == 0, "aot: ", e.name, " argument ", i,
                    " was compiled for 16-byte aligned addresses, got ", v.ptr);
        *static_cast<uint64_t*>(slot) = v.ptr;
        break;
      case ArgType::I32:
        TORCH_CHECK(v.kind == ArgType::I64, "aot: ", e.name, " argument ", i, " must be an integer");
        TORCH_CHECK(v.i >= INT32_MIN && v.i <= INT32_MAX, "aot: ", e.name, " argument ", i, " = ", v.i,
                    " does not fit the compiled i32");
        TORCH_CHECK(!(e.divisible >> i & 1) || v.i % 16 == 0, "aot: ", e.name, " argument ", i,
                    " was compiled as a multiple of 16, got ", v.i);
        *static_cast<int32_t*>(slot) = static_cast<int32_t>(v.i);
        break;
      case ArgType::I64:
        TORCH_CHECK(v.kind == ArgType::I64, "aot: ", e.name, " argument ", i, " must be an integer");
        TORCH_CHECK(!(e.divisible >> i & 1) || v.i % 16 == 0, "aot: ", e.name, " argument ", i,
                    " was compiled as a multiple of 16, got ", v.i);
        *static_cast<int64_t*>(slot) = v.i;
        break;
      case ArgType::F32:
        TORCH_CHECK(v.kind == ArgType::F32, "aot: ", e.name, " argument ", i, " must be a float");
        *static_cast<float*>(slot) = static_cast<float>(v.f);
        break;
    }
  }
  for (int k = n; k < n + e.scratch; ++k) params[k] = &storage[k];  // the scratch pointers: null unless set below
  // Global scratch as Triton's launcher sizes it: every program (and CTA of its cluster) gets its own slice.
  const int64_t scratch_bytes = e.global_scratch == 0 ? 0
                                                      : static_cast<int64_t>(grid.x) * grid.y * grid.z * e.num_ctas *
                                                            e.global_scratch;
  const Launch l{&e, grid, device, params.data(), n + e.scratch, values, n, scratch_bytes};
  if (g_recording) {
    if (g_keep) record_launch(l);
    return;
  }
  TORCH_CHECK(device >= 0, "aot: CPU tensors are launched only while recording");
  TORCH_CHECK(cuda_launch != nullptr, "aot: fasttrain._C was built without CUDA");
  at::Tensor scratch;  // alive until the launch is queued; the caching allocator orders its reuse on the stream
  if (scratch_bytes > 0) {
    scratch = at::empty({scratch_bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
    TORCH_CHECK(reinterpret_cast<uint64_t>(scratch.data_ptr()) % e.global_scratch_align == 0, "aot: ", e.name,
                ": global scratch not ", e.global_scratch_align, "-byte aligned");
    storage[n] = reinterpret_cast<uint64_t>(scratch.data_ptr());
  }
  cuda_launch(l);
}

namespace {

TimeFn cuda_time = nullptr;
CapturingFn cuda_capturing = nullptr;
std::mutex g_tune_mutex;
std::map<std::vector<int64_t>, int> g_tuned;  // (kernel, key...) -> the candidate chosen
std::deque<double> g_tune_times;             // the recorder's times, consumed in order
std::function<void()> g_tune_saver;          // called after each new timed choice (persisted tuning)

// Timed runs per candidate, after one untimed run (which also loads its module on the device).
constexpr int kTuneRuns = 5;

}  // namespace

void set_cuda_timing(TimeFn time, CapturingFn capturing) {
  cuda_time = time;
  cuda_capturing = capturing;
}

void tune_reset(std::vector<double> times) {
  std::lock_guard<std::mutex> lock(g_tune_mutex);
  g_tuned.clear();
  g_tune_times.assign(times.begin(), times.end());
}

int tune(Kernel kernel, std::initializer_list<int64_t> key, int candidates, c10::DeviceIndex device,
         const std::function<void(int)>& run) {
  TORCH_CHECK(candidates > 0, "aot: nothing to tune among for ", spec_of(kernel).name);
  if (candidates == 1) return 0;
  std::vector<int64_t> k{static_cast<int64_t>(kernel)};
  k.insert(k.end(), key.begin(), key.end());
  {
    std::lock_guard<std::mutex> lock(g_tune_mutex);
    auto it = g_tuned.find(k);
    if (it != g_tuned.end() && it->second < candidates) return it->second;
  }
  std::vector<double> times(candidates);
  if (g_recording) {
    std::lock_guard<std::mutex> lock(g_tune_mutex);
    if (g_tune_times.size() < static_cast<size_t>(candidates)) return 0;
    for (double& t : times) {
      t = g_tune_times.front();
      g_tune_times.pop_front();
    }
  } else {
    TORCH_CHECK(cuda_time != nullptr && cuda_capturing != nullptr, "aot: fasttrain._C was built without CUDA");
    if (cuda_capturing(device)) return 0;
  }
  for (int i = 0; i < candidates; ++i) {
    if (g_recording) {
      run(i);
      continue;
    }
    run(i);
    times[i] = cuda_time(device, [&] {
      for (int r = 0; r < kTuneRuns; ++r) run(i);
    });
  }
  const int best = static_cast<int>(std::min_element(times.begin(), times.end()) - times.begin());
  std::function<void()> saver;
  {
    std::lock_guard<std::mutex> lock(g_tune_mutex);
    g_tuned[k] = best;
    saver = g_tune_saver;
  }
  if (saver) saver();  // unlocked: the saver reads tune_choices()
  return best;
}

std::vector<TuneChoice> tune_choices() {
  std::lock_guard<std::mutex> lock(g_tune_mutex);
  std::vector<TuneChoice> out;
  for (const auto& [k, choice] : g_tuned) {
    out.emplace_back(spec_of(static_cast<Kernel>(k[0])).name, std::vector<int64_t>(k.begin() + 1, k.end()), choice);
  }
  return out;
}

void tune_preload(const std::vector<TuneChoice>& choices) {
  std::lock_guard<std::mutex> lock(g_tune_mutex);
  for (const auto& [name, key, choice] : choices) {
    const auto spec = std::find_if(specs().begin(), specs().end(), [&](const KernelSpec& s) { return name == s.name; });
    if (spec == specs().end() || choice < 0 || choice > INT32_MAX) continue;
    std::vector<int64_t> k{static_cast<int64_t>(spec->kernel)};
    k.insert(k.end(), key.begin(), key.end());
    g_tuned.emplace(k, static_cast<int>(choice));  // a choice made in this process stays
  }
}

void set_tune_saver(std::function<void()> saver) {
  std::lock_guard<std::mutex> lock(g_tune_mutex);
  g_tune_saver = std::move(saver);
}

std::vector<std::string> kernel_names() {
  std::vector<std::string> out;
  for (const auto& s : specs()) out.emplace_back(s.name);
  return out;
}

void register_entry(const std::string& kernel, const std::string& dtype, std::vector<int64_t> constexprs,
                    const std::vector<std::string>& constexpr_names, const std::vector<std::string>& arg_names,
                    const std::vector<std::string>& arg_types, const std::vector<std::string>& divisible, int warps,
                    int num_ctas, int shared, int cubin_params, int64_t global_scratch, int64_t global_scratch_align,
                    int64_t profile_scratch, std::string name, std::string label, std::string cubin) {
  const KernelSpec* spec = nullptr;
  for (const auto& s : specs()) {
    if (kernel == s.name) spec = &s;
  }
  TORCH_CHECK(spec != nullptr, "aot: no C++ op launches ", kernel);
  TORCH_CHECK(constexpr_names == spec->constexprs && arg_names == spec->args, "aot: ", kernel, " [", label,
              "]: its parameters differ from what the C++ op passes (cubins from another kernel version?)");
  TORCH_CHECK(arg_types.size() == arg_names.size() && constexprs.size() == constexpr_names.size(), "aot: ", kernel,
              " [", label, "]: malformed entry");
  const int scratch = cubin_params - static_cast<int>(arg_names.size());
  TORCH_CHECK(scratch >= 0 && scratch <= 2, "aot: ", kernel, " [", label, "]: ", cubin_params,
              " cubin parameters, expected the arguments and up to two scratch pointers");
  TORCH_CHECK(profile_scratch == 0, "aot: ", kernel, " [", label,
              "] needs profile scratch memory, which the launcher does not allocate");
  TORCH_CHECK(global_scratch >= 0 && (global_scratch == 0 || scratch >= 1), "aot: ", kernel, " [", label,
              "]: global scratch of ", global_scratch, " bytes but no scratch parameter");
  // The caching allocator's blocks are 512-byte aligned; the launch checks the address it gets too.
  TORCH_CHECK(global_scratch_align >= 1 && global_scratch_align <= 512 &&
                  (global_scratch_align & (global_scratch_align - 1)) == 0,
              "aot: ", kernel, " [", label, "]: global scratch alignment ", global_scratch_align,
              " is not a power of 2 up to 512");
  TORCH_CHECK(static_cast<int>(arg_names.size()) <= kMaxArgs, "aot: ", kernel, " takes more than ", kMaxArgs,
              " arguments");
  auto e = std::make_unique<Entry>();
  e->kernel = spec->kernel;
  e->dtype = parse_dtype(dtype);
  e->label = std::move(label);
  e->name = std::move(name);
  e->constexprs = std::move(constexprs);
  for (const auto& t : arg_types) {
    e->args.push_back(parse_type(t));
    if (e->args.back() == ArgType::Ptr) e->pointers.push_back(parse_dtype(t.substr(1)));
  }
  for (const auto& d : divisible) {
    auto at = std::find(arg_names.begin(), arg_names.end(), d);
    TORCH_CHECK(at != arg_names.end(), "aot: ", kernel, ": divisible_by_16 names ", d, ", not an argument");
    e->divisible |= uint64_t{1} << (at - arg_names.begin());
  }
  e->warps = warps;
  e->num_ctas = num_ctas;
  e->shared = shared;
  e->scratch = scratch;
  e->global_scratch = global_scratch;
  e->global_scratch_align = global_scratch_align;
  e->cubin = std::move(cubin);
  const Key key =
      make_key(e->kernel, e->pointers.data(), e->pointers.size(), e->constexprs.data(), e->constexprs.size());
  std::lock_guard<std::mutex> lock(table_mutex());
  table().emplace(key, std::move(e));  // a case registered twice keeps the first
}

int64_t registered() { return static_cast<int64_t>(table().size()); }

void clear() {
  std::lock_guard<std::mutex> lock(table_mutex());
  table().clear();
}

void record(bool on, int multiprocessors, bool keep) {
  std::lock_guard<std::mutex> lock(g_records_mutex);
  g_recording = on;
  g_keep = keep;
  g_record_multiprocessors = multiprocessors;
  g_records.clear();
}

std::vector<Record> records() {
  std::lock_guard<std::mutex> lock(g_records_mutex);
  return g_records;
}

}  // namespace fasttrain::aot
