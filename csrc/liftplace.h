// Shared definitions for the liftplace kernels (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>

namespace liftplace {

enum class Grouping : int { Global = 0, Error = 1, Patch = 2 };
enum class Norm : int { L1 = 0, L2 = 1 };

// Columns of the per-row statistics `rows` [R, kRowStats] that lift_place_fwd returns.
// Every column is differentiable; lift_place_bwd consumes a gradient for each.
enum RowStat : int64_t {
  kCoarse = 0,          // sum_g n_g * coarse_g
  kFine = 1,            // sum_i (a*x_i + b - y_i)^2, a and b held constant
  kSqErr = 2,           // sum_i (x_i - y_i)^2
  kAbsSlopeDev = 3,     // sum_g |a_g - 1|
  kAbsIntercept = 4,    // sum_g |b_g|
  kSumSlope = 5,        // sum_g a_g
  kSumIntercept = 6,    // sum_g b_g
  kRowStats = 7,
};

// Columns of `aux` [R, G, kAux]: what backward needs besides a and b.
enum AuxStat : int64_t { kMeanX = 0, kMeanY = 1, kDenom = 2 /* vx + eps */, kAux = 3 };

inline Grouping parse_grouping(c10::string_view s) {
  if (s == "global") return Grouping::Global;
  if (s == "error") return Grouping::Error;
  if (s == "patch") return Grouping::Patch;
  TORCH_CHECK(false, "liftplace: grouping must be 'global', 'error' or 'patch', got '", std::string(s), "'");
}

inline Norm parse_norm(c10::string_view s) {
  if (s == "l1") return Norm::L1;
  if (s == "l2") return Norm::L2;
  TORCH_CHECK(false, "liftplace: norm must be 'l1' or 'l2', got '", std::string(s), "'");
}

// Groups per row (METHOD.md §3). For "error" the last group takes the N % P leftovers.
inline int64_t num_groups(Grouping g, int64_t n, int64_t group_size) {
  return g == Grouping::Global ? 1 : n / group_size;
}

// Integer square root for patch sides (group_size = p * p).
inline int64_t patch_side(int64_t group_size) {
  int64_t p = 1;
  while ((p + 1) * (p + 1) <= group_size) ++p;
  return p;
}

// Checks shared by every backend; the Python layer has already raised friendlier errors.
inline void check_fwd_inputs(const at::Tensor& x, const at::Tensor& y, Grouping grouping,
                             int64_t group_size, int64_t width) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "liftplace: x and y must be [R, N], got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.sizes() == y.sizes(), "liftplace: x ", x.sizes(), " and y ", y.sizes(), " differ in shape");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "liftplace: x and y differ in dtype");
  TORCH_CHECK(x.device() == y.device(), "liftplace: x and y are on different devices");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "liftplace: x and y must be contiguous");
  const int64_t n = x.size(1);
  TORCH_CHECK(n >= 2, "liftplace: rows need at least 2 elements, got ", n);
  if (grouping != Grouping::Global) {
    TORCH_CHECK(group_size >= 2 && group_size <= n, "liftplace: group_size must be in [2, ", n, "], got ", group_size);
  }
  if (grouping == Grouping::Patch) {
    const int64_t p = patch_side(group_size);
    TORCH_CHECK(p * p == group_size, "liftplace: patch grouping needs a square group_size, got ", group_size);
    TORCH_CHECK(width > 0 && n % width == 0 && width % p == 0 && (n / width) % p == 0,
                "liftplace: patch grouping needs H and W divisible by ", p, " (N=", n, ", W=", width, ")");
  }
}

inline void check_bucket_inputs(const at::Tensor& values, const at::Tensor& timesteps, int64_t num_buckets,
                                double t_max) {
  TORCH_CHECK(values.dim() == 2, "liftplace: bucket_stats values must be [B, S], got ", values.sizes());
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.size(0) == values.size(0),
              "liftplace: bucket_stats timesteps must be [B] with B=", values.size(0), ", got ", timesteps.sizes());
  TORCH_CHECK(values.device() == timesteps.device(), "liftplace: values and timesteps are on different devices");
  TORCH_CHECK(num_buckets >= 1, "liftplace: num_buckets must be >= 1, got ", num_buckets);
  TORCH_CHECK(t_max > 0, "liftplace: t_max must be > 0, got ", t_max);
}

}  // namespace liftplace
