// Stream-ordered signals: a stream writes a 32-bit flag, another stream waits
// until the flag reaches a value. The handshake runs on the GPUs' front ends,
// without the host and without occupying SMs.
#include <optional>

#include "api.h"
#include "check.h"

namespace adrt {

namespace {

void check_flag(uint64_t ptr, int64_t device, const char* what) {
  ADRT_ARG(ptr != 0, std::string(what) + ": flag pointer is null");
  ADRT_ARG(ptr % 4 == 0, std::string(what) + ": flag pointer " + hex(ptr) + " is not 4-byte aligned");
  check_ordinal(device, what);
}

unsigned wait_flags(const std::string& mode, bool flush) {
  unsigned f;
  if (mode == "geq") f = CU_STREAM_WAIT_VALUE_GEQ;  // wraps like a counter: (int32)(flag - value) >= 0
  else if (mode == "eq") f = CU_STREAM_WAIT_VALUE_EQ;
  else if (mode == "and") f = CU_STREAM_WAIT_VALUE_AND;
  else if (mode == "nor") f = CU_STREAM_WAIT_VALUE_NOR;
  else throw std::invalid_argument("signal_wait: mode must be 'geq', 'eq', 'and' or 'nor', got '" + mode + "'");
  // FLUSH makes remote writes (e.g. from a peer GPU) visible before later work.
  return flush ? f | CU_STREAM_WAIT_VALUE_FLUSH : f;
}

}  // namespace

// Checks the flag, then runs `issue` with the stream's context current.
template <typename Issue>
void on_flag_stream(uint64_t stream, uint64_t ptr, int64_t device, bool check_pointer, const char* name,
                    Issue issue) {
  check_device_exists(device, name);
  if (check_pointer) check_device_range(ptr, 4, device, (std::string(name) + " flag").c_str());
  std::optional<DeviceGuard> current;  // stream 0 is the current device's: make it the flag's
  if (stream == 0) current.emplace(static_cast<int>(device));
  StreamGuard guard(stream);
  issue(reinterpret_cast<CUstream>(stream), static_cast<CUdeviceptr>(ptr));
}

void signal_write(uint64_t stream, uint64_t ptr, uint32_t value, int64_t device, bool check_pointer) {
  check_flag(ptr, device, "signal_write");
  on_flag_stream(stream, ptr, device, check_pointer, "signal_write", [&](CUstream s, CUdeviceptr flag) {
    // Default flags: prior work on the stream is visible before the flag is.
    ADRT_CU(ADRT_DRIVER(cuStreamWriteValue32, 11070)(s, flag, value, CU_STREAM_WRITE_VALUE_DEFAULT));
  });
}

void signal_wait(uint64_t stream, uint64_t ptr, uint32_t value, int64_t device, const std::string& mode,
                 bool flush, bool check_pointer) {
  check_flag(ptr, device, "signal_wait");
  const unsigned flags = wait_flags(mode, flush);
  on_flag_stream(stream, ptr, device, check_pointer, "signal_wait", [&](CUstream s, CUdeviceptr flag) {
    ADRT_CU(ADRT_DRIVER(cuStreamWaitValue32, 11070)(s, flag, value, flags));
  });
}

}  // namespace adrt
