#include "call_leads.h"

#include <algorithm>

#include "stage_rows.h"

namespace stagetrace {

namespace {

constexpr double kCaughtUpNs = 20.0 * 1e3;  // lead.CAUGHT_UP_US

inline bool is_boundary(int32_t kind) {  // lead.BOUNDARY_KINDS
  return kind == kCallBegin || kind == kCallEnd || kind == kPrefillForward || kind == kDecodeForward;
}

double median_of_sorted(const std::vector<double>& v) {
  const size_t n = v.size();
  return (v[(n - 1) / 2] + v[n / 2]) / 2;
}

}  // namespace

LeadColumns lead_columns(const int32_t* labels, const int64_t* device_ns, const int64_t* host_ns,
                         const bool* issued_by_host, int64_t n, const int64_t* windows, int64_t n_windows,
                         int64_t n_steps) {
  // the marks that give a lead: issued by the host, not a boundary kind; their step, time, lead
  std::vector<int64_t> t, behind, step;
  std::vector<double> lead_us;
  int64_t host0 = 0, prev_t = 0, decodes = 0;
  bool first = true;
  for (int64_t i = 0; i < n; ++i) {
    if (issued_by_host != nullptr && !issued_by_host[i]) continue;  // a stamp: no issue time of its own
    if (first) {
      host0 = host_ns[i];
      prev_t = device_ns[i];
      first = false;
    }
    const int64_t lead = device_ns[i] - (host_ns[i] - host0);
    const int64_t dt = device_ns[i] - prev_t;  // since the previous host-issued mark
    prev_t = device_ns[i];
    const int32_t kind = labels[i] & 0xFF;
    if (kind == kDecodeForward) ++decodes;
    if (is_boundary(kind)) continue;
    t.push_back(device_ns[i]);
    lead_us.push_back(static_cast<double>(lead) / 1e3);
    behind.push_back(static_cast<double>(lead) > kCaughtUpNs ? std::min(lead, dt) : 0);
    step.push_back(decodes - 1);
  }
  LeadColumns out;
  std::vector<double> v;
  for (int64_t w = 0; w < n_windows; ++w) {
    const int64_t a = windows[2 * w], b = windows[2 * w + 1];
    LeadStats s;
    v.clear();
    for (size_t k = 0; k < t.size(); ++k) {
      if (t[k] > a && t[k] <= b) {
        v.push_back(lead_us[k]);
        s.behind_ns += behind[k];
      }
    }
    s.marks = static_cast<int64_t>(v.size());
    if (!v.empty()) {
      std::sort(v.begin(), v.end());
      s.min_us = v.front();
      s.max_us = v.back();
      s.median_us = median_of_sorted(v);
    }
    out.windows.push_back(s);
  }
  out.step_marks.assign(n_steps, 0);
  out.step_median_us.assign(n_steps, 0.0);
  out.step_behind_ns.assign(n_steps, 0.0);
  std::vector<std::vector<double>> per_step(n_steps);
  for (size_t k = 0; k < t.size(); ++k) {
    if (step[k] < 0 || step[k] >= n_steps) continue;
    per_step[step[k]].push_back(lead_us[k]);
    out.step_behind_ns[step[k]] += static_cast<double>(behind[k]);  // in mark order, as np.bincount adds
  }
  for (int64_t s = 0; s < n_steps; ++s) {
    auto& leads = per_step[s];
    out.step_marks[s] = static_cast<int64_t>(leads.size());
    if (!leads.empty()) {
      std::sort(leads.begin(), leads.end());
      out.step_median_us[s] = median_of_sorted(leads);
    }
  }
  return out;
}

}  // namespace stagetrace
