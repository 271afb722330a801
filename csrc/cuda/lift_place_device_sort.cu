// Device-wide rankings for "error" grouping when a row does not fit one block's sort
// (N > 16384) and for float64.
//
// float compute: one cub::DeviceRadixSort over composite keys (row << 32 | error bits) for
// all rows at once. A few long rows (e.g. 24 x 65536) then spread over the whole GPU,
// which CUB's segmented sort (one block per segment) cannot do; the row bits add only
// ceil(log2 R) bits to sort. float64: the 63-bit error key leaves no room for the row, so
// cub::DeviceSegmentedRadixSort sorts each row as a segment. Both are stable LSD radix
// sorts over keys built in index order, so ties keep index order; both use DoubleBuffers
// (about N extra items of storage, scratch from torch's caching allocator) and decide
// which buffer holds the result on the host, without synchronising.
#include <c10/cuda/CUDAException.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "cuda/launch.h"

namespace liftplace {
namespace cuda {

int32_t* radix_sort_pairs(void* temp, size_t& temp_bytes, uint64_t* keys0, uint64_t* keys1, int32_t* index0,
                          int32_t* index1, int num_items, int end_bit, cudaStream_t stream) {
  cub::DoubleBuffer<uint64_t> keys(keys0, keys1);
  cub::DoubleBuffer<int32_t> index(index0, index1);
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, index, num_items, 0, end_bit, stream));
  if (temp == nullptr) return nullptr;
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return index.Current();
}

int32_t* segmented_sort_pairs(void* temp, size_t& temp_bytes, uint64_t* keys0, uint64_t* keys1, int32_t* index0,
                              int32_t* index1, int num_items, int num_segments, const int* offsets, int end_bit,
                              cudaStream_t stream) {
  cub::DoubleBuffer<uint64_t> keys(keys0, keys1);
  cub::DoubleBuffer<int32_t> index(index0, index1);
  C10_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(temp, temp_bytes, keys, index, num_items, num_segments,
                                                          offsets, offsets + 1, 0, end_bit, stream));
  if (temp == nullptr) return nullptr;
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return index.Current();
}

}  // namespace cuda
}  // namespace liftplace
