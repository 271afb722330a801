// Every liftplace op schema, in one place. Kernels register per device in csrc/cpu and
// csrc/cuda; autograd and fake (meta) kernels are attached in liftplace/_ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import liftplace._C` only has to load this library so the registrations run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(liftplace, m) {
  // x, y: [R, N] contiguous, same dtype. Returns
  //   slope, intercept [R, G]; rows [R, 7] (see RowStat); aux [R, G, 3] (see AuxStat);
  //   group_id [R, N] int32 for grouping="error", else an empty int32 tensor.
  // Floating outputs are float32, or float64 for float64 inputs.
  m.def(
      "lift_place_fwd(Tensor x, Tensor y, int group_size, str grouping, str norm, float eps, int width)"
      " -> (Tensor slope, Tensor intercept, Tensor rows, Tensor aux, Tensor group_id)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of (slope, intercept, rows) pulled back to x and y through the saved grouping.
  // grad_y is empty unless need_grad_y.
  m.def(
      "lift_place_bwd(Tensor grad_rows, Tensor? grad_slope, Tensor? grad_intercept, Tensor x, Tensor y,"
      " Tensor slope, Tensor intercept, Tensor aux, Tensor group_id, int group_size, str grouping,"
      " str norm, int width, bool need_grad_y) -> (Tensor grad_x, Tensor grad_y)",
      {at::Tag::pt2_compliant_tag});
  // The whole loss of one call without timestep buckets (csrc/kd.cpp; loss.py's eager fast
  // path): lift_place_fwd, then the reduction of loss.py's _reduce_rows. weight_value is the
  // fine weight unless adaptive; coef is d loss / d rows[r] for every row. Only loss is
  // differentiable (in x and y); its autograd node is C++ (kd.cpp), lift_place_kd_bwd its backward.
  m.def(
      "lift_place_kd(Tensor x, Tensor y, int group_size, str grouping, str norm, float eps, int width,"
      " float scale, float num_groups, bool adaptive, float weight_value, str parts, bool anneal)"
      " -> (Tensor loss, Tensor totals, Tensor w, Tensor cw, Tensor coef, Tensor slope, Tensor intercept,"
      " Tensor aux, Tensor group_id)",
      {at::Tag::pt2_compliant_tag});
  // grad_x (and grad_y if need_grad_y) of lift_place_kd's loss for the loss gradient grad.
  m.def(
      "lift_place_kd_bwd(Tensor grad, Tensor coef, Tensor x, Tensor y, Tensor slope, Tensor intercept,"
      " Tensor aux, Tensor group_id, int group_size, str grouping, str norm, int width, bool need_grad_y)"
      " -> (Tensor grad_x, Tensor grad_y)",
      {at::Tag::pt2_compliant_tag});
  // Under create_graph=True lift_place_kd's backward calls the differentiable closed form
  // liftplace/_ops.py implements (CompositeImplicitAutograd, the twin over the saved grouping).
  m.def(
      "lift_place_kd_bwd_graph(Tensor grad, Tensor coef, Tensor x, Tensor y, Tensor slope, Tensor intercept,"
      " Tensor aux, Tensor group_id, int group_size, str grouping, str norm, float eps, int width,"
      " bool need_grad_x, bool need_grad_y) -> (Tensor grad_x, Tensor grad_y)");
  // Per-timestep-bucket sums of per-sample statistics (METHOD.md §8), in sample order.
  // values [B, S] float; timesteps [B] (integer or floating); bucket k = floor(t * K / t_max)
  // clamped to [0, K). Returns sums [K, S] (float32, or float64 for float64 values) and
  // counts [K] int64, and each sample's bucket [B] int64. Not differentiable: it feeds
  // detached weights and logs.
  m.def(
      "bucket_stats(Tensor values, Tensor timesteps, int num_buckets, float t_max)"
      " -> (Tensor sums, Tensor counts, Tensor bucket)",
      {at::Tag::pt2_compliant_tag});
}
