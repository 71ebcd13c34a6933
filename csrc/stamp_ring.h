#pragma once
#include <cstdint>
#include <vector>

namespace stagetrace {

// Timestamps taken BY THE GPU (%globaltimer, ns) into a device ring, one slot per stamp,
// claimed with an atomic counter. A stamp is a one-thread kernel launched on a stream,
// so it can be captured into a CUDA graph: every replay appends its own stamps with no
// host involvement. That is what gives marks inside compiled, graph-replayed code.
//
// What must stay true: the ring and counter addresses never change for the life of the
// object (captured graphs hold them); a full ring counts drops, it never overwrites.
class StampRing {
 public:
  StampRing(int device, int64_t capacity);
  ~StampRing();
  StampRing(const StampRing&) = delete;
  StampRing& operator=(const StampRing&) = delete;

  // Asynchronous on `stream`: empties the ring for the next call.
  void reset(int64_t stream);
  // One stamp kernel on `stream`.
  void stamp(int32_t label, int64_t stream);
  // One kernel on `stream` that stamps, then copies `nbytes` from `src` to `dst`: the copy
  // is the data dependency that keeps a compiler from moving the stamp (see graph_stamps.py).
  void stamp_copy(int32_t label, int64_t src, int64_t dst, int64_t nbytes, int64_t stream);
  // Waits for `stream`, then reads back the stamps taken since reset(): labels, GPU ns, and
  // how many stamps found the ring full.
  void read(int64_t stream, std::vector<int32_t>& labels, std::vector<int64_t>& t_ns, int64_t& dropped);

  int device() const { return device_; }
  int64_t capacity() const { return capacity_; }

 private:
  int device_;
  int64_t capacity_;
  unsigned long long* slots_ = nullptr;    // capacity_ x (t_ns, label)
  unsigned long long* counter_ = nullptr;  // next slot; may run past capacity_ (= drops)
};

// Smallest non-zero step of %globaltimer seen by one thread reading it `reads` times.
int64_t globaltimer_resolution_ns(int device, int64_t reads);

}  // namespace stagetrace
