// Shared by every file of the extension: errors, device guard, driver entry
// points and pointer checks. CUDA failures throw CudaError (a Python
// exception, registered in bindings.cpp) naming the call; bad arguments throw
// std::invalid_argument (ValueError). Nothing here prints or exits.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_* types of the driver entry points
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace adrt {

struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The driver or device lacks a feature (e.g. green contexts): callers fall back.
struct Unsupported : CudaError {
  using CudaError::CudaError;
};

[[noreturn]] void throw_cuda(const char* call, cudaError_t err, const char* file, int line);
[[noreturn]] void throw_cu(const char* call, CUresult err, const char* file, int line);

#define ADRT_CUDA(call)                                                     \
  do {                                                                      \
    cudaError_t adrt_err_ = (call);                                         \
    if (adrt_err_ != cudaSuccess) ::adrt::throw_cuda(#call, adrt_err_, __FILE__, __LINE__); \
  } while (0)

#define ADRT_CU(call)                                                       \
  do {                                                                      \
    CUresult adrt_res_ = (call);                                            \
    if (adrt_res_ != CUDA_SUCCESS) ::adrt::throw_cu(#call, adrt_res_, __FILE__, __LINE__); \
  } while (0)

// Argument check at the boundary: raises ValueError with `msg`.
#define ADRT_ARG(cond, msg)                                                 \
  do {                                                                      \
    if (!(cond)) throw std::invalid_argument(msg);                          \
  } while (0)

std::string hex(uint64_t v);

// A driver-API function by name, through the runtime (no libcuda link).
// Throws Unsupported when the installed driver is older than `version`.
void* driver_symbol(const char* name, unsigned version);

template <class Fn>
Fn driver_fn(const char* name, unsigned version) {
  return reinterpret_cast<Fn>(driver_symbol(name, version));
}

// Looked up once per call site; the name doubles as the PFN type suffix.
#define ADRT_DRIVER(name, ver) \
  ([]() { static auto fn = ::adrt::driver_fn<PFN_##name##_v##ver>(#name, ver); return fn; }())

// Makes `device` current for a scope and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

// Pure checks (no CUDA call): ordinal >= 0.
void check_ordinal(int64_t device, const char* what);
// Needs the driver: ordinal < device count.
void check_device_exists(int64_t device, const char* what);
// (base, size) of the allocation holding `ptr`.
std::pair<uint64_t, uint64_t> allocation_range(uint64_t ptr);
// `ptr` .. `ptr + nbytes` is device memory of `device`, inside one allocation.
void check_device_range(uint64_t ptr, int64_t nbytes, int64_t device, const char* what);
// Makes a stream's own context current for a scope (a device's primary
// context, or the green context the stream was made in), so work issued on
// it never meets a context mismatch. The legacy stream 0 keeps the current one.
class StreamGuard {
 public:
  explicit StreamGuard(uint64_t stream);
  ~StreamGuard();
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  PFN_cuCtxPopCurrent_v4000 pop_ = nullptr;  // looked up before pushing: the destructor cannot throw
};

}  // namespace adrt
