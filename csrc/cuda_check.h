#pragma once
// The one place a CUDA runtime error becomes a Python exception (CudaError carries the
// CUDA error name and string), and the one device guard. Shared by the host-compiled
// timeline and the nvcc-compiled stamp ring.
#include <cuda_runtime_api.h>

#include <string>

#include "timeline.h"

namespace stagetrace {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    throw CudaError(std::string(what) + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

// Makes `device` current for the scope and restores the caller's device, so the
// runtime state torch sees on this thread is left as it was.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace stagetrace
