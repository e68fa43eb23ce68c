// CUDA IPC: share device buffers and events between processes on one node.
// A buffer is exported as (handle, offset from its allocation base), since
// handles name whole allocations. Opening a handle twice in one process fails
// in CUDA, so opened handles are cached with a reference count.
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "api.h"
#include "check.h"

namespace adrt {

static_assert(kIpcHandleBytes == CUDA_IPC_HANDLE_SIZE, "IPC handle size changed");

namespace {

struct Mapping {
  uint64_t base;
  uint64_t size;
  int refs;
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

std::map<std::pair<int64_t, std::string>, Mapping>& cache() {
  static std::map<std::pair<int64_t, std::string>, Mapping> c;
  return c;
}

void check_handle(const std::string& handle, const char* what) {
  ADRT_ARG(handle.size() == kIpcHandleBytes, std::string(what) + ": an IPC handle is " +
                                                 std::to_string(kIpcHandleBytes) + " bytes, got " +
                                                 std::to_string(handle.size()));
}

}  // namespace

IpcExport ipc_export(uint64_t ptr, int64_t device) {
  ADRT_ARG(ptr != 0, "ipc_export: pointer is null");
  check_ordinal(device, "ipc_export");
  check_device_exists(device, "ipc_export");
  check_device_range(ptr, 1, device, "ipc_export");
  DeviceGuard guard(static_cast<int>(device));
  const uint64_t base = allocation_range(ptr).first;  // handles name whole allocations
  cudaIpcMemHandle_t h;
  ADRT_CUDA(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(base)));
  return IpcExport{std::string(h.reserved, kIpcHandleBytes), static_cast<int64_t>(ptr - base)};
}

uint64_t ipc_open(const std::string& handle, int64_t offset, int64_t device) {
  check_handle(handle, "ipc_open");
  ADRT_ARG(offset >= 0, "ipc_open: offset must be >= 0, got " + std::to_string(offset));
  check_ordinal(device, "ipc_open");
  check_device_exists(device, "ipc_open");
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto key = std::make_pair(device, handle);
  auto it = cache().find(key);
  if (it == cache().end()) {
    cudaIpcMemHandle_t h;
    std::memcpy(h.reserved, handle.data(), kIpcHandleBytes);
    DeviceGuard guard(static_cast<int>(device));
    void* p = nullptr;
    ADRT_CUDA(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
    uint64_t size = 0;
    try {
      size = allocation_range(reinterpret_cast<uint64_t>(p)).second;
    } catch (...) {
      cudaIpcCloseMemHandle(p);
      throw;
    }
    it = cache().emplace(key, Mapping{reinterpret_cast<uint64_t>(p), size, 0}).first;
  }
  if (static_cast<uint64_t>(offset) >= it->second.size) {
    const uint64_t size = it->second.size;
    if (it->second.refs == 0) {  // opened just now for this call: undo
      DeviceGuard guard(static_cast<int>(device));
      cudaIpcCloseMemHandle(reinterpret_cast<void*>(it->second.base));
      cache().erase(it);
    }
    throw std::invalid_argument("ipc_open: offset " + std::to_string(offset) + " is past the end of the shared " +
                                "allocation (" + std::to_string(size) + " bytes)");
  }
  it->second.refs += 1;
  return it->second.base + static_cast<uint64_t>(offset);
}

void ipc_close(const std::string& handle, int64_t device) {
  check_handle(handle, "ipc_close");
  check_ordinal(device, "ipc_close");
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto it = cache().find(std::make_pair(device, handle));
  ADRT_ARG(it != cache().end(), "ipc_close: this handle is not open on device " + std::to_string(device) +
                                    " in this process");
  if (--it->second.refs > 0) return;
  const uint64_t base = it->second.base;
  cache().erase(it);
  DeviceGuard guard(static_cast<int>(device));
  ADRT_CUDA(cudaIpcCloseMemHandle(reinterpret_cast<void*>(base)));
}

int ipc_open_count() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  return static_cast<int>(cache().size());
}

std::string event_ipc_export(uint64_t event) {
  ADRT_ARG(event != 0, "event_ipc_export: event handle is null");
  cudaIpcEventHandle_t h;
  ADRT_CUDA(cudaIpcGetEventHandle(&h, reinterpret_cast<cudaEvent_t>(event)));
  return std::string(h.reserved, kIpcHandleBytes);
}

uint64_t event_ipc_open(const std::string& handle, int64_t device) {
  check_handle(handle, "event_ipc_open");
  check_ordinal(device, "event_ipc_open");
  check_device_exists(device, "event_ipc_open");
  cudaIpcEventHandle_t h;
  std::memcpy(h.reserved, handle.data(), kIpcHandleBytes);
  DeviceGuard guard(static_cast<int>(device));
  cudaEvent_t ev = nullptr;
  ADRT_CUDA(cudaIpcOpenEventHandle(&ev, h));
  return reinterpret_cast<uint64_t>(ev);
}

}  // namespace adrt
