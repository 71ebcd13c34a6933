#include "cuda_timeline.h"

#include <cmath>

#include "cuda_check.h"

namespace stagetrace {

bool cuda_compiled() { return true; }

std::pair<int, std::string> cuda_probe() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return {0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)};
  }
  if (count == 0) return {0, "the CUDA driver reports no devices"};
  return {count, ""};
}

CudaTimeline::CudaTimeline(int device, int64_t capacity, int64_t chunk, int64_t max_marks)
    : TimelineBase(capacity, chunk, max_marks), device_(device) {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (device < 0 || device >= count)
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist (" +
                                std::to_string(count) + " visible)");
  if (!grow_device_slots(capacity)) throw CudaError("could not create the initial event pool");
}

CudaTimeline::~CudaTimeline() {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;  // runtime already torn down
  cudaSetDevice(device_);
  for (cudaEvent_t ev : events_) cudaEventDestroy(ev);
  cudaSetDevice(previous);
}

bool CudaTimeline::grow_device_slots(int64_t new_capacity) {
  try {
    DeviceGuard guard(device_);
    events_.reserve(static_cast<size_t>(new_capacity));
    while (static_cast<int64_t>(events_.size()) < new_capacity) {
      cudaEvent_t ev;
      // Timing-enabled, spin-waiting events: the cheapest kind to record.
      check(cudaEventCreateWithFlags(&ev, cudaEventDefault), "cudaEventCreateWithFlags");
      events_.push_back(ev);
    }
    return true;
  } catch (const CudaError&) {
    return false;
  }
}

void CudaTimeline::synchronize_device() {
  DeviceGuard guard(device_);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

void CudaTimeline::bind_stream(int64_t stream) {
  if (stream < 0) throw std::invalid_argument("stream handle must be >= 0, got " + std::to_string(stream));
  if (stream != 0) {
    int stream_device = -1;
    check(cudaStreamGetDevice(reinterpret_cast<cudaStream_t>(stream), &stream_device), "cudaStreamGetDevice");
    if (stream_device != device_)
      throw std::invalid_argument("stream is on CUDA device " + std::to_string(stream_device) +
                                  " but this timeline records on device " + std::to_string(device_));
  }
  stream_ = stream;
}

void CudaTimeline::mark(int32_t label) { mark_on(label, stream_); }

void CudaTimeline::mark_on(int32_t label, int64_t stream) {
  int64_t i = claim_slot();
  if (i < 0) return;
  cudaError_t err;
  if (stream == 0) {
    // Handle 0 is the legacy default stream *of the current device*: with a model on another
    // GPU than the thread's current one (or split over several), record with ours current.
    int current = device_;
    cudaGetDevice(&current);
    if (current != device_ && (err = cudaSetDevice(device_)) == cudaSuccess) {
      err = cudaEventRecord(events_[i], nullptr);
      cudaSetDevice(current);
    } else if (current == device_) {
      err = cudaEventRecord(events_[i], nullptr);
    }
  } else {
    err = cudaEventRecord(events_[i], reinterpret_cast<cudaStream_t>(stream));
  }
  if (err != cudaSuccess) {
    --n_;  // the slot holds no event of this run: give it back before reporting
    check(err, "cudaEventRecord");
  }
  labels_[i] = label;
  host_ns_[i] = host_now_ns();
  streams_[i] = stream;
}

Resolved CudaTimeline::resolve() {
  check_resolvable();
  check(cudaEventSynchronize(events_[n_ - 1]), "cudaEventSynchronize");
  Resolved r;
  r.labels.assign(labels_.begin(), labels_.begin() + n_);
  r.host_ns.assign(host_ns_.begin(), host_ns_.begin() + n_);
  r.streams.assign(streams_.begin(), streams_.begin() + n_);
  r.device_ns.resize(n_);
  r.device_ns[0] = 0;
  for (int64_t i = 1; i < n_; ++i) {
    float ms = 0.f;
    cudaError_t err = cudaEventElapsedTime(&ms, events_[0], events_[i]);
    if (err == cudaErrorNotReady) {
      // Marks on another stream can finish after the last-recorded one.
      cudaGetLastError();
      check(cudaEventSynchronize(events_[i]), "cudaEventSynchronize");
      err = cudaEventElapsedTime(&ms, events_[0], events_[i]);
    }
    check(err, "cudaEventElapsedTime");
    r.device_ns[i] = std::llround(static_cast<double>(ms) * 1e6);
  }
  resolved_ = true;
  return r;
}

}  // namespace stagetrace

namespace stagetrace {

double bench_event_record_ns(int device, int64_t n, int64_t stream) {
  if (n < 1) throw std::invalid_argument("n must be >= 1");
  CudaTimeline tl(device, n, n, n);
  tl.bind_stream(stream);
  int64_t t0 = host_now_ns();
  for (int64_t i = 0; i < n; ++i) tl.mark(static_cast<int32_t>(i));
  int64_t t1 = host_now_ns();
  tl.resolve();
  return static_cast<double>(t1 - t0) / static_cast<double>(n);
}

}  // namespace stagetrace
