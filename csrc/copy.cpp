// copy_batch: many device-to-device copies issued on one stream in one call.
// All pure argument checks run before the first CUDA call, so a bad batch
// enqueues nothing.
#include <algorithm>
#include <set>

#include "api.h"
#include "check.h"

namespace adrt {

namespace {

struct Range {
  uint64_t begin, end;
  size_t entry;
};

std::string entry_name(size_t i) { return "copy_batch entry " + std::to_string(i); }

}  // namespace

void validate_copy_entries(const std::vector<CopyEntry>& entries) {
  std::vector<Range> dsts;
  dsts.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const CopyEntry& e = entries[i];
    const std::string who = entry_name(i);
    ADRT_ARG(e.nbytes > 0, who + ": nbytes must be > 0, got " + std::to_string(e.nbytes));
    ADRT_ARG(e.dst != 0, who + ": dst pointer is null");
    ADRT_ARG(e.src != 0, who + ": src pointer is null");
    check_ordinal(e.dst_device, (who + " dst").c_str());
    check_ordinal(e.src_device, (who + " src").c_str());
    const uint64_t n = static_cast<uint64_t>(e.nbytes);
    ADRT_ARG(e.dst + n > e.dst && e.src + n > e.src, who + ": pointer + nbytes overflows the address space");
    dsts.push_back({e.dst, e.dst + n, i});
  }
  // Destinations must be disjoint: two writes to one byte have no defined order.
  std::sort(dsts.begin(), dsts.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t k = 1; k < dsts.size(); ++k)
    ADRT_ARG(dsts[k].begin >= dsts[k - 1].end, entry_name(dsts[k].entry) + ": dst range overlaps the dst of " +
                                                   entry_name(dsts[k - 1].entry));
  // No source may be written by the batch itself. Sorted disjoint ranges have
  // increasing ends, so only the last dst starting before src.end can overlap.
  for (size_t i = 0; i < entries.size(); ++i) {
    const uint64_t b = entries[i].src, e = b + static_cast<uint64_t>(entries[i].nbytes);
    auto it = std::lower_bound(dsts.begin(), dsts.end(), e, [](const Range& r, uint64_t v) { return r.begin < v; });
    if (it == dsts.begin()) continue;
    --it;
    ADRT_ARG(it->end <= b, entry_name(i) + ": src range overlaps the dst of " + entry_name(it->entry));
  }
}

void copy_batch(const std::vector<CopyEntry>& entries, uint64_t stream, bool check_pointers, bool force_peer) {
  validate_copy_entries(entries);
  if (entries.empty()) return;
  std::set<int64_t> devices;
  for (const CopyEntry& e : entries) devices.insert({e.dst_device, e.src_device});
  for (int64_t d : devices) check_device_exists(d, "copy_batch");
  if (check_pointers) {
    for (size_t i = 0; i < entries.size(); ++i) {
      const CopyEntry& e = entries[i];
      check_device_range(e.dst, e.nbytes, e.dst_device, (entry_name(i) + " dst").c_str());
      check_device_range(e.src, e.nbytes, e.src_device, (entry_name(i) + " src").c_str());
    }
  }
  auto s = reinterpret_cast<cudaStream_t>(stream);
  StreamGuard guard(stream);
  for (size_t i = 0; i < entries.size(); ++i) {
    const CopyEntry& e = entries[i];
    auto dst = reinterpret_cast<void*>(e.dst);
    auto src = reinterpret_cast<const void*>(e.src);
    const size_t n = static_cast<size_t>(e.nbytes);
    cudaError_t err = (e.dst_device == e.src_device && !force_peer)
                          ? cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s)
                          : cudaMemcpyPeerAsync(dst, static_cast<int>(e.dst_device), src,
                                                static_cast<int>(e.src_device), n, s);
    if (err != cudaSuccess) {
      try {
        throw_cuda(e.dst_device == e.src_device && !force_peer ? "cudaMemcpyAsync" : "cudaMemcpyPeerAsync", err,
                   __FILE__, __LINE__);
      } catch (const CudaError& ex) {
        throw CudaError(std::string(ex.what()) + " [" + entry_name(i) + " of " + std::to_string(entries.size()) +
                        "; earlier entries were issued]");
      }
    }
  }
}

}  // namespace adrt
