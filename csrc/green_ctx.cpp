// SM partitions of one GPU: green contexts over disjoint SM groups, one
// non-blocking stream each. Work on one part's stream cannot take SMs from
// another part, so several "virtual devices" on one GPU stay apart.
// Driver API only (CUDA >= 12.4 drivers); older drivers raise Unsupported.
#include <algorithm>

#include "api.h"
#include "check.h"

namespace adrt {

SmPartition::SmPartition(int64_t device, int64_t parts, int64_t min_sms) : device_(static_cast<int>(device)) {
  check_ordinal(device, "SmPartition");
  ADRT_ARG(parts >= 1, "SmPartition: parts must be >= 1, got " + std::to_string(parts));
  ADRT_ARG(min_sms >= 0, "SmPartition: min_sms must be >= 0 (0 = an equal share), got " + std::to_string(min_sms));
  check_device_exists(device, "SmPartition");

  DeviceGuard guard(device_);
  ADRT_CUDA(cudaFree(nullptr));  // the primary context must exist before green contexts borrow from it
  CUdevice dev = 0;
  ADRT_CU(ADRT_DRIVER(cuDeviceGet, 2000)(&dev, device_));
  CUdevResource all{};
  ADRT_CU(ADRT_DRIVER(cuDeviceGetDevResource, 12040)(dev, &all, CU_DEV_RESOURCE_TYPE_SM));
  total_sms_ = static_cast<int>(all.sm.smCount);

  // Equal share by default, rounded down to the split granularity.
  const unsigned gran = std::max(1u, all.sm.smCoscheduledAlignment);
  unsigned want = min_sms > 0 ? static_cast<unsigned>(min_sms) : static_cast<unsigned>(total_sms_ / parts) / gran * gran;
  want = std::max(want, all.sm.minSmPartitionSize);
  std::vector<CUdevResource> groups;
  unsigned made = 0;  // parts of >= `want` SMs the driver could make
  if (static_cast<int64_t>(want) * parts <= total_sms_) {
    made = static_cast<unsigned>(parts);
    groups.resize(made);
    CUdevResource rest{};
    ADRT_CU(ADRT_DRIVER(cuDevSmResourceSplitByCount, 12040)(groups.data(), &made, &all, &rest, 0, want));
    groups.resize(made);
  }
  ADRT_ARG(made == static_cast<unsigned>(parts),
           "SmPartition: device " + std::to_string(device) + " has " + std::to_string(total_sms_) + " SMs; it splits into " +
               std::to_string(made) + " parts of >= " + std::to_string(want) + " SMs, not " + std::to_string(parts) +
               " (minimum part " + std::to_string(all.sm.minSmPartitionSize) + " SMs, alignment " +
               std::to_string(gran) + "); ask for fewer parts or fewer SMs");

  try {
    for (CUdevResource& group : groups) {
      CUdevResourceDesc desc = nullptr;
      ADRT_CU(ADRT_DRIVER(cuDevResourceGenerateDesc, 12040)(&desc, &group, 1));
      CUgreenCtx g = nullptr;
      ADRT_CU(ADRT_DRIVER(cuGreenCtxCreate, 12040)(&g, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM));
      green_ctxs_.push_back(g);
      CUstream s = nullptr;
      ADRT_CU(ADRT_DRIVER(cuGreenCtxStreamCreate, 12050)(&s, g, CU_STREAM_NON_BLOCKING, 0));
      streams_.push_back(reinterpret_cast<uint64_t>(s));
      CUdevResource got{};
      ADRT_CU(ADRT_DRIVER(cuGreenCtxGetDevResource, 12040)(g, &got, CU_DEV_RESOURCE_TYPE_SM));
      sm_counts_.push_back(static_cast<int>(got.sm.smCount));
    }
  } catch (...) {
    close();
    throw;
  }
}

SmPartition::~SmPartition() {
  try {
    close();
  } catch (...) {  // destructors must not throw; close() explicitly to see errors
  }
}

// Waits for the streams' work, then frees streams before their contexts
// (the driver requires that order).
void SmPartition::close() {
  std::vector<uint64_t> streams;
  std::vector<void*> ctxs;
  streams.swap(streams_);
  ctxs.swap(green_ctxs_);
  sm_counts_.clear();
  for (uint64_t s : streams) {
    ADRT_CU(ADRT_DRIVER(cuStreamSynchronize, 2000)(reinterpret_cast<CUstream>(s)));
    ADRT_CU(ADRT_DRIVER(cuStreamDestroy, 4000)(reinterpret_cast<CUstream>(s)));
  }
  for (void* g : ctxs) ADRT_CU(ADRT_DRIVER(cuGreenCtxDestroy, 12040)(static_cast<CUgreenCtx>(g)));
}

}  // namespace adrt
