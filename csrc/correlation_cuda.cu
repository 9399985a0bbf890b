// CUDA ops of the correlation accumulator (same results as TorchOps in symphony_kernels/correlation.py).
//
// column_moments / center: one thread owns V consecutive columns (16-byte loads where the layout allows) and walks
// a split of the tokens, summing in float64; blocks cover (column tile, token split, layer); the per-split
// partial sums are added in a fixed order afterwards (deterministic, no atomics). merge / finalize: one block per
// row of the [L, A, B] comoment, threads across its columns (coalesced float64 read-modify-write).
#include "correlation.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace symphony {
namespace {

int multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

constexpr int kThreads = 256;

// Activations come as float32, float16 or bfloat16 (fewer instantiations than ATen's float dispatch).
#define SYMPHONY_DISPATCH_INPUT(TYPE, NAME, ...)                            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Token splits so that the grid holds a few waves of blocks.
int64_t pick_splits(int64_t tiles, int64_t layers, int64_t tokens) {
  const int sms = multiprocessors();
  const int64_t want = std::max<int64_t>(1, (8LL * sms + tiles * layers - 1) / (tiles * layers));
  const int64_t most = std::max<int64_t>(1, (tokens + 31) / 32);  // at least 32 tokens per split
  return std::min<int64_t>(std::min(want, most), 65535);
}

// out_t == void: moments only. Otherwise y = (x - shift) computed in calc_t, rounded to out_t, summed.
template <typename T, typename O, int V>
__global__ void __launch_bounds__(kThreads)
    moments_kernel(const T* __restrict__ x, int64_t layer_stride, int64_t tokens, int64_t F,
                   const float* __restrict__ shift, O* __restrict__ y, int64_t rows_per_split, int64_t splits,
                   double* __restrict__ ps, double* __restrict__ pq) {
  constexpr bool kCenter = !std::is_void<O>::value;
  using calc_t = std::conditional_t<std::is_same<O, double>::value, double, float>;
  const int64_t l = blockIdx.z;
  const int64_t split = blockIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= F) return;
  const int64_t t0 = split * rows_per_split;
  const int64_t t1 = min(tokens, t0 + rows_per_split);
  const T* base = x + l * layer_stride + c0;
  double s[V], q[V];
  calc_t k[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    s[v] = 0.0;
    q[v] = 0.0;
    if constexpr (kCenter) k[v] = static_cast<calc_t>(shift[l * F + c0 + v]);
  }
  auto consume = [&](const Vec<T, V>& r, int64_t t) {
    if constexpr (kCenter) {
      using OO = std::conditional_t<kCenter, O, float>;
      Vec<OO, V> out;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const OO o = static_cast<OO>(static_cast<calc_t>(r.v[v]) - k[v]);
        out.v[v] = o;
        const double d = static_cast<double>(static_cast<calc_t>(o));
        s[v] += d;
        q[v] = fma(d, d, q[v]);
      }
      *reinterpret_cast<Vec<OO, V>*>(y + (l * tokens + t) * F + c0) = out;
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const double d = static_cast<double>(static_cast<at::opmath_type<T>>(r.v[v]));
        s[v] += d;
        q[v] = fma(d, d, q[v]);
      }
    }
  };
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {  // four rows in flight
    const Vec<T, V> r0 = *reinterpret_cast<const Vec<T, V>*>(base + (t + 0) * F);
    const Vec<T, V> r1 = *reinterpret_cast<const Vec<T, V>*>(base + (t + 1) * F);
    const Vec<T, V> r2 = *reinterpret_cast<const Vec<T, V>*>(base + (t + 2) * F);
    const Vec<T, V> r3 = *reinterpret_cast<const Vec<T, V>*>(base + (t + 3) * F);
    consume(r0, t);
    consume(r1, t + 1);
    consume(r2, t + 2);
    consume(r3, t + 3);
  }
  for (; t < t1; ++t) consume(*reinterpret_cast<const Vec<T, V>*>(base + t * F), t);
  double* os = ps + (l * splits + split) * F + c0;
  double* oq = pq + (l * splits + split) * F + c0;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    os[v] = s[v];
    oq[v] = q[v];
  }
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, typename O>
void launch_moments(const at::Tensor& x, const float* shift, O* y, at::Tensor& s, at::Tensor& q) {
  const int64_t L = x.size(0), tokens = x.size(1), F = x.size(2), ls = x.stride(0);
  constexpr int VW = 16 / sizeof(T);  // elements per 16-byte load
  int64_t out_bytes = 0;
  if constexpr (!std::is_void<O>::value) out_bytes = sizeof(O) * VW;
  const bool vec = VW > 1 && F % VW == 0 && ls % VW == 0 && aligned(x.data_ptr(), 16) &&
                   (out_bytes == 0 || aligned(y, out_bytes));
  const int V = vec ? VW : 1;
  const int64_t tiles = (F / V + kThreads - 1) / kThreads;
  const int64_t splits = pick_splits(tiles, L, tokens);
  const int64_t rows = (tokens + splits - 1) / splits;
  auto opts = x.options().dtype(at::kDouble);
  at::Tensor ps = at::empty({L, splits, F}, opts);
  at::Tensor pq = at::empty({L, splits, F}, opts);
  TORCH_CHECK(L <= 65535, "at most 65535 layers per call");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits), static_cast<unsigned>(L));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  if (vec) {
    moments_kernel<T, O, VW><<<grid, kThreads, 0, stream>>>(xp, ls, tokens, F, shift, y, rows, splits,
                                                            ps.data_ptr<double>(), pq.data_ptr<double>());
  } else {
    moments_kernel<T, O, 1><<<grid, kThreads, 0, stream>>>(xp, ls, tokens, F, shift, y, rows, splits,
                                                           ps.data_ptr<double>(), pq.data_ptr<double>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::sum_out(s, ps, {1});
  at::sum_out(q, pq, {1});
}

template <typename P>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(double* __restrict__ c, const P* __restrict__ p, const double* __restrict__ u,
                 const double* __restrict__ v, int64_t A, int64_t B, int R) {
  const int64_t row = blockIdx.x;
  const int64_t l = row / A;
  double ur[4] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    if (r < R) ur[r] = u[row * R + r];
  }
  double* crow = c + row * B;
  const P* prow = p + row * B;
  const double* vl = v == nullptr ? nullptr : v + l * B * R;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double val = crow[b] + static_cast<double>(prow[b]);
    if (vl != nullptr) {
      double d = 0.0;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if (r < R) d += ur[r] * vl[b * R + r];
      }
      val += d;
    }
    crow[b] = val;
  }
}

__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* __restrict__ c, const double* __restrict__ ma, const double* __restrict__ mb,
                    double alpha, const double* __restrict__ ia, const double* __restrict__ ib,
                    float* __restrict__ out, int64_t A, int64_t B) {
  const int64_t row = blockIdx.x;
  const int64_t l = row / A;
  const double am = alpha * ma[row], ai = ia[row];
  const double* crow = c + row * B;
  const double* mbl = mb + l * B;
  const double* ibl = ib + l * B;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const double r = ((crow[b] + am * mbl[b]) * ai) * ibl[b];
    out[row * B + b] = static_cast<float>(fmin(1.0, fmax(-1.0, r)));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> column_moments_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto opts = x.options().dtype(at::kDouble);
  at::Tensor s = at::empty({x.size(0), x.size(2)}, opts);
  at::Tensor q = at::empty({x.size(0), x.size(2)}, opts);
  SYMPHONY_DISPATCH_INPUT(x.scalar_type(), "column_moments_cuda",
                          [&] { launch_moments<scalar_t, void>(x, nullptr, nullptr, s, q); });
  return {s, q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> center_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                           at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == x.scalar_type() || out_dtype == at::kDouble,
              "center (CUDA): out_dtype must be the input's dtype or float64");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(out_dtype));
  auto opts = x.options().dtype(at::kDouble);
  at::Tensor s = at::empty({x.size(0), x.size(2)}, opts);
  at::Tensor q = at::empty({x.size(0), x.size(2)}, opts);
  const float* k = shift.data_ptr<float>();
  SYMPHONY_DISPATCH_INPUT(x.scalar_type(), "center_cuda", [&] {
    if (out_dtype == at::kDouble) {
      launch_moments<scalar_t, double>(x, k, y.data_ptr<double>(), s, q);
    } else {
      launch_moments<scalar_t, scalar_t>(x, k, y.data_ptr<scalar_t>(), s, q);
    }
  });
  return {y, s, q};
}

void merge_comoment_cuda(at::Tensor& c, const at::Tensor& p, const std::optional<at::Tensor>& u,
                         const std::optional<at::Tensor>& v) {
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t L = c.size(0), A = c.size(1), B = c.size(2);
  if (L * A == 0 || B == 0) return;
  at::Tensor pc = p.contiguous();
  const double* up = u.has_value() ? u->data_ptr<double>() : nullptr;
  const double* vp = v.has_value() ? v->data_ptr<double>() : nullptr;
  const int R = u.has_value() ? static_cast<int>(u->size(2)) : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned threads = static_cast<unsigned>(std::min<int64_t>(kThreads, ((B + 31) / 32) * 32));
  if (pc.scalar_type() == at::kDouble) {
    merge_kernel<double><<<static_cast<unsigned>(L * A), threads, 0, stream>>>(
        c.data_ptr<double>(), pc.data_ptr<double>(), up, vp, A, B, R);
  } else {
    TORCH_CHECK(pc.scalar_type() == at::kFloat, "merge_comoment_: p must be float32 or float64");
    merge_kernel<float><<<static_cast<unsigned>(L * A), threads, 0, stream>>>(
        c.data_ptr<double>(), pc.data_ptr<float>(), up, vp, A, B, R);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor finalize_cuda(const at::Tensor& c, const at::Tensor& mean_a, const at::Tensor& mean_b, double alpha,
                         const at::Tensor& inv_a, const at::Tensor& inv_b) {
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t L = c.size(0), A = c.size(1), B = c.size(2);
  at::Tensor out = at::empty({L, A, B}, c.options().dtype(at::kFloat));
  if (L * A == 0 || B == 0) return out;
  const unsigned threads = static_cast<unsigned>(std::min<int64_t>(kThreads, ((B + 31) / 32) * 32));
  finalize_kernel<<<static_cast<unsigned>(L * A), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      c.data_ptr<double>(), mean_a.data_ptr<double>(), mean_b.data_ptr<double>(), alpha, inv_a.data_ptr<double>(),
      inv_b.data_ptr<double>(), out.data_ptr<float>(), A, B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace symphony
