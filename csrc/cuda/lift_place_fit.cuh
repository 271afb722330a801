// Device code shared by the lift/place forward kernels (lift_place_fit.cu and
// lift_place_block_sort.cu): error keys, the position -> element map of a row's groups, and
// the per-row fit (METHOD.md §4-§5), mirroring liftplace/_reference.py's lift_place_rows.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace liftplace {
namespace cuda {

// Ranking key of e = (y - x)^2, computed exactly as the reference does (in the compute
// dtype). e >= 0, so its IEEE bits already sort in value order; the sign bit is masked
// (a NaN may carry it) and every NaN becomes one value above +inf, so NaNs rank last and
// tie among themselves, i.e. keep index order, as in torch's stable sort.
__device__ __forceinline__ uint32_t error_key(float x, float y) {
  const float d = y - x;
  const float e = d * d;
  const uint32_t bits = __float_as_uint(e) & 0x7fffffffu;
  return bits > 0x7f800000u ? 0x7fffffffu : bits;
}
__device__ __forceinline__ uint64_t error_key(double x, double y) {
  const double d = y - x;
  const double e = d * d;
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(e)) & 0x7fffffffffffffffull;
  return bits > 0x7ff0000000000000ull ? 0x7fffffffffffffffull : bits;
}

// Position k of a row (groups are the position ranges [g*P, g*P + P), the last one running
// to N) -> element index in the row. Both are < N <= 2^31-1, so 32-bit.
struct RowMap {
  Grouping grouping;
  int span;     // P
  int side;     // patch side p (P = p*p)
  int tiles_w;  // W / p
  int width;    // W
  const int32_t* order;  // "error": the row's element of rank k (shared or global memory)

  __device__ __forceinline__ int operator()(int k) const {
    if (grouping == Grouping::Error) return order[k];
    if (grouping == Grouping::Patch) {
      const int g = k / span, j = k - g * span;
      const int tr = g / tiles_w, tc = g - tr * tiles_w;
      const int jr = j / side, jc = j - jr * side;
      return (tr * side + jr) * width + tc * side + jc;
    }
    return k;
  }
};

__device__ __forceinline__ RowMap make_row_map(const Geometry& geo, const int32_t* order) {
  return RowMap{geo.grouping, geo.span, geo.side, geo.width / geo.side, geo.width, order};
}

// One row's groups (one block per row): two-pass centred fit per group, then the fine
// residual and the row's kRowStats sums (METHOD.md §4-§5, _reference.fit / lift_place_rows).
//
// Work split: with at least as many groups as warps, teams of T lanes (T = power of two,
// <= 32, about 8 elements per lane) take one group each and reduce with shuffles; with
// fewer groups (large P, e.g. "global") the whole block takes each group in turn. Every
// reduction has a fixed shape for a given (N, P, blockDim): bitwise reproducible, no atomics.
//
// x, y, group_id point at the row; slope, intercept ([G]), aux ([G, kAux]) and row_stats
// ([kRowStats]) at the row's outputs. scratch: kRowStats * 32 acc_t of shared memory. All
// threads must call it. Group bounds and loop counters are 64-bit: k + T may pass 2^31.
template <typename scalar_t, typename acc_t>
__device__ void fit_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, const RowMap& map,
                        const Geometry& geo, acc_t eps, acc_t* __restrict__ slope, acc_t* __restrict__ intercept,
                        acc_t* __restrict__ aux, acc_t* __restrict__ row_stats, int32_t* __restrict__ group_id,
                        acc_t* scratch) {
  const int64_t n = geo.n, span = geo.span, groups = geo.groups;
  const int nwarps = blockDim.x >> 5;
  int T = blockDim.x;
  if (groups >= nwarps) {
    T = 1;
    while (T < 32 && T * 8 < span) T <<= 1;
  }
  const int team = threadIdx.x / T, lane = threadIdx.x - team * T, nteams = blockDim.x / T;

  acc_t part[kRowStats];
#pragma unroll
  for (int c = 0; c < kRowStats; ++c) part[c] = acc_t(0);

  // Every thread runs the same number of iterations (the shuffles need the whole warp);
  // teams past the last group run with an empty range.
  for (int64_t base = 0; base < groups; base += nteams) {
    const int64_t g = base + team;
    const bool active = g < groups;
    const int64_t lo = active ? g * span : 0;
    const int64_t hi = active ? lo + group_len(g, groups, n, span) : 0;

    acc_t s[2] = {acc_t(0), acc_t(0)};
    for (int64_t k = lo + lane; k < hi; k += T) {
      const int i = map(static_cast<int>(k));
      s[0] += widen(x[i]);
      s[1] += widen(y[i]);
      if (group_id != nullptr) group_id[i] = static_cast<int32_t>(g);
    }
    team_sum(s, T, scratch);
    const acc_t cnt = acc_t(hi - lo);
    const acc_t mx = s[0] / cnt;
    const acc_t my = s[1] / cnt;

    acc_t c[2] = {acc_t(0), acc_t(0)};
    for (int64_t k = lo + lane; k < hi; k += T) {
      const int i = map(static_cast<int>(k));
      const acc_t dx = widen(x[i]) - mx;
      const acc_t dy = widen(y[i]) - my;
      c[0] += dx * dx;
      c[1] += dx * dy;
    }
    team_sum(c, T, scratch);
    const acc_t d = c[0] / cnt + eps;
    const acc_t a = c[1] / cnt / d;
    const acc_t b = my - a * mx;

    for (int64_t k = lo + lane; k < hi; k += T) {
      const int i = map(static_cast<int>(k));
      const acc_t xi = widen(x[i]);
      const acc_t yi = widen(y[i]);
      const acc_t r = a * xi + b - yi;
      const acc_t e = xi - yi;
      part[kFine] += r * r;
      part[kSqErr] += e * e;
    }

    if (active && lane == 0) {
      slope[g] = a;
      intercept[g] = b;
      aux[aux_at(g, kMeanX)] = mx;
      aux[aux_at(g, kMeanY)] = my;
      aux[aux_at(g, kDenom)] = d;
      const acc_t da = a - acc_t(1);
      const acc_t coarse = geo.norm == Norm::L1 ? abs_of(da) + abs_of(b) : da * da + b * b;
      part[kCoarse] += cnt * coarse;
      part[kAbsSlopeDev] += abs_of(da);
      part[kAbsIntercept] += abs_of(b);
      part[kSumSlope] += a;
      part[kSumIntercept] += b;
    }
  }

  block_sum(part, scratch);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int c = 0; c < kRowStats; ++c) row_stats[c] = part[c];
  }
}

}  // namespace cuda
}  // namespace liftplace
