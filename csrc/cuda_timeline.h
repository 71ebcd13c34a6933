#pragma once
#include <cuda_runtime_api.h>

#include "timeline.h"

namespace stagetrace {

// CUDA events in a pre-made pool, one per mark, recorded on a bound stream.
// Talks to the CUDA runtime directly (linked statically) and takes streams as
// integer handles, so one build serves any torch version.
class CudaTimeline : public TimelineBase {
 public:
  CudaTimeline(int device, int64_t capacity = 4096, int64_t chunk = 4096, int64_t max_marks = -1);
  ~CudaTimeline() override;
  CudaTimeline(const CudaTimeline&) = delete;
  CudaTimeline& operator=(const CudaTimeline&) = delete;

  // Validates the handle once, off the hot path; later mark() calls use it.
  void bind_stream(int64_t stream);
  int64_t bound_stream() const { return stream_; }
  int device() const { return device_; }
  // Waits until every stream of this timeline's device is idle (calibration, off the hot path).
  void synchronize_device();
  // The timeline protocol: one device, one stream; its events are one clock (nothing to calibrate).
  void bind_streams(const std::vector<int64_t>& streams) {
    if (streams.size() != 1) throw TimelineError("a one-device timeline binds exactly one stream");
    bind_stream(streams[0]);
  }
  void calibrate() {}
  std::vector<int64_t> device_streams() const { return {stream_}; }

  void mark(int32_t label);
  void mark_on(int32_t label, int64_t stream);
  // One wait on the last recorded event, then one elapsed-time query per mark.
  Resolved resolve();

 protected:
  bool grow_device_slots(int64_t new_capacity) override;

 private:
  int device_;
  int64_t stream_ = 0;
  std::vector<cudaEvent_t> events_;
};

}  // namespace stagetrace

namespace stagetrace {
// Floor for the benchmark: ns per cudaEventRecord issued from C++ in a tight loop.
double bench_event_record_ns(int device, int64_t n, int64_t stream);
}  // namespace stagetrace
