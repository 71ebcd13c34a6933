#include "timeline.h"

#include <algorithm>
#include <ctime>

namespace stagetrace {

int64_t host_now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

TimelineBase::TimelineBase(int64_t capacity, int64_t chunk, int64_t max_marks)
    : chunk_(chunk), max_marks_(max_marks) {
  if (capacity < 1) throw std::invalid_argument("capacity must be >= 1, got " + std::to_string(capacity));
  if (chunk < 1) throw std::invalid_argument("chunk must be >= 1, got " + std::to_string(chunk));
  if (max_marks >= 0 && max_marks < capacity)
    throw std::invalid_argument("max_marks (" + std::to_string(max_marks) + ") is below capacity (" +
                                std::to_string(capacity) + ")");
  labels_.resize(capacity);
  host_ns_.resize(capacity);
  streams_.resize(capacity);
}

void TimelineBase::reset() {
  n_ = 0;
  dropped_ = 0;
  resolved_ = false;
}

int64_t TimelineBase::claim_slot() {
  if (resolved_)
    throw TimelineError("mark() after resolve(): call reset() before recording the next run");
  if (n_ < capacity()) return n_++;
  // Out of room: grow by one chunk. This allocates, but only once per chunk.
  int64_t new_capacity = capacity() + chunk_;
  if (max_marks_ >= 0) new_capacity = std::min(new_capacity, max_marks_);
  if (new_capacity <= capacity() || !grow_device_slots(new_capacity)) {
    ++dropped_;
    return -1;
  }
  labels_.resize(new_capacity);
  host_ns_.resize(new_capacity);
  streams_.resize(new_capacity);
  return n_++;
}

void TimelineBase::check_resolvable() const {
  if (resolved_) throw TimelineError("resolve() called twice: call reset() before recording the next run");
  if (n_ == 0) throw TimelineError("resolve() before any mark: nothing was recorded");
}

HostTimeline::HostTimeline(int64_t capacity, int64_t chunk, int64_t max_marks)
    : TimelineBase(capacity, chunk, max_marks) {}

void HostTimeline::mark(int32_t label) { mark_on(label, 0); }

void HostTimeline::mark_on(int32_t label, int64_t stream) {
  if (stream != 0)
    throw std::invalid_argument("the host backend has no streams: stream handle must be 0, got " +
                                std::to_string(stream));
  int64_t now = host_now_ns();
  int64_t i = claim_slot();
  if (i < 0) return;
  labels_[i] = label;
  host_ns_[i] = now;
  streams_[i] = 0;
}

Resolved HostTimeline::resolve() {
  check_resolvable();
  Resolved r;
  r.labels.assign(labels_.begin(), labels_.begin() + n_);
  r.host_ns.assign(host_ns_.begin(), host_ns_.begin() + n_);
  r.streams.assign(streams_.begin(), streams_.begin() + n_);
  r.device_ns.resize(n_);
  for (int64_t i = 0; i < n_; ++i) r.device_ns[i] = host_ns_[i] - host_ns_[0];
  resolved_ = true;
  return r;
}

#ifndef STAGETRACE_WITH_CUDA
bool cuda_compiled() { return false; }
std::pair<int, std::string> cuda_probe() {
  return {0, "stagetrace was built without the CUDA backend (no CUDA toolkit at build time)"};
}
#endif

}  // namespace stagetrace
