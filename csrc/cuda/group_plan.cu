// group_plan on the GPU: prepare (keys + iota + histogram) -> inclusive scan of counts -> stable radix sort.
//
// Everything is enqueued on the caller's stream with no host synchronisation and no allocation: scratch
// comes from the caller (a torch uint8 tensor sized by group_plan_cuda_workspace_bytes), which keeps the op
// usable under CUDA-graph capture and free of allocator interplay with torch.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstdint>

#include "sparsemm/common.h"
#include "sparsemm/ops.h"

namespace sparsemm {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; more would only add global atomics from the histogram flush.
constexpr int64_t kMaxBlocks = 2048;
// Groups up to this many get a per-block shared-memory histogram (8 bytes each, 32 KiB).
constexpr int64_t kMaxSharedGroups = 4096;
constexpr size_t kAlign = 256;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Radix-sort keys are uint32 in [0, num_groups): an id outside that range is sorted as the nearest valid
// id (and counted as invalid), so the plan is always a full permutation, and only bit_width(num_groups - 1)
// key bits need sorting whatever the width of the input ids (at least one, so cub always sorts).
int key_bits(int64_t num_groups) {
  int bits = 1;
  while ((int64_t{1} << bits) < num_groups) ++bits;
  return bits;
}

// Grid: min(ceil(n / kThreads), kMaxBlocks) blocks of kThreads, grid-stride over the n ids.
// keys[i] = clamp(ids[i], 0, G-1); iota[i] = i; counts[keys[i]] += 1; invalid += 1 for ids out of range.
template <typename IdT, bool kSharedHist>
__global__ void prepare_kernel(const IdT* __restrict__ ids, int64_t n, int64_t num_groups,
                               uint32_t* __restrict__ keys, int64_t* __restrict__ iota,
                               unsigned long long* __restrict__ counts,
                               unsigned long long* __restrict__ invalid_count) {
  extern __shared__ unsigned long long block_hist[];
  if (kSharedHist) {
    for (int64_t g = threadIdx.x; g < num_groups; g += blockDim.x) block_hist[g] = 0;
    __syncthreads();
  }
  unsigned long long my_invalid = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    const bool valid = id >= 0 && id < num_groups;
    const int64_t key = id < 0 ? 0 : (id >= num_groups ? num_groups - 1 : id);
    keys[i] = static_cast<uint32_t>(key);
    iota[i] = i;
    atomicAdd(kSharedHist ? &block_hist[key] : &counts[key], 1ull);
    if (!valid) ++my_invalid;
  }
  if (my_invalid) atomicAdd(invalid_count, my_invalid);
  if (kSharedHist) {
    __syncthreads();
    for (int64_t g = threadIdx.x; g < num_groups; g += blockDim.x) {
      if (block_hist[g]) atomicAdd(&counts[g], block_hist[g]);
    }
  }
}

// Bytes of cub temp storage for both the scan and the sort (they run one after the other, so they share).
size_t cub_temp_bytes(int64_t n, int64_t num_groups) {
  size_t scan_bytes = 0, sort_bytes = 0;
  CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<const int64_t*>(nullptr),
                                           static_cast<int64_t*>(nullptr), num_groups));
  if (n > 0) {
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), n, 0, key_bits(num_groups)));
  }
  return std::max(scan_bytes, sort_bytes);
}

// Workspace layout: keys_in | keys_out | iota | cub temp, each 256-byte aligned.
struct Workspace {
  size_t keys_in, keys_out, iota, temp, temp_bytes, total;
};

Workspace layout(int64_t n, int64_t num_groups) {
  Workspace w{};
  const size_t n_u = static_cast<size_t>(n);
  w.keys_in = 0;
  w.keys_out = w.keys_in + align_up(n_u * sizeof(uint32_t));
  w.iota = w.keys_out + align_up(n_u * sizeof(uint32_t));
  w.temp = w.iota + align_up(n_u * sizeof(int64_t));
  w.temp_bytes = cub_temp_bytes(n, num_groups);
  w.total = w.temp + align_up(w.temp_bytes);
  return w;
}

void check_sizes(int64_t n, int64_t num_groups, int ids_dtype) {
  SPARSEMM_CHECK(n >= 0, "ids", "length must be >= 0, got ", n);
#if CUB_VERSION < 200500
  // Older cub takes the item count of the radix sort and scan as an int: refuse what it would narrow.
  SPARSEMM_CHECK(n < (int64_t{1} << 31), "ids", "length must be < 2^31 with this CUDA toolkit's cub, got ", n);
#endif
  // Keys are uint32 in [0, num_groups).
  SPARSEMM_CHECK(num_groups >= 1 && num_groups < (int64_t{1} << 31), "num_groups",
                 "must be in [1, 2^31), got ", num_groups);
  SPARSEMM_CHECK(ids_dtype == kInt32 || ids_dtype == kInt64, "ids", "must be int32 or int64, got ",
                 dtype_name(ids_dtype));
}

// Makes this module's CUDA runtime (linked statically, so separate from torch's) current on the device that
// owns `ptr`, and restores the previous device on exit. The Python wrapper's torch.cuda.device() normally
// makes this a no-op; it is here so that a multi-GPU call cannot launch on the wrong device. A pointer the
// runtime cannot classify leaves the current device alone (the launch then reports any real problem).
class DeviceOf {
 public:
  explicit DeviceOf(const void* ptr) {
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
      (void)cudaGetLastError();  // Clear it so the post-launch check does not report it.
      return;
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return;
    CUDA_CHECK(cudaGetDevice(&previous_));
    if (attr.device >= 0 && attr.device != previous_) {
      CUDA_CHECK(cudaSetDevice(attr.device));
      switched_ = true;
    }
  }
  ~DeviceOf() {
    if (switched_) (void)cudaSetDevice(previous_);  // Best effort: a destructor must not throw.
  }
  DeviceOf(const DeviceOf&) = delete;
  DeviceOf& operator=(const DeviceOf&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

template <typename IdT>
void launch_prepare(const void* ids, int64_t n, int64_t num_groups, uint32_t* keys, int64_t* iota,
                    unsigned long long* counts, unsigned long long* invalid, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
  const auto* typed = static_cast<const IdT*>(ids);
  if (num_groups <= kMaxSharedGroups) {
    const size_t smem = static_cast<size_t>(num_groups) * sizeof(unsigned long long);
    prepare_kernel<IdT, true>
        <<<blocks, kThreads, smem, stream>>>(typed, n, num_groups, keys, iota, counts, invalid);
  } else {
    prepare_kernel<IdT, false>
        <<<blocks, kThreads, 0, stream>>>(typed, n, num_groups, keys, iota, counts, invalid);
  }
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int64_t group_plan_cuda_workspace_bytes(int64_t n, int64_t num_groups, int ids_dtype) {
  check_sizes(n, num_groups, ids_dtype);
  return static_cast<int64_t>(layout(n, num_groups).total);
}

void group_plan_cuda(std::uintptr_t ids, int ids_dtype, int64_t n, int64_t num_groups,
                     std::uintptr_t sorted_to_orig, std::uintptr_t counts, std::uintptr_t offsets,
                     std::uintptr_t invalid_count, std::uintptr_t workspace, int64_t workspace_bytes,
                     std::uintptr_t stream) {
  check_sizes(n, num_groups, ids_dtype);
  SPARSEMM_CHECK(counts != 0 && offsets != 0 && invalid_count != 0, "counts",
                 "output pointers must be non-null");
  SPARSEMM_CHECK(n == 0 || (ids != 0 && sorted_to_orig != 0), "ids",
                 "pointers must be non-null when n > 0");
  DeviceOf on_device(reinterpret_cast<const void*>(counts));
  const Workspace w = layout(n, num_groups);
  SPARSEMM_CHECK(workspace_bytes >= static_cast<int64_t>(w.total), "workspace", "needs ", w.total,
                 " bytes for n=", n, " num_groups=", num_groups, ", got ", workspace_bytes);
  SPARSEMM_CHECK(workspace != 0 || w.total == 0, "workspace", "pointer must be non-null");
  SPARSEMM_CHECK(workspace % kAlign == 0, "workspace", "must be ", kAlign, "-byte aligned");

  auto* base = reinterpret_cast<unsigned char*>(workspace);
  auto* keys_in = reinterpret_cast<uint32_t*>(base + w.keys_in);
  auto* keys_out = reinterpret_cast<uint32_t*>(base + w.keys_out);
  auto* iota = reinterpret_cast<int64_t*>(base + w.iota);
  void* temp = base + w.temp;
  size_t temp_bytes = w.temp_bytes;
  auto* cnt = reinterpret_cast<int64_t*>(counts);
  auto* off = reinterpret_cast<int64_t*>(offsets);
  auto st = reinterpret_cast<cudaStream_t>(stream);

  CUDA_CHECK(cudaMemsetAsync(cnt, 0, static_cast<size_t>(num_groups) * sizeof(int64_t), st));
  CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(invalid_count), 0, sizeof(int64_t), st));
  CUDA_CHECK(cudaMemsetAsync(off, 0, sizeof(int64_t), st));
  if (n > 0) {
    auto* ucnt = reinterpret_cast<unsigned long long*>(cnt);
    auto* uinv = reinterpret_cast<unsigned long long*>(invalid_count);
    if (ids_dtype == kInt32) {
      launch_prepare<int32_t>(reinterpret_cast<const void*>(ids), n, num_groups, keys_in, iota, ucnt, uinv, st);
    } else {
      launch_prepare<int64_t>(reinterpret_cast<const void*>(ids), n, num_groups, keys_in, iota, ucnt, uinv, st);
    }
  }
  // offsets[1:] = cumsum(counts); offsets[G] = n since every row is counted in some group.
  CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp, temp_bytes, static_cast<const int64_t*>(cnt), off + 1,
                                           num_groups, st));
  if (n > 0) {
    // LSD radix sort is stable, so rows of one group keep their original order.
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, iota,
                                               reinterpret_cast<int64_t*>(sorted_to_orig), n, 0,
                                               key_bits(num_groups), st));
  }
}

}  // namespace sparsemm
