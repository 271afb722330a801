// Per-timestep-bucket sums on the GPU. The work is tiny (B samples x S statistics), so one
// block per bucket, one thread per statistic, each walking the samples in order: a fixed
// summation order with no atomics, so results are bitwise reproducible. No host sync.
#include <c10/cuda/CUDAException.h>

#include "cuda/common.cuh"

namespace liftplace {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void bucket_stats_kernel(const scalar_t* __restrict__ values, const double* __restrict__ timesteps,
                                    int64_t B, int64_t S, int64_t num_buckets, double t_max,
                                    acc_t* __restrict__ sums, int64_t* __restrict__ counts,
                                    int64_t* __restrict__ bucket) {
  const int64_t k = blockIdx.x;
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    acc_t total = 0;
    for (int64_t b = 0; b < B; ++b) {
      if (bucket_of(timesteps[b], num_buckets, t_max) == k) total += static_cast<acc_t>(widen(values[b * S + s]));
    }
    sums[k * S + s] = total;
  }
  if (threadIdx.x == 0) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; ++b) n += bucket_of(timesteps[b], num_buckets, t_max) == k;
    counts[k] = n;
  }
  if (k == 0) {
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) bucket[b] = bucket_of(timesteps[b], num_buckets, t_max);
  }
}

}  // namespace

void launch_bucket_stats(const BucketArgs& a, cudaStream_t stream) {
  with_scalar_type(a.dtype, [&](auto tag) {
    using scalar_t = LIFTPLACE_SCALAR_T(tag);
    using acc_t = acc_type<scalar_t>;
    bucket_stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(a.num_buckets), 128, 0, stream>>>(
        static_cast<const scalar_t*>(a.values), a.timesteps, a.batch, a.stats, a.num_buckets, a.t_max,
        static_cast<acc_t*>(a.sums), a.counts, a.bucket);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace liftplace
