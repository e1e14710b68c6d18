/*
 * vptq-mlc ROCm runtime: registers our functions in TVM's global function table when the library
 * is loaded (dlopen). Registration never aborts the process: a name another ROCm runtime already
 * registered (e.g. TVM built from source with ROCm) is left alone and reported by vptq_rocm.info.
 */
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <string>
#include <vector>

#include "common.h"

namespace vptq_rocm {

namespace ffi = tvm::ffi;

void* GlobalDeviceAPI();
ffi::Module LoadHipModule(const ffi::Bytes& bytes);
ffi::Map<ffi::String, ffi::Any> HipModuleInfo(const ffi::Module& mod);

namespace {

std::vector<std::string>& Registered() {
  static std::vector<std::string> v;
  return v;
}
std::vector<std::string>& Skipped() {
  static std::vector<std::string> v;
  return v;
}

void Register(const char* name, ffi::Function f) {
  if (ffi::Function::GetGlobal(name).has_value()) {
    Skipped().push_back(name);
    return;
  }
  try {
    ffi::Function::SetGlobal(name, std::move(f), /*override=*/false);
    Registered().push_back(name);
  } catch (const std::exception&) {
    Skipped().push_back(name);  // lost a race with another registrant: report, do not abort
  }
}

ffi::Map<ffi::String, ffi::Any> Info() {
  ffi::Map<ffi::String, ffi::Any> info;
  ffi::Array<ffi::String> reg, skip;
  for (const auto& s : Registered()) reg.push_back(ffi::String(s));
  for (const auto& s : Skipped()) skip.push_back(ffi::String(s));
  info.Set("registered", reg);
  info.Set("skipped", skip);
  info.Set("device_count", static_cast<int64_t>(DeviceCount()));
  info.Set("no_device_reason", ffi::String(NoDeviceReason()));
  info.Set("hip_runtime_version", static_cast<int64_t>(RuntimeVersion()));
  info.Set("hip_header_version", static_cast<int64_t>(HIP_VERSION));
  return info;
}

struct Registrar {
  Registrar() {
    try {
      auto device_api = ffi::Function::FromPacked(
          [](ffi::PackedArgs, ffi::Any* rv) { *rv = GlobalDeviceAPI(); });
      Register("device_api.rocm", device_api);
      Register("device_api.rocm_host", device_api);
      auto loader = ffi::Function::FromTyped(
          [](const ffi::Bytes& bytes) { return LoadHipModule(bytes); });
      Register("ffi.Module.load_from_bytes.hip", loader);
      Register("ffi.Module.load_from_bytes.hsaco", loader);
      Register("vptq_rocm.info", ffi::Function::FromTyped([]() { return Info(); }));
      Register("vptq_rocm.module_info", ffi::Function::FromTyped(
                                            [](ffi::Module m) { return HipModuleInfo(m); }));
    } catch (...) {
      // never let an exception escape a static initializer (it would abort the host process)
    }
  }
};

Registrar registrar;

}  // namespace
}  // namespace vptq_rocm
