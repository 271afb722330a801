// The interface between the torch glue (lift_place_cuda.cpp, bucket_stats_cuda.cpp; host
// compiler) and the kernels (*.cu, nvcc): plain pointers and sizes plus the ATen-free
// contract (csrc/contract.h: enums, column layout, dtypes), so no .cu file includes ATen.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "contract.h"

namespace liftplace {
namespace cuda {

// Row and group geometry, filled once on the host from the checked call. Positions within
// a row are 32-bit (N <= 2^31-1 is checked in liftplace.h); every offset that can pass N
// (row * N, G * kAux, loop counters that step past the end) is 64-bit in the kernels.
struct Geometry {
  int64_t rows;  // R
  int n;         // N
  int span;      // P: group_size, or N for "global" (contract.h: group_span)
  int groups;    // G; the last "error" group also takes the N % P leftovers
  int width;     // W for "patch"
  int side;      // p for "patch" (P = p * p), else 1
  Grouping grouping;
  Norm norm;
};

// Floating outputs are in the accumulation dtype (contract.h: acc_dtype).
struct FwdArgs {
  const void* x;  // [R, N] of dtype, contiguous
  const void* y;  // [R, N]
  DType dtype;
  Geometry geo;
  double eps;
  // "error" grouping after a device-wide sort: [R, N], row r's element of rank k at r*N + k.
  const int32_t* order;
  void* slope;        // [R, G] acc
  void* intercept;    // [R, G] acc
  void* row_stats;    // [R, kRowStats] acc
  void* aux;          // [R, G, kAux] acc
  int32_t* group_id;  // [R, N] for "error", else nullptr
};

struct BwdArgs {
  const void* x;  // [R, N] of dtype, contiguous
  const void* y;
  DType dtype;
  Geometry geo;
  const void* grad_rows;       // [R, kRowStats] acc
  const void* grad_slope;      // [R, G] acc, or nullptr
  const void* grad_intercept;  // [R, G] acc, or nullptr
  const void* slope;           // [R, G] acc
  const void* intercept;       // [R, G] acc
  const void* aux;             // [R, G, kAux] acc
  const int32_t* group_id;     // [R, N] for "error", else nullptr; range-checked in the kernel
  void* grad_x;                // [R, N] of dtype
  void* grad_y;                // [R, N] of dtype, or nullptr
};

// lift_place_fit.cu: statistics, coefficients and row sums with one block per row, for
// "global", "patch", and "error" once `order` holds each row's ranking.
void launch_fit(const FwdArgs& args, cudaStream_t stream);

// lift_place_block_sort.cu: "error" grouping with the ranking sorted in shared memory and
// fused with the fit. Returns false (launching nothing) when the row is too long for it or
// the dtype is Double; the caller then sorts with the device-wide path.
bool launch_block_sort_fit(const FwdArgs& args, cudaStream_t stream);

// lift_place_fit.cu: keys and indices for the device-wide sort. dtype Double: the 63-bit
// error key (sorted per row by segments); otherwise (row << 32) | 32-bit error key, one
// global sort.
void launch_error_keys(const FwdArgs& args, uint64_t* keys, int32_t* index, cudaStream_t stream);

// lift_place_device_sort.cu: stable LSD radix sorts of (key, index) pairs. Each returns
// the buffer (index0 or index1) holding the sorted indices; with temp == nullptr it only
// sets temp_bytes and returns nullptr. Both buffers of each pair may be overwritten.
int32_t* radix_sort_pairs(void* temp, size_t& temp_bytes, uint64_t* keys0, uint64_t* keys1, int32_t* index0,
                          int32_t* index1, int num_items, int end_bit, cudaStream_t stream);
int32_t* segmented_sort_pairs(void* temp, size_t& temp_bytes, uint64_t* keys0, uint64_t* keys1, int32_t* index0,
                              int32_t* index1, int num_items, int num_segments, const int* offsets, int end_bit,
                              cudaStream_t stream);

// lift_place_bwd.cu: the closed-form gradients, one thread per element.
void launch_bwd(const BwdArgs& args, cudaStream_t stream);

// bucket_stats_cuda.cu: per-timestep-bucket sums (METHOD.md §8), one block per bucket.
struct BucketArgs {
  const void* values;        // [B, S] of dtype
  DType dtype;
  const double* timesteps;   // [B]
  int64_t batch;             // B
  int64_t stats;             // S
  int64_t num_buckets;       // K
  double t_max;
  void* sums;                // [K, S] acc
  int64_t* counts;           // [K]
  int64_t* bucket;           // [B]
};
void launch_bucket_stats(const BucketArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace liftplace
