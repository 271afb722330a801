// liftplace::lift_place_kd / lift_place_kd_bwd: the whole LIFT/PLACE loss of one call (no
// timestep buckets, one process) as one op each way, for the eager path of liftplace/loss.py
// (_FusedKD). They add no math: the forward is lift_place_fwd followed by exactly the ATen
// ops that loss.py's _reduce_rows runs (same ops, same order, so the same bits); the backward
// is the rows' gradient grad * coef followed by lift_place_bwd. What they save is per-call
// Python: about twenty small tensor ops and two autograd nodes become one op call each way
// (benchmarks/RESULTS.md §7). Device-agnostic: the kernels are reached through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "contract.h"

namespace liftplace {
namespace {

using at::Tensor;
using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

FwdOut call_fwd(const Tensor& x, const Tensor& y, int64_t group_size, c10::string_view grouping,
                c10::string_view norm, double eps, int64_t width) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("liftplace::lift_place_fwd", "")
                       .typed<FwdOut(const Tensor&, const Tensor&, int64_t, c10::string_view, c10::string_view,
                                     double, int64_t)>();
  return op.call(x, y, group_size, grouping, norm, eps, width);
}

std::tuple<Tensor, Tensor> call_bwd(const Tensor& grad_rows, const Tensor& x, const Tensor& y, const Tensor& slope,
                                    const Tensor& intercept, const Tensor& aux, const Tensor& group_id,
                                    int64_t group_size, c10::string_view grouping, c10::string_view norm,
                                    int64_t width, bool need_grad_y) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("liftplace::lift_place_bwd", "")
                       .typed<std::tuple<Tensor, Tensor>(
                           const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                           c10::string_view, c10::string_view, int64_t, bool)>();
  return op.call(grad_rows, std::nullopt, std::nullopt, x, y, slope, intercept, aux, group_id, group_size, grouping,
                 norm, width, need_grad_y);
}

// The reduction below on a CPU tensor's values: the same IEEE operations in the same dtype as
// the ATen ops (which round a double Scalar to the tensor's dtype first), without ~15 op
// dispatches. This file is compiled with -ffp-contract=off (CMakeLists.txt), so no a*b + c
// becomes an FMA; tests/test_fused.py compares both paths bit for bit.
template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> reduce_on_host(const Tensor& totals, double scale, double num_groups,
                                                          bool adaptive, double weight_value, c10::string_view parts,
                                                          bool anneal) {
  const T* t = totals.const_data_ptr<T>();
  const T one = T(1), s = static_cast<T>(scale);
  T w;
  if (adaptive) {
    const T frac = (t[kAbsSlopeDev] + t[kAbsIntercept]) / static_cast<T>(num_groups);
    w = one - (std::isnan(frac) ? frac : std::min(frac, one));  // clamp_max keeps NaN
  } else {
    w = static_cast<T>(weight_value);
  }
  const T coarse = t[kCoarse] * s, fine = t[kFine] * s;
  const T cw = anneal ? one - w : one;
  T loss, c_coarse = T(0), c_fine = T(0);
  if (parts == "coarse") {
    loss = coarse;
    c_coarse = s;
  } else if (parts == "fine") {
    loss = fine;
    c_fine = s;
  } else {
    const T a = cw * coarse, b = w * fine;
    loss = a + b;
    c_coarse = cw * s;
    c_fine = w * s;
  }
  const auto opts = totals.options();
  auto scalar = [&](T v) {  // outputs must not alias one another (the schema says so)
    Tensor out = at::empty({}, opts);
    *out.mutable_data_ptr<T>() = v;
    return out;
  };
  Tensor coef = at::empty({kRowStats}, opts);
  T* c = coef.mutable_data_ptr<T>();
  std::fill(c, c + kRowStats, T(0));
  c[kCoarse] = c_coarse;
  c[kFine] = c_fine;
  return {scalar(loss), scalar(w), scalar(cw), coef};
}

// loss.py: _fine_weight (weight "adaptive", else the schedule's value) and _combine, then the
// coefficient vector of _reduce_rows. Keep the three in step.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lift_place_kd(
    const Tensor& x, const Tensor& y, int64_t group_size, c10::string_view grouping, c10::string_view norm,
    double eps, int64_t width, double scale, double num_groups, bool adaptive, double weight_value,
    c10::string_view parts, bool anneal) {
  TORCH_CHECK(parts == "both" || parts == "coarse" || parts == "fine",
              "liftplace: parts must be 'both', 'coarse' or 'fine', got '", std::string(parts), "'");
  auto [slope, intercept, rows, aux, group_id] = call_fwd(x, y, group_size, grouping, norm, eps, width);
  Tensor totals = rows.sum(0);
  if (totals.device().is_cpu()) {
    return AT_DISPATCH_FLOATING_TYPES(totals.scalar_type(), "lift_place_kd", [&] {
      auto [loss, w, cw, coef] = reduce_on_host<scalar_t>(totals, scale, num_groups, adaptive, weight_value, parts,
                                                          anneal);
      return std::make_tuple(loss, totals, w, cw, coef, slope, intercept, aux, group_id);
    });
  }
  Tensor w;
  if (adaptive) {
    Tensor absdev = at::cat({totals.slice(0, kAbsSlopeDev, kAbsIntercept + 1),
                             at::full({1}, num_groups, totals.options())});
    w = at::rsub(((absdev[0] + absdev[1]) / absdev[2]).clamp_max(1.0), 1.0);
  } else {
    w = at::full({}, weight_value, totals.options());
  }
  Tensor coarse = totals[kCoarse] * scale;
  Tensor fine = totals[kFine] * scale;
  Tensor cw = anneal ? at::rsub(w, 1.0) : at::ones_like(w);
  Tensor loss;
  if (parts == "coarse") {
    loss = coarse;
  } else if (parts == "fine") {
    loss = fine;
  } else {
    loss = cw * coarse + w * fine;
  }
  Tensor coef = at::zeros({kRowStats}, rows.options());
  if (parts != "fine") {
    if (parts == "coarse") {
      coef.select(0, kCoarse).fill_(scale);
    } else {
      coef.select(0, kCoarse).copy_(cw * scale);
    }
  }
  if (parts != "coarse") {
    if (parts == "fine") {
      coef.select(0, kFine).fill_(scale);
    } else {
      coef.select(0, kFine).copy_(w * scale);
    }
  }
  return {loss, totals, w, cw, coef, slope, intercept, aux, group_id};
}

std::tuple<Tensor, Tensor> lift_place_kd_bwd(const Tensor& grad, const Tensor& coef, const Tensor& x,
                                             const Tensor& y, const Tensor& slope, const Tensor& intercept,
                                             const Tensor& aux, const Tensor& group_id, int64_t group_size,
                                             c10::string_view grouping, c10::string_view norm, int64_t width,
                                             bool need_grad_y) {
  Tensor grad_rows = (grad * coef).expand({x.size(0), kRowStats}).contiguous();
  return call_bwd(grad_rows, x, y, slope, intercept, aux, group_id, group_size, grouping, norm, width, need_grad_y);
}

using KdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

KdOut call_kd(const Tensor& x, const Tensor& y, int64_t group_size, c10::string_view grouping, c10::string_view norm,
              double eps, int64_t width, double scale, double num_groups, bool adaptive, double weight_value,
              c10::string_view parts, bool anneal) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("liftplace::lift_place_kd", "")
                       .typed<KdOut(const Tensor&, const Tensor&, int64_t, c10::string_view, c10::string_view, double,
                                    int64_t, double, double, bool, double, c10::string_view, bool)>();
  return op.call(x, y, group_size, grouping, norm, eps, width, scale, num_groups, adaptive, weight_value, parts,
                 anneal);
}

// The autograd node of lift_place_kd, in C++ so that a training step's loss costs one node and
// no Python in the backward. Only the loss is differentiable (totals, w and cw are detached
// statistics, METHOD.md §5). Under create_graph=True the backward is the differentiable closed
// form that liftplace/_ops.py registers as liftplace::lift_place_kd_bwd_graph (the twin with
// the fit recomputed over the saved grouping), so double backward is exact on this path too.
struct KdFunction : public torch::autograd::Function<KdFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const Tensor& y, int64_t group_size, c10::string_view grouping,
                                                c10::string_view norm, double eps, int64_t width, double scale,
                                                double num_groups, bool adaptive, double weight_value,
                                                c10::string_view parts, bool anneal) {
    at::AutoDispatchBelowADInplaceOrView below;  // to the kernel above, not back to this node
    auto [loss, totals, w, cw, coef, slope, intercept, aux, group_id] = call_kd(
        x, y, group_size, grouping, norm, eps, width, scale, num_groups, adaptive, weight_value, parts, anneal);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({totals, w, cw, coef, slope, intercept, aux, group_id});
    ctx->save_for_backward({x, y, slope, intercept, aux, group_id, coef});
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["grouping"] = std::string(grouping);
    ctx->saved_data["norm"] = std::string(norm);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["width"] = width;
    return {loss, totals, w, cw, coef, slope, intercept, aux, group_id};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(13);
    const Tensor& grad = grads[0];
    if (!grad.defined()) return out;  // the loss was not used
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_y = ctx->needs_input_grad(1);
    const int64_t group_size = ctx->saved_data["group_size"].toInt(), width = ctx->saved_data["width"].toInt();
    const std::string grouping = ctx->saved_data["grouping"].toStringRef(), norm = ctx->saved_data["norm"].toStringRef();
    std::tuple<Tensor, Tensor> g;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      static auto graph = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("liftplace::lift_place_kd_bwd_graph", "")
                              .typed<std::tuple<Tensor, Tensor>(
                                  const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, const Tensor&, const Tensor&, int64_t, c10::string_view,
                                  c10::string_view, double, int64_t, bool, bool)>();
      g = graph.call(grad, saved[6], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], group_size, grouping,
                     norm, ctx->saved_data["eps"].toDouble(), width, need_x, need_y);
    } else {
      g = lift_place_kd_bwd(grad, saved[6], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], group_size,
                            grouping, norm, width, need_y);
    }
    if (need_x) out[0] = std::get<0>(g);
    if (need_y) out[1] = std::get<1>(g);
    return out;
  }
};

KdOut lift_place_kd_autograd(const Tensor& x, const Tensor& y, int64_t group_size, c10::string_view grouping,
                             c10::string_view norm, double eps, int64_t width, double scale, double num_groups,
                             bool adaptive, double weight_value, c10::string_view parts, bool anneal) {
  auto o = KdFunction::apply(x, y, group_size, grouping, norm, eps, width, scale, num_groups, adaptive, weight_value,
                             parts, anneal);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8]};
}

}  // namespace
}  // namespace liftplace

TORCH_LIBRARY_IMPL(liftplace, CompositeExplicitAutograd, m) {
  m.impl("lift_place_kd", &liftplace::lift_place_kd);
  m.impl("lift_place_kd_bwd", &liftplace::lift_place_kd_bwd);
}

TORCH_LIBRARY_IMPL(liftplace, Autograd, m) { m.impl("lift_place_kd", &liftplace::lift_place_kd_autograd); }
