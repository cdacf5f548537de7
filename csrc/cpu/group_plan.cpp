// group_plan on the CPU: a serial stable counting sort (histogram -> exclusive scan -> placement).
//
// Serial on purpose: the work is O(n) memory traffic with a data-dependent scatter, so threads would buy
// little and would need per-thread histograms to stay stable.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "sparsemm/common.h"
#include "sparsemm/ops.h"

namespace sparsemm {
namespace {

// An id outside [0, num_groups) is sorted as the nearest valid id: it can never index counts or cursor out
// of bounds, and every row still lands in the plan (sorted_to_orig is always a full permutation).
template <typename IdT>
int64_t clamped(IdT id, int64_t num_groups) {
  return std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(id), 0), num_groups - 1);
}

template <typename IdT>
int64_t counting_sort(const IdT* ids, int64_t n, int64_t num_groups, int64_t* sorted_to_orig,
                      int64_t* counts, int64_t* offsets) {
  for (int64_t g = 0; g < num_groups; ++g) counts[g] = 0;
  int64_t first_bad = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    if ((id < 0 || id >= num_groups) && first_bad < 0) first_bad = i;
    ++counts[clamped(ids[i], num_groups)];
  }
  offsets[0] = 0;
  for (int64_t g = 0; g < num_groups; ++g) offsets[g + 1] = offsets[g] + counts[g];

  // Placement in increasing i keeps each group in original order (stability).
  std::vector<int64_t> cursor(offsets, offsets + num_groups);
  for (int64_t i = 0; i < n; ++i) sorted_to_orig[cursor[clamped(ids[i], num_groups)]++] = i;
  return first_bad;
}

}  // namespace

int64_t group_plan_cpu(std::uintptr_t ids, int ids_dtype, int64_t n, int64_t num_groups,
                       std::uintptr_t sorted_to_orig, std::uintptr_t counts, std::uintptr_t offsets) {
  SPARSEMM_CHECK(n >= 0, "ids", "length must be >= 0, got ", n);
  SPARSEMM_CHECK(num_groups >= 1, "num_groups", "must be >= 1, got ", num_groups);
  SPARSEMM_CHECK(counts != 0 && offsets != 0, "counts", "output pointers must be non-null");
  SPARSEMM_CHECK(n == 0 || (ids != 0 && sorted_to_orig != 0), "ids",
                 "pointers must be non-null when n > 0");
  SPARSEMM_CHECK(ids_dtype == kInt32 || ids_dtype == kInt64, "ids", "must be int32 or int64, got ",
                 dtype_name(ids_dtype));
  auto* out = reinterpret_cast<int64_t*>(sorted_to_orig);
  auto* cnt = reinterpret_cast<int64_t*>(counts);
  auto* off = reinterpret_cast<int64_t*>(offsets);
  if (ids_dtype == kInt32)
    return counting_sort(reinterpret_cast<const int32_t*>(ids), n, num_groups, out, cnt, off);
  return counting_sort(reinterpret_cast<const int64_t*>(ids), n, num_groups, out, cnt, off);
}

}  // namespace sparsemm
