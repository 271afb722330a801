// The contract every liftplace kernel shares, without ATen: the option enums, the column
// layout of `rows` and `aux`, the input dtypes and the accumulation rule, and the row /
// group geometry (METHOD.md §2-§3). Included by the CPU kernels and, through
// liftplace.h, the CUDA host glue, and directly by the .cu files (nvcc never sees ATen).
// Python's copy of the layout is in liftplace/_ops.py (ROW_STATS, AUX, ...), the op layer.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define LIFTPLACE_HD __host__ __device__
#else
#define LIFTPLACE_HD
#endif

namespace liftplace {

enum class Grouping : int { Global = 0, Error = 1, Patch = 2 };
enum class Norm : int { L1 = 0, L2 = 1 };

// Columns of the per-row statistics `rows` [R, kRowStats] that lift_place_fwd returns.
// Every column is differentiable; lift_place_bwd consumes a gradient for each.
enum RowStat : int {
  kCoarse = 0,        // sum_g n_g * coarse_g
  kFine = 1,          // sum_i (a*x_i + b - y_i)^2, a and b held constant
  kSqErr = 2,         // sum_i (x_i - y_i)^2
  kAbsSlopeDev = 3,   // sum_g |a_g - 1|
  kAbsIntercept = 4,  // sum_g |b_g|
  kSumSlope = 5,      // sum_g a_g
  kSumIntercept = 6,  // sum_g b_g
  kRowStats = 7,
};

// Columns of `aux` [R, G, kAux]: what backward needs besides a and b.
enum AuxStat : int { kMeanX = 0, kMeanY = 1, kDenom = 2 /* vx + eps */, kAux = 3 };

// Offset of group g's column c in a row's aux block (64-bit: G * kAux can pass 2^31).
LIFTPLACE_HD constexpr int64_t aux_at(int64_t g, AuxStat c) { return g * kAux + c; }

// Input dtypes the kernels take.
enum class DType : int { Half = 0, BFloat16 = 1, Float = 2, Double = 3 };

// The accumulation rule (METHOD.md §2): float64 inputs compute in float64, every other
// input in float32. The value form (for choosing an output dtype or a kernel at run time)
// and the type form (inside a kernel templated on the input type) sit together here.
LIFTPLACE_HD constexpr DType acc_dtype(DType t) { return t == DType::Double ? DType::Double : DType::Float; }
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Integer square root: the side p of a "patch" group (group_size = p * p when valid).
template <typename I>
LIFTPLACE_HD constexpr I patch_side(I group_size) {
  I p = 1;
  while ((p + 1) * (p + 1) <= group_size) ++p;
  return p;
}

// Group span P: group_size for "error" and "patch", the whole row for "global".
template <typename I>
LIFTPLACE_HD constexpr I group_span(Grouping g, I n, I group_size) {
  return g == Grouping::Global ? n : group_size;
}

// Groups per row (METHOD.md §3).
template <typename I>
LIFTPLACE_HD constexpr I num_groups(Grouping g, I n, I group_size) {
  return g == Grouping::Global ? I(1) : n / group_size;
}

// n_g, the size of group g of G: P, except the last, which also takes the N % P leftovers
// of "error" grouping (for "patch" N = G * P; for "global" G = 1 and P = N).
template <typename I>
LIFTPLACE_HD constexpr I group_len(I g, I groups, I n, I span) {
  return g == groups - 1 ? n - (groups - 1) * span : span;
}

// bucket_stats' bucket of timestep t (METHOD.md §8): floor(t * K / t_max) clamped to
// [0, K), NaN to 0. In double, so every integer timestep below 2^53 is exact.
LIFTPLACE_HD inline int64_t bucket_of(double t, int64_t num_buckets, double t_max) {
  const double k = floor(t * static_cast<double>(num_buckets) / t_max);
  if (!(k >= 0)) return 0;  // also NaN
  return k >= static_cast<double>(num_buckets) ? num_buckets - 1 : static_cast<int64_t>(k);
}

}  // namespace liftplace
