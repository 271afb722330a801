// The ATen side of the contract: option parsing and the one input check per op, shared by
// the CPU kernels and the CUDA host glue (csrc/contract.h holds the ATen-free part).
// Every error names the argument, what was expected and what was received; the Python
// layer has usually raised a friendlier one already.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "contract.h"

namespace liftplace {

inline Grouping parse_grouping(c10::string_view s) {
  if (s == "global") return Grouping::Global;
  if (s == "error") return Grouping::Error;
  if (s == "patch") return Grouping::Patch;
  TORCH_CHECK(false, "liftplace: grouping must be 'global', 'error' or 'patch', got '", std::string(s), "'");
}

inline Norm parse_norm(c10::string_view s) {
  if (s == "l1") return Norm::L1;
  if (s == "l2") return Norm::L2;
  TORCH_CHECK(false, "liftplace: norm must be 'l1' or 'l2', got '", std::string(s), "'");
}

inline DType dtype_of(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    default: break;
  }
  TORCH_CHECK(false, "liftplace: ", name, " must be float16, bfloat16, float32 or float64, got ", t);
}

inline at::ScalarType scalar_type_of(DType t) {
  switch (t) {
    case DType::Half: return at::kHalf;
    case DType::BFloat16: return at::kBFloat16;
    case DType::Float: return at::kFloat;
    case DType::Double: return at::kDouble;
  }
  return at::kFloat;
}

// The kernels' own dtype for a floating input (contract.h: acc_dtype).
inline at::ScalarType acc_scalar_type(at::ScalarType t, const char* name) {
  return scalar_type_of(acc_dtype(dtype_of(t, name)));
}

// What one lift_place call is about, parsed and checked once.
struct LiftPlaceCall {
  Grouping grouping;
  Norm norm;
  int64_t R, N;
  int64_t P;  // group span: group_size, or N for "global" (contract.h: group_span)
  int64_t G;
  int64_t width;
  DType dtype;
  at::ScalarType acc;  // dtype of slope, intercept, rows, aux and of the incoming gradients
};

inline void check_on_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "liftplace: ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; move every tensor argument to x's device");
}

// x, y and the options, for both lift_place ops. Rows are limited to 2^31-1 elements: both
// devices store group ids as int32 and address positions within a row with 32-bit ints
// (offsets that can pass N, such as G * kAux or the CUDA loop counters, are 64-bit).
inline LiftPlaceCall check_lift_place_inputs(const char* op, c10::DeviceType kernel_device, const at::Tensor& x,
                                             const at::Tensor& y, int64_t group_size, c10::string_view grouping_s,
                                             c10::string_view norm_s, int64_t width) {
  LiftPlaceCall c{};
  c.grouping = parse_grouping(grouping_s);
  c.norm = parse_norm(norm_s);
  TORCH_CHECK(x.device().type() == kernel_device, "liftplace: the ", op, " kernel for ",
              c10::DeviceTypeName(kernel_device, /*lower_case=*/true), " got x on ", x.device());
  check_on_device(y, "y", x);
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "liftplace: ", op, " expects x and y of shape [R, N], got ", x.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(x.sizes() == y.sizes(), "liftplace: ", op, ": x ", x.sizes(), " and y ", y.sizes(),
              " differ in shape");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "liftplace: ", op, ": x (", x.scalar_type(), ") and y (",
              y.scalar_type(), ") differ in dtype; cast one to the other");
  c.dtype = dtype_of(x.scalar_type(), "x");
  c.acc = scalar_type_of(acc_dtype(c.dtype));
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "liftplace: ", op,
              " expects contiguous x and y; pass x.contiguous() and y.contiguous()");
  c.R = x.size(0);
  c.N = x.size(1);
  TORCH_CHECK(c.N >= 2, "liftplace: rows need at least 2 elements, got N=", c.N);
  TORCH_CHECK(c.N <= std::numeric_limits<int32_t>::max(),
              "liftplace: rows of more than 2^31-1 elements are not supported (group ids and positions within a"
              " row are 32-bit), got N=",
              c.N, "; split each row into several");
  if (c.grouping != Grouping::Global) {
    TORCH_CHECK(group_size >= 2 && group_size <= c.N, "liftplace: group_size must be in [2, N=", c.N, "], got ",
                group_size);
  }
  if (c.grouping == Grouping::Patch) {
    const int64_t p = patch_side(group_size);
    TORCH_CHECK(p * p == group_size, "liftplace: patch grouping needs a square group_size (p*p), got ", group_size);
    TORCH_CHECK(width > 0 && c.N % width == 0 && width % p == 0 && (c.N / width) % p == 0,
                "liftplace: patch grouping needs width W and height H = N / W divisible by the patch side ", p,
                " (N=", c.N, ", W=", width, ")");
  }
  c.P = group_span(c.grouping, c.N, group_size);
  c.G = num_groups(c.grouping, c.N, group_size);
  c.width = width;
  return c;
}

inline LiftPlaceCall check_fwd_inputs(c10::DeviceType kernel_device, const at::Tensor& x, const at::Tensor& y,
                                      int64_t group_size, c10::string_view grouping, c10::string_view norm,
                                      double eps, int64_t width) {
  LiftPlaceCall c =
      check_lift_place_inputs("lift_place_fwd", kernel_device, x, y, group_size, grouping, norm, width);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "liftplace: eps must be positive and finite, got ", eps);
  return c;
}

// lift_place_bwd's saved statistics and incoming gradients, on x's device, in the
// accumulation dtype and contiguous (copies only where they are not already).
struct BwdTensors {
  at::Tensor grad_rows, grad_slope, grad_intercept;  // the optional two may be undefined
  at::Tensor slope, intercept, aux;
  at::Tensor group_id;  // "error": int32 [R, N]; undefined otherwise (ignored)
};

inline at::Tensor bwd_operand(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& x,
                              at::ScalarType acc) {
  check_on_device(t, name, x);
  TORCH_CHECK(t.sizes() == shape, "liftplace: lift_place_bwd expects ", name, " of shape ", shape, ", got ",
              t.sizes());
  (void)dtype_of(t.scalar_type(), name);
  return t.to(acc).contiguous();
}

// The backward's check. group_id's values are range-checked inside each kernel, where they
// are read anyway (a separate pass here would cost a read and, on CUDA, a host sync).
inline std::pair<LiftPlaceCall, BwdTensors> check_bwd_inputs(
    c10::DeviceType kernel_device, const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_slope,
    const std::optional<at::Tensor>& grad_intercept, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& slope, const at::Tensor& intercept, const at::Tensor& aux, const at::Tensor& group_id,
    int64_t group_size, c10::string_view grouping, c10::string_view norm, int64_t width) {
  const LiftPlaceCall c =
      check_lift_place_inputs("lift_place_bwd", kernel_device, x, y, group_size, grouping, norm, width);
  BwdTensors t;
  t.grad_rows = bwd_operand(grad_rows, "grad_rows", {c.R, kRowStats}, x, c.acc);
  if (grad_slope.has_value() && grad_slope->defined())
    t.grad_slope = bwd_operand(*grad_slope, "grad_slope", {c.R, c.G}, x, c.acc);
  if (grad_intercept.has_value() && grad_intercept->defined())
    t.grad_intercept = bwd_operand(*grad_intercept, "grad_intercept", {c.R, c.G}, x, c.acc);
  t.slope = bwd_operand(slope, "slope", {c.R, c.G}, x, c.acc);
  t.intercept = bwd_operand(intercept, "intercept", {c.R, c.G}, x, c.acc);
  t.aux = bwd_operand(aux, "aux", {c.R, c.G, kAux}, x, c.acc);
  if (c.grouping == Grouping::Error) {
    check_on_device(group_id, "group_id", x);
    TORCH_CHECK(group_id.scalar_type() == at::kInt && group_id.sizes() == x.sizes(),
                "liftplace: lift_place_bwd with grouping='error' expects group_id int32 of shape ", x.sizes(),
                " (the one lift_place_fwd returned), got ", group_id.scalar_type(), " ", group_id.sizes());
    t.group_id = group_id.contiguous();
  }
  return {c, t};
}

inline void check_bucket_inputs(c10::DeviceType kernel_device, const at::Tensor& values, const at::Tensor& timesteps,
                                int64_t num_buckets, double t_max) {
  TORCH_CHECK(values.device().type() == kernel_device, "liftplace: the bucket_stats kernel for ",
              c10::DeviceTypeName(kernel_device, /*lower_case=*/true), " got values on ", values.device());
  TORCH_CHECK(timesteps.device() == values.device(), "liftplace: bucket_stats timesteps are on ",
              timesteps.device(), " but values are on ", values.device(), "; move them to one device");
  TORCH_CHECK(values.dim() == 2, "liftplace: bucket_stats values must be [B, S], got ", values.sizes());
  (void)dtype_of(values.scalar_type(), "bucket_stats values");
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.size(0) == values.size(0),
              "liftplace: bucket_stats timesteps must be [B] with B=", values.size(0), ", got ", timesteps.sizes());
  TORCH_CHECK(num_buckets >= 1, "liftplace: num_buckets must be >= 1, got ", num_buckets);
  TORCH_CHECK(t_max > 0, "liftplace: t_max must be > 0, got ", t_max);
}

}  // namespace liftplace
