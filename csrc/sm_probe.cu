// A probe kernel that reports which SM ran each block: tests use it to check
// that an SmPartition stream stays on its own SMs.
#include "api.h"
#include "check.h"

namespace adrt {

namespace {

__global__ void sm_probe_kernel(int* out, long long spin_cycles) {
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  // Spin so that blocks stay resident and spread over all SMs they may use.
  const long long start = clock64();
  while (clock64() - start < spin_cycles) {
  }
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int>(smid);
}

}  // namespace

void sm_probe(uint64_t stream, uint64_t out, int64_t n_blocks, int64_t device, int64_t spin_cycles) {
  ADRT_ARG(out != 0, "sm_probe: out pointer is null");
  ADRT_ARG(out % 4 == 0, "sm_probe: out pointer " + hex(out) + " is not 4-byte aligned");
  ADRT_ARG(n_blocks >= 1 && n_blocks <= (1 << 20), "sm_probe: n_blocks must be in [1, 2**20], got " +
                                                      std::to_string(n_blocks));
  ADRT_ARG(spin_cycles >= 0, "sm_probe: spin_cycles must be >= 0");
  check_ordinal(device, "sm_probe");
  check_device_exists(device, "sm_probe");
  check_device_range(out, n_blocks * 4, device, "sm_probe out");
  DeviceGuard current(static_cast<int>(device));
  StreamGuard guard(stream);
  sm_probe_kernel<<<static_cast<unsigned>(n_blocks), 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<int*>(out), spin_cycles);
  ADRT_CUDA(cudaGetLastError());
}

}  // namespace adrt
