// The extension's C++ surface, torch-free and pybind11-free: device pointers,
// streams and events are integers, memory belongs to the caller. bindings.cpp
// turns these into the Python module `asyncdiff_rt._C`.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace adrt {

// ---- topology.cpp
int device_count();
int runtime_version();
int driver_version();  // 0 when no driver is installed
struct DeviceProps {
  std::string name, pci_bus_id;
  int major, minor, sm_count;
  uint64_t total_memory, l2_bytes;
};
DeviceProps device_properties(int64_t device);
bool can_access_peer(int64_t device, int64_t peer);
struct LinkInfo {
  bool same_device, can_access_peer, native_atomics;
  int performance_rank;        // lower is faster, 0 for the best link on this system
  std::optional<bool> nvlink;  // empty when NVML cannot be loaded
};
LinkInfo link_info(int64_t device, int64_t peer);
bool enable_peer_access(int64_t device, int64_t peer);  // true if newly enabled

// ---- events.cpp
uint64_t event_create(int64_t device, bool timing, bool interprocess);
void event_record(uint64_t event, uint64_t stream);
void stream_wait_event(uint64_t stream, uint64_t event);
bool event_query(uint64_t event);
void event_synchronize(uint64_t event);
float event_elapsed_ms(uint64_t start, uint64_t end);
void event_destroy(uint64_t event);

// ---- copy.cpp
struct CopyEntry {
  uint64_t dst;
  int64_t dst_device;
  uint64_t src;
  int64_t src_device;
  int64_t nbytes;
};
void validate_copy_entries(const std::vector<CopyEntry>& entries);  // pure: no CUDA call
void copy_batch(const std::vector<CopyEntry>& entries, uint64_t stream, bool check_pointers, bool force_peer);

// ---- ipc.cpp
constexpr int kIpcHandleBytes = 64;
struct IpcExport {
  std::string handle;  // kIpcHandleBytes raw bytes
  int64_t offset;      // from the allocation base
};
IpcExport ipc_export(uint64_t ptr, int64_t device);
uint64_t ipc_open(const std::string& handle, int64_t offset, int64_t device);
void ipc_close(const std::string& handle, int64_t device);
int ipc_open_count();
std::string event_ipc_export(uint64_t event);
uint64_t event_ipc_open(const std::string& handle, int64_t device);

// ---- signals.cpp
// check_pointer=false skips the driver lookup that the flag lives on `device`: for a peer's
// flag mapped through IPC (the lookup would make the peer's GPU current here).
void signal_write(uint64_t stream, uint64_t ptr, uint32_t value, int64_t device, bool check_pointer = true);
void signal_wait(uint64_t stream, uint64_t ptr, uint32_t value, int64_t device, const std::string& mode, bool flush,
                 bool check_pointer = true);

// ---- green_ctx.cpp
class SmPartition {
 public:
  SmPartition(int64_t device, int64_t parts, int64_t min_sms);
  ~SmPartition();
  SmPartition(const SmPartition&) = delete;
  SmPartition& operator=(const SmPartition&) = delete;
  void close();
  int device() const { return device_; }
  const std::vector<uint64_t>& streams() const { return streams_; }
  const std::vector<int>& sm_counts() const { return sm_counts_; }
  int total_sms() const { return total_sms_; }

 private:
  int device_;
  int total_sms_ = 0;
  std::vector<void*> green_ctxs_;
  std::vector<uint64_t> streams_;
  std::vector<int> sm_counts_;
};

// ---- sm_probe.cu: each of n_blocks blocks writes its SM id to out[block] (int32).
void sm_probe(uint64_t stream, uint64_t out, int64_t n_blocks, int64_t device, int64_t spin_cycles);

}  // namespace adrt
