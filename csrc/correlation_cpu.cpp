// CPU ops of the correlation accumulator: ATen tensors, at::parallel_for (OpenMP) over (layer, column chunk)
// or over rows. Each op computes exactly what TorchOps in symphony_kernels/correlation.py computes.
#include "correlation.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace symphony {
namespace {

constexpr int64_t kColumnChunk = 256;  // columns per work item: one cache-friendly stretch of each row

// Runs fn(layer, c0, c1) over all (layer, column chunk) pairs in parallel.
template <typename Fn>
void for_each_column_chunk(int64_t layers, int64_t columns, const Fn& fn) {
  const int64_t chunks = (columns + kColumnChunk - 1) / kColumnChunk;
  at::parallel_for(0, layers * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t l = item / chunks;
      const int64_t c0 = (item % chunks) * kColumnChunk;
      fn(l, c0, std::min(columns, c0 + kColumnChunk));
    }
  });
}

template <typename scalar_t>
void moments_impl(const at::Tensor& x, at::Tensor& s, at::Tensor& q) {
  const int64_t L = x.size(0), T = x.size(1), F = x.size(2), ls = x.stride(0), rs = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  double* sp = s.data_ptr<double>();
  double* qp = q.data_ptr<double>();
  for_each_column_chunk(L, F, [&](int64_t l, int64_t c0, int64_t c1) {
    double acc_s[kColumnChunk] = {0.0};
    double acc_q[kColumnChunk] = {0.0};
    const int64_t w = c1 - c0;
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* row = xp + l * ls + t * rs + c0;
      for (int64_t c = 0; c < w; ++c) {
        const double v = static_cast<double>(static_cast<at::opmath_type<scalar_t>>(row[c]));
        acc_s[c] += v;
        acc_q[c] += v * v;
      }
    }
    for (int64_t c = 0; c < w; ++c) {
      sp[l * F + c0 + c] = acc_s[c];
      qp[l * F + c0 + c] = acc_q[c];
    }
  });
}

template <typename scalar_t, typename out_t>
void center_impl(const at::Tensor& x, const at::Tensor& shift, at::Tensor& y, at::Tensor& s, at::Tensor& q) {
  // y = x - shift in double for a double output (exact), else in float, rounded to out_t.
  using calc_t = std::conditional_t<std::is_same_v<out_t, double>, double, float>;
  const int64_t L = x.size(0), T = x.size(1), F = x.size(2), ls = x.stride(0), rs = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const float* kp = shift.data_ptr<float>();
  out_t* yp = y.data_ptr<out_t>();
  double* sp = s.data_ptr<double>();
  double* qp = q.data_ptr<double>();
  for_each_column_chunk(L, F, [&](int64_t l, int64_t c0, int64_t c1) {
    double acc_s[kColumnChunk] = {0.0};
    double acc_q[kColumnChunk] = {0.0};
    calc_t k[kColumnChunk];
    const int64_t w = c1 - c0;
    for (int64_t c = 0; c < w; ++c) k[c] = static_cast<calc_t>(kp[l * F + c0 + c]);
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* row = xp + l * ls + t * rs + c0;
      out_t* out = yp + (l * T + t) * F + c0;
      for (int64_t c = 0; c < w; ++c) {
        const out_t r = static_cast<out_t>(static_cast<calc_t>(row[c]) - k[c]);
        const double v = static_cast<double>(static_cast<calc_t>(r));
        out[c] = r;
        acc_s[c] += v;
        acc_q[c] += v * v;
      }
    }
    for (int64_t c = 0; c < w; ++c) {
      sp[l * F + c0 + c] = acc_s[c];
      qp[l * F + c0 + c] = acc_q[c];
    }
  });
}

template <typename p_t>
void merge_impl(at::Tensor& c, const at::Tensor& p, const double* up, const double* vp, int64_t R) {
  const int64_t L = c.size(0), A = c.size(1), B = c.size(2);
  double* cp = c.data_ptr<double>();
  const p_t* pp = p.data_ptr<p_t>();
  at::parallel_for(0, L * A, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t l = row / A;
      double* crow = cp + row * B;
      const p_t* prow = pp + row * B;
      for (int64_t b = 0; b < B; ++b) crow[b] += static_cast<double>(prow[b]);
      if (up != nullptr) {
        const double* urow = up + row * R;
        const double* vl = vp + l * B * R;
        for (int64_t b = 0; b < B; ++b) {
          double d = 0.0;
          for (int64_t r = 0; r < R; ++r) d += urow[r] * vl[b * R + r];
          crow[b] += d;
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> column_moments_cpu(const at::Tensor& x) {
  auto opts = x.options().dtype(at::kDouble);
  at::Tensor s = at::empty({x.size(0), x.size(2)}, opts);
  at::Tensor q = at::empty({x.size(0), x.size(2)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "column_moments_cpu",
                                  [&] { moments_impl<scalar_t>(x, s, q); });
  return {s, q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> center_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                          at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == x.scalar_type() || out_dtype == at::kFloat || out_dtype == at::kDouble,
              "center: out_dtype must be the input's dtype, float32 or float64");
  at::Tensor k = shift.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(out_dtype));
  auto opts = x.options().dtype(at::kDouble);
  at::Tensor s = at::empty({x.size(0), x.size(2)}, opts);
  at::Tensor q = at::empty({x.size(0), x.size(2)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "center_cpu", [&] {
    if (out_dtype == at::kDouble) {
      center_impl<scalar_t, double>(x, k, y, s, q);
    } else if (out_dtype == at::kFloat) {
      center_impl<scalar_t, float>(x, k, y, s, q);
    } else {
      center_impl<scalar_t, scalar_t>(x, k, y, s, q);
    }
  });
  return {y, s, q};
}

void merge_comoment_cpu(at::Tensor& c, const at::Tensor& p, const std::optional<at::Tensor>& u,
                        const std::optional<at::Tensor>& v) {
  at::Tensor uc, vc;
  const double* up = nullptr;
  const double* vp = nullptr;
  int64_t R = 0;
  if (u.has_value() && v.has_value()) {
    uc = u->to(at::kDouble).contiguous();
    vc = v->to(at::kDouble).contiguous();
    up = uc.data_ptr<double>();
    vp = vc.data_ptr<double>();
    R = uc.size(2);
  }
  at::Tensor pc = p.contiguous();
  if (pc.scalar_type() == at::kDouble) {
    merge_impl<double>(c, pc, up, vp, R);
  } else {
    TORCH_CHECK(pc.scalar_type() == at::kFloat, "merge_comoment_: p must be float32 or float64");
    merge_impl<float>(c, pc, up, vp, R);
  }
}

at::Tensor finalize_cpu(const at::Tensor& c, const at::Tensor& mean_a, const at::Tensor& mean_b, double alpha,
                        const at::Tensor& inv_a, const at::Tensor& inv_b) {
  const int64_t L = c.size(0), A = c.size(1), B = c.size(2);
  at::Tensor out = at::empty({L, A, B}, c.options().dtype(at::kFloat));
  const double* cp = c.data_ptr<double>();
  const double* ma = mean_a.data_ptr<double>();
  const double* mb = mean_b.data_ptr<double>();
  const double* ia = inv_a.data_ptr<double>();
  const double* ib = inv_b.data_ptr<double>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, L * A, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t l = row / A;
      const double am = alpha * ma[row], ai = ia[row];
      for (int64_t b = 0; b < B; ++b) {
        const double r = ((cp[row * B + b] + am * mb[l * B + b]) * ai) * ib[l * B + b];
        op[row * B + b] = static_cast<float>(std::min(1.0, std::max(-1.0, r)));
      }
    }
  });
  return out;
}

}  // namespace symphony
