// The Python module asyncdiff_rt._C: converts Python values to the C++ calls
// of api.h. Integers in, integers out; the GIL is released around CUDA work.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "api.h"
#include "check.h"

namespace py = pybind11;
using adrt::CopyEntry;

#ifndef ADRT_CUDA_ARCHS
#define ADRT_CUDA_ARCHS "unknown"
#endif

namespace {

using EntryTuple = std::tuple<uint64_t, int64_t, uint64_t, int64_t, int64_t>;

void copy_batch(const std::vector<EntryTuple>& entries, uint64_t stream, bool check_pointers, bool force_peer) {
  std::vector<CopyEntry> es;
  es.reserve(entries.size());
  for (const auto& [dst, dst_dev, src, src_dev, n] : entries) es.push_back({dst, dst_dev, src, src_dev, n});
  py::gil_scoped_release nogil;
  adrt::copy_batch(es, stream, check_pointers, force_peer);
}

py::dict build_info() {
  py::dict d;
  d["cuda_version"] = CUDART_VERSION;  // the toolkit it was compiled with (runtime linked statically)
  d["cuda_archs"] = ADRT_CUDA_ARCHS;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "asyncdiff_rt transfer engine: peer copies, events, IPC, stream signals, SM partitions (torch-free)";
  // Translators run newest first, so Unsupported (a CudaError) is matched before its base.
  auto& cuda_error = py::register_exception<adrt::CudaError>(m, "CudaError", PyExc_RuntimeError);
  py::register_exception<adrt::Unsupported>(m, "Unsupported", cuda_error.ptr());

  // topology
  m.def("device_count", &adrt::device_count, "Visible CUDA devices; raises CudaError without a driver or GPU.");
  m.def("runtime_version", &adrt::runtime_version, "CUDA runtime version (linked statically), e.g. 13000.");
  m.def("driver_version", &adrt::driver_version, "CUDA version the driver supports, 0 without a driver.");
  m.def("build_info", &build_info);
  m.def("device_properties", [](int64_t device) {
    adrt::DeviceProps p = adrt::device_properties(device);
    py::dict d;
    d["name"] = p.name;
    d["pci_bus_id"] = p.pci_bus_id;
    d["capability"] = py::make_tuple(p.major, p.minor);
    d["sm_count"] = p.sm_count;
    d["total_memory"] = p.total_memory;
    d["l2_bytes"] = p.l2_bytes;
    return d;
  }, py::arg("device"));
  m.def("can_access_peer", &adrt::can_access_peer, py::arg("device"), py::arg("peer"),
        "Whether `device` can read/write `peer`'s memory directly (True for device == peer).");
  m.def("link_info", [](int64_t device, int64_t peer) {
    adrt::LinkInfo l = adrt::link_info(device, peer);
    py::dict d;
    d["same_device"] = l.same_device;
    d["can_access_peer"] = l.can_access_peer;
    d["performance_rank"] = l.performance_rank;
    d["native_atomics"] = l.native_atomics;
    d["nvlink"] = l.nvlink ? py::cast(*l.nvlink) : py::none();
    return d;
  }, py::arg("device"), py::arg("peer"), "Link between two devices; nvlink is None when NVML is unavailable.");
  m.def("enable_peer_access", &adrt::enable_peer_access, py::arg("device"), py::arg("peer"),
        "Let `device` access `peer`'s memory; returns False if already enabled or device == peer.");

  // events
  m.def("event_create", &adrt::event_create, py::arg("device"), py::arg("timing") = false,
        py::arg("interprocess") = false);
  m.def("event_record", &adrt::event_record, py::arg("event"), py::arg("stream"));
  m.def("stream_wait_event", &adrt::stream_wait_event, py::arg("stream"), py::arg("event"));
  m.def("event_query", &adrt::event_query, py::arg("event"), "True once all work before the record is done.");
  m.def("event_synchronize", &adrt::event_synchronize, py::arg("event"), py::call_guard<py::gil_scoped_release>());
  m.def("event_elapsed_ms", &adrt::event_elapsed_ms, py::arg("start"), py::arg("end"));
  m.def("event_destroy", &adrt::event_destroy, py::arg("event"));

  // copies
  m.def("copy_batch", &copy_batch, py::arg("entries"), py::arg("stream"), py::arg("check_pointers") = true,
        py::arg("force_peer") = false,
        "Issue (dst, dst_device, src, src_device, nbytes) copies in order on `stream`. Destinations must be\n"
        "disjoint and must not overlap any source. check_pointers=False skips the per-pointer driver lookups\n"
        "(for plans validated once); force_peer uses cudaMemcpyPeerAsync even on one device.");

  // IPC
  m.def("ipc_export", [](uint64_t ptr, int64_t device) {
    adrt::IpcExport e = adrt::ipc_export(ptr, device);
    return py::make_tuple(py::bytes(e.handle), e.offset);
  }, py::arg("ptr"), py::arg("device"), "(handle bytes, offset from the allocation base) for another process.");
  m.def("ipc_open", [](py::bytes handle, int64_t offset, int64_t device) {
    return adrt::ipc_open(std::string(handle), offset, device);
  }, py::arg("handle"), py::arg("offset"), py::arg("device"), "Map a peer's buffer; returns base + offset.");
  m.def("ipc_close", [](py::bytes handle, int64_t device) { adrt::ipc_close(std::string(handle), device); },
        py::arg("handle"), py::arg("device"), "Drop one ipc_open of `handle`; unmaps after the last.");
  m.def("ipc_open_count", &adrt::ipc_open_count, "Handles currently mapped in this process.");
  m.def("event_ipc_export", [](uint64_t event) { return py::bytes(adrt::event_ipc_export(event)); },
        py::arg("event"), "Handle of an event made with interprocess=True.");
  m.def("event_ipc_open", [](py::bytes handle, int64_t device) {
    return adrt::event_ipc_open(std::string(handle), device);
  }, py::arg("handle"), py::arg("device"), "Open a peer's event; destroy it with event_destroy.");

  // stream-ordered signals
  m.def("signal_write", &adrt::signal_write, py::arg("stream"), py::arg("ptr"), py::arg("value"), py::arg("device"),
        py::arg("check_pointer") = true,
        "When `stream` reaches this point, store the 32-bit `value` at device address `ptr` (after prior work).");
  m.def("signal_wait", &adrt::signal_wait, py::arg("stream"), py::arg("ptr"), py::arg("value"), py::arg("device"),
        py::arg("mode") = "geq", py::arg("flush") = false, py::arg("check_pointer") = true,
        "Make `stream` wait until *ptr compares to `value` by `mode` (geq, eq, and, nor).");

  // SM partitions
  py::class_<adrt::SmPartition>(m, "SmPartition",
                                "Split one GPU's SMs into `parts` green contexts with a stream each.")
      .def(py::init<int64_t, int64_t, int64_t>(), py::arg("device"), py::arg("parts"), py::arg("min_sms") = 0)
      .def_property_readonly("device", &adrt::SmPartition::device)
      .def_property_readonly("streams", &adrt::SmPartition::streams)
      .def_property_readonly("sm_counts", &adrt::SmPartition::sm_counts)
      .def_property_readonly("total_sms", &adrt::SmPartition::total_sms)
      .def("close", &adrt::SmPartition::close, "Wait for the streams, then free streams and contexts.")
      .def("__enter__", [](adrt::SmPartition& p) -> adrt::SmPartition& { return p; },
           py::return_value_policy::reference)
      .def("__exit__", [](adrt::SmPartition& p, py::args) { p.close(); });
  m.def("sm_probe", &adrt::sm_probe, py::arg("stream"), py::arg("out"), py::arg("n_blocks"), py::arg("device"),
        py::arg("spin_cycles") = 100000, "Each block writes the id of the SM it ran on to out[block] (int32).");
}
