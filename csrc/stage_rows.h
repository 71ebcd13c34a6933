// Which marks bound each span of one call: the part of the stage math that walks the marks.
//
// The twin of stagetrace/stages.py's numpy path (``_bounds_numpy``), which stays the
// reference: tests run both on random mark sequences and require the same result. It
// exists because this runs after every generate(), inside the traced call, where numpy's
// per-call overhead (tens of array operations on a few dozen marks, with cold caches after
// the model's own work) cost more than the stage math itself.
//
// What must stay true (as in stages.py):
//  * the kind codes below are labels.Kind's values: append, never renumber;
//  * a label's flags (bits 28 and 29) never change its kind or its index;
//  * positions only: no time is read here except to check device order and to pick the
//    later of two boundaries, so every clock the marks are ordered on reads the same spans.
#pragma once

#include <cstdint>
#include <vector>

namespace stagetrace {

// labels.Kind
enum MarkKind : int32_t {
  kCallBegin = 1,
  kCallEnd = 2,
  kVisionBegin = 3,
  kVisionEnd = 4,
  kPrefillForward = 5,
  kDecodeForward = 6,
  kLmBegin = 7,
  kLmHeadEnd = 8,
  kLayerBegin = 9,
  kLayerEnd = 10,
  kForwardReturn = 11,
  kAudioBegin = 12,  // a non-vision (audio) encoder's run: no stage; the stage walk passes over it
  kAudioEnd = 13,
  kAuxForwardBegin = 14,  // a top-level forward outside generate()'s decoding loop: no stage; passed over too
  kAuxForwardEnd = 15,
};

// spans.SPAN_KINDS positions
enum SpanKindCode : int8_t { kSpanCall = 0, kSpanVision = 1, kSpanPrefill = 2, kSpanDecode = 3, kSpanStep = 4,
                             kSpanLayer = 5 };

// Why a call's marks do not form stages (the Python side words it).
enum RowsStatus : int32_t {
  kRowsOk = 0,
  kRowsBadFrame = 1,       // fewer than 2 marks, or not CALL_BEGIN ... CALL_END
  kRowsOutOfOrder = 2,     // device times go back: at = the mark before the first one that does
  kRowsVisionUnpaired = 3,
  kRowsNoPrefill = 4,
};

struct StageRows {
  int32_t status = kRowsOk;
  int64_t at = -1;
  // stage boundaries as mark positions (-1: none)
  int64_t vision_begin = -1, vision_end = -1, prefill_begin = -1, prefill_end = -1, first_decode = -1;
  std::vector<int64_t> decode;  // every decode step's start mark, in order
  // one row per span, in nesting order (see stages.py)
  std::vector<int8_t> kind, depth;
  std::vector<int32_t> index;
  std::vector<int64_t> begin, end;
};

StageRows stage_rows(const int32_t* labels, const int64_t* device_ns, int64_t n);

}  // namespace stagetrace
