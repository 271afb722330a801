// Forward without an in-kernel sort: "global" and "patch" grouping, and "error" grouping
// after the device-wide sort (long rows, float64). Also the keys for that sort.
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <type_traits>

#include "cuda/lift_place_fit.cuh"

namespace liftplace {
namespace cuda {
namespace {

constexpr int kMaxFitThreads = 512;

// One block per row; see fit_row for how the block splits the row's groups.
template <typename acc_t>
__global__ void __launch_bounds__(kMaxFitThreads) fit_kernel(const FwdArgs a) {
  __shared__ acc_t scratch[kRowStats * 32];
  const Geometry& geo = a.geo;
  const int64_t row = blockIdx.x;
  const int64_t off = row * geo.n;
  const RowMap map = make_row_map(geo, a.order != nullptr ? a.order + off : nullptr);
  acc_t* slope = static_cast<acc_t*>(a.slope) + row * geo.groups;
  acc_t* intercept = static_cast<acc_t*>(a.intercept) + row * geo.groups;
  acc_t* aux = static_cast<acc_t*>(a.aux) + row * geo.groups * kAux;
  acc_t* row_stats = static_cast<acc_t*>(a.row_stats) + row * kRowStats;
  int32_t* group_id = a.group_id != nullptr ? a.group_id + off : nullptr;
  with_scalar_type_for<acc_t>(a.dtype, [&](auto tag) {
    using scalar_t = LIFTPLACE_SCALAR_T(tag);
    fit_row<scalar_t, acc_t>(static_cast<const scalar_t*>(a.x) + off, static_cast<const scalar_t*>(a.y) + off, map,
                             geo, static_cast<acc_t>(a.eps), slope, intercept, aux, row_stats, group_id, scratch);
  });
}

// Keys for the device-wide sort, in element order (the sort is stable, so ties keep index
// order). float compute: (row << 32) | key, one sort over all rows; double: the 63-bit key
// alone, sorted per row as segments.
template <typename scalar_t>
__global__ void error_keys_kernel(const FwdArgs a, uint64_t* __restrict__ keys, int32_t* __restrict__ index) {
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  const scalar_t* y = static_cast<const scalar_t*>(a.y);
  const int64_t n = a.geo.n, total = a.geo.rows * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t row = t / n;
    const auto key = error_key(widen(x[t]), widen(y[t]));
    if constexpr (std::is_same_v<scalar_t, double>) {
      keys[t] = key;
    } else {
      keys[t] = (static_cast<uint64_t>(row) << 32) | key;
    }
    index[t] = static_cast<int32_t>(t - row * n);
  }
}

}  // namespace

void launch_fit(const FwdArgs& a, cudaStream_t stream) {
  // Threads per row block: enough lanes for ~8-16 elements each on long rows.
  const int n = a.geo.n;
  const int threads = n <= 2048 ? 128 : n <= 8192 ? 256 : kMaxFitThreads;
  const unsigned blocks = static_cast<unsigned>(a.geo.rows);
  if (acc_dtype(a.dtype) == DType::Double) {
    fit_kernel<double><<<blocks, threads, 0, stream>>>(a);
  } else {
    fit_kernel<float><<<blocks, threads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_error_keys(const FwdArgs& a, uint64_t* keys, int32_t* index, cudaStream_t stream) {
  const int threads = 256;
  const int64_t total = a.geo.rows * a.geo.n;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + threads - 1) / threads, 1 << 16));
  with_scalar_type(a.dtype, [&](auto tag) {
    error_keys_kernel<LIFTPLACE_SCALAR_T(tag)><<<blocks, threads, 0, stream>>>(a, keys, index);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace liftplace
