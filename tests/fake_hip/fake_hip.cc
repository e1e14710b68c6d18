// TEST DOUBLE for libamdhip64 (tests only, never shipped): one pretend gfx90a GPU whose "device memory" is host
// memory and whose kernel launches are recorded, not executed. It lets the tests drive TVM's host code through our
// ROCm runtime (device API + hip module) on a machine without an AMD GPU and check what would reach the GPU:
// kernel name, grid/block, dynamic LDS and the kernarg bytes. Each launch is appended to $FAKE_HIP_LOG as
// "launch <kernel> <gx> <gy> <gz> <bx> <by> <bz> <shmem> <nbytes> <hex bytes>"; allocations as "malloc <ptr> <n>".
#include <hip/hip_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {
int g_device = 0;
hipError_t g_last = hipSuccess;

void Log(const std::string& line) {
  const char* path = std::getenv("FAKE_HIP_LOG");
  if (path == nullptr) return;
  FILE* f = std::fopen(path, "a");
  if (f == nullptr) return;
  std::fprintf(f, "%s\n", line.c_str());
  std::fclose(f);
}

struct FakeFunction {
  char name[256];
};
}  // namespace

extern "C" {

hipError_t hipGetDeviceCount(int* count) { *count = 1; return hipSuccess; }
hipError_t hipSetDevice(int id) { if (id != 0) return g_last = hipErrorInvalidDevice; g_device = id; return hipSuccess; }
hipError_t hipGetDevice(int* id) { *id = g_device; return hipSuccess; }
hipError_t hipGetLastError(void) { hipError_t e = g_last; g_last = hipSuccess; return e; }
const char* hipGetErrorName(hipError_t e) { return e == hipSuccess ? "hipSuccess" : "hipErrorFake"; }
const char* hipGetErrorString(hipError_t e) { return e == hipSuccess ? "no error" : "fake HIP error"; }
hipError_t hipRuntimeGetVersion(int* v) { *v = 60200000; return hipSuccess; }
hipError_t hipDriverGetVersion(int* v) { *v = 60200000; return hipSuccess; }

hipError_t hipDeviceGetAttribute(int* value, hipDeviceAttribute_t attr, int device) {
  switch (attr) {
    case hipDeviceAttributeMaxThreadsPerBlock: *value = 1024; break;
    case hipDeviceAttributeWarpSize: *value = 64; break;
    case hipDeviceAttributeMaxSharedMemoryPerBlock: *value = 65536; break;
    case hipDeviceAttributeMultiprocessorCount: *value = 104; break;
    default: *value = 1; break;
  }
  return hipSuccess;
}
hipError_t hipDeviceGetName(char* name, int len, int device) {
  std::snprintf(name, len, "Fake AMD GPU (test double)");
  return hipSuccess;
}
hipError_t hipGetDeviceProperties(hipDeviceProp_t* prop, int device) {
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->gcnArchName, sizeof(prop->gcnArchName), "gfx90a:sramecc+:xnack-");
  return hipSuccess;
}
hipError_t hipDeviceTotalMem(size_t* bytes, hipDevice_t device) { *bytes = size_t(64) << 30; return hipSuccess; }
hipError_t hipMemGetInfo(size_t* free_b, size_t* total) { *free_b = size_t(60) << 30; *total = size_t(64) << 30; return hipSuccess; }

hipError_t hipMalloc(void** ptr, size_t size) {
  *ptr = std::aligned_alloc(256, (size + 255) / 256 * 256 + 256);
  Log("malloc " + std::to_string(reinterpret_cast<uintptr_t>(*ptr)) + " " + std::to_string(size));
  return hipSuccess;
}
hipError_t hipFree(void* ptr) { std::free(ptr); return hipSuccess; }
hipError_t hipHostMalloc(void** ptr, size_t size, unsigned int flags) { return hipMalloc(ptr, size); }
hipError_t hipHostFree(void* ptr) { std::free(ptr); return hipSuccess; }
hipError_t hipMemcpy(void* dst, const void* src, size_t n, hipMemcpyKind kind) { std::memcpy(dst, src, n); return hipSuccess; }
hipError_t hipMemcpyAsync(void* dst, const void* src, size_t n, hipMemcpyKind kind, hipStream_t s) {
  std::memcpy(dst, src, n);
  return hipSuccess;
}
hipError_t hipMemcpyPeerAsync(void* dst, int dd, const void* src, int sd, size_t n, hipStream_t s) {
  std::memcpy(dst, src, n);
  return hipSuccess;
}

hipError_t hipStreamCreateWithFlags(hipStream_t* s, unsigned int flags) { *s = reinterpret_cast<hipStream_t>(new int(0)); return hipSuccess; }
hipError_t hipStreamDestroy(hipStream_t s) { delete reinterpret_cast<int*>(s); return hipSuccess; }
hipError_t hipStreamSynchronize(hipStream_t s) { return hipSuccess; }
hipError_t hipStreamWaitEvent(hipStream_t s, hipEvent_t e, unsigned int flags) { return hipSuccess; }
hipError_t hipEventCreate(hipEvent_t* e) { *e = reinterpret_cast<hipEvent_t>(new int(0)); return hipSuccess; }
hipError_t hipEventDestroy(hipEvent_t e) { delete reinterpret_cast<int*>(e); return hipSuccess; }
hipError_t hipEventRecord(hipEvent_t e, hipStream_t s) { return hipSuccess; }

hipError_t hipModuleLoadData(hipModule_t* module, const void* image) {
  const unsigned char* elf = static_cast<const unsigned char*>(image);
  if (std::memcmp(elf, "\x7f" "ELF", 4) != 0) return g_last = hipErrorInvalidImage;
  // like ROCr's loader: the code object's ISA (EF_AMDGPU_MACH in e_flags) must be this GPU's (gfx90a = 0x3f)
  uint32_t e_flags;
  std::memcpy(&e_flags, elf + 0x30, 4);
  if ((e_flags & 0xff) != 0x3f) return g_last = hipErrorNoBinaryForGpu;
  *module = reinterpret_cast<hipModule_t>(new int(1));
  Log("module_load");
  return hipSuccess;
}
hipError_t hipModuleUnload(hipModule_t m) { delete reinterpret_cast<int*>(m); return hipSuccess; }
hipError_t hipModuleGetFunction(hipFunction_t* f, hipModule_t m, const char* name) {
  auto* fn = new FakeFunction();
  std::snprintf(fn->name, sizeof(fn->name), "%s", name);
  *f = reinterpret_cast<hipFunction_t>(fn);
  return hipSuccess;
}
hipError_t hipModuleLaunchKernel(hipFunction_t f, unsigned int gx, unsigned int gy, unsigned int gz,
                                 unsigned int bx, unsigned int by, unsigned int bz, unsigned int shmem,
                                 hipStream_t stream, void** params, void** extra) {
  const unsigned char* buf = nullptr;
  size_t nbytes = 0;
  for (int i = 0; extra != nullptr && extra[i] != HIP_LAUNCH_PARAM_END; i += 2) {
    if (extra[i] == HIP_LAUNCH_PARAM_BUFFER_POINTER) buf = static_cast<const unsigned char*>(extra[i + 1]);
    if (extra[i] == HIP_LAUNCH_PARAM_BUFFER_SIZE) nbytes = *static_cast<size_t*>(extra[i + 1]);
  }
  std::string hex;
  char tmp[3];
  for (size_t i = 0; i < nbytes; ++i) {
    std::snprintf(tmp, sizeof(tmp), "%02x", buf[i]);
    hex += tmp;
  }
  char head[512];
  std::snprintf(head, sizeof(head), "launch %s %u %u %u %u %u %u %u %zu ", reinterpret_cast<FakeFunction*>(f)->name,
                gx, gy, gz, bx, by, bz, shmem, nbytes);
  Log(head + hex);
  return hipSuccess;
}

}  // extern "C"
