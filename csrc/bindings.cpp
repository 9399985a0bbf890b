// Python bindings of symphony_kernels._C: argument checks, then dispatch to the CPU or the CUDA implementation.
#include <torch/extension.h>

#include "correlation.h"

namespace symphony {
namespace {

bool has_cuda() {
#ifdef SYMPHONY_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void check_activations(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be [layers, tokens, features], got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, name,
              " must be a float tensor, got ", t);
  TORCH_CHECK(x.stride(2) == 1 && (x.size(1) <= 1 || x.stride(1) == x.size(2)), name,
              " needs contiguous rows (column stride 1, row stride = features)");
}

void check_f64(const at::Tensor& t, const at::Tensor& like, std::vector<int64_t> shape, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous(), name, " must be a contiguous float64 tensor");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " must have shape ", at::IntArrayRef(shape), ", got ",
              t.sizes());
}

#define SYMPHONY_DISPATCH(tensor, cpu_call, cuda_call)                             \
  do {                                                                             \
    if ((tensor).is_cuda()) {                                                      \
      SYMPHONY_CUDA_OR_FAIL(cuda_call);                                            \
    }                                                                              \
    TORCH_CHECK((tensor).is_cpu(), "unsupported device ", (tensor).device());     \
    return cpu_call;                                                               \
  } while (0)

#ifdef SYMPHONY_WITH_CUDA
#define SYMPHONY_CUDA_OR_FAIL(call) return call
#else
#define SYMPHONY_CUDA_OR_FAIL(call) TORCH_CHECK(false, "symphony_kernels._C was built without CUDA")
#endif

std::tuple<at::Tensor, at::Tensor> column_moments(const at::Tensor& x) {
  check_activations(x, "x");
  SYMPHONY_DISPATCH(x, column_moments_cpu(x), column_moments_cuda(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> center(const at::Tensor& x, const at::Tensor& shift,
                                                      at::ScalarType out_dtype) {
  check_activations(x, "x");
  TORCH_CHECK(shift.scalar_type() == at::kFloat && shift.is_contiguous() && shift.device() == x.device(),
              "shift must be a contiguous float32 tensor on ", x.device());
  TORCH_CHECK(shift.dim() == 2 && shift.size(0) == x.size(0) && shift.size(1) == x.size(2),
              "shift must be [layers, features]");
  SYMPHONY_DISPATCH(x, center_cpu(x, shift, out_dtype), center_cuda(x, shift, out_dtype));
}

void merge_comoment_(at::Tensor c, const at::Tensor& p, const std::optional<at::Tensor>& u,
                     const std::optional<at::Tensor>& v) {
  TORCH_CHECK(c.dim() == 3 && c.scalar_type() == at::kDouble && c.is_contiguous(),
              "c must be a contiguous float64 [layers, A, B] tensor");
  TORCH_CHECK(p.sizes() == c.sizes() && p.device() == c.device() &&
                  (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble),
              "p must be a float32/float64 tensor shaped like c, on c's device");
  TORCH_CHECK(u.has_value() == v.has_value(), "give both u and v, or neither");
  if (u.has_value()) {
    TORCH_CHECK(u->dim() == 3 && u->size(2) >= 1 && u->size(2) <= 4, "u must be [layers, A, R] with R <= 4");
    check_f64(*u, c, {c.size(0), c.size(1), u->size(2)}, "u");
    check_f64(*v, c, {c.size(0), c.size(2), u->size(2)}, "v");
  }
  if (c.is_cuda()) {
#ifdef SYMPHONY_WITH_CUDA
    merge_comoment_cuda(c, p, u, v);
    return;
#else
    TORCH_CHECK(false, "symphony_kernels._C was built without CUDA");
#endif
  }
  merge_comoment_cpu(c, p, u, v);
}

at::Tensor finalize(const at::Tensor& c, const at::Tensor& mean_a, const at::Tensor& mean_b, double alpha,
                    const at::Tensor& inv_a, const at::Tensor& inv_b) {
  TORCH_CHECK(c.dim() == 3 && c.scalar_type() == at::kDouble && c.is_contiguous(),
              "c must be a contiguous float64 [layers, A, B] tensor");
  check_f64(mean_a, c, {c.size(0), c.size(1)}, "mean_a");
  check_f64(inv_a, c, {c.size(0), c.size(1)}, "inv_a");
  check_f64(mean_b, c, {c.size(0), c.size(2)}, "mean_b");
  check_f64(inv_b, c, {c.size(0), c.size(2)}, "inv_b");
  SYMPHONY_DISPATCH(c, finalize_cpu(c, mean_a, mean_b, alpha, inv_a, inv_b),
                    finalize_cuda(c, mean_a, mean_b, alpha, inv_a, inv_b));
}

#ifdef SYMPHONY_WITH_CUDA
void check_auction(const at::Tensor& a, const at::Tensor& layers, const at::Tensor& price) {
  TORCH_CHECK(a.is_cuda() && a.dim() == 3 && a.size(1) == a.size(2) && a.scalar_type() == at::kFloat &&
                  a.is_contiguous(),
              "scores must be a contiguous float32 CUDA tensor [layers, n, n]");
  TORCH_CHECK(a.size(1) >= 2 && a.size(1) < (int64_t{1} << 30), "auction needs 2 <= n < 2^30");
  TORCH_CHECK(layers.is_cuda() && layers.scalar_type() == at::kInt && layers.dim() == 1 && layers.is_contiguous(),
              "layers must be a contiguous int32 CUDA vector");
  TORCH_CHECK(price.is_cuda() && price.scalar_type() == at::kFloat && price.is_contiguous() &&
                  price.size(0) == a.size(0) && price.size(1) == a.size(1),
              "price must be a contiguous float32 CUDA tensor [layers, n]");
}

void auction_phase(const at::Tensor& a, const at::Tensor& layers, const at::Tensor& eps, at::Tensor price,
                   at::Tensor owner, at::Tensor mine, at::Tensor counters, int64_t bid_cap) {
  check_auction(a, layers, price);
  const int64_t L = a.size(0), n = a.size(1);
  TORCH_CHECK(eps.is_cuda() && eps.scalar_type() == at::kFloat && eps.numel() == L && eps.is_contiguous(),
              "eps must be a contiguous float32 CUDA tensor [layers]");
  TORCH_CHECK(owner.is_cuda() && owner.scalar_type() == at::kLong && owner.is_contiguous() &&
                  owner.numel() == L * n, "owner must be a contiguous int64 CUDA tensor [layers, n]");
  TORCH_CHECK(mine.is_cuda() && mine.scalar_type() == at::kInt && mine.is_contiguous() && mine.numel() == L * n,
              "mine must be a contiguous int32 CUDA tensor [layers, n]");
  TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == at::kLong && counters.is_contiguous() &&
                  counters.numel() == L * 4, "counters must be a contiguous int64 CUDA tensor [layers, 4]");
  auction_phase_cuda(a, layers, eps, price, owner, mine, counters, bid_cap);
}

at::Tensor auction_profit(const at::Tensor& a, const at::Tensor& layers, const at::Tensor& price) {
  check_auction(a, layers, price);
  return auction_profit_cuda(a, layers, price);
}
#endif

}  // namespace
}  // namespace symphony

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Symphony-MoE C++/CUDA kernels: streaming activation correlation, GPU auction";
  m.attr("API_VERSION") = symphony::kApiVersion;
  m.def("has_cuda", &symphony::has_cuda, "True when the CUDA kernels were compiled in");
  m.def("column_moments", &symphony::column_moments, "(sum, sum of squares) over tokens, float64 [L, F]",
        py::arg("x"));
  m.def("center", &symphony::center, "shifted copy rounded to x's dtype, with its float64 sums", py::arg("x"),
        py::arg("shift"), py::arg("out_dtype"));
  m.def("merge_comoment_", &symphony::merge_comoment_, "c += p + u v^T (in place)", py::arg("c"), py::arg("p"),
        py::arg("u"), py::arg("v"));
  m.def("finalize", &symphony::finalize, "clamp((c + alpha mean_a mean_b^T) inv_a inv_b^T, -1, 1) as float32",
        py::arg("c"), py::arg("mean_a"), py::arg("mean_b"), py::arg("alpha"), py::arg("inv_a"), py::arg("inv_b"));
#ifdef SYMPHONY_WITH_CUDA
  m.def("auction_phase", &symphony::auction_phase, "one epsilon phase of the GPU auction", py::arg("a"),
        py::arg("layers"), py::arg("eps"), py::arg("price"), py::arg("owner"), py::arg("mine"),
        py::arg("counters"), py::arg("bid_cap"));
  m.def("auction_profit", &symphony::auction_profit, "max_j (a_ij - price_j) per row, float64", py::arg("a"),
        py::arg("layers"), py::arg("price"));
#endif
}
