// Fused CPU kernels for liftplace::lift_place_fwd / lift_place_bwd (METHOD.md §3-§6).
//
// One row at a time, rows spread over threads with at::parallel_for. Every row writes only
// its own output slots and sums in a fixed order, so results are bitwise identical for any
// thread count. Elementwise math is float32 (float64 for double inputs); sums are double.
// This file holds the op entry points (checks, outputs, dispatch); the row loops are in
// lift_place_cpu_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>

#include "liftplace.h"

#if defined(__GNUC__) || defined(__clang__)
#define LIFTPLACE_PREFETCH_FOR_WRITE(ptr) __builtin_prefetch((ptr), 1)
#else
#define LIFTPLACE_PREFETCH_FOR_WRITE(ptr) ((void)0)
#endif

namespace liftplace {
namespace {

using at::Tensor;

// Types shared by both ISA builds of the kernels (lift_place_cpu_kernels.h).

// A row's 7 statistics (RowStat), summed in double in group order.
struct RowSums {
  double coarse = 0, fine = 0, sqerr = 0, absdev = 0, absb = 0, suma = 0, sumb = 0;
};

template <typename acc_t>
struct FwdRow {
  acc_t* slope;      // [G]
  acc_t* intercept;  // [G]
  acc_t* aux;        // [G, 3]
};

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t* x;  // [R, N]
  const scalar_t* y;  // [R, N]
  acc_t* slope;       // [R, G]
  acc_t* intercept;   // [R, G]
  acc_t* rows;        // [R, 7]
  acc_t* aux;         // [R, G, 3]
  int32_t* gid;       // [R, N] for grouping="error"
  int64_t R, N, P, G, width;
  double eps;
  bool l2;
  Grouping grouping;
};

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const acc_t* grad_rows;       // [R, 7]
  const acc_t* grad_slope;      // [R, G] or null
  const acc_t* grad_intercept;  // [R, G] or null
  const scalar_t* x;
  const scalar_t* y;
  const acc_t* slope;
  const acc_t* intercept;
  const acc_t* aux;
  const int32_t* gid;
  scalar_t* gx;
  scalar_t* gy;
  int64_t R, N, P, G, width;
  bool l2;
  Grouping grouping;
};

// Baseline-ISA kernels; with GCC on x86-64 also an AVX2 build, picked at run time.
namespace isa_base {
#include "lift_place_cpu_kernels.h"
}  // namespace isa_base

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LIFTPLACE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
#include "lift_place_cpu_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

// Whether to run the AVX2 build; LIFTPLACE_CPU_ISA=base forces the baseline (tests use it
// to check that both builds agree bit for bit).
inline bool use_avx2() {
#ifdef LIFTPLACE_AVX2
  static const bool supported = __builtin_cpu_supports("avx2");
  const char* isa = std::getenv("LIFTPLACE_CPU_ISA");
  return supported && !(isa && std::strcmp(isa, "base") == 0);
#else
  return false;
#endif
}

// Rows per parallel_for task: about 32K elements, so short rows are batched (KERNELS.md).
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lift_place_fwd_cpu(const Tensor& x, const Tensor& y,
                                                                      int64_t group_size,
                                                                      c10::string_view grouping_s,
                                                                      c10::string_view norm_s, double eps,
                                                                      int64_t width) {
  const Grouping grouping = parse_grouping(grouping_s);
  const Norm norm = parse_norm(norm_s);
  check_fwd_inputs(x, y, grouping, group_size, width);
  TORCH_CHECK(x.device().is_cpu(), "liftplace: lift_place_fwd_cpu got tensors on ", x.device());
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "liftplace: eps must be positive and finite, got ", eps);
  const int64_t R = x.size(0), N = x.size(1);
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "liftplace: rows longer than 2^31-1 elements are not supported, got N=", N);
  const int64_t G = num_groups(grouping, N, group_size);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(acc_type);
  Tensor slope = at::empty({R, G}, opts);
  Tensor intercept = at::empty({R, G}, opts);
  Tensor rows = at::empty({R, kRowStats}, opts);
  Tensor aux = at::empty({R, G, kAux}, opts);
  Tensor gid = grouping == Grouping::Error ? at::empty({R, N}, x.options().dtype(at::kInt))
                                           : at::empty({0}, x.options().dtype(at::kInt));
  if (R == 0) return {slope, intercept, rows, aux, gid};

  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lift_place_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FwdArgs<scalar_t, acc_t> A{x.const_data_ptr<scalar_t>(),
                                     y.const_data_ptr<scalar_t>(),
                                     slope.mutable_data_ptr<acc_t>(),
                                     intercept.mutable_data_ptr<acc_t>(),
                                     rows.mutable_data_ptr<acc_t>(),
                                     aux.mutable_data_ptr<acc_t>(),
                                     grouping == Grouping::Error ? gid.mutable_data_ptr<int32_t>() : nullptr,
                                     R,
                                     N,
                                     group_size,
                                     G,
                                     width,
                                     eps,
                                     norm == Norm::L2,
                                     grouping};
    at::parallel_for(0, R, row_grain(N), [&](int64_t begin, int64_t end) {
#ifdef LIFTPLACE_AVX2
      if (avx2) return isa_avx2::fwd_rows(A, begin, end);
#endif
      isa_base::fwd_rows(A, begin, end);
    });
  });
  return {slope, intercept, rows, aux, gid};
}

Tensor acc_input(const Tensor& t, at::ScalarType acc_type, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "liftplace: lift_place_bwd expects ", name, " of shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "liftplace: lift_place_bwd got ", name, " on ", t.device());
  return t.to(acc_type).contiguous();
}

std::tuple<Tensor, Tensor> lift_place_bwd_cpu(const Tensor& grad_rows, const std::optional<Tensor>& grad_slope,
                                              const std::optional<Tensor>& grad_intercept, const Tensor& x,
                                              const Tensor& y, const Tensor& slope, const Tensor& intercept,
                                              const Tensor& aux, const Tensor& group_id, int64_t group_size,
                                              c10::string_view grouping_s, c10::string_view norm_s, int64_t width,
                                              bool need_grad_y) {
  const Grouping grouping = parse_grouping(grouping_s);
  const Norm norm = parse_norm(norm_s);
  check_fwd_inputs(x, y, grouping, group_size, width);
  TORCH_CHECK(x.device().is_cpu(), "liftplace: lift_place_bwd_cpu got tensors on ", x.device());
  const int64_t R = x.size(0), N = x.size(1);
  const int64_t G = num_groups(grouping, N, group_size);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor gr = acc_input(grad_rows, acc_type, "grad_rows", {R, kRowStats});
  const Tensor a = acc_input(slope, acc_type, "slope", {R, G});
  const Tensor b = acc_input(intercept, acc_type, "intercept", {R, G});
  const Tensor ax = acc_input(aux, acc_type, "aux", {R, G, kAux});
  Tensor ga, gb;
  if (grad_slope.has_value() && grad_slope->defined()) ga = acc_input(*grad_slope, acc_type, "grad_slope", {R, G});
  if (grad_intercept.has_value() && grad_intercept->defined())
    gb = acc_input(*grad_intercept, acc_type, "grad_intercept", {R, G});
  if (grouping == Grouping::Error) {
    TORCH_CHECK(group_id.scalar_type() == at::kInt && group_id.sizes() == x.sizes(),
                "liftplace: lift_place_bwd with grouping='error' expects group_id int32 of shape ", x.sizes(),
                " (from lift_place_fwd), got ", group_id.scalar_type(), " ", group_id.sizes());
  }
  const Tensor gid = grouping == Grouping::Error ? group_id.contiguous() : group_id;
  Tensor grad_x = at::empty_like(x);
  Tensor grad_y = need_grad_y ? at::empty_like(y) : at::empty({0}, y.options());
  if (R == 0) return {grad_x, grad_y};

  std::atomic<bool> bad_gid{false};
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lift_place_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BwdArgs<scalar_t, acc_t> A{
        gr.const_data_ptr<acc_t>(),
        ga.defined() ? ga.const_data_ptr<acc_t>() : nullptr,
        gb.defined() ? gb.const_data_ptr<acc_t>() : nullptr,
        x.const_data_ptr<scalar_t>(),
        y.const_data_ptr<scalar_t>(),
        a.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(),
        ax.const_data_ptr<acc_t>(),
        grouping == Grouping::Error ? gid.const_data_ptr<int32_t>() : nullptr,
        grad_x.mutable_data_ptr<scalar_t>(),
        need_grad_y ? grad_y.mutable_data_ptr<scalar_t>() : nullptr,
        R,
        N,
        group_size,
        G,
        width,
        norm == Norm::L2,
        grouping};
    at::parallel_for(0, R, row_grain(N), [&](int64_t begin, int64_t end) {
#ifdef LIFTPLACE_AVX2
      if (avx2) return isa_avx2::bwd_rows(A, need_grad_y, begin, end, bad_gid);
#endif
      isa_base::bwd_rows(A, need_grad_y, begin, end, bad_gid);
    });
  });
  TORCH_CHECK(!bad_gid.load(), "liftplace: lift_place_bwd got group_id values outside [0, ", G,
              "); pass the group_id that lift_place_fwd returned");
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace liftplace

TORCH_LIBRARY_IMPL(liftplace, CPU, m) {
  m.impl("lift_place_fwd", &liftplace::lift_place_fwd_cpu);
  m.impl("lift_place_bwd", &liftplace::lift_place_bwd_cpu);
}
