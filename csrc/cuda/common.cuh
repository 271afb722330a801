// Device helpers shared by the liftplace CUDA kernels: loads, error keys, fixed-order
// reductions and the per-row fit (METHOD.md §4–§5), mirroring _reference.lift_place_rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/launch.h"

namespace liftplace {
namespace cuda {

// fp16 / bf16 / fp32 compute in float, fp64 in double.
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ float abs_of(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_of(double v) { return fabs(v); }

// torch.sign: 0 for 0 and for NaN.
template <typename T> __device__ __forceinline__ T sign_of(T v) { return T((v > T(0)) - (v < T(0))); }

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

// Sum over aligned teams of `team` lanes (a power of two <= 32) by an xor butterfly. Every
// lane of the team ends with the same bits (a + b == b + a), and the order is fixed by
// `team`, so the result is reproducible. All 32 lanes of the warp must call it.
template <typename T, int K>
__device__ __forceinline__ void team_sum_warp(T (&v)[K], int team) {
  for (int m = team >> 1; m > 0; m >>= 1) {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], m);
  }
}

// Block-wide sum, the result in every thread: warp butterflies, then every thread adds the
// warp totals in warp order. `scratch` holds K * 32 values; blockDim.x is a multiple of 32.
// Every thread of the block must call it.
template <typename T, int K>
__device__ __forceinline__ void block_sum(T (&v)[K], T* scratch) {
  team_sum_warp(v, 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) scratch[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; ++i) {
    T s = scratch[i * 32];
    for (int w = 1; w < nwarps; ++w) s += scratch[i * 32 + w];
    v[i] = s;
  }
  __syncthreads();  // scratch is reused by the next call
}

template <typename T, int K>
__device__ __forceinline__ void team_sum(T (&v)[K], int team, T* scratch) {
  if (team <= 32) {
    team_sum_warp(v, team);
  } else {
    block_sum(v, scratch);
  }
}

// Position k of a row (groups are the position ranges [g*P, g*P + P), the last one running
// to N) -> element index in the row.
struct RowMap {
  int grouping;
  int group_size;  // P
  int side;        // patch side p (P = p*p)
  int tiles_w;     // W / p
  int width;       // W
  const int32_t* order;  // "error": the row's element of rank k (shared or global memory)

  __device__ __forceinline__ int operator()(int k) const {
    if (grouping == kGroupError) return order[k];
    if (grouping == kGroupPatch) {
      const int g = k / group_size, j = k - g * group_size;
      const int tr = g / tiles_w, tc = g - tr * tiles_w;
      const int jr = j / side, jc = j - jr * side;
      return (tr * side + jr) * width + tc * side + jc;
    }
    return k;
  }
};

__device__ __forceinline__ RowMap make_row_map(const FwdArgs& a, const int32_t* order) {
  RowMap m;
  m.grouping = a.grouping;
  m.group_size = a.group_size;
  m.side = 1;
  if (a.grouping == kGroupPatch) {
    while ((m.side + 1) * (m.side + 1) <= a.group_size) ++m.side;
  }
  m.tiles_w = a.grouping == kGroupPatch ? a.width / m.side : 1;
  m.width = a.width;
  m.order = order;
  return m;
}

// One row's groups (one block per row): two-pass centred fit per group, then the fine
// residual and the row's 7 sums (METHOD.md §4–§5, _reference.fit / lift_place_rows).
//
// Work split: with at least as many groups as warps, teams of T lanes (T = power of two,
// <= 32, about 8 elements per lane) take one group each and reduce with shuffles; with
// fewer groups (large P, e.g. "global") the whole block takes each group in turn. Every
// reduction has a fixed shape for a given (N, P, blockDim): bitwise reproducible, no atomics.
//
// x, y, group_id point at the row; slope, intercept ([G]), aux ([G, 3]) and row_stats ([7])
// at the row's outputs. scratch: 7 * 32 acc_t of shared memory. All threads must call it.
template <typename scalar_t, typename acc_t>
__device__ void fit_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, const RowMap& map, int n,
                        int group_size, int groups, int norm, acc_t eps, acc_t* __restrict__ slope,
                        acc_t* __restrict__ intercept, acc_t* __restrict__ aux, acc_t* __restrict__ row_stats,
                        int32_t* __restrict__ group_id, acc_t* scratch) {
  const int nwarps = blockDim.x >> 5;
  int T = blockDim.x;
  if (groups >= nwarps) {
    T = 1;
    while (T < 32 && T * 8 < group_size) T <<= 1;
  }
  const int team = threadIdx.x / T, lane = threadIdx.x - team * T, nteams = blockDim.x / T;

  acc_t part[kNumCols];
#pragma unroll
  for (int c = 0; c < kNumCols; ++c) part[c] = acc_t(0);

  // Every thread runs the same number of iterations (the shuffles need the whole warp);
  // teams past the last group run with an empty range.
  for (int base = 0; base < groups; base += nteams) {
    const int g = base + team;
    const bool active = g < groups;
    const int lo = active ? g * group_size : 0;
    const int hi = active ? (g == groups - 1 ? n : lo + group_size) : 0;

    acc_t s[2] = {acc_t(0), acc_t(0)};
    for (int k = lo + lane; k < hi; k += T) {
      const int i = map(k);
      s[0] += widen(x[i]);
      s[1] += widen(y[i]);
      if (group_id != nullptr) group_id[i] = g;
    }
    team_sum(s, T, scratch);
    const acc_t cnt = acc_t(hi - lo);
    const acc_t mx = s[0] / cnt;
    const acc_t my = s[1] / cnt;

    acc_t c[2] = {acc_t(0), acc_t(0)};
    for (int k = lo + lane; k < hi; k += T) {
      const int i = map(k);
      const acc_t dx = widen(x[i]) - mx;
      const acc_t dy = widen(y[i]) - my;
      c[0] += dx * dx;
      c[1] += dx * dy;
    }
    team_sum(c, T, scratch);
    const acc_t d = c[0] / cnt + eps;
    const acc_t a = c[1] / cnt / d;
    const acc_t b = my - a * mx;

    for (int k = lo + lane; k < hi; k += T) {
      const int i = map(k);
      const acc_t xi = widen(x[i]);
      const acc_t yi = widen(y[i]);
      const acc_t r = a * xi + b - yi;
      const acc_t e = xi - yi;
      part[kColFine] += r * r;
      part[kColSqErr] += e * e;
    }

    if (active && lane == 0) {
      slope[g] = a;
      intercept[g] = b;
      aux[3 * g + 0] = mx;
      aux[3 * g + 1] = my;
      aux[3 * g + 2] = d;
      const acc_t da = a - acc_t(1);
      const acc_t coarse = norm == kNormL1 ? abs_of(da) + abs_of(b) : da * da + b * b;
      part[kColCoarse] += cnt * coarse;
      part[kColAbsSlopeDev] += abs_of(da);
      part[kColAbsIntercept] += abs_of(b);
      part[kColSumSlope] += a;
      part[kColSumIntercept] += b;
    }
  }

  block_sum(part, scratch);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int c = 0; c < kNumCols; ++c) row_stats[c] = part[c];
  }
}

// Dispatch on the input dtype inside a kernel: float compute for fp16/bf16/fp32, double
// for fp64. `f` is called with a null pointer of the scalar type.
template <typename acc_t, typename F>
__device__ __forceinline__ void with_scalar_type(DType dtype, F&& f) {
  if constexpr (sizeof(acc_t) == 8) {
    f(static_cast<const double*>(nullptr));
  } else {
    switch (dtype) {
      case DType::Half: f(static_cast<const __half*>(nullptr)); break;
      case DType::BFloat16: f(static_cast<const __nv_bfloat16*>(nullptr)); break;
      default: f(static_cast<const float*>(nullptr)); break;
    }
  }
}

}  // namespace cuda
}  // namespace liftplace
