// Backward: the closed-form gradients of METHOD.md §6, in the centred form of
// _reference.lift_place_bwd. With the grouping fixed (the saved group_id for "error",
// recomputed from the index for "global" / "patch"; never a second sort) every term is
// affine in x_i and y_i per group, so one thread per element needs only its group's saved
// a, b, mean x, mean y, vx + eps and the row's incoming gradients. No reductions: the
// result is the same bits on every run.
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>

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

  const Geometry& geo = a.geo;
  const int side = geo.side, tiles_w = geo.width / side;
  const int64_t n = geo.n, total = geo.rows * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t row = t / n;
    const int i = static_cast<int>(t - row * n);
    int g = 0;
    if (geo.grouping == Grouping::Error) {
      g = a.group_id[t];
      // A foreign group id (not from lift_place_fwd for these x, y) is never used as an
      // index: it trips a device-side assert (reported by the next synchronising CUDA
      // call, as torch's own index kernels do; no host sync here), and where asserts are
      // compiled out the element's gradients become NaN.
      if (g < 0 || g >= geo.groups) {
        CUDA_KERNEL_ASSERT_MSG(false, "liftplace: lift_place_bwd got a group_id outside [0, G); pass the group_id "
                                      "that lift_place_fwd returned for these x and y");
        const acc_t nan = acc_t(NAN);
        store(grad_x + t, nan);
        if (grad_y != nullptr) store(grad_y + t, nan);
        continue;
      }
    } else if (geo.grouping == Grouping::Patch) {
      const int r = i / geo.width, c = i - r * geo.width;
      g = (r / side) * tiles_w + c / side;
    }
    const acc_t cnt = acc_t(group_len<int64_t>(g, geo.groups, n, geo.span));
    const int64_t rg = row * geo.groups + g;
    const acc_t A = slope[rg];
    const acc_t B = intercept[rg];
    const acc_t mx = aux[aux_at(rg, kMeanX)];
    const acc_t my = aux[aux_at(rg, kMeanY)];
    const acc_t d = aux[aux_at(rg, kDenom)];
    const acc_t* gr = grad_rows + row * kRowStats;

    const acc_t sa = sign_of(A - acc_t(1));
    const acc_t sb = sign_of(B);
    const acc_t da = geo.norm == Norm::L1 ? sa : acc_t(2) * (A - acc_t(1));
    const acc_t db = geo.norm == Norm::L1 ? sb : acc_t(2) * B;
    // dL/da and dL/db: through the coarse term, |a-1| / |b| sums, a / b sums, and directly.
    acc_t GA = gr[kCoarse] * cnt * da + gr[kAbsSlopeDev] * sa + gr[kSumSlope];
    acc_t GB = gr[kCoarse] * cnt * db + gr[kAbsIntercept] * sb + gr[kSumIntercept];
    if (grad_slope != nullptr) GA += grad_slope[rg];
    if (grad_intercept != nullptr) GB += grad_intercept[rg];
    const acc_t K = (GA - GB * mx) / (cnt * d);

    const acc_t xi = widen(x[t]);
    const acc_t yi = widen(y[t]);
    const acc_t dx = xi - mx;
    const acc_t dy = yi - my;
    const acc_t r = A * dx - dy;  // fit residual a*x + b - y in centred form
    const acc_t diff = xi - yi;
    const acc_t g_fine = gr[kFine];
    const acc_t g_sqerr = gr[kSqErr];
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
  const int64_t total = a.geo.rows * a.geo.n;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + threads - 1) / threads, 1 << 16));
  with_scalar_type(a.dtype, [&](auto tag) {
    using scalar_t = LIFTPLACE_SCALAR_T(tag);
    bwd_kernel<scalar_t, acc_type<scalar_t>><<<blocks, threads, 0, stream>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace liftplace
