// Errors, driver entry points, device guard and pointer checks (see check.h).
#include "check.h"

#include <cstdio>
#include <cstring>

namespace adrt {

namespace {

// "cudaMemcpyAsync(dst, ...)" -> "cudaMemcpyAsync": the message names the call.
std::string call_name(const char* call) {
  const char* paren = std::strchr(call, '(');
  std::string name = paren ? std::string(call, paren - call) : std::string(call);
  // ADRT_DRIVER(cuX, 123)(...) -> cuX
  const std::string prefix = "ADRT_DRIVER";
  if (name == prefix && paren) {
    const char* comma = std::strchr(paren, ',');
    if (comma) name = std::string(paren + 1, comma - paren - 1);
  }
  return name;
}

std::string where(const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

}  // namespace

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

void throw_cuda(const char* call, cudaError_t err, const char* file, int line) {
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  throw CudaError(call_name(call) + " failed: " + cudaGetErrorString(err) + " (" +
                  cudaGetErrorName(err) + ") at " + where(file, line));
}

void throw_cu(const char* call, CUresult err, const char* file, int line) {
  const char* text = nullptr;
  const char* name = nullptr;
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  if (cudaGetDriverEntryPointByVersion("cuGetErrorString", &fn, 6000, cudaEnableDefault, &q) == cudaSuccess && fn)
    reinterpret_cast<PFN_cuGetErrorString_v6000>(fn)(err, &text);
  if (cudaGetDriverEntryPointByVersion("cuGetErrorName", &fn, 6000, cudaEnableDefault, &q) == cudaSuccess && fn)
    reinterpret_cast<PFN_cuGetErrorName_v6000>(fn)(err, &name);
  std::string msg = call_name(call) + " failed: " + (text ? text : "CUresult " + std::to_string(err)) +
                    (name ? std::string(" (") + name + ")" : std::string()) + " at " + where(file, line);
  if (err == CUDA_ERROR_NOT_SUPPORTED) throw Unsupported(msg);
  throw CudaError(msg);
}

void* driver_symbol(const char* name, unsigned version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSuccess;
  cudaError_t err = cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &status);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw CudaError(std::string("cudaGetDriverEntryPointByVersion(") + name + ") failed: " +
                    cudaGetErrorString(err) + " (" + cudaGetErrorName(err) + ")");
  }
  if (status != cudaDriverEntryPointSuccess || fn == nullptr) {
    int driver = 0;
    cudaDriverGetVersion(&driver);
    throw Unsupported(std::string(name) + " needs a CUDA driver supporting CUDA " +
                      std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10) +
                      "; this driver supports CUDA " + std::to_string(driver / 1000) + "." +
                      std::to_string(driver % 1000 / 10) + " (update the NVIDIA driver)");
  }
  return fn;
}

DeviceGuard::DeviceGuard(int device) {
  int cur = -1;
  ADRT_CUDA(cudaGetDevice(&cur));
  if (cur != device) {
    ADRT_CUDA(cudaSetDevice(device));
    prev_ = cur;
  }
}

DeviceGuard::~DeviceGuard() {
  if (prev_ >= 0) cudaSetDevice(prev_);  // best effort: destructors must not throw
}

void check_ordinal(int64_t device, const char* what) {
  ADRT_ARG(device >= 0, std::string(what) + ": device ordinal must be >= 0, got " + std::to_string(device));
}

void check_device_exists(int64_t device, const char* what) {
  int count = 0;
  ADRT_CUDA(cudaGetDeviceCount(&count));
  ADRT_ARG(device < count, std::string(what) + ": device " + std::to_string(device) + " does not exist (" +
                               std::to_string(count) + " visible)");
}

std::pair<uint64_t, uint64_t> allocation_range(uint64_t ptr) {
  CUdeviceptr base = 0;
  size_t size = 0;
  ADRT_CU(ADRT_DRIVER(cuPointerGetAttribute, 4000)(&base, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                                                   static_cast<CUdeviceptr>(ptr)));
  ADRT_CU(ADRT_DRIVER(cuPointerGetAttribute, 4000)(&size, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                                                   static_cast<CUdeviceptr>(ptr)));
  return {static_cast<uint64_t>(base), static_cast<uint64_t>(size)};
}

void check_device_range(uint64_t ptr, int64_t nbytes, int64_t device, const char* what) {
  cudaPointerAttributes attr{};
  ADRT_CUDA(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)));
  const std::string who = std::string(what) + " pointer " + hex(ptr);
  ADRT_ARG(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
           who + (attr.type == cudaMemoryTypeHost ? " is host memory" : " is not CUDA device memory") +
               "; pass a device allocation");
  ADRT_ARG(attr.device == device, who + " lives on device " + std::to_string(attr.device) +
                                      ", not the stated device " + std::to_string(device));
  DeviceGuard guard(static_cast<int>(device));  // a current context for the driver query
  const auto [base, size] = allocation_range(ptr);
  ADRT_ARG(ptr + static_cast<uint64_t>(nbytes) <= base + size,
           who + " + " + std::to_string(nbytes) + " bytes runs past its allocation (" +
               std::to_string(base + size - ptr) + " bytes left)");
}

StreamGuard::StreamGuard(uint64_t stream) {
  if (stream == 0) return;
  CUcontext ctx = nullptr;
  ADRT_CU(ADRT_DRIVER(cuStreamGetCtx, 9020)(reinterpret_cast<CUstream>(stream), &ctx));
  auto pop = ADRT_DRIVER(cuCtxPopCurrent, 4000);
  ADRT_CU(ADRT_DRIVER(cuCtxPushCurrent, 4000)(ctx));
  pop_ = pop;
}

StreamGuard::~StreamGuard() {
  CUcontext ctx = nullptr;
  if (pop_) pop_(&ctx);  // best effort: destructors must not throw
}

}  // namespace adrt
