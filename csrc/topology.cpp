// Devices and the links between them. NVLink is read from NVML, loaded with
// dlopen so the extension links neither libnvidia-ml nor libcuda.
#include <dlfcn.h>

#include <mutex>

#include "api.h"
#include "check.h"

namespace adrt {

namespace {

// The few NVML declarations we need (nvml.h is not part of the CUDA toolkit).
using nvmlDevice = void*;
constexpr int kNvmlSuccess = 0;
constexpr int kNvmlP2pCapsNvlink = 2;  // NVML_P2P_CAPS_INDEX_NVLINK
constexpr int kNvmlP2pStatusOk = 0;    // NVML_P2P_STATUS_OK

struct Nvml {
  int (*init)() = nullptr;
  int (*by_pci)(const char*, nvmlDevice*) = nullptr;
  int (*p2p_status)(nvmlDevice, nvmlDevice, int, int*) = nullptr;
  bool ok = false;
};

const Nvml& nvml() {
  static Nvml n;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) return;
    n.init = reinterpret_cast<int (*)()>(dlsym(lib, "nvmlInit_v2"));
    n.by_pci = reinterpret_cast<int (*)(const char*, nvmlDevice*)>(dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2"));
    n.p2p_status = reinterpret_cast<int (*)(nvmlDevice, nvmlDevice, int, int*)>(dlsym(lib, "nvmlDeviceGetP2PStatus"));
    n.ok = n.init && n.by_pci && n.p2p_status && n.init() == kNvmlSuccess;
  });
  return n;
}

std::string pci_bus_id(int device) {
  char buf[64] = {0};
  ADRT_CUDA(cudaDeviceGetPCIBusId(buf, sizeof buf, device));
  return buf;
}

std::optional<bool> nvlink_between(int a, int b) {
  const Nvml& n = nvml();
  if (!n.ok) return std::nullopt;
  nvmlDevice ha = nullptr, hb = nullptr;
  int status = -1;
  if (n.by_pci(pci_bus_id(a).c_str(), &ha) != kNvmlSuccess || n.by_pci(pci_bus_id(b).c_str(), &hb) != kNvmlSuccess ||
      n.p2p_status(ha, hb, kNvmlP2pCapsNvlink, &status) != kNvmlSuccess)
    return std::nullopt;
  return status == kNvmlP2pStatusOk;
}

void check_pair(int64_t device, int64_t peer) {
  check_ordinal(device, "device");
  check_ordinal(peer, "peer");
  check_device_exists(device, "device");
  check_device_exists(peer, "peer");
}

}  // namespace

int device_count() {
  int n = 0;
  ADRT_CUDA(cudaGetDeviceCount(&n));
  return n;
}

int runtime_version() {
  int v = 0;
  ADRT_CUDA(cudaRuntimeGetVersion(&v));
  return v;
}

int driver_version() {
  int v = 0;
  cudaError_t err = cudaDriverGetVersion(&v);
  if (err != cudaSuccess) cudaGetLastError();
  return err == cudaSuccess ? v : 0;
}

DeviceProps device_properties(int64_t device) {
  check_ordinal(device, "device_properties");
  check_device_exists(device, "device_properties");
  cudaDeviceProp p{};
  ADRT_CUDA(cudaGetDeviceProperties(&p, static_cast<int>(device)));
  return DeviceProps{p.name, pci_bus_id(static_cast<int>(device)), p.major, p.minor, p.multiProcessorCount,
                     static_cast<uint64_t>(p.totalGlobalMem), static_cast<uint64_t>(p.l2CacheSize)};
}

// A device always reaches its own memory; CUDA reports 0 for (a, a).
bool can_access_peer(int64_t device, int64_t peer) {
  check_pair(device, peer);
  if (device == peer) return true;
  int ok = 0;
  ADRT_CUDA(cudaDeviceCanAccessPeer(&ok, static_cast<int>(device), static_cast<int>(peer)));
  return ok != 0;
}

LinkInfo link_info(int64_t device, int64_t peer) {
  check_pair(device, peer);
  if (device == peer) return LinkInfo{true, true, true, 0, false};
  const int a = static_cast<int>(device), b = static_cast<int>(peer);
  LinkInfo info{false, can_access_peer(a, b), false, 0, std::nullopt};
  if (info.can_access_peer) {
    int atomics = 0;
    ADRT_CUDA(cudaDeviceGetP2PAttribute(&info.performance_rank, cudaDevP2PAttrPerformanceRank, a, b));
    ADRT_CUDA(cudaDeviceGetP2PAttribute(&atomics, cudaDevP2PAttrNativeAtomicSupported, a, b));
    info.native_atomics = atomics != 0;
  }
  info.nvlink = nvlink_between(a, b);
  return info;
}

bool enable_peer_access(int64_t device, int64_t peer) {
  check_pair(device, peer);
  if (device == peer) return false;
  ADRT_ARG(can_access_peer(device, peer), "device " + std::to_string(device) + " cannot access device " +
                                              std::to_string(peer) + " peer-to-peer (no P2P link); copies between "
                                              "them go through the host");
  DeviceGuard guard(static_cast<int>(device));
  cudaError_t err = cudaDeviceEnablePeerAccess(static_cast<int>(peer), 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();
    return false;
  }
  if (err != cudaSuccess) throw_cuda("cudaDeviceEnablePeerAccess", err, __FILE__, __LINE__);
  return true;
}

}  // namespace adrt
