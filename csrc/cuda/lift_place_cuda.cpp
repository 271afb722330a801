// Host glue of the CUDA lift_place_fwd / lift_place_bwd kernels: the shared checks
// (liftplace.h), output allocation, the choice of ranking algorithm, and the registration
// under the CUDA key. Compiled by the host compiler; the kernels live in the
// lift_place_*.cu files behind cuda/launch.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>

#include "cuda/launch.h"
#include "liftplace.h"

namespace liftplace {
namespace {

// The kernels' launch geometry: one block per row, so R is bounded by the grid's 2^31-1
// blocks (a CUDA limit, beyond the shared checks in liftplace.h).
cuda::Geometry geometry_of(const LiftPlaceCall& c) {
  TORCH_CHECK(c.R <= INT_MAX, "liftplace: more than 2^31-1 rows are not supported on CUDA, got R=", c.R,
              "; split the batch");
  cuda::Geometry geo{};
  geo.rows = c.R;
  geo.n = static_cast<int>(c.N);  // <= INT_MAX, checked by check_lift_place_inputs
  geo.span = static_cast<int>(c.P);
  geo.groups = static_cast<int>(c.G);
  geo.width = static_cast<int>(c.width);
  geo.side = c.grouping == Grouping::Patch ? static_cast<int>(patch_side(c.P)) : 1;
  geo.grouping = c.grouping;
  geo.norm = c.norm;
  return geo;
}

// "error" ranking with a device-wide sort, for rows too long for one block's sort and for
// float64; leaves each row's order in `order_buf` and returns a pointer into it.
const int32_t* device_ranking(const cuda::FwdArgs& args, const at::Tensor& x, at::Tensor& order_buf,
                              cudaStream_t stream) {
  const int64_t rows = args.geo.rows, n = args.geo.n, total = rows * n;
  TORCH_CHECK(total <= INT_MAX, "liftplace: grouping='error' on CUDA sorts at most 2^31-1 elements per call for rows"
              " longer than 16384 or float64 inputs, got ", rows, " x ", n, "; split the batch");
  const auto opts = x.options();
  // Two key and two index buffers: the sort ping-pongs between them.
  at::Tensor keys = at::empty({2, total}, opts.dtype(at::kLong));
  order_buf = at::empty({2, total}, opts.dtype(at::kInt));
  auto* k0 = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
  auto* i0 = order_buf.data_ptr<int32_t>();
  uint64_t* k1 = k0 + total;
  int32_t* i1 = i0 + total;
  cuda::launch_error_keys(args, k0, i0, stream);

  const bool segmented = acc_dtype(args.dtype) == DType::Double;
  at::Tensor offsets;
  int end_bit = 63;  // float64 keys: the sign bit is always clear
  if (segmented) {
    offsets = at::arange(0, (rows + 1) * n, n, opts.dtype(at::kInt));
  } else {
    int row_bits = 0;
    while ((int64_t{1} << row_bits) < rows) ++row_bits;
    end_bit = 32 + row_bits;
  }
  auto sort = [&](void* temp, size_t& bytes) {
    const int items = static_cast<int>(total);
    return segmented ? cuda::segmented_sort_pairs(temp, bytes, k0, k1, i0, i1, items, static_cast<int>(rows),
                                                  offsets.data_ptr<int32_t>(), end_bit, stream)
                     : cuda::radix_sort_pairs(temp, bytes, k0, k1, i0, i1, items, end_bit, stream);
  };
  size_t temp_bytes = 0;
  sort(nullptr, temp_bytes);
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes > 0 ? temp_bytes : 1)}, opts.dtype(at::kByte));
  return sort(temp.data_ptr(), temp_bytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lift_place_fwd_cuda(
    const at::Tensor& x, const at::Tensor& y, int64_t group_size, c10::string_view grouping,
    c10::string_view norm, double eps, int64_t width) {
  const LiftPlaceCall c = check_fwd_inputs(c10::DeviceType::CUDA, x, y, group_size, grouping, norm, eps, width);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t R = c.R, N = c.N, G = c.G;
  const auto acc_opts = x.options().dtype(c.acc);
  at::Tensor slope = at::empty({R, G}, acc_opts);
  at::Tensor intercept = at::empty({R, G}, acc_opts);
  at::Tensor rows = at::empty({R, kRowStats}, acc_opts);
  at::Tensor aux = at::empty({R, G, kAux}, acc_opts);
  const bool error = c.grouping == Grouping::Error;
  const auto id_opts = x.options().dtype(at::kInt);
  at::Tensor group_id = error ? at::empty({R, N}, id_opts) : at::empty({0}, id_opts);
  if (R == 0) return {slope, intercept, rows, aux, group_id};

  cuda::FwdArgs args{};
  args.x = x.data_ptr();
  args.y = y.data_ptr();
  args.dtype = c.dtype;
  args.geo = geometry_of(c);
  args.eps = eps;
  args.order = nullptr;
  args.slope = slope.data_ptr();
  args.intercept = intercept.data_ptr();
  args.row_stats = rows.data_ptr();
  args.aux = aux.data_ptr();
  args.group_id = error ? group_id.data_ptr<int32_t>() : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!error) {
    cuda::launch_fit(args, stream);
  } else if (!cuda::launch_block_sort_fit(args, stream)) {
    at::Tensor order_buf;  // kept alive until the fit is queued; the allocator is stream-ordered
    args.order = device_ranking(args, x, order_buf, stream);
    cuda::launch_fit(args, stream);
  }
  return {slope, intercept, rows, aux, group_id};
}

std::tuple<at::Tensor, at::Tensor> lift_place_bwd_cuda(
    const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_slope,
    const std::optional<at::Tensor>& grad_intercept, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& slope, const at::Tensor& intercept, const at::Tensor& aux, const at::Tensor& group_id,
    int64_t group_size, c10::string_view grouping, c10::string_view norm, int64_t width, bool need_grad_y) {
  const auto [c, t] = check_bwd_inputs(c10::DeviceType::CUDA, grad_rows, grad_slope, grad_intercept, x, y, slope,
                                       intercept, aux, group_id, group_size, grouping, norm, width);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_y = need_grad_y ? at::empty_like(y) : at::empty({0}, y.options());
  if (c.R == 0) return {grad_x, grad_y};

  cuda::BwdArgs args{};
  args.x = x.data_ptr();
  args.y = y.data_ptr();
  args.dtype = c.dtype;
  args.geo = geometry_of(c);
  args.grad_rows = t.grad_rows.data_ptr();
  args.grad_slope = t.grad_slope.defined() ? t.grad_slope.data_ptr() : nullptr;
  args.grad_intercept = t.grad_intercept.defined() ? t.grad_intercept.data_ptr() : nullptr;
  args.slope = t.slope.data_ptr();
  args.intercept = t.intercept.data_ptr();
  args.aux = t.aux.data_ptr();
  args.group_id = t.group_id.defined() ? t.group_id.data_ptr<int32_t>() : nullptr;
  args.grad_x = grad_x.data_ptr();
  args.grad_y = need_grad_y ? grad_y.data_ptr() : nullptr;
  cuda::launch_bwd(args, c10::cuda::getCurrentCUDAStream());
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace liftplace

TORCH_LIBRARY_IMPL(liftplace, CUDA, m) {
  m.impl("lift_place_fwd", &liftplace::lift_place_fwd_cuda);
  m.impl("lift_place_bwd", &liftplace::lift_place_bwd_cuda);
}
