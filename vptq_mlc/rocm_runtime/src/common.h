/*
 * vptq-mlc ROCm runtime: shared helpers.
 *
 * The apache-tvm wheel ships no ROCm runtime, so this small library registers the two things TVM
 * needs to run a ROCm model library: the device API ("device_api.rocm") and the loader of the
 * "hip" module kind ("ffi.Module.load_from_bytes.hip"). Written for vptq-mlc against the public
 * headers of the apache-tvm / apache-tvm-ffi wheels and HIP; the contract follows TVM's
 * src/runtime/rocm (read, not copied).
 */
#ifndef VPTQ_ROCM_RUNTIME_COMMON_H_
#define VPTQ_ROCM_RUNTIME_COMMON_H_

#include <hip/hip_runtime_api.h>
#include <tvm/ffi/error.h>

#include <string>

namespace vptq_rocm {

/*! \brief Throw a TVM RuntimeError naming the failed HIP call and its error. */
#define VPTQ_HIP_CALL(expr)                                                                   \
  do {                                                                                        \
    hipError_t vptq_err_ = (expr);                                                            \
    if (vptq_err_ != hipSuccess) {                                                            \
      TVM_FFI_THROW(RuntimeError) << "ROCm: " #expr " failed: " << hipGetErrorName(vptq_err_) \
                                  << " (" << hipGetErrorString(vptq_err_) << ")";             \
    }                                                                                         \
  } while (0)

/*! \brief Number of usable AMD GPUs; 0 when HIP finds none. Never throws; cached. */
int DeviceCount();

/*! \brief Why DeviceCount() is 0 (HIP's error name), empty when devices exist. */
const std::string& NoDeviceReason();

/*!
 * \brief Throw a clear "no ROCm device" error unless `device_id` names a usable GPU.
 * Every entry point that needs a GPU calls this first, so a host without an AMD GPU gets one
 * readable message instead of a HIP error code from deep inside a call.
 */
void RequireDevice(int device_id);

/*! \brief The HIP runtime version (hipRuntimeGetVersion), or -1 when unavailable. */
int RuntimeVersion();

}  // namespace vptq_rocm

#endif  // VPTQ_ROCM_RUNTIME_COMMON_H_
