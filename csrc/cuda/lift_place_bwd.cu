// Backward: the closed-form gradients of METHOD.md §6, in the centred form of
// _reference.lift_place_bwd. With the grouping fixed (the saved group_id for "error",
// recomputed from the index for "global" / "patch"; never a second sort) every term is
// affine in x_i and y_i per group, so one thread per element needs only its group's saved
// a, b, mean x, mean y, vx + eps and the row's incoming gradients. No reductions: the
// result is the same bits on every run.
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "cuda/common.cuh"

namespace liftplace {
namespace cuda {
namespace {

constexpr int kBwdThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBwdThreads) bwd_kernel(const BwdArgs a) {
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  const scalar_t* y = static_cast<const scalar_t*>(a.y);
  const acc_t* grad_rows = static_cast<const acc_t*>(a.grad_rows);
  const acc_t* grad_slope = static_cast<const acc_t*>(a.grad_slope);
  const acc_t* grad_intercept = static_cast<const acc_t*>(a.grad_intercept);
  const acc_t* slope = static_cast<const acc_t*>(a.slope);
  const acc_t* intercept = static_cast<const acc_t*>(a.intercept);
  const acc_t* aux = static_cast<const acc_t*>(a.aux);
  scalar_t* grad_x = static_cast<scalar_t*>(a.grad_x);
  scalar_t* grad_y = static_cast<scalar_t*>(a.grad_y);

  int side = 1;
  if (a.grouping == kGroupPatch) {
    while ((side + 1) * (side + 1) <= a.group_size) ++side;
  }
  const int tiles_w = a.grouping == kGroupPatch ? a.width / side : 1;
  const int last = a.groups - 1;

  const int64_t total = a.rows * a.n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t row = t / a.n;
    const int i = static_cast<int>(t - row * a.n);
    int g = 0;
    if (a.grouping == kGroupError) {
      g = a.group_id[t];
    } else if (a.grouping == kGroupPatch) {
      const int r = i / a.width, c = i - r * a.width;
      g = (r / side) * tiles_w + c / side;
    }
    // n_g: P, except the last group, which runs to N ("global": one group of N).
    const acc_t cnt = acc_t(g == last ? a.n - last * a.group_size : a.group_size);
    const int64_t rg = row * a.groups + g;
    const acc_t A = slope[rg];
    const acc_t B = intercept[rg];
    const acc_t mx = aux[3 * rg + 0];
    const acc_t my = aux[3 * rg + 1];
    const acc_t d = aux[3 * rg + 2];
    const acc_t* gr = grad_rows + row * kNumCols;

    const acc_t sa = sign_of(A - acc_t(1));
    const acc_t sb = sign_of(B);
    const acc_t da = a.norm == kNormL1 ? sa : acc_t(2) * (A - acc_t(1));
    const acc_t db = a.norm == kNormL1 ? sb : acc_t(2) * B;
    // dL/da and dL/db: through the coarse term, |a-1| / |b| sums, a / b sums, and directly.
    acc_t GA = gr[kColCoarse] * cnt * da + gr[kColAbsSlopeDev] * sa + gr[kColSumSlope];
    acc_t GB = gr[kColCoarse] * cnt * db + gr[kColAbsIntercept] * sb + gr[kColSumIntercept];
    if (grad_slope != nullptr) GA += grad_slope[rg];
    if (grad_intercept != nullptr) GB += grad_intercept[rg];
    const acc_t K = (GA - GB * mx) / (cnt * d);

    const acc_t xi = widen(x[t]);
    const acc_t yi = widen(y[t]);
    const acc_t dx = xi - mx;
    const acc_t dy = yi - my;
    const acc_t r = A * dx - dy;  // fit residual a*x + b - y in centred form
    const acc_t diff = xi - yi;
    const acc_t g_fine = gr[kColFine];
    const acc_t g_sqerr = gr[kColSqErr];
    const acc_t gx = K * (dy - acc_t(2) * A * dx) - GB * A / cnt + acc_t(2) * A * g_fine * r + acc_t(2) * g_sqerr * diff;
    store(grad_x + t, gx);
    if (grad_y != nullptr) {
      const acc_t gy = K * dx + GB / cnt - acc_t(2) * g_fine * r - acc_t(2) * g_sqerr * diff;
      store(grad_y + t, gy);
    }
  }
}

}  // namespace

void launch_bwd(const BwdArgs& a, cudaStream_t stream) {
  const int threads = kBwdThreads;
  const int64_t total = a.rows * a.n;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + threads - 1) / threads, 1 << 16));
  switch (a.dtype) {
    case DType::Half: bwd_kernel<__half, float><<<blocks, threads, 0, stream>>>(a); break;
    case DType::BFloat16: bwd_kernel<__nv_bfloat16, float><<<blocks, threads, 0, stream>>>(a); break;
    case DType::Float: bwd_kernel<float, float><<<blocks, threads, 0, stream>>>(a); break;
    case DType::Double: bwd_kernel<double, double><<<blocks, threads, 0, stream>>>(a); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace liftplace
