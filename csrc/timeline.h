// stagetrace native core: a recorder of labelled marks on one timeline.
//
// What must stay true:
//  * mark() never synchronises and never allocates while the pool has room;
//    when it runs out it grows by a whole chunk (allocation happens then, once
//    per chunk), and if growing fails the timeline is flagged, never mis-timed.
//  * Times stay raw (ns on the host steady clock, events on the GPU) until
//    resolve(); conversion happens once, after the run.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace stagetrace {

// Misuse of the recorder (resolve before any mark, mark after resolve, ...).
struct TimelineError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A CUDA runtime call failed; the message carries cudaGetErrorString.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Host monotonic clock in ns (CLOCK_MONOTONIC, the clock of time.monotonic_ns).
int64_t host_now_ns();

// Marks as plain columns, filled by resolve().
struct Resolved {
  std::vector<int32_t> labels;
  std::vector<int64_t> device_ns;  // relative to the first mark
  std::vector<int64_t> host_ns;    // absolute host monotonic clock
  std::vector<int64_t> streams;    // stream handle each mark was recorded on
};

// The host-side bookkeeping every backend shares: labels, host stamps,
// streams, growth policy and the state machine (recording -> resolved -> reset).
class TimelineBase {
 public:
  TimelineBase(int64_t capacity, int64_t chunk, int64_t max_marks);
  virtual ~TimelineBase() = default;

  void reset();
  int64_t size() const { return n_; }
  int64_t capacity() const { return static_cast<int64_t>(labels_.size()); }
  int64_t dropped() const { return dropped_; }
  bool resolved() const { return resolved_; }
  int64_t max_marks() const { return max_marks_; }

 protected:
  // Returns the slot for the next mark, or -1 when the pool cannot grow
  // (the mark is then counted in dropped()).
  int64_t claim_slot();
  virtual bool grow_device_slots(int64_t new_capacity) = 0;
  void check_resolvable() const;

  std::vector<int32_t> labels_;
  std::vector<int64_t> host_ns_;
  std::vector<int64_t> streams_;
  int64_t n_ = 0;
  int64_t chunk_;
  int64_t max_marks_;
  int64_t dropped_ = 0;
  bool resolved_ = false;
};

// Host clock only: the backend when there is no usable GPU.
class HostTimeline : public TimelineBase {
 public:
  explicit HostTimeline(int64_t capacity = 4096, int64_t chunk = 4096, int64_t max_marks = -1);
  void mark(int32_t label);
  void mark_on(int32_t label, int64_t stream);
  Resolved resolve();
  // The timeline protocol's stream and clock calls: one host clock has neither.
  void bind_streams(const std::vector<int64_t>&) {}
  void calibrate() {}
  std::vector<int64_t> device_streams() const { return {}; }

 protected:
  bool grow_device_slots(int64_t) override { return true; }
};

// Whether this build has the CUDA backend compiled in.
bool cuda_compiled();
// Number of usable CUDA devices, and why there are none (empty when >0).
std::pair<int, std::string> cuda_probe();

}  // namespace stagetrace
