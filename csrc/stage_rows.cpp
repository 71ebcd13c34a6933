#include "stage_rows.h"

#include <algorithm>

namespace stagetrace {

namespace {

constexpr int32_t kFlags = (1 << 29) | (1 << 28);  // labels.LABEL_FLAGS
inline int32_t kind_of(int32_t label) { return label & 0xFF; }
inline int32_t index_of(int32_t label) { return (label & ~kFlags) >> 8; }

void add(StageRows& r, int8_t kind, int32_t index, int8_t depth, int64_t begin, int64_t end) {
  r.kind.push_back(kind);
  r.index.push_back(index);
  r.depth.push_back(depth);
  r.begin.push_back(begin);
  r.end.push_back(end);
}

}  // namespace

StageRows stage_rows(const int32_t* labels, const int64_t* t, int64_t n) {
  StageRows r;
  if (n < 2 || kind_of(labels[0]) != kCallBegin || kind_of(labels[n - 1]) != kCallEnd) {
    r.status = kRowsBadFrame;
    return r;
  }
  for (int64_t i = 0; i + 1 < n; ++i) {
    if (t[i + 1] < t[i]) {
      r.status = kRowsOutOfOrder;
      r.at = i;
      return r;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    if (kind_of(labels[i]) == kDecodeForward) r.decode.push_back(i);
  const int64_t first_decode = r.decode.empty() ? n - 1 : r.decode.front();
  r.first_decode = first_decode;

  // what shapes vision and prefill: the marks before the first decode step
  int64_t vb = -1, ve = -1, prefill_fwd = -1, lm_begin = -1, head_end = -1;
  for (int64_t i = 0; i < first_decode; ++i) {
    switch (kind_of(labels[i])) {
      case kVisionBegin: if (vb < 0) vb = i; break;
      case kVisionEnd: ve = i; break;
      case kPrefillForward: if (prefill_fwd < 0) prefill_fwd = i; break;
      case kLmBegin: if (lm_begin < 0) lm_begin = i; break;
      case kLmHeadEnd: head_end = i; break;
      default: break;
    }
  }
  if ((vb < 0) != (ve < 0)) {
    r.status = kRowsVisionUnpaired;
    return r;
  }
  if (prefill_fwd < 0) {
    r.status = kRowsNoPrefill;
    return r;
  }
  int64_t p_start = lm_begin >= 0 ? lm_begin : prefill_fwd;
  if (vb >= 0) {
    r.vision_begin = vb;
    r.vision_end = ve;
    p_start = std::max(p_start, ve);  // prefill starts after vision: the later mark is the later time
  }
  r.prefill_begin = p_start;
  r.prefill_end = head_end >= 0 ? head_end : first_decode;

  // Layer spans (stages._layer_spans): a begin is closed by the next layer mark of its region
  // (the prefill, or one decode step) that is any layer's begin or its own end.
  std::vector<int64_t> layer_pos;
  std::vector<int64_t> region;  // 0 before the first decode step, k >= 1 in step k - 1
  {
    size_t d = 0;
    for (int64_t i = 0; i < n; ++i) {
      while (d < r.decode.size() && r.decode[d] <= i) ++d;
      int32_t k = kind_of(labels[i]);
      if (k == kLayerBegin || k == kLayerEnd) {
        layer_pos.push_back(i);
        region.push_back(static_cast<int64_t>(d));
      }
    }
  }
  std::vector<int64_t> lb, le, lregion;  // closed layer spans, in begin order
  for (size_t j = 0; j < layer_pos.size(); ++j) {
    const int64_t b = layer_pos[j];
    if (kind_of(labels[b]) != kLayerBegin) continue;
    for (size_t m = j + 1; m < layer_pos.size() && region[m] == region[j]; ++m) {
      const int64_t q = layer_pos[m];
      if (kind_of(labels[q]) == kLayerBegin || index_of(labels[q]) == index_of(labels[b])) {
        lb.push_back(b);
        le.push_back(q);
        lregion.push_back(region[j]);
        break;
      }
    }
  }

  add(r, kSpanCall, -1, 0, 0, n - 1);
  if (vb >= 0) add(r, kSpanVision, -1, 1, r.vision_begin, r.vision_end);
  add(r, kSpanPrefill, -1, 1, r.prefill_begin, r.prefill_end);
  size_t l = 0;
  for (; l < lb.size() && lregion[l] == 0; ++l) add(r, kSpanLayer, index_of(labels[lb[l]]), 2, lb[l], le[l]);
  if (!r.decode.empty()) add(r, kSpanDecode, -1, 1, r.decode.front(), n - 1);
  for (size_t s = 0; s < r.decode.size(); ++s) {
    add(r, kSpanStep, static_cast<int32_t>(s), 2, r.decode[s], s + 1 < r.decode.size() ? r.decode[s + 1] : n - 1);
    for (; l < lb.size() && lregion[l] == static_cast<int64_t>(s + 1); ++l)
      add(r, kSpanLayer, index_of(labels[lb[l]]), 3, lb[l], le[l]);
  }
  return r;
}

}  // namespace stagetrace
