// CUDA kernels of the liftplace ops: checks, output allocation, the choice of ranking
// algorithm, and the TORCH_LIBRARY_IMPL registration under the CUDA key. Compiled by the
// host compiler; the kernels live in the .cu files behind cuda/launch.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
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

static_assert(static_cast<int>(Grouping::Global) == cuda::kGroupGlobal &&
                  static_cast<int>(Grouping::Error) == cuda::kGroupError &&
                  static_cast<int>(Grouping::Patch) == cuda::kGroupPatch,
              "cuda/launch.h grouping codes must match liftplace::Grouping");
static_assert(static_cast<int>(Norm::L1) == cuda::kNormL1 && static_cast<int>(Norm::L2) == cuda::kNormL2,
              "cuda/launch.h norm codes must match liftplace::Norm");
constexpr bool same(int64_t a, int b) { return a == static_cast<int64_t>(b); }
static_assert(same(kCoarse, cuda::kColCoarse) && same(kFine, cuda::kColFine) && same(kSqErr, cuda::kColSqErr) &&
                  same(kAbsSlopeDev, cuda::kColAbsSlopeDev) && same(kAbsIntercept, cuda::kColAbsIntercept) &&
                  same(kSumSlope, cuda::kColSumSlope) && same(kSumIntercept, cuda::kColSumIntercept) &&
                  same(kRowStats, cuda::kNumCols) && same(kAux, 3),
              "cuda/launch.h columns must match liftplace::RowStat / AuxStat");

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::DType::Half;
    case at::kBFloat16: return cuda::DType::BFloat16;
    case at::kFloat: return cuda::DType::Float;
    case at::kDouble: return cuda::DType::Double;
    default: break;
  }
  TORCH_CHECK(false, "liftplace: x and y must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  return cuda::DType::Float;
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Sizes the kernels index with 32-bit ints (within a row) and one block per row.
void check_sizes(int64_t rows, int64_t n) {
  TORCH_CHECK(n <= INT_MAX, "liftplace: rows of more than 2^31-1 elements are not supported on CUDA, got N=", n);
  TORCH_CHECK(rows <= INT_MAX, "liftplace: more than 2^31-1 rows are not supported on CUDA, got R=", rows);
}

// "error" ranking with a device-wide sort, for rows too long for one block's sort and for
// float64; leaves each row's order in `order_buf` and returns a pointer into it.
// The fields FwdArgs and BwdArgs share: inputs and the row / group geometry.
template <typename Args>
void set_geometry(Args& args, const at::Tensor& x, const at::Tensor& y, cuda::DType dtype, int64_t R, int64_t N,
                  int64_t P, int64_t G, Grouping grouping, int64_t width, Norm norm) {
  args.x = x.data_ptr();
  args.y = y.data_ptr();
  args.dtype = dtype;
  args.rows = R;
  args.n = static_cast<int>(N);
  args.group_size = static_cast<int>(P);
  args.groups = static_cast<int>(G);
  args.grouping = static_cast<int>(grouping);
  args.width = static_cast<int>(width);
  args.norm = static_cast<int>(norm);
}

const int32_t* device_ranking(const cuda::FwdArgs& args, const at::Tensor& x, at::Tensor& order_buf,
                              cudaStream_t stream) {
  const int64_t total = args.rows * args.n;
  TORCH_CHECK(total <= INT_MAX, "liftplace: grouping='error' on CUDA sorts at most 2^31-1 elements per call for rows"
              " longer than 16384 or float64 inputs, got ", args.rows, " x ", args.n, "; split the batch");
  const auto opts = x.options();
  // Two key and two index buffers: the sort ping-pongs between them.
  at::Tensor keys = at::empty({2, total}, opts.dtype(at::kLong));
  order_buf = at::empty({2, total}, opts.dtype(at::kInt));
  auto* k0 = reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>());
  auto* i0 = order_buf.data_ptr<int32_t>();
  uint64_t* k1 = k0 + total;
  int32_t* i1 = i0 + total;
  cuda::launch_error_keys(args, k0, i0, stream);

  const bool segmented = args.dtype == cuda::DType::Double;
  at::Tensor offsets;
  int end_bit = 63;  // float64 keys: the sign bit is always clear
  if (segmented) {
    offsets = at::arange(0, (args.rows + 1) * args.n, args.n, opts.dtype(at::kInt));
  } else {
    int row_bits = 0;
    while ((int64_t{1} << row_bits) < args.rows) ++row_bits;
    end_bit = 32 + row_bits;
  }
  auto sort = [&](void* temp, size_t& bytes) {
    const int n = static_cast<int>(total);
    return segmented ? cuda::segmented_sort_pairs(temp, bytes, k0, k1, i0, i1, n, static_cast<int>(args.rows),
                                                  offsets.data_ptr<int32_t>(), end_bit, stream)
                     : cuda::radix_sort_pairs(temp, bytes, k0, k1, i0, i1, n, end_bit, stream);
  };
  size_t temp_bytes = 0;
  sort(nullptr, temp_bytes);
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes > 0 ? temp_bytes : 1)}, opts.dtype(at::kByte));
  return sort(temp.data_ptr(), temp_bytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lift_place_fwd_cuda(
    const at::Tensor& x, const at::Tensor& y, int64_t group_size, c10::string_view grouping_s,
    c10::string_view norm_s, double eps, int64_t width) {
  const Grouping grouping = parse_grouping(grouping_s);
  const Norm norm = parse_norm(norm_s);
  check_fwd_inputs(x, y, grouping, group_size, width);
  TORCH_CHECK(x.is_cuda(), "liftplace: the CUDA kernel got tensors on ", x.device());
  const cuda::DType dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t R = x.size(0), N = x.size(1);
  check_sizes(R, N);
  const int64_t P = grouping == Grouping::Global ? N : group_size;
  const int64_t G = num_groups(grouping, N, group_size);
  const auto acc_opts = x.options().dtype(acc_type(x));
  at::Tensor slope = at::empty({R, G}, acc_opts);
  at::Tensor intercept = at::empty({R, G}, acc_opts);
  at::Tensor rows = at::empty({R, kRowStats}, acc_opts);
  at::Tensor aux = at::empty({R, G, kAux}, acc_opts);
  const auto id_opts = x.options().dtype(at::kInt);
  at::Tensor group_id = grouping == Grouping::Error ? at::empty({R, N}, id_opts) : at::empty({0}, id_opts);
  if (R == 0) return {slope, intercept, rows, aux, group_id};

  cuda::FwdArgs args{};
  set_geometry(args, x, y, dtype, R, N, P, G, grouping, width, norm);
  args.eps = eps;
  args.order = nullptr;
  args.slope = slope.data_ptr();
  args.intercept = intercept.data_ptr();
  args.row_stats = rows.data_ptr();
  args.aux = aux.data_ptr();
  args.group_id = grouping == Grouping::Error ? group_id.data_ptr<int32_t>() : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (grouping != Grouping::Error) {
    cuda::launch_fit(args, stream);
  } else if (!cuda::launch_block_sort_fit(args, stream)) {
    at::Tensor order_buf;  // kept alive until the fit is queued; the allocator is stream-ordered
    args.order = device_ranking(args, x, order_buf, stream);
    cuda::launch_fit(args, stream);
  }
  return {slope, intercept, rows, aux, group_id};
}

at::Tensor acc_contiguous(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

void check_shape(const at::Tensor& t, const char* name, c10::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "liftplace: ", name, " must have shape ", expected, ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> lift_place_bwd_cuda(
    const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_slope,
    const std::optional<at::Tensor>& grad_intercept, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& slope, const at::Tensor& intercept, const at::Tensor& aux, const at::Tensor& group_id,
    int64_t group_size, c10::string_view grouping_s, c10::string_view norm_s, int64_t width, bool need_grad_y) {
  const Grouping grouping = parse_grouping(grouping_s);
  const Norm norm = parse_norm(norm_s);
  TORCH_CHECK(x.dim() == 2 && x.sizes() == y.sizes(), "liftplace: x and y must be [R, N] of one shape, got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "liftplace: x and y differ in dtype");
  TORCH_CHECK(x.is_cuda() && y.device() == x.device(), "liftplace: the CUDA kernel got x on ", x.device(),
              " and y on ", y.device());
  const cuda::DType dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t R = x.size(0), N = x.size(1);
  check_sizes(R, N);
  TORCH_CHECK(grouping == Grouping::Global || (group_size >= 2 && group_size <= N),
              "liftplace: group_size must be in [2, ", N, "], got ", group_size);
  if (grouping == Grouping::Patch) {
    const int64_t p = patch_side(group_size);
    TORCH_CHECK(p * p == group_size && width > 0 && N % width == 0 && width % p == 0 && (N / width) % p == 0,
                "liftplace: patch grouping needs a square group_size and H, W divisible by its side (N=", N,
                ", W=", width, ", group_size=", group_size, ")");
  }
  const int64_t G = num_groups(grouping, N, group_size);
  const int64_t P = grouping == Grouping::Global ? N : group_size;
  check_shape(grad_rows, "grad_rows", {R, kRowStats});
  check_shape(slope, "slope", {R, G});
  check_shape(intercept, "intercept", {R, G});
  check_shape(aux, "aux", {R, G, kAux});
  if (grouping == Grouping::Error) {
    check_shape(group_id, "group_id", {R, N});
    TORCH_CHECK(group_id.scalar_type() == at::kInt, "liftplace: group_id must be int32, got ", group_id.scalar_type());
  }
  const at::ScalarType acc = acc_type(x);
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const at::Tensor gr = acc_contiguous(grad_rows, acc);
  const at::Tensor a = acc_contiguous(slope, acc), b = acc_contiguous(intercept, acc);
  const at::Tensor ax = acc_contiguous(aux, acc);
  at::Tensor gs, gi;
  if (grad_slope.has_value() && grad_slope->defined()) {
    check_shape(*grad_slope, "grad_slope", {R, G});
    gs = acc_contiguous(*grad_slope, acc);
  }
  if (grad_intercept.has_value() && grad_intercept->defined()) {
    check_shape(*grad_intercept, "grad_intercept", {R, G});
    gi = acc_contiguous(*grad_intercept, acc);
  }
  const at::Tensor gid = grouping == Grouping::Error ? group_id.contiguous() : at::Tensor();

  at::Tensor grad_x = at::empty({R, N}, x.options());
  at::Tensor grad_y = need_grad_y ? at::empty({R, N}, y.options()) : at::empty({0}, y.options());
  if (R == 0 || N == 0) return {grad_x, grad_y};

  cuda::BwdArgs args{};
  set_geometry(args, xc, yc, dtype, R, N, P, G, grouping, width, norm);
  args.grad_rows = gr.data_ptr();
  args.grad_slope = gs.defined() ? gs.data_ptr() : nullptr;
  args.grad_intercept = gi.defined() ? gi.data_ptr() : nullptr;
  args.slope = a.data_ptr();
  args.intercept = b.data_ptr();
  args.aux = ax.data_ptr();
  args.group_id = gid.defined() ? gid.data_ptr<int32_t>() : nullptr;
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
