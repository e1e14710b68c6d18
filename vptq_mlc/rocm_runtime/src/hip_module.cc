/*
 * vptq-mlc ROCm runtime: loader and launcher for TVM's "hip" module kind (format "hsaco").
 *
 * An exported TVM ROCm library embeds, per module, the bytes that TVM's ROCm codegen serialized:
 *   [str fmt]["hsaco"] [u64 n] n x ([str name][FunctionInfo]) [bytes code]
 * with FunctionInfo = [str name][u64 n][n x (u8 code, u8 bits, u16 lanes)]   argument dtypes
 *                     [u64 m][m x str]                                        launch param tags
 *                     [u64 k][k x i32]                                        argument extra tags
 * (strings/bytes are u64 length + data, all little endian). The code is one HSA code object
 * (an AMDGPU ELF) for one gfx arch. Kernels are launched with hipModuleLaunchKernel; arguments are
 * packed into one buffer laid out like a C struct (pointers and 64-bit scalars 8-byte aligned,
 * 32-bit scalars 4-byte aligned), followed in the call by the launch values named by the tags.
 */
#include <tvm/ffi/cast.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <array>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"

namespace vptq_rocm {

namespace ffi = tvm::ffi;

namespace {

constexpr int kMaxGPUs = 32;

/*! \brief Bounds-checked little-endian reader over the serialized module. */
class BlobReader {
 public:
  BlobReader(const char* data, size_t size) : data_(data), size_(size) {}

  uint64_t U64() { return Scalar<uint64_t>(); }

  template <typename T>
  T Scalar() {
    Need(sizeof(T));
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string Str() {
    uint64_t n = U64();
    Need(n);
    std::string s(data_ + pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return s;
  }

  bool AtEnd() const { return pos_ == size_; }

 private:
  void Need(uint64_t n) const {
    if (n > size_ - pos_) {
      TVM_FFI_THROW(ValueError)
          << "corrupted ROCm (hip) module in the model library: record ends after " << size_
          << " bytes while reading at " << pos_
          << "; rebuild the library with apache-tvm 0.27 or re-download it";
    }
  }
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

enum class ArgKind : uint8_t { kPointer, kI64, kF64, kI32, kU32, kF32 };

ArgKind ToArgKind(DLDataType t, const std::string& kernel) {
  if (t.lanes == 1) {
    if (t.code == kDLOpaqueHandle && t.bits == 64) return ArgKind::kPointer;
    if (t.code == kDLInt && t.bits == 64) return ArgKind::kI64;
    if (t.code == kDLInt && t.bits == 32) return ArgKind::kI32;
    if (t.code == kDLUInt && t.bits == 32) return ArgKind::kU32;
    if (t.code == kDLFloat && t.bits == 64) return ArgKind::kF64;
    if (t.code == kDLFloat && t.bits == 32) return ArgKind::kF32;
  }
  TVM_FFI_THROW(ValueError) << "ROCm kernel " << kernel << " has an argument of type (code "
                            << int(t.code) << ", bits " << int(t.bits) << ", lanes " << t.lanes
                            << ") that cannot be passed to a device function";
  TVM_FFI_UNREACHABLE();
}

/*! \brief What TVM's FunctionInfo says about one kernel, in launch-ready form. */
struct KernelInfo {
  std::string name;
  std::vector<ArgKind> args;
  std::vector<DLDataType> arg_types;
  std::vector<std::string> tags;
  // launch value i (after the kernel arguments) goes to work slot slots[i]: 0-2 grid, 3-5 block
  std::vector<int> slots;
  bool dyn_shmem = false;
  // byte offset of each argument in the kernarg buffer (C struct layout), and the buffer's size
  std::vector<uint32_t> offsets;
  uint32_t kernarg_size = 0;
};

/*!
 * \brief Lay the arguments out like the AMDGPU backend lays out the kernarg segment (a C struct):
 * pointers and 64-bit scalars on 8-byte boundaries, 32-bit scalars on 4-byte boundaries.
 */
void LayoutKernargs(KernelInfo* k) {
  uint32_t off = 0;
  for (ArgKind a : k->args) {
    uint32_t size = (a == ArgKind::kI32 || a == ArgKind::kU32 || a == ArgKind::kF32) ? 4 : 8;
    off = (off + size - 1) / size * size;
    k->offsets.push_back(off);
    off += size;
  }
  k->kernarg_size = off;
}

KernelInfo ParseKernel(BlobReader* r) {
  KernelInfo k;
  k.name = r->Str();
  uint64_t nargs = r->U64();
  for (uint64_t i = 0; i < nargs; ++i) {
    DLDataType t;
    t.code = r->Scalar<uint8_t>();
    t.bits = r->Scalar<uint8_t>();
    t.lanes = r->Scalar<uint16_t>();
    k.arg_types.push_back(t);
    k.args.push_back(ToArgKind(t, k.name));
  }
  uint64_t ntags = r->U64();
  for (uint64_t i = 0; i < ntags; ++i) k.tags.push_back(r->Str());
  uint64_t nextra = r->U64();
  for (uint64_t i = 0; i < nextra; ++i) {
    int32_t extra = r->Scalar<int32_t>();
    if (extra != 0) {
      TVM_FFI_THROW(ValueError) << "ROCm kernel " << k.name
                                << " uses an argument tag (tensor map) that ROCm does not have";
    }
  }
  for (size_t i = 0; i < k.tags.size(); ++i) {
    const std::string& tag = k.tags[i];
    if (tag == "tirx.use_dyn_shared_memory") {
      if (i + 1 != k.tags.size()) {
        TVM_FFI_THROW(ValueError) << "ROCm kernel " << k.name
                                  << ": the dynamic shared memory tag must be the last tag";
      }
      k.dyn_shmem = true;
    } else if (tag.size() == 10 && (tag.compare(0, 9, "blockIdx.") == 0) && tag[9] >= 'x' &&
               tag[9] <= 'z') {
      k.slots.push_back(tag[9] - 'x');
    } else if (tag.size() == 11 && (tag.compare(0, 10, "threadIdx.") == 0) && tag[10] >= 'x' &&
               tag[10] <= 'z') {
      k.slots.push_back(3 + (tag[10] - 'x'));
    } else {
      TVM_FFI_THROW(ValueError) << "ROCm kernel " << k.name << " needs launch parameter '" << tag
                                << "', which the vptq-mlc ROCm runtime does not support";
    }
  }
  LayoutKernargs(&k);
  return k;
}

/*! \brief Facts read from the code object's ELF header and metadata note. */
struct CodeObjectFacts {
  std::string target;  // e.g. "amdgcn-amd-amdhsa--gfx90a" or "...-hcc-gfx90a"
  std::string arch;    // e.g. "gfx90a"
  int version = 0;     // code object version (3..6)
};

CodeObjectFacts InspectCodeObject(const std::string& code) {
  static const char kElfMagic[4] = {0x7f, 'E', 'L', 'F'};
  if (code.size() < 64 || std::memcmp(code.data(), kElfMagic, 4) != 0) {
    TVM_FFI_THROW(ValueError) << "the ROCm module's code is not an ELF code object ("
                              << code.size() << " bytes); rebuild the model library";
  }
  uint16_t machine;
  std::memcpy(&machine, code.data() + 18, 2);
  if (machine != 224 /* EM_AMDGPU */) {
    TVM_FFI_THROW(ValueError) << "the ROCm module's code object is for ELF machine " << machine
                              << ", not AMDGPU (224); rebuild the model library";
  }
  CodeObjectFacts f;
  const int abi = static_cast<unsigned char>(code[8]);  // EI_ABIVERSION: 1=v3 .. 4=v6
  f.version = abi + 2;
  const std::string key = "amdgcn-amd-amdhsa";
  size_t pos = code.find(key);
  if (pos != std::string::npos) {
    size_t end = pos;
    while (end < code.size() && (std::isalnum(static_cast<unsigned char>(code[end])) ||
                                 code[end] == '-' || code[end] == '_' || code[end] == ':' ||
                                 code[end] == '+')) {
      ++end;
    }
    f.target = code.substr(pos, end - pos);
    size_t g = f.target.rfind("gfx");
    if (g != std::string::npos) f.arch = f.target.substr(g);
  }
  return f;
}

std::string MinRocmFor(int version) {
  // ROCr's loader accepts code object v5 from ROCm 5.2 and v6 from ROCm 6.2 (ROCR-Runtime
  // src/loader/executable.cpp, tags rocm-5.2.0 / rocm-6.2.0).
  if (version <= 4) return "ROCm >= 4.x";
  if (version == 5) return "ROCm >= 5.2";
  return "ROCm >= 6.2";
}

class HipModuleNode : public ffi::ModuleObj {
 public:
  HipModuleNode(ffi::Bytes blob, std::string code, std::vector<KernelInfo> kernels)
      : blob_(std::move(blob)), code_(std::move(code)), facts_(InspectCodeObject(code_)) {
    for (auto& k : kernels) kernels_.push_back(std::make_shared<KernelInfo>(std::move(k)));
    for (auto& m : modules_) m = nullptr;
  }

  ~HipModuleNode() {
    for (int i = 0; i < kMaxGPUs; ++i) {
      if (modules_[i] != nullptr) {
        // errors ignored: at process exit HIP may already be torn down
        (void)hipSetDevice(i);
        (void)hipModuleUnload(modules_[i]);
      }
    }
  }

  const char* kind() const final { return "hip"; }

  int GetPropertyMask() const final {
    return ffi::Module::kBinarySerializable | ffi::Module::kRunnable;
  }

  ffi::Bytes SaveToBytes() const final { return blob_; }

  ffi::String InspectSource(const ffi::String& format) const final {
    if (format == "hsaco") return ffi::String(code_);
    return ffi::String();
  }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final;

  const CodeObjectFacts& facts() const { return facts_; }
  const std::vector<std::shared_ptr<KernelInfo>>& kernels() const { return kernels_; }

  /*! \brief hipFunction_t of `kernel` on `device_id`, loading the code object on first use. */
  hipFunction_t Resolve(int device_id, const std::string& kernel) {
    if (device_id < 0 || device_id >= kMaxGPUs) {
      TVM_FFI_THROW(RuntimeError) << "ROCm device id " << device_id << " is out of range (max "
                                  << kMaxGPUs << ")";
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (modules_[device_id] == nullptr) {
      hipModule_t mod = nullptr;
      hipError_t err = hipModuleLoadData(&mod, code_.data());
      if (err != hipSuccess) {
        (void)hipGetLastError();
        hipDeviceProp_t prop;
        std::string gpu = "unknown";
        if (hipGetDeviceProperties(&prop, device_id) == hipSuccess) gpu = prop.gcnArchName;
        TVM_FFI_THROW(RuntimeError)
            << "cannot load the ROCm code object on device " << device_id
            << " (hipModuleLoadData: " << hipGetErrorName(err) << "): the library is for "
            << (facts_.arch.empty() ? "an unknown arch" : facts_.arch) << " with code object v"
            << facts_.version << " (needs " << MinRocmFor(facts_.version) << ", this HIP runtime is "
            << RuntimeVersion() << "), this GPU is " << gpu
            << "; use the library built for this GPU's arch";
      }
      modules_[device_id] = mod;
    }
    hipFunction_t fn = nullptr;
    hipError_t err = hipModuleGetFunction(&fn, modules_[device_id], kernel.c_str());
    if (err != hipSuccess) {
      (void)hipGetLastError();
      TVM_FFI_THROW(RuntimeError) << "ROCm kernel " << kernel
                                  << " is missing from the code object (hipModuleGetFunction: "
                                  << hipGetErrorName(err) << "); rebuild the model library";
    }
    return fn;
  }

 private:
  ffi::Bytes blob_;
  std::string code_;
  CodeObjectFacts facts_;
  std::vector<std::shared_ptr<KernelInfo>> kernels_;
  std::array<hipModule_t, kMaxGPUs> modules_;
  std::mutex mutex_;
};

/*! \brief Packs TVM's call arguments and launches one kernel. */
class KernelLauncher {
 public:
  KernelLauncher(ffi::ObjectPtr<HipModuleNode> mod, std::shared_ptr<KernelInfo> info)
      : mod_(std::move(mod)), info_(std::move(info)) {
    for (auto& f : fcache_) f.store(nullptr, std::memory_order_relaxed);
  }

  void operator()(ffi::PackedArgs args, ffi::Any* rv) const {
    const KernelInfo& k = *info_;
    const size_t nargs = k.args.size();
    const size_t nlaunch = k.slots.size() + (k.dyn_shmem ? 1 : 0);
    if (static_cast<size_t>(args.size()) != nargs + nlaunch) {
      TVM_FFI_THROW(TypeError) << "ROCm kernel " << k.name << " takes " << nargs
                               << " arguments and " << nlaunch << " launch values, got "
                               << args.size();
    }
    if (DeviceCount() == 0) RequireDevice(0);  // throws the clear "no ROCm device" error
    int device_id = 0;
    VPTQ_HIP_CALL(hipGetDevice(&device_id));
    RequireDevice(device_id);

    // kernarg buffer, laid out at parse time (LayoutKernargs)
    uint64_t stack_buf[16];
    std::vector<uint64_t> heap_buf;
    uint64_t* buf = stack_buf;
    if (k.kernarg_size > sizeof(stack_buf)) {
      heap_buf.resize((k.kernarg_size + 7) / 8);
      buf = heap_buf.data();
    }
    char* base = reinterpret_cast<char*>(buf);
    std::memset(base, 0, k.kernarg_size);
    for (size_t i = 0; i < nargs; ++i) {
      char* dst = base + k.offsets[i];
      switch (k.args[i]) {
        case ArgKind::kPointer: {
          void* p = PointerArg(args, i);
          std::memcpy(dst, &p, sizeof(p));
          break;
        }
        case ArgKind::kI64: {
          int64_t v = args[i].cast<int64_t>();
          std::memcpy(dst, &v, 8);
          break;
        }
        case ArgKind::kF64: {
          double v = args[i].cast<double>();
          std::memcpy(dst, &v, 8);
          break;
        }
        case ArgKind::kI32: {
          int32_t v = static_cast<int32_t>(args[i].cast<int64_t>());
          std::memcpy(dst, &v, 4);
          break;
        }
        case ArgKind::kU32: {
          uint32_t v = static_cast<uint32_t>(args[i].cast<int64_t>());
          std::memcpy(dst, &v, 4);
          break;
        }
        case ArgKind::kF32: {
          float v = static_cast<float>(args[i].cast<double>());
          std::memcpy(dst, &v, 4);
          break;
        }
      }
    }
    size_t nbytes = k.kernarg_size;

    size_t work[6] = {1, 1, 1, 1, 1, 1};
    for (size_t i = 0; i < k.slots.size(); ++i) {
      int64_t v = args[nargs + i].cast<int64_t>();
      if (v > 0) work[k.slots[i]] = static_cast<size_t>(v);  // dynamic extents may be 0
    }
    size_t dyn_shmem = 0;
    if (k.dyn_shmem) dyn_shmem = static_cast<size_t>(args[nargs + k.slots.size()].cast<int64_t>());

    hipFunction_t fn = fcache_[device_id].load(std::memory_order_acquire);
    if (fn == nullptr) {
      fn = mod_->Resolve(device_id, k.name);
      fcache_[device_id].store(fn, std::memory_order_release);
    }
    hipStream_t stream = static_cast<hipStream_t>(TVMFFIEnvGetStream(kDLROCM, device_id));
    void* config[] = {HIP_LAUNCH_PARAM_BUFFER_POINTER, base, HIP_LAUNCH_PARAM_BUFFER_SIZE,
                      &nbytes, HIP_LAUNCH_PARAM_END};
    hipError_t err = hipModuleLaunchKernel(
        fn, static_cast<unsigned>(work[0]), static_cast<unsigned>(work[1]),
        static_cast<unsigned>(work[2]), static_cast<unsigned>(work[3]),
        static_cast<unsigned>(work[4]), static_cast<unsigned>(work[5]),
        static_cast<unsigned>(dyn_shmem), stream, nullptr, config);
    if (err != hipSuccess) {
      (void)hipGetLastError();
      TVM_FFI_THROW(RuntimeError) << "ROCm kernel " << k.name << " failed to launch (grid "
                                  << work[0] << "x" << work[1] << "x" << work[2] << ", block "
                                  << work[3] << "x" << work[4] << "x" << work[5]
                                  << ", dynamic LDS " << dyn_shmem
                                  << " bytes): " << hipGetErrorName(err) << " ("
                                  << hipGetErrorString(err) << ")";
    }
  }

 private:
  static void* PointerArg(const ffi::PackedArgs& args, size_t i) {
    const TVMFFIAny* raw = reinterpret_cast<const TVMFFIAny*>(args.data()) + i;
    if (raw->type_index == ffi::TypeIndex::kTVMFFIOpaquePtr ||
        raw->type_index == ffi::TypeIndex::kTVMFFINone) {
      return raw->v_ptr;  // what TVM's host code passes: the buffer's data pointer
    }
    if (auto t = args[i].try_cast<DLTensor*>()) {
      return static_cast<char*>((*t)->data) + (*t)->byte_offset;
    }
    TVM_FFI_THROW(TypeError) << "ROCm kernel argument " << i
                             << " must be a device pointer or tensor, got "
                             << args[i].GetTypeKey();
    TVM_FFI_UNREACHABLE();
  }

  ffi::ObjectPtr<HipModuleNode> mod_;
  std::shared_ptr<KernelInfo> info_;
  mutable std::array<std::atomic<hipFunction_t>, kMaxGPUs> fcache_;
};

ffi::Optional<ffi::Function> HipModuleNode::GetFunction(const ffi::String& name) {
  for (const auto& k : kernels_) {
    if (k->name == std::string(name)) {
      auto self = ffi::GetObjectPtr<HipModuleNode>(this);
      auto launcher = std::make_shared<KernelLauncher>(self, k);
      return ffi::Function::FromPacked(
          [launcher](ffi::PackedArgs args, ffi::Any* rv) { (*launcher)(args, rv); });
    }
  }
  return std::nullopt;
}

}  // namespace

ffi::Module LoadHipModule(const ffi::Bytes& bytes) {
  BlobReader r(bytes.data(), bytes.size());
  std::string fmt = r.Str();
  if (fmt != "hsaco") {
    TVM_FFI_THROW(ValueError) << "ROCm module format '" << fmt
                              << "' is not supported (only 'hsaco', i.e. compiled code); "
                                 "rebuild the model library with vptq-mlc compile --target rocm";
  }
  std::vector<KernelInfo> kernels;
  uint64_t n = r.U64();
  for (uint64_t i = 0; i < n; ++i) {
    std::string key = r.Str();
    KernelInfo k = ParseKernel(&r);
    if (k.name != key) k.name = key;  // the map key is what the host code looks up
    kernels.push_back(std::move(k));
  }
  std::string code = r.Str();
  if (!r.AtEnd()) {
    TVM_FFI_THROW(ValueError) << "ROCm (hip) module record has trailing bytes: the library was "
                                 "built by a TVM whose format differs from apache-tvm 0.27; "
                                 "rebuild it with this vptq-mlc";
  }
  auto node = ffi::make_object<HipModuleNode>(bytes, std::move(code), std::move(kernels));
  return ffi::Module(node);
}

/*! \brief Code object facts and kernel signatures of a module loaded by LoadHipModule. */
ffi::Map<ffi::String, ffi::Any> HipModuleInfo(const ffi::Module& mod) {
  auto* node = dynamic_cast<HipModuleNode*>(mod.operator->());
  if (node == nullptr) {
    TVM_FFI_THROW(TypeError) << "module of kind '" << mod->kind()
                             << "' was not loaded by the vptq-mlc ROCm runtime";
  }
  ffi::Map<ffi::String, ffi::Any> info;
  info.Set("target", ffi::String(node->facts().target));
  info.Set("arch", ffi::String(node->facts().arch));
  info.Set("code_object_version", static_cast<int64_t>(node->facts().version));
  info.Set("min_rocm", ffi::String(MinRocmFor(node->facts().version)));
  ffi::Map<ffi::String, ffi::Any> kernels;
  for (const auto& k : node->kernels()) {
    ffi::Array<ffi::String> tags;
    for (const auto& t : k->tags) tags.push_back(ffi::String(t));
    ffi::Array<ffi::String> types;
    for (const auto& t : k->arg_types) types.push_back(ffi::DLDataTypeToString(t));
    ffi::Map<ffi::String, ffi::Any> entry;
    entry.Set("arg_types", types);
    entry.Set("launch_param_tags", tags);
    ffi::Array<int64_t> offsets;
    for (uint32_t o : k->offsets) offsets.push_back(static_cast<int64_t>(o));
    entry.Set("kernarg_offsets", offsets);
    entry.Set("kernarg_size", static_cast<int64_t>(k->kernarg_size));
    kernels.Set(ffi::String(k->name), entry);
  }
  info.Set("kernels", kernels);
  return info;
}

}  // namespace vptq_rocm
