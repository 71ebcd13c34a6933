// Python bindings: one-line forwards only. Behaviour lives in the timeline files.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "call_leads.h"
#include "stage_rows.h"
#include "timeline.h"
#ifdef STAGETRACE_WITH_CUDA
#include "cuda_timeline.h"
#endif
#ifdef STAGETRACE_WITH_STAMPS
#include "stamp_ring.h"
#endif

namespace py = pybind11;
using namespace stagetrace;

namespace {

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

py::tuple to_python(const Resolved& r) {
  return py::make_tuple(to_numpy(r.labels), to_numpy(r.device_ns), to_numpy(r.host_ns), to_numpy(r.streams));
}

template <typename T, typename Cls>
void def_common(Cls& cls) {
  cls.def("mark", &T::mark, py::arg("label"))
      .def("mark_on", &T::mark_on, py::arg("label"), py::arg("stream"))
      .def("resolve", [](T& t) { return to_python(t.resolve()); })
      .def("reset", &T::reset)
      .def("bind_streams", &T::bind_streams, py::arg("streams"))
      .def("calibrate", &T::calibrate)
      .def_property_readonly("device_streams", &T::device_streams)
      .def("__len__", &T::size)
      .def_property_readonly("capacity", &T::capacity)
      .def_property_readonly("dropped", &T::dropped)
      .def_property_readonly("resolved", &T::resolved)
      .def_property_readonly("max_marks", &T::max_marks);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "stagetrace native core: labelled marks on a GPU (CUDA events) or host timeline";
  auto timeline_error = py::register_exception<TimelineError>(m, "TimelineError", PyExc_RuntimeError);
  py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);
  (void)timeline_error;

  m.def("cuda_compiled", &cuda_compiled);
  m.def("stage_rows", [](py::array_t<int32_t, py::array::c_style | py::array::forcecast> labels,
                         py::array_t<int64_t, py::array::c_style | py::array::forcecast> device_ns) {
    if (labels.ndim() != 1 || device_ns.ndim() != 1 || labels.shape(0) != device_ns.shape(0))
      throw std::invalid_argument("stage_rows: labels and device_ns must be 1-d and of one length");
    StageRows r = stage_rows(labels.data(), device_ns.data(), labels.shape(0));
    return py::make_tuple(r.status, r.at, r.vision_begin, r.vision_end, r.prefill_begin, r.prefill_end,
                          r.first_decode, to_numpy(r.decode), to_numpy(r.kind), to_numpy(r.index),
                          to_numpy(r.depth), to_numpy(r.begin), to_numpy(r.end));
  }, py::arg("labels"), py::arg("device_ns"));
  m.def("lead_columns", [](py::array_t<int32_t, py::array::c_style | py::array::forcecast> labels,
                           py::array_t<int64_t, py::array::c_style | py::array::forcecast> device_ns,
                           py::array_t<int64_t, py::array::c_style | py::array::forcecast> host_ns, py::object issued,
                           py::array_t<int64_t, py::array::c_style | py::array::forcecast> windows, int64_t n_steps) {
    const int64_t n = labels.shape(0);
    if (labels.ndim() != 1 || device_ns.ndim() != 1 || host_ns.ndim() != 1 || device_ns.shape(0) != n ||
        host_ns.shape(0) != n || windows.size() % 2 != 0 || n_steps < 0)
      throw std::invalid_argument("lead_columns: labels, device_ns and host_ns must be 1-d and of one length");
    py::array_t<bool, py::array::c_style | py::array::forcecast> by_host;
    if (!issued.is_none()) {
      by_host = py::array_t<bool, py::array::c_style | py::array::forcecast>::ensure(issued);
      if (!by_host || by_host.ndim() != 1 || by_host.shape(0) != n)
        throw std::invalid_argument("lead_columns: issued_by_host must be None or n booleans");
    }
    LeadColumns c = lead_columns(labels.data(), device_ns.data(), host_ns.data(),
                                 issued.is_none() ? nullptr : by_host.data(), n, windows.data(), windows.size() / 2,
                                 n_steps);
    py::list stats;
    for (const LeadStats& s : c.windows)
      stats.append(py::make_tuple(s.marks, s.min_us, s.median_us, s.max_us, s.behind_ns));
    return py::make_tuple(stats, to_numpy(c.step_marks), to_numpy(c.step_median_us), to_numpy(c.step_behind_ns));
  }, py::arg("labels"), py::arg("device_ns"), py::arg("host_ns"), py::arg("issued_by_host"), py::arg("windows"),
     py::arg("n_steps"));
  m.def("stage_kind_codes", []() {  // for the test that they are labels.Kind's and spans.SPAN_KINDS' values
    py::dict marks, spans;
    marks["CALL_BEGIN"] = int(kCallBegin); marks["CALL_END"] = int(kCallEnd);
    marks["VISION_BEGIN"] = int(kVisionBegin); marks["VISION_END"] = int(kVisionEnd);
    marks["PREFILL_FORWARD"] = int(kPrefillForward); marks["DECODE_FORWARD"] = int(kDecodeForward);
    marks["LM_BEGIN"] = int(kLmBegin); marks["LM_HEAD_END"] = int(kLmHeadEnd);
    marks["LAYER_BEGIN"] = int(kLayerBegin); marks["LAYER_END"] = int(kLayerEnd);
    marks["FORWARD_RETURN"] = int(kForwardReturn);
    marks["AUDIO_BEGIN"] = int(kAudioBegin); marks["AUDIO_END"] = int(kAudioEnd);
    marks["AUX_FORWARD_BEGIN"] = int(kAuxForwardBegin); marks["AUX_FORWARD_END"] = int(kAuxForwardEnd);
    spans["call"] = int(kSpanCall); spans["vision"] = int(kSpanVision); spans["prefill"] = int(kSpanPrefill);
    spans["decode"] = int(kSpanDecode); spans["step"] = int(kSpanStep); spans["layer"] = int(kSpanLayer);
    return py::make_tuple(marks, spans);
  });
  m.def("cuda_probe", &cuda_probe);
  m.def("host_now_ns", &host_now_ns);

  py::class_<HostTimeline> host(m, "HostTimeline");
  host.def(py::init<int64_t, int64_t, int64_t>(), py::arg("capacity") = 4096, py::arg("chunk") = 4096,
           py::arg("max_marks") = -1);
  def_common<HostTimeline>(host);
  host.def_property_readonly("backend", [](const HostTimeline&) { return "cpu"; });

#ifdef STAGETRACE_WITH_CUDA
  py::class_<CudaTimeline> cuda(m, "CudaTimeline");
  cuda.def(py::init<int, int64_t, int64_t, int64_t>(), py::arg("device"), py::arg("capacity") = 4096,
           py::arg("chunk") = 4096, py::arg("max_marks") = -1);
  def_common<CudaTimeline>(cuda);
  cuda.def("bind_stream", &CudaTimeline::bind_stream, py::arg("stream"))
      .def("synchronize_device", &CudaTimeline::synchronize_device)
      .def_property_readonly("bound_stream", &CudaTimeline::bound_stream)
      .def_property_readonly("device", &CudaTimeline::device)
      .def_property_readonly("backend", [](const CudaTimeline&) { return "cuda"; });
  m.def("bench_event_record_ns", &bench_event_record_ns, py::arg("device"), py::arg("n"), py::arg("stream"));
#endif

  m.def("stamps_compiled", []() {
#ifdef STAGETRACE_WITH_STAMPS
    return true;
#else
    return false;
#endif
  });
#ifdef STAGETRACE_WITH_STAMPS
  py::class_<StampRing> ring(m, "StampRing");
  ring.def(py::init<int, int64_t>(), py::arg("device"), py::arg("capacity") = 65536)
      .def("reset", &StampRing::reset, py::arg("stream"))
      .def("stamp", &StampRing::stamp, py::arg("label"), py::arg("stream"))
      .def("stamp_copy", &StampRing::stamp_copy, py::arg("label"), py::arg("src"), py::arg("dst"), py::arg("nbytes"),
           py::arg("stream"))
      .def("read", [](StampRing& r, int64_t stream) {
             std::vector<int32_t> labels;
             std::vector<int64_t> t_ns;
             int64_t dropped = 0;
             r.read(stream, labels, t_ns, dropped);
             return py::make_tuple(to_numpy(labels), to_numpy(t_ns), dropped);
           }, py::arg("stream"))
      .def_property_readonly("device", &StampRing::device)
      .def_property_readonly("capacity", &StampRing::capacity);
  m.def("globaltimer_resolution_ns", &globaltimer_resolution_ns, py::arg("device"), py::arg("reads") = 100000);
#endif
}
