// Per-timestep-bucket sums on the CPU. Tiny work (B samples), so one serial pass in
// sample order: fixed summation order, bitwise reproducible for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "liftplace.h"

namespace liftplace {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bucket_stats_cpu(const at::Tensor& values, const at::Tensor& timesteps,
                                                    int64_t num_buckets, double t_max) {
  check_bucket_inputs(c10::DeviceType::CPU, values, timesteps, num_buckets, t_max);
  const auto v = values.contiguous();
  const auto t = timesteps.contiguous();
  const int64_t B = v.size(0), S = v.size(1);
  const auto acc = acc_scalar_type(v.scalar_type(), "bucket_stats values");
  auto sums = at::zeros({num_buckets, S}, v.options().dtype(acc));
  auto counts = at::zeros({num_buckets}, v.options().dtype(at::kLong));
  auto bucket_t = at::empty({B}, v.options().dtype(at::kLong));
  auto* bucket = bucket_t.data_ptr<int64_t>();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "bucket_stats_cpu_t", [&] {
    const auto* tp = t.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) bucket[b] = bucket_of(static_cast<double>(tp[b]), num_buckets, t_max);
  });
  auto* cp = counts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "bucket_stats_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto* vp = v.data_ptr<scalar_t>();
    auto* sp = sums.data_ptr<acc_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t k = bucket[b];
      cp[k] += 1;
      for (int64_t s = 0; s < S; ++s) sp[k * S + s] += static_cast<acc_t>(vp[b * S + s]);
    }
  });
  return {sums, counts, bucket_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(liftplace, CPU, m) { m.impl("bucket_stats", &bucket_stats_cpu); }

}  // namespace liftplace
