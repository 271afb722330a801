// Device helpers shared by every liftplace CUDA kernel: loads and stores in the
// accumulation dtype, dispatch on the input dtype, and fixed-order (reproducible) sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"

namespace liftplace {
namespace cuda {

// Loads widen to the accumulation type (contract.h: acc_type), stores round back.
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
template <typename T>
__device__ __forceinline__ T sign_of(T v) {
  return T((v > T(0)) - (v < T(0)));
}

// Calls f with a null pointer of the CUDA scalar type of `dtype` (host or device code).
template <typename F>
__host__ __device__ __forceinline__ void with_scalar_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Half: f(static_cast<const __half*>(nullptr)); break;
    case DType::BFloat16: f(static_cast<const __nv_bfloat16*>(nullptr)); break;
    case DType::Float: f(static_cast<const float*>(nullptr)); break;
    case DType::Double: f(static_cast<const double*>(nullptr)); break;
  }
}

#define LIFTPLACE_SCALAR_T(tag) std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>

// The same inside a kernel instantiated for one accumulation type: only the input types
// that accumulate in acc_t (contract.h: acc_type) are generated.
template <typename acc_t, typename F>
__device__ __forceinline__ void with_scalar_type_for(DType dtype, F&& f) {
  with_scalar_type(dtype, [&](auto tag) {
    if constexpr (std::is_same_v<acc_type<LIFTPLACE_SCALAR_T(tag)>, acc_t>) f(tag);
  });
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

}  // namespace cuda
}  // namespace liftplace
