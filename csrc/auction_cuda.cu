// GPU auction for the maximum-weight perfect matching (Bertsekas' forward auction), one epsilon phase per launch,
// batched over layers. symphony_kernels/matching.py drives the phases (epsilon scaling) and certifies the result
// against the dual bound computed by auction_profit.
//
// One phase, asynchronous (no barrier inside it): the warps of the blocks given to a layer share its persons
// (rows) round-robin. A warp sweeps its persons; a person is unassigned when it holds no object or its object's
// owner is someone else (displacement needs no message: ownership is read back from the object). For an
// unassigned person i the warp scans row i for the best and second-best profit a_ij - p_j (ties: the first
// object in the order i, i+1, ..., so identical rows spread over objects), and lane 0 bids
// b = a_ij* - second + eps on the best object j* with one 64-bit atomicMax on (price bits << 32 | person): prices
// are non-negative floats, whose bit patterns order like the values, so the highest bid wins atomically and the
// returned old value names the displaced owner. A separate float price array (atomicMax on its bits) is what the
// scans read. Stale prices only make a bid fail or come out lower; every successful bid raises the object's
// price, and the asynchronous auction terminates with every person holding an object, eps-complementary-slack
// (Bertsekas & Castanon 1991). The phase ends when all n objects have an owner (a per-layer counter); a layer
// whose bids exceed bid_cap (or that sees no bid at all for seconds: a stall) is flagged failed and left to
// the exact CPU solver.
//
// The kernel is launched cooperatively so that all its blocks are resident: a warp may wait on persons of other
// blocks, which must therefore be running.
#include "correlation.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

namespace symphony {
namespace {

int multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr unsigned kNone = 0xffffffffu;
using u64 = unsigned long long;

struct Best {
  float v1;  // best profit
  int r1;    // its object, as the offset (j - i) mod n
  float v2;  // second-best profit
};

__device__ __forceinline__ void push(Best& b, float v, int r) {
  if (v > b.v1 || (v == b.v1 && r < b.r1)) {
    b.v2 = b.v1;
    b.v1 = v;
    b.r1 = r;
  } else if (v > b.v2) {
    b.v2 = v;
  }
}

__device__ __forceinline__ Best warp_best(Best b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov1 = __shfl_xor_sync(kFull, b.v1, off);
    const int or1 = __shfl_xor_sync(kFull, b.r1, off);
    const float ov2 = __shfl_xor_sync(kFull, b.v2, off);
    if (ov1 > b.v1 || (ov1 == b.v1 && or1 < b.r1)) {
      b.v2 = fmaxf(b.v1, ov2);
      b.v1 = ov1;
      b.r1 = or1;
    } else {
      b.v2 = fmaxf(b.v2, ov1);
    }
  }
  return b;
}

__device__ __forceinline__ long long read_volatile(const long long* p) {
  return *reinterpret_cast<const volatile long long*>(p);
}

// One bid of person i by the whole warp. Returns nothing; lane 0 records the outcome in mine[i].
template <bool VEC>
__device__ __forceinline__ void bid(const float* __restrict__ row, float* price, u64* owner, int* mine,
                                    long long* cnt, int n, int i, float eps, int lane, long long bid_cap) {
  Best b{-INFINITY, INT_MAX, -INFINITY};
  if (VEC) {
    // n % 4 == 0: 16-byte loads of scores and prices.
#pragma unroll 4
    for (int j = lane * 4; j < n; j += 128) {
      const float4 s = __ldg(reinterpret_cast<const float4*>(row + j));
      const float4 p = __ldcg(reinterpret_cast<const float4*>(price + j));
      int r = j - i;
      if (r < 0) r += n;
      push(b, s.x - p.x, r);
      push(b, s.y - p.y, r + 1 < n ? r + 1 : r + 1 - n);
      push(b, s.z - p.z, r + 2 < n ? r + 2 : r + 2 - n);
      push(b, s.w - p.w, r + 3 < n ? r + 3 : r + 3 - n);
    }
  } else {
#pragma unroll 4
    for (int j = lane; j < n; j += 32) {
      int r = j - i;
      if (r < 0) r += n;
      push(b, __ldg(row + j) - __ldcg(price + j), r);
    }
  }
  b = warp_best(b);
  if (lane == 0) {
    int j = b.r1 + i;
    if (j >= n) j -= n;
    const float bid_value = row[j] - b.v2 + eps;  // = price seen + (best - second) + eps
    const float now = __ldcg(price + j);
    int won = -1;
    if (bid_value > now) {
      const u64 mine_packed = (static_cast<u64>(__float_as_uint(bid_value)) << 32) | static_cast<unsigned>(i);
      const u64 old = atomicMax(owner + j, mine_packed);
      if (old < mine_packed) {
        atomicMax(reinterpret_cast<int*>(price + j), __float_as_int(bid_value));
        won = j;
        if (static_cast<unsigned>(old) == kNone) atomicAdd(reinterpret_cast<u64*>(cnt), 1ull);
      } else {  // outbid meanwhile: help the price array catch up, retry later
        atomicMax(reinterpret_cast<int*>(price + j), static_cast<int>(old >> 32));
      }
    }
    mine[i] = won;
    const long long bids = static_cast<long long>(atomicAdd(reinterpret_cast<u64*>(cnt + 1), 1ull)) + 1;
    if (bids > bid_cap) atomicExch(reinterpret_cast<u64*>(cnt + 2), 1ull);
  }
  __syncwarp();
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads)
    auction_phase_kernel(const float* __restrict__ a, int n, const int* __restrict__ layers, int blocks_per_layer,
                         const float* __restrict__ eps, float* price, u64* owner, int* mine, long long* counters,
                         long long bid_cap) {
  const int la = blockIdx.x / blocks_per_layer;
  const int blk = blockIdx.x - la * blocks_per_layer;
  const int64_t l = layers[la];
  const int lane = threadIdx.x & 31;
  const int gw = blk * kWarps + (threadIdx.x >> 5);  // this warp's rank within the layer
  const int W = blocks_per_layer * kWarps;           // warps serving the layer
  if (gw >= n) return;                                // no person for this warp (whole warp leaves)
  const float* A = a + l * n * n;
  float* P = price + l * n;
  u64* O = owner + l * n;
  int* M = mine + l * n;
  long long* cnt = counters + l * 4;  // [0] objects owned, [1] bids, [2] failed
  const float e = eps[l];
  long long last_bids = -1, idle = 0;  // stall guard: no bid anywhere for a long while means a bug, not work
  while (true) {
    long long owned = 0, failed = 0;
    if (lane == 0) {
      owned = read_volatile(cnt);
      failed = read_volatile(cnt + 2);
    }
    owned = __shfl_sync(kFull, owned, 0);
    failed = __shfl_sync(kFull, failed, 0);
    if (owned >= n || failed != 0) break;
    bool worked = false;
    for (int64_t k0 = 0; gw + static_cast<int64_t>(W) * k0 < n; k0 += 32) {
      const int64_t i64 = gw + static_cast<int64_t>(W) * (k0 + lane);
      const int i = static_cast<int>(i64);
      bool need = false;
      if (i64 < n) {
        const int j = M[i];
        need = j < 0 || static_cast<unsigned>(__ldcg(O + j)) != static_cast<unsigned>(i);
      }
      unsigned want = __ballot_sync(kFull, need);
      while (want != 0u) {
        const int src = __ffs(want) - 1;
        want &= want - 1;
        const int who = __shfl_sync(kFull, i, src);
        bid<VEC>(A + static_cast<int64_t>(who) * n, P, O, M, cnt, n, who, e, lane, bid_cap);
        worked = true;
      }
    }
    if (!worked) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
      __nanosleep(200);
#endif
      long long bids = 0;
      if (lane == 0) bids = read_volatile(cnt + 1);
      bids = __shfl_sync(kFull, bids, 0);
      idle = bids == last_bids ? idle + 1 : 0;
      last_bids = bids;
      if (idle > (1 << 22) && lane == 0) atomicExch(reinterpret_cast<u64*>(cnt + 2), 2ull);
    } else {
      idle = 0;
    }
  }
}

// Start of a phase: every object unowned at its current price, every person without an object, counters zero.
__global__ void auction_reset_kernel(const int* __restrict__ layers, int n, const float* __restrict__ price,
                                     u64* owner, int* mine, long long* counters) {
  const int64_t l = layers[blockIdx.y];
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    owner[l * n + j] = (static_cast<u64>(__float_as_uint(price[l * n + j])) << 32) | kNone;
    mine[l * n + j] = -1;
  }
  if (blockIdx.x == 0 && threadIdx.x < 4) counters[l * 4 + threadIdx.x] = 0;
}

// max_j (a_ij - p_j) per person, in float64; one warp per row.
__global__ void __launch_bounds__(kThreads)
    auction_profit_kernel(const float* __restrict__ a, int n, const int* __restrict__ layers,
                          const float* __restrict__ price, double* __restrict__ out) {
  const int64_t la = blockIdx.y;
  const int64_t l = layers[la];
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (i >= n) return;
  const float* row = a + (l * n + i) * n;
  const float* P = price + l * n;
  double best = -INFINITY;
  for (int64_t j = lane; j < n; j += 32) best = fmax(best, static_cast<double>(row[j]) - static_cast<double>(P[j]));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) best = fmax(best, __shfl_xor_sync(kFull, best, off));
  if (lane == 0) out[la * n + i] = best;
}

}  // namespace

void auction_phase_cuda(const at::Tensor& a, const at::Tensor& layers, const at::Tensor& eps, at::Tensor& price,
                        at::Tensor& owner, at::Tensor& mine, at::Tensor& counters, int64_t bid_cap) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int n = static_cast<int>(a.size(1));
  const int La = static_cast<int>(layers.numel());
  if (La == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int* lp = layers.data_ptr<int>();
  u64* op = reinterpret_cast<u64*>(owner.data_ptr<int64_t>());
  long long* cp = reinterpret_cast<long long*>(counters.data_ptr<int64_t>());

  TORCH_CHECK(La <= 65535, "at most 65535 layers per phase");
  const dim3 reset_grid(static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 64)),
                        static_cast<unsigned>(La));
  auction_reset_kernel<<<reset_grid, kThreads, 0, stream>>>(lp, n, price.data_ptr<float>(), op,
                                                             mine.data_ptr<int>(), cp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const bool vec = n % 4 == 0;
  const void* kernel = vec ? reinterpret_cast<const void*>(&auction_phase_kernel<true>)
                           : reinterpret_cast<const void*>(&auction_phase_kernel<false>);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int sms = multiprocessors();
  const int capacity = std::max(1, per_sm * sms);  // blocks that can all be resident at once
  const float* ap = a.data_ptr<float>();
  const float* ep = eps.data_ptr<float>();
  float* pp = price.data_ptr<float>();
  int* mp = mine.data_ptr<int>();
  long long cap = bid_cap;
  // Layers in chunks that fit the resident capacity, each layer served by as many blocks as the chunk allows
  // (no more warps than persons).
  for (int c0 = 0; c0 < La; c0 += capacity) {
    const int chunk = std::min(capacity, La - c0);
    int bpl = std::max(1, capacity / chunk);
    bpl = std::min(bpl, std::max(1, (n + kWarps - 1) / kWarps));
    const int* chunk_layers = lp + c0;
    int nn = n;
    void* args[] = {&ap, &nn, &chunk_layers, &bpl, &ep, &pp, &op, &mp, &cp, &cap};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(chunk * bpl)), dim3(kThreads),
                                               args, 0, stream));
  }
}

at::Tensor auction_profit_cuda(const at::Tensor& a, const at::Tensor& layers, const at::Tensor& price) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int n = static_cast<int>(a.size(1));
  const int64_t La = layers.numel();
  at::Tensor out = at::empty({La, n}, a.options().dtype(at::kDouble));
  if (La == 0) return out;
  TORCH_CHECK(La <= 65535, "at most 65535 layers per call");
  const dim3 grid(static_cast<unsigned>((static_cast<int64_t>(n) * 32 + kThreads - 1) / kThreads),
                  static_cast<unsigned>(La));
  auction_profit_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a.data_ptr<float>(), n, layers.data_ptr<int>(), price.data_ptr<float>(), out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace symphony
