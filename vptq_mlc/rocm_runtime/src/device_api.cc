/*
 * vptq-mlc ROCm runtime: TVM DeviceAPI for kDLROCM (memory, copies, streams, attributes).
 *
 * TVM finds it through the global function "device_api.rocm", which returns a DeviceAPI*.
 */
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/runtime/device_api.h>

#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"

namespace vptq_rocm {

using tvm::runtime::DeviceAPI;
using tvm::runtime::DeviceAttrKind;

namespace {

struct DeviceState {
  int count = 0;
  std::string reason;
};

const DeviceState& State() {
  static DeviceState state = [] {
    DeviceState s;
    int n = 0;
    hipError_t err = hipGetDeviceCount(&n);
    if (err != hipSuccess) {
      s.count = 0;
      s.reason = std::string(hipGetErrorName(err));
      (void)hipGetLastError();  // do not leave the sticky error for later calls
    } else {
      s.count = n;
      if (n == 0) s.reason = "hipGetDeviceCount returned 0";
    }
    return s;
  }();
  return state;
}

}  // namespace

int DeviceCount() { return State().count; }

const std::string& NoDeviceReason() { return State().reason; }

int RuntimeVersion() {
  int v = -1;
  if (hipRuntimeGetVersion(&v) != hipSuccess) return -1;
  return v;
}

void RequireDevice(int device_id) {
  const DeviceState& s = State();
  if (s.count == 0) {
    TVM_FFI_THROW(RuntimeError)
        << "no ROCm device: HIP found no usable AMD GPU on this host (" << s.reason
        << "). A ROCm model library needs an AMD GPU with the amdgpu kernel driver (/dev/kfd); "
           "on this host use a CUDA or CPU (llvm) library instead";
  }
  if (device_id < 0 || device_id >= s.count) {
    TVM_FFI_THROW(RuntimeError) << "no ROCm device " << device_id << ": this host has " << s.count
                                << " AMD GPU(s), ids 0.." << s.count - 1
                                << "; pick one of those (HIP_VISIBLE_DEVICES also limits them)";
  }
}

namespace {

/*!
 * \brief Per-thread cache of temporary device buffers (TVM's AllocWorkspace contract: few,
 * stack-ordered, repeated allocations). Blocks are kept for reuse and freed when the thread ends.
 */
class WorkspaceCache {
 public:
  ~WorkspaceCache() {
    for (auto& kv : free_) {
      for (auto& blk : kv.second) (void)hipFree(blk.second);
    }
    for (auto& kv : used_) (void)hipFree(kv.first);
  }

  void* Alloc(int device_id, size_t nbytes) {
    constexpr size_t kPage = 4096;
    size_t size = (nbytes + kPage - 1) / kPage * kPage;
    if (size == 0) size = kPage;
    auto& pool = free_[device_id];
    // smallest free block that fits
    auto it = pool.lower_bound(size);
    void* ptr = nullptr;
    if (it != pool.end()) {
      size = it->first;
      ptr = it->second;
      pool.erase(it);
    } else {
      VPTQ_HIP_CALL(hipSetDevice(device_id));
      VPTQ_HIP_CALL(hipMalloc(&ptr, size));
    }
    used_[ptr] = Block{device_id, size};
    return ptr;
  }

  void Free(void* ptr) {
    auto it = used_.find(ptr);
    if (it == used_.end()) {
      TVM_FFI_THROW(InternalError) << "ROCm FreeWorkspace: pointer was not allocated by this pool";
    }
    free_[it->second.device_id].emplace(it->second.size, ptr);
    used_.erase(it);
  }

  static WorkspaceCache* ThreadLocal() {
    static thread_local WorkspaceCache inst;
    return &inst;
  }

 private:
  struct Block {
    int device_id;
    size_t size;
  };
  std::map<int, std::multimap<size_t, void*>> free_;
  std::map<void*, Block> used_;
};

class ROCmDeviceAPI final : public DeviceAPI {
 public:
  void SetDevice(tvm::Device dev) final {
    RequireDevice(dev.device_id);
    VPTQ_HIP_CALL(hipSetDevice(dev.device_id));
  }

  void GetAttr(tvm::Device dev, DeviceAttrKind kind, tvm::ffi::Any* rv) final {
    if (kind == tvm::runtime::kExist) {
      // Must never throw: TVM asks this on build boxes and CPU-only hosts.
      *rv = (dev.device_id >= 0 && dev.device_id < DeviceCount()) ? 1 : 0;
      return;
    }
    if (kind == tvm::runtime::kApiVersion) {
      *rv = static_cast<int64_t>(HIP_VERSION);
      return;
    }
    RequireDevice(dev.device_id);
    const int id = dev.device_id;
    int value = 0;
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock:
        VPTQ_HIP_CALL(hipDeviceGetAttribute(&value, hipDeviceAttributeMaxThreadsPerBlock, id));
        break;
      case tvm::runtime::kWarpSize:
        VPTQ_HIP_CALL(hipDeviceGetAttribute(&value, hipDeviceAttributeWarpSize, id));
        break;
      case tvm::runtime::kMaxSharedMemoryPerBlock:
        VPTQ_HIP_CALL(
            hipDeviceGetAttribute(&value, hipDeviceAttributeMaxSharedMemoryPerBlock, id));
        break;
      case tvm::runtime::kComputeVersion: {
        int major = 0, minor = 0;
        VPTQ_HIP_CALL(
            hipDeviceGetAttribute(&major, hipDeviceAttributeComputeCapabilityMajor, id));
        VPTQ_HIP_CALL(
            hipDeviceGetAttribute(&minor, hipDeviceAttributeComputeCapabilityMinor, id));
        *rv = std::to_string(major) + "." + std::to_string(minor);
        return;
      }
      case tvm::runtime::kDeviceName: {
        char name[256] = {0};
        VPTQ_HIP_CALL(hipDeviceGetName(name, sizeof(name) - 1, id));
        *rv = std::string(name);
        return;
      }
      case tvm::runtime::kMaxClockRate:
        VPTQ_HIP_CALL(hipDeviceGetAttribute(&value, hipDeviceAttributeClockRate, id));
        break;
      case tvm::runtime::kMultiProcessorCount:
        VPTQ_HIP_CALL(hipDeviceGetAttribute(&value, hipDeviceAttributeMultiprocessorCount, id));
        break;
      case tvm::runtime::kMaxThreadDimensions: {
        int d[3];
        VPTQ_HIP_CALL(hipDeviceGetAttribute(&d[0], hipDeviceAttributeMaxBlockDimX, id));
        VPTQ_HIP_CALL(hipDeviceGetAttribute(&d[1], hipDeviceAttributeMaxBlockDimY, id));
        VPTQ_HIP_CALL(hipDeviceGetAttribute(&d[2], hipDeviceAttributeMaxBlockDimZ, id));
        std::ostringstream os;
        os << "[" << d[0] << ", " << d[1] << ", " << d[2] << "]";
        *rv = os.str();
        return;
      }
      case tvm::runtime::kMaxRegistersPerBlock:
        VPTQ_HIP_CALL(hipDeviceGetAttribute(&value, hipDeviceAttributeMaxRegistersPerBlock, id));
        break;
      case tvm::runtime::kGcnArch: {
        hipDeviceProp_t prop;
        VPTQ_HIP_CALL(hipGetDeviceProperties(&prop, id));
        *rv = std::string(prop.gcnArchName);
        return;
      }
      case tvm::runtime::kDriverVersion: {
        int v = 0;
        VPTQ_HIP_CALL(hipDriverGetVersion(&v));
        *rv = static_cast<int64_t>(v);
        return;
      }
      case tvm::runtime::kL2CacheSizeBytes:
        VPTQ_HIP_CALL(hipDeviceGetAttribute(&value, hipDeviceAttributeL2CacheSize, id));
        break;
      case tvm::runtime::kTotalGlobalMemory: {
        size_t total = 0;
        VPTQ_HIP_CALL(hipDeviceTotalMem(&total, id));
        *rv = static_cast<int64_t>(total);
        return;
      }
      case tvm::runtime::kAvailableGlobalMemory: {
        size_t free_bytes = 0, total = 0;
        VPTQ_HIP_CALL(hipSetDevice(id));
        VPTQ_HIP_CALL(hipMemGetInfo(&free_bytes, &total));
        *rv = static_cast<int64_t>(free_bytes);
        return;
      }
      default:
        return;  // unknown / not applicable (e.g. image pitch): leave rv as None
    }
    *rv = value;
  }

  void* AllocDataSpace(tvm::Device dev, size_t nbytes, size_t alignment,
                       DLDataType type_hint) final {
    if (alignment == 0 || 256 % alignment != 0) {
      TVM_FFI_THROW(ValueError) << "ROCm allocations are 256-byte aligned; alignment "
                                << alignment << " is not supported";
    }
    RequireDevice(dev.device_id);
    void* ptr = nullptr;
    if (dev.device_type == kDLROCMHost) {
      VPTQ_HIP_CALL(hipHostMalloc(&ptr, nbytes, hipHostMallocDefault));
    } else {
      VPTQ_HIP_CALL(hipSetDevice(dev.device_id));
      VPTQ_HIP_CALL(hipMalloc(&ptr, nbytes));
    }
    return ptr;
  }

  void FreeDataSpace(tvm::Device dev, void* ptr) final {
    if (ptr == nullptr) return;
    if (dev.device_type == kDLROCMHost) {
      VPTQ_HIP_CALL(hipHostFree(ptr));
    } else {
      VPTQ_HIP_CALL(hipSetDevice(dev.device_id));
      VPTQ_HIP_CALL(hipFree(ptr));
    }
  }

  TVMStreamHandle CreateStream(tvm::Device dev) final {
    RequireDevice(dev.device_id);
    VPTQ_HIP_CALL(hipSetDevice(dev.device_id));
    hipStream_t s;
    VPTQ_HIP_CALL(hipStreamCreateWithFlags(&s, hipStreamNonBlocking));
    return static_cast<TVMStreamHandle>(s);
  }

  void FreeStream(tvm::Device dev, TVMStreamHandle stream) final {
    VPTQ_HIP_CALL(hipSetDevice(dev.device_id));
    VPTQ_HIP_CALL(hipStreamDestroy(static_cast<hipStream_t>(stream)));
  }

  void StreamSync(tvm::Device dev, TVMStreamHandle stream) final {
    RequireDevice(dev.device_id);
    VPTQ_HIP_CALL(hipSetDevice(dev.device_id));
    VPTQ_HIP_CALL(hipStreamSynchronize(static_cast<hipStream_t>(stream)));
  }

  void SyncStreamFromTo(tvm::Device dev, TVMStreamHandle src, TVMStreamHandle dst) final {
    RequireDevice(dev.device_id);
    VPTQ_HIP_CALL(hipSetDevice(dev.device_id));
    hipEvent_t evt;
    VPTQ_HIP_CALL(hipEventCreate(&evt));
    VPTQ_HIP_CALL(hipEventRecord(evt, static_cast<hipStream_t>(src)));
    VPTQ_HIP_CALL(hipStreamWaitEvent(static_cast<hipStream_t>(dst), evt, 0));
    VPTQ_HIP_CALL(hipEventDestroy(evt));
  }

  void* AllocWorkspace(tvm::Device dev, size_t nbytes, DLDataType type_hint) final {
    RequireDevice(dev.device_id);
    return WorkspaceCache::ThreadLocal()->Alloc(dev.device_id, nbytes);
  }

  void FreeWorkspace(tvm::Device dev, void* ptr) final {
    WorkspaceCache::ThreadLocal()->Free(ptr);
  }

  static ROCmDeviceAPI* Global() {
    static ROCmDeviceAPI* inst = new ROCmDeviceAPI();  // never destroyed: TVM keeps the pointer
    return inst;
  }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset,
                      size_t nbytes, tvm::Device dev_from, tvm::Device dev_to,
                      DLDataType type_hint, TVMStreamHandle stream) final {
    const char* src = static_cast<const char*>(from) + from_offset;
    char* dst = static_cast<char*>(to) + to_offset;
    if (dev_from.device_type == kDLROCMHost) dev_from.device_type = kDLCPU;
    if (dev_to.device_type == kDLROCMHost) dev_to.device_type = kDLCPU;
    if (dev_from.device_type == kDLCPU && dev_to.device_type == kDLCPU) {
      std::memcpy(dst, src, nbytes);
      return;
    }
    hipStream_t s = static_cast<hipStream_t>(stream);
    if (dev_from.device_type == kDLROCM && dev_to.device_type == kDLROCM) {
      RequireDevice(dev_from.device_id);
      RequireDevice(dev_to.device_id);
      VPTQ_HIP_CALL(hipSetDevice(dev_from.device_id));
      if (dev_from.device_id == dev_to.device_id) {
        Copy(dst, src, nbytes, hipMemcpyDeviceToDevice, s);
      } else {
        VPTQ_HIP_CALL(
            hipMemcpyPeerAsync(dst, dev_to.device_id, src, dev_from.device_id, nbytes, s));
      }
    } else if (dev_from.device_type == kDLROCM && dev_to.device_type == kDLCPU) {
      RequireDevice(dev_from.device_id);
      VPTQ_HIP_CALL(hipSetDevice(dev_from.device_id));
      Copy(dst, src, nbytes, hipMemcpyDeviceToHost, s);
    } else if (dev_from.device_type == kDLCPU && dev_to.device_type == kDLROCM) {
      RequireDevice(dev_to.device_id);
      VPTQ_HIP_CALL(hipSetDevice(dev_to.device_id));
      Copy(dst, src, nbytes, hipMemcpyHostToDevice, s);
    } else {
      TVM_FFI_THROW(ValueError) << "ROCm device API copies only between ROCm devices and the "
                                   "host, not device types "
                                << static_cast<int>(dev_from.device_type) << " -> "
                                << static_cast<int>(dev_to.device_type);
    }
  }

 private:
  static void Copy(void* dst, const void* src, size_t nbytes, hipMemcpyKind kind,
                   hipStream_t stream) {
    if (stream != nullptr) {
      VPTQ_HIP_CALL(hipMemcpyAsync(dst, src, nbytes, kind, stream));
    } else {
      VPTQ_HIP_CALL(hipMemcpy(dst, src, nbytes, kind));
    }
  }
};

}  // namespace

/*! \brief The singleton, for the registration code. */
void* GlobalDeviceAPI() { return static_cast<void*>(ROCmDeviceAPI::Global()); }

}  // namespace vptq_rocm
