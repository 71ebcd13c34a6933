#include "stamp_ring.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "timeline.h"

namespace stagetrace {
namespace {

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void take_stamp(unsigned long long* slots, unsigned long long* counter,
                                           unsigned long long capacity, int label) {
  unsigned long long t = globaltimer();
  unsigned long long slot = atomicAdd(counter, 1ULL);
  if (slot < capacity) {
    slots[2 * slot] = t;
    slots[2 * slot + 1] = static_cast<unsigned long long>(static_cast<unsigned int>(label));
  }
}

__global__ void stamp_kernel(unsigned long long* slots, unsigned long long* counter, unsigned long long capacity,
                             int label) {
  take_stamp(slots, counter, capacity, label);
}

// Block 0 / thread 0 stamps first; every thread then copies. The stamp reads the clock
// when the kernel starts, i.e. once the work before it on the stream has finished.
__global__ void stamp_copy_kernel(unsigned long long* slots, unsigned long long* counter,
                                  unsigned long long capacity, int label, const unsigned char* src,
                                  unsigned char* dst, long long nbytes) {
  if (blockIdx.x == 0 && threadIdx.x == 0) take_stamp(slots, counter, capacity, label);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool aligned = (reinterpret_cast<uintptr_t>(src) % 16 == 0) && (reinterpret_cast<uintptr_t>(dst) % 16 == 0);
  long long done = 0;
  if (aligned) {
    const long long vecs = nbytes / 16;
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (long long i = tid; i < vecs; i += stride) d[i] = s[i];
    done = vecs * 16;
  }
  for (long long i = done + tid; i < nbytes; i += stride) dst[i] = src[i];
}

__global__ void resolution_kernel(long long reads, unsigned long long* out) {
  unsigned long long best = ~0ULL, last = globaltimer();
  for (long long i = 0; i < reads; ++i) {
    unsigned long long now = globaltimer();
    if (now != last) {
      best = min(best, now - last);
      last = now;
    }
  }
  *out = best;
}

}  // namespace

StampRing::StampRing(int device, int64_t capacity) : device_(device), capacity_(capacity) {
  if (capacity <= 0) throw std::invalid_argument("StampRing capacity must be positive");
  DeviceGuard guard(device);
  check(cudaMalloc(&slots_, sizeof(unsigned long long) * 2 * capacity), "cudaMalloc(stamp ring)");
  check(cudaMalloc(&counter_, sizeof(unsigned long long)), "cudaMalloc(stamp counter)");
  // One launch now loads the kernels' module: a lazy load must not happen during graph capture.
  stamp(0, 0);
  stamp_copy(0, 0, 0, 0, 0);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  check(cudaMemset(counter_, 0, sizeof(unsigned long long)), "cudaMemset(stamp counter)");
}

StampRing::~StampRing() {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return;  // runtime already torn down
  cudaSetDevice(device_);
  // Graphs that captured these addresses must not replay after this; the Python owner
  // keeps the ring alive as long as the tracer that installed the stamps.
  cudaFree(slots_);
  cudaFree(counter_);
  cudaSetDevice(previous);
}

void StampRing::reset(int64_t stream) {
  DeviceGuard guard(device_);
  check(cudaMemsetAsync(counter_, 0, sizeof(unsigned long long), reinterpret_cast<cudaStream_t>(stream)),
        "cudaMemsetAsync(stamp counter)");
}

// Launches go to the ring's device: the caller's current device may be another card.
void StampRing::stamp(int32_t label, int64_t stream) {
  DeviceGuard guard(device_);
  stamp_kernel<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(slots_, counter_, capacity_, label);
  check(cudaGetLastError(), "stamp kernel launch");
}

void StampRing::stamp_copy(int32_t label, int64_t src, int64_t dst, int64_t nbytes, int64_t stream) {
  if (nbytes < 0) throw std::invalid_argument("stamp_copy: negative size");
  DeviceGuard guard(device_);
  const long long threads = 256;
  const long long blocks = std::max(1LL, std::min(1024LL, (static_cast<long long>(nbytes) / 16 + threads - 1) / threads));
  stamp_copy_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0,
                      reinterpret_cast<cudaStream_t>(stream)>>>(
      slots_, counter_, capacity_, label, reinterpret_cast<const unsigned char*>(src),
      reinterpret_cast<unsigned char*>(dst), nbytes);
  check(cudaGetLastError(), "stamp_copy kernel launch");
}

void StampRing::read(int64_t stream, std::vector<int32_t>& labels, std::vector<int64_t>& t_ns, int64_t& dropped) {
  DeviceGuard guard(device_);
  check(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
  unsigned long long count = 0;
  check(cudaMemcpy(&count, counter_, sizeof(count), cudaMemcpyDeviceToHost), "cudaMemcpy(stamp counter)");
  const unsigned long long kept = std::min<unsigned long long>(count, capacity_);
  dropped = static_cast<int64_t>(count - kept);
  std::vector<unsigned long long> raw(2 * kept);
  if (kept)
    check(cudaMemcpy(raw.data(), slots_, sizeof(unsigned long long) * 2 * kept, cudaMemcpyDeviceToHost),
          "cudaMemcpy(stamp ring)");
  labels.resize(kept);
  t_ns.resize(kept);
  for (unsigned long long i = 0; i < kept; ++i) {
    t_ns[i] = static_cast<int64_t>(raw[2 * i]);
    labels[i] = static_cast<int32_t>(static_cast<unsigned int>(raw[2 * i + 1]));
  }
}

int64_t globaltimer_resolution_ns(int device, int64_t reads) {
  DeviceGuard guard(device);
  unsigned long long* out = nullptr;
  check(cudaMalloc(&out, sizeof(unsigned long long)), "cudaMalloc");
  resolution_kernel<<<1, 1>>>(reads, out);
  cudaError_t err = cudaGetLastError();
  unsigned long long best = 0;
  if (err == cudaSuccess) err = cudaMemcpy(&best, out, sizeof(best), cudaMemcpyDeviceToHost);
  cudaFree(out);
  check(err, "globaltimer resolution kernel");
  return best == ~0ULL ? -1 : static_cast<int64_t>(best);
}

}  // namespace stagetrace
