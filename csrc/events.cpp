// CUDA events as integer handles: create, record, wait, query, time, destroy.
// Work on a stream is issued with the stream's context current (StreamGuard).
#include "api.h"
#include "check.h"

namespace adrt {

namespace {

cudaEvent_t as_event(uint64_t event, const char* what) {
  ADRT_ARG(event != 0, std::string(what) + ": event handle is null (create one with event_create)");
  return reinterpret_cast<cudaEvent_t>(event);
}

}  // namespace

uint64_t event_create(int64_t device, bool timing, bool interprocess) {
  check_ordinal(device, "event_create");
  ADRT_ARG(!(timing && interprocess), "event_create: CUDA interprocess events cannot record timing; "
                                      "pass timing=False with interprocess=True");
  check_device_exists(device, "event_create");
  unsigned flags = timing ? cudaEventDefault : cudaEventDisableTiming;
  if (interprocess) flags |= cudaEventInterprocess;
  DeviceGuard guard(static_cast<int>(device));
  cudaEvent_t ev = nullptr;
  ADRT_CUDA(cudaEventCreateWithFlags(&ev, flags));
  return reinterpret_cast<uint64_t>(ev);
}

void event_record(uint64_t event, uint64_t stream) {
  cudaEvent_t ev = as_event(event, "event_record");
  StreamGuard guard(stream);
  ADRT_CUDA(cudaEventRecord(ev, reinterpret_cast<cudaStream_t>(stream)));
}

void stream_wait_event(uint64_t stream, uint64_t event) {
  cudaEvent_t ev = as_event(event, "stream_wait_event");
  StreamGuard guard(stream);
  ADRT_CUDA(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), ev, 0));
}

bool event_query(uint64_t event) {
  cudaError_t err = cudaEventQuery(as_event(event, "event_query"));
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  if (err != cudaSuccess) throw_cuda("cudaEventQuery", err, __FILE__, __LINE__);
  return true;
}

void event_synchronize(uint64_t event) { ADRT_CUDA(cudaEventSynchronize(as_event(event, "event_synchronize"))); }

float event_elapsed_ms(uint64_t start, uint64_t end) {
  float ms = 0.f;
  ADRT_CUDA(cudaEventElapsedTime(&ms, as_event(start, "event_elapsed_ms"), as_event(end, "event_elapsed_ms")));
  return ms;
}

void event_destroy(uint64_t event) { ADRT_CUDA(cudaEventDestroy(as_event(event, "event_destroy"))); }

}  // namespace adrt
