// Fused CPU kernels for liftplace::lift_place_fwd / lift_place_bwd (METHOD.md §3-§6).
//
// One row at a time, rows spread over threads with at::parallel_for. Every row writes only
// its own output slots and sums in a fixed order, so results are bitwise identical for any
// thread count. Elementwise math is in the accumulation dtype (contract.h: float32, float64
// for double inputs); sums are double.
// This file holds the op entry points (checks, outputs, dispatch); the row loops are in
// lift_place_cpu_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

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

// A row's kRowStats statistics (RowStat), summed in double in group order.
struct RowSums {
  double coarse = 0, fine = 0, sqerr = 0, absdev = 0, absb = 0, suma = 0, sumb = 0;
};

template <typename acc_t>
struct FwdRow {
  acc_t* slope;      // [G]
  acc_t* intercept;  // [G]
  acc_t* aux;        // [G, kAux]
};

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  const scalar_t* x;  // [R, N]
  const scalar_t* y;  // [R, N]
  acc_t* slope;       // [R, G]
  acc_t* intercept;   // [R, G]
  acc_t* rows;        // [R, kRowStats]
  acc_t* aux;         // [R, G, kAux]
  int32_t* gid;       // [R, N] for grouping="error"
  int64_t R, N, P, G, width;  // P: the group span (N for "global"), contract.h
  double eps;
  bool l2;
  Grouping grouping;
};

// One group's backward constants (lift_place_cpu_kernels.h, group_coef).
template <typename acc_t>
struct GradCoef {
  acc_t mx, my, a, k, two_a, fine_a, cx, cy;
};

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  const acc_t* grad_rows;       // [R, kRowStats]
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

// Whether to run the AVX2 build, decided once per process: LIFTPLACE_CPU_ISA=base forces
// the baseline (tests set it in a subprocess to check that both builds agree bit for bit).
bool use_avx2() {
#ifdef LIFTPLACE_AVX2
  static const bool avx2 = [] {
    const char* isa = std::getenv("LIFTPLACE_CPU_ISA");
    return __builtin_cpu_supports("avx2") && !(isa && std::strcmp(isa, "base") == 0);
  }();
  return avx2;
#else
  return false;
#endif
}

// Rows per parallel_for task: about 32K elements, so short rows are batched (docs/KERNELS.md).
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// Elements per backward span when rows are split (a multiple of `unit`, the image width for
// "patch"): about 32K, like row_grain.
inline int64_t bwd_span(int64_t n, int64_t unit) {
  return std::min(n, std::max<int64_t>(1, 32768 / unit) * unit);
}

// LIFTPLACE_BENCH_STUB_KERNELS=1 (read once): both kernels allocate their outputs and return
// without computing (rows zeroed, everything else uninitialised). Only for
// `benchmarks/bench_loss.py --stub-kernels`, which times what a loss call costs around its
// kernels; a process that sets it computes garbage.
bool stub_kernels() {
  static const bool stub = [] {
    const char* v = std::getenv("LIFTPLACE_BENCH_STUB_KERNELS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return stub;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lift_place_fwd_cpu(const Tensor& x, const Tensor& y,
                                                                      int64_t group_size,
                                                                      c10::string_view grouping,
                                                                      c10::string_view norm, double eps,
                                                                      int64_t width) {
  const LiftPlaceCall c = check_fwd_inputs(c10::DeviceType::CPU, x, y, group_size, grouping, norm, eps, width);
  const int64_t R = c.R, N = c.N, G = c.G;
  const auto opts = x.options().dtype(c.acc);
  Tensor slope = at::empty({R, G}, opts);
  Tensor intercept = at::empty({R, G}, opts);
  Tensor rows = at::empty({R, kRowStats}, opts);
  Tensor aux = at::empty({R, G, kAux}, opts);
  const bool error = c.grouping == Grouping::Error;
  Tensor gid = error ? at::empty({R, N}, x.options().dtype(at::kInt)) : at::empty({0}, x.options().dtype(at::kInt));
  if (R == 0) return {slope, intercept, rows, aux, gid};
  if (stub_kernels()) return {slope, intercept, rows.zero_(), aux, gid};

  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lift_place_fwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const FwdArgs<scalar_t, acc_t> A{x.const_data_ptr<scalar_t>(),
                                     y.const_data_ptr<scalar_t>(),
                                     slope.mutable_data_ptr<acc_t>(),
                                     intercept.mutable_data_ptr<acc_t>(),
                                     rows.mutable_data_ptr<acc_t>(),
                                     aux.mutable_data_ptr<acc_t>(),
                                     error ? gid.mutable_data_ptr<int32_t>() : nullptr,
                                     R,
                                     N,
                                     c.P,
                                     G,
                                     width,
                                     eps,
                                     c.norm == Norm::L2,
                                     c.grouping};
    at::parallel_for(0, R, row_grain(N), [&](int64_t begin, int64_t end) {
#ifdef LIFTPLACE_AVX2
      if (avx2) return isa_avx2::fwd_rows(A, begin, end);
#endif
      isa_base::fwd_rows(A, begin, end);
    });
  });
  return {slope, intercept, rows, aux, gid};
}

std::tuple<Tensor, Tensor> lift_place_bwd_cpu(const Tensor& grad_rows, const std::optional<Tensor>& grad_slope,
                                              const std::optional<Tensor>& grad_intercept, const Tensor& x,
                                              const Tensor& y, const Tensor& slope, const Tensor& intercept,
                                              const Tensor& aux, const Tensor& group_id, int64_t group_size,
                                              c10::string_view grouping, c10::string_view norm, int64_t width,
                                              bool need_grad_y) {
  const auto [c, t] = check_bwd_inputs(c10::DeviceType::CPU, grad_rows, grad_slope, grad_intercept, x, y, slope,
                                       intercept, aux, group_id, group_size, grouping, norm, width);
  const int64_t R = c.R, N = c.N, G = c.G;
  Tensor grad_x = at::empty_like(x);
  Tensor grad_y = need_grad_y ? at::empty_like(y) : at::empty({0}, y.options());
  if (R == 0 || stub_kernels()) return {grad_x, grad_y};

  std::atomic<bool> bad_gid{false};
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lift_place_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const BwdArgs<scalar_t, acc_t> A{
        t.grad_rows.const_data_ptr<acc_t>(),
        t.grad_slope.defined() ? t.grad_slope.const_data_ptr<acc_t>() : nullptr,
        t.grad_intercept.defined() ? t.grad_intercept.const_data_ptr<acc_t>() : nullptr,
        x.const_data_ptr<scalar_t>(),
        y.const_data_ptr<scalar_t>(),
        t.slope.const_data_ptr<acc_t>(),
        t.intercept.const_data_ptr<acc_t>(),
        t.aux.const_data_ptr<acc_t>(),
        t.group_id.defined() ? t.group_id.const_data_ptr<int32_t>() : nullptr,
        grad_x.mutable_data_ptr<scalar_t>(),
        need_grad_y ? grad_y.mutable_data_ptr<scalar_t>() : nullptr,
        R,
        N,
        c.P,
        G,
        width,
        c.norm == Norm::L2,
        c.grouping};
    const int64_t span = bwd_span(N, c.grouping == Grouping::Patch ? width : 1);
    if (R >= 2 * at::get_num_threads() || span >= N) {
      at::parallel_for(0, R, row_grain(N), [&](int64_t begin, int64_t end) {
#ifdef LIFTPLACE_AVX2
        if (avx2) return isa_avx2::bwd_rows(A, need_grad_y, begin, end, bad_gid);
#endif
        isa_base::bwd_rows(A, need_grad_y, begin, end, bad_gid);
      });
    } else {  // few long rows: coefficients per row, then spans of every row over all threads
      Tensor coefs = at::empty({R * G * int64_t(sizeof(GradCoef<acc_t>))}, x.options().dtype(at::kByte));
      Tensor twos = at::empty({R, 2}, x.options().dtype(c.acc));
      auto* cp = reinterpret_cast<GradCoef<acc_t>*>(coefs.mutable_data_ptr<uint8_t>());
      acc_t* tp = twos.mutable_data_ptr<acc_t>();
      at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
        isa_base::bwd_rows_coefs(A, cp, tp, begin, end);  // scalar double math: one build suffices
      });
      const int64_t spans = R * ((N + span - 1) / span);
      at::parallel_for(0, spans, 1, [&](int64_t begin, int64_t end) {
#ifdef LIFTPLACE_AVX2
        if (avx2) return isa_avx2::bwd_spans(A, need_grad_y, cp, tp, span, begin, end, bad_gid);
#endif
        isa_base::bwd_spans(A, need_grad_y, cp, tp, span, begin, end, bad_gid);
      });
    }
  });
  // Ids outside [0, G) were skipped by the kernel (never used as an index).
  TORCH_CHECK(!bad_gid.load(), "liftplace: lift_place_bwd got group_id values outside [0, G=", G,
              "); pass the group_id that lift_place_fwd returned for these x and y");
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace liftplace

TORCH_LIBRARY_IMPL(liftplace, CPU, m) {
  m.impl("lift_place_fwd", &liftplace::lift_place_fwd_cpu);
  m.impl("lift_place_bwd", &liftplace::lift_place_bwd_cpu);
}
