// How far the GPU ran behind the host, per stage and per decode step: the part of lead.py's
// call_leads that walks the marks. lead.py's numpy path (``_lead_columns_numpy``) is its twin
// and the reference (tests compare both on random calls); lead.py's docstring says what the
// numbers mean and what must stay true. Here: the same arithmetic in the same order, so the
// results are equal, not close (integer ns sums; a median is the mean of the middle two).
#pragma once

#include <cstdint>
#include <vector>

namespace stagetrace {

struct LeadStats {  // one window's marks: count, min / median / max lead (µs), GPU-bound ns
  int64_t marks = 0;
  double min_us = 0, median_us = 0, max_us = 0;
  int64_t behind_ns = 0;
};

struct LeadColumns {
  std::vector<LeadStats> windows;   // one per (start, end] window asked for
  std::vector<int64_t> step_marks;  // per decode step: marks that give a lead
  std::vector<double> step_median_us, step_behind_ns;
};

// issued_by_host may be null (every mark was issued by the host); windows: [start, end] pairs
// on the device clock; n_steps: the call's decode steps.
LeadColumns lead_columns(const int32_t* labels, const int64_t* device_ns, const int64_t* host_ns,
                         const bool* issued_by_host, int64_t n, const int64_t* windows, int64_t n_windows,
                         int64_t n_steps);

}  // namespace stagetrace
