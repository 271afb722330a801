// "error" grouping for rows up to 16384 elements: one block per row ranks the row with
// cub::BlockRadixSort in shared memory and goes straight on to the fit (one kernel).
//
// Why this algorithm for these lengths: a row of <= 16384 (key, index) pairs fits a
// block's registers and shared memory, so the whole ranking costs one read of x and y and
// never touches global memory; the sort is integer-only (deterministic) and stable, so
// ties keep index order exactly as the reference's stable torch.sort. The 31-bit error
// keys need 8 passes of 4-bit digits. Longer rows (and float64, whose 63-bit keys would
// double the shared memory) go to the device-wide radix sort (lift_place_device_sort.cu), which
// parallelises one long row over many blocks.
#include <c10/cuda/CUDAException.h>
#include <cub/block/block_radix_sort.cuh>

#include <type_traits>

#include "cuda/lift_place_fit.cuh"

namespace liftplace {
namespace cuda {
namespace {

constexpr size_t round_up16(size_t v) { return (v + 15) / 16 * 16; }

template <int kThreads, int kItems>
struct SortConfig {
  using Sort = cub::BlockRadixSort<uint32_t, kThreads, kItems, int32_t>;
  static constexpr int kCapacity = kThreads * kItems;
  // The sort's temporary storage and, once sorted, the row's order share the same bytes.
  static constexpr size_t kSortBytes = sizeof(typename Sort::TempStorage);
  static constexpr size_t kOrderBytes = sizeof(int32_t) * kCapacity;
  static constexpr size_t kScratchOffset = round_up16(kSortBytes > kOrderBytes ? kSortBytes : kOrderBytes);
  static constexpr size_t kSmemBytes = kScratchOffset + sizeof(float) * kRowStats * 32;
};

// Keys in the blocked arrangement (thread t holds elements t*kItems ... t*kItems+kItems-1):
// the order BlockRadixSort keeps for equal keys, so ties stay in index order. Slots past
// the row get a key above every real one (0xffffffff > the NaN key 0x7fffffff) and sort last.
template <typename scalar_t, int kItems>
__device__ __forceinline__ void load_keys(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int n,
                                          uint32_t (&keys)[kItems]) {
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = threadIdx.x * kItems + j;
    keys[j] = i < n ? error_key(widen(x[i]), widen(y[i])) : 0xffffffffu;
  }
}

template <int kThreads, int kItems>
__global__ void __launch_bounds__(kThreads) sort_fit_kernel(const FwdArgs a) {
  using Cfg = SortConfig<kThreads, kItems>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Geometry& geo = a.geo;
  const int64_t row = blockIdx.x;
  const int64_t off = row * geo.n;

  uint32_t keys[kItems];
  int32_t index[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) index[j] = threadIdx.x * kItems + j;
  with_scalar_type_for<float>(a.dtype, [&](auto tag) {
    using scalar_t = LIFTPLACE_SCALAR_T(tag);
    load_keys<scalar_t, kItems>(static_cast<const scalar_t*>(a.x) + off, static_cast<const scalar_t*>(a.y) + off,
                                geo.n, keys);
  });

  typename Cfg::Sort(*reinterpret_cast<typename Cfg::Sort::TempStorage*>(smem)).Sort(keys, index, 0, 32);
  __syncthreads();  // the temporary storage becomes the order array

  // Sorted output is blocked too: thread t holds ranks t*kItems ... t*kItems+kItems-1.
  int32_t* order = reinterpret_cast<int32_t*>(smem);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int k = threadIdx.x * kItems + j;
    if (k < geo.n) order[k] = index[j];
  }
  __syncthreads();

  float* scratch = reinterpret_cast<float*>(smem + Cfg::kScratchOffset);
  const RowMap map = make_row_map(geo, order);
  float* slope = static_cast<float*>(a.slope) + row * geo.groups;
  float* intercept = static_cast<float*>(a.intercept) + row * geo.groups;
  float* aux = static_cast<float*>(a.aux) + row * geo.groups * kAux;
  float* row_stats = static_cast<float*>(a.row_stats) + row * kRowStats;
  int32_t* group_id = a.group_id + off;
  with_scalar_type_for<float>(a.dtype, [&](auto tag) {
    using scalar_t = LIFTPLACE_SCALAR_T(tag);
    fit_row<scalar_t, float>(static_cast<const scalar_t*>(a.x) + off, static_cast<const scalar_t*>(a.y) + off, map,
                             geo, static_cast<float>(a.eps), slope, intercept, aux, row_stats, group_id, scratch);
  });
}

template <int kThreads, int kItems>
bool fits_device(int max_smem_optin) {
  return SortConfig<kThreads, kItems>::kSmemBytes <= static_cast<size_t>(max_smem_optin);
}

template <int kThreads, int kItems>
void launch(const FwdArgs& a, cudaStream_t stream) {
  constexpr size_t smem = SortConfig<kThreads, kItems>::kSmemBytes;
  auto kernel = sort_fit_kernel<kThreads, kItems>;
  if (smem > 48 * 1024) {
    // Above 48 KiB a kernel must opt in to dynamic shared memory (a host-side attribute,
    // no synchronisation).
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(a.geo.rows), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool launch_block_sort_fit(const FwdArgs& a, cudaStream_t stream) {
  if (acc_dtype(a.dtype) == DType::Double || a.geo.n > 16384) return false;
  int device = 0, max_smem_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // Three block sizes, so that a row of more than 512 elements sorts at most 4x its length
  // in padded slots; the 1024 x 16 size needs ~67 KiB of shared memory (every listed arch
  // has >= 99 KiB per block; a device with less falls back to the device-wide sort).
  if (a.geo.n <= 2048) {
    launch<256, 8>(a, stream);
  } else if (a.geo.n <= 8192 && fits_device<512, 16>(max_smem_optin)) {
    launch<512, 16>(a, stream);
  } else if (fits_device<1024, 16>(max_smem_optin)) {
    launch<1024, 16>(a, stream);
  } else {
    return false;
  }
  return true;
}

}  // namespace cuda
}  // namespace liftplace
