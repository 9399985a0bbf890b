// Ops of the streaming correlation accumulator and of the GPU auction (see symphony_kernels/correlation.py and
// symphony_kernels/matching.py for the algorithms; TorchOps in correlation.py is the reference of every op).
//
// Shapes: x [L, T, F] with unit column stride and row stride F (any layer stride); float64 statistics [L, F].
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace symphony {

// Bump with every change of a signature or of a result; symphony_kernels/_ext.py checks it.
constexpr int kApiVersion = 1;

// ---- CPU (ATen + at::parallel_for, i.e. OpenMP) --------------------------------------------------------------
// (sum over tokens, sum of squares over tokens), float64 [L, F].
std::tuple<at::Tensor, at::Tensor> column_moments_cpu(const at::Tensor& x);
// y = x - shift, computed in double for a float64 out_dtype (exact) else in float, rounded to out_dtype;
// with y's float64 sums and sums of squares.
std::tuple<at::Tensor, at::Tensor, at::Tensor> center_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                          at::ScalarType out_dtype);
// c [L, A, B] float64 += p (float32 or float64) + u v^T (u [L, A, R], v [L, B, R] float64, optional).
void merge_comoment_cpu(at::Tensor& c, const at::Tensor& p, const std::optional<at::Tensor>& u,
                        const std::optional<at::Tensor>& v);
// clamp((c + alpha * mean_a mean_b^T) * inv_a inv_b^T, -1, 1) as float32 [L, A, B].
at::Tensor finalize_cpu(const at::Tensor& c, const at::Tensor& mean_a, const at::Tensor& mean_b, double alpha,
                        const at::Tensor& inv_a, const at::Tensor& inv_b);

#ifdef SYMPHONY_WITH_CUDA
// ---- CUDA: the same four ops ----------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> column_moments_cuda(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> center_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                           at::ScalarType out_dtype);
void merge_comoment_cuda(at::Tensor& c, const at::Tensor& p, const std::optional<at::Tensor>& u,
                         const std::optional<at::Tensor>& v);
at::Tensor finalize_cuda(const at::Tensor& c, const at::Tensor& mean_a, const at::Tensor& mean_b, double alpha,
                         const at::Tensor& inv_a, const at::Tensor& inv_b);

// ---- CUDA auction (maximisation), one epsilon phase for the listed layers ------------------------------------
// a [L, n, n] float32 scores; layers [La] int32; eps [L] float32; price [L, n] float32 (non-negative, kept across
// phases); owner [L, n] int64 scratch; mine [L, n] int32 (out: the object of each person); counters [L, 4] int64
// (out per layer: objects owned, bids, failed flag). A layer fails when its bids exceed bid_cap.
void auction_phase_cuda(const at::Tensor& a, const at::Tensor& layers, const at::Tensor& eps, at::Tensor& price,
                        at::Tensor& owner, at::Tensor& mine, at::Tensor& counters, int64_t bid_cap);
// max_j (a_ij - price_j) per person of the listed layers, float64 [La, n].
at::Tensor auction_profit_cuda(const at::Tensor& a, const at::Tensor& layers, const at::Tensor& price);
#endif

}  // namespace symphony
