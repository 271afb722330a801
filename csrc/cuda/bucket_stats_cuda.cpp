// Torch glue for the CUDA bucket_stats kernel (bucket_stats_cuda.cu): checks, outputs, launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/launch.h"
#include "liftplace.h"

namespace liftplace {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bucket_stats_cuda(const at::Tensor& values,
                                                                 const at::Tensor& timesteps,
                                                                 int64_t num_buckets, double t_max) {
  check_bucket_inputs(c10::DeviceType::CUDA, values, timesteps, num_buckets, t_max);
  const c10::cuda::CUDAGuard guard(values.device());
  const auto v = values.contiguous();
  // Bucket in double, like the reference: exact for every integer timestep below 2^53.
  const auto t = timesteps.to(at::kDouble).contiguous();
  const int64_t B = v.size(0), S = v.size(1);
  const DType dtype = dtype_of(v.scalar_type(), "bucket_stats values");
  const auto acc = scalar_type_of(acc_dtype(dtype));
  auto sums = at::empty({num_buckets, S}, v.options().dtype(acc));
  auto counts = at::empty({num_buckets}, v.options().dtype(at::kLong));
  auto bucket = at::empty({B}, v.options().dtype(at::kLong));
  if (B == 0) return {sums.zero_(), counts.zero_(), bucket};
  cuda::BucketArgs args{v.data_ptr(), dtype, t.data_ptr<double>(), B, S, num_buckets,
                        t_max, sums.data_ptr(), counts.data_ptr<int64_t>(), bucket.data_ptr<int64_t>()};
  cuda::launch_bucket_stats(args, c10::cuda::getCurrentCUDAStream());
  return {sums, counts, bucket};
}

}  // namespace

TORCH_LIBRARY_IMPL(liftplace, CUDA, m) { m.impl("bucket_stats", &bucket_stats_cuda); }

}  // namespace liftplace
