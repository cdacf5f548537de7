// Expert-choice routing on the CPU: a segmented top-k, one expert per task.
//
// Expert e takes its need_e = min(k, limit[e]) eligible tokens ranked highest by (score descending, token
// ascending): the eligible tokens of its column are collected, std::nth_element puts the need_e best first
// (expected linear time, no full sort), and only those are sorted by token index. Each expert's row is
// written by one thread and depends on its column alone, so the output is identical for any thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "sparsemm/common.h"
#include "sparsemm/ops.h"

namespace sparsemm {
namespace {

template <typename T>
void route_expert(const T* scores, int64_t n, int64_t stride_n, const uint8_t* mask, int64_t mask_stride_n,
                  int64_t need, int64_t capacity, int64_t* out, std::vector<std::pair<T, int64_t>>& cand) {
  cand.clear();
  for (int64_t t = 0; t < n; ++t) {
    const T s = scores[t * stride_n];
    // NaN and -inf are never eligible (as the torch backend); -0.0 == +0.0 compares as a tie.
    if (std::isnan(s) || s == -INFINITY) continue;
    if (mask != nullptr && mask[t * mask_stride_n] == 0) continue;
    cand.emplace_back(s, t);
  }
  const auto better = [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  const int64_t take = std::min<int64_t>(need, static_cast<int64_t>(cand.size()));
  if (take < static_cast<int64_t>(cand.size()))
    std::nth_element(cand.begin(), cand.begin() + take, cand.end(), better);
  std::vector<int64_t> chosen(take);
  for (int64_t j = 0; j < take; ++j) chosen[j] = cand[j].second;
  std::sort(chosen.begin(), chosen.end());
  for (int64_t j = 0; j < take; ++j) out[j] = chosen[j];
  for (int64_t j = take; j < capacity; ++j) out[j] = -1;
}

template <typename T>
void route_all(const T* scores, int64_t n, int64_t e_count, int64_t stride_n, int64_t stride_e,
               const uint8_t* mask, int mask_mode, int64_t mask_stride_n, int64_t mask_stride_e,
               const int64_t* limit, int64_t capacity, int64_t* out) {
  const int64_t k = std::min(capacity, n);
#pragma omp parallel
  {
    std::vector<std::pair<T, int64_t>> cand;  // per thread, reused across its experts
#pragma omp for schedule(dynamic, 1)
    for (int64_t e = 0; e < e_count; ++e) {
      int64_t need = k;
      if (limit != nullptr) need = std::max<int64_t>(std::min(need, limit[e]), 0);
      const uint8_t* m = mask_mode == 0 ? nullptr : (mask_mode == 1 ? mask : mask + e * mask_stride_e);
      route_expert(scores + e * stride_e, n, stride_n, m, mask_stride_n, need, capacity, out + e * capacity,
                   cand);
    }
  }
}

}  // namespace

void expert_choice_cpu(std::uintptr_t scores, int dtype, int64_t n, int64_t num_experts, int64_t stride_n,
                       int64_t stride_e, std::uintptr_t mask, int mask_mode, int64_t mask_stride_n,
                       int64_t mask_stride_e, std::uintptr_t limit, int64_t capacity, std::uintptr_t out) {
  SPARSEMM_CHECK(n >= 0 && num_experts >= 0, "scores", "sizes must be >= 0, got ", n, " x ", num_experts);
  SPARSEMM_CHECK(capacity >= 0, "capacity", "must be >= 0, got ", capacity);
  SPARSEMM_CHECK(dtype == kFloat32 || dtype == kFloat64, "scores", "must be float32 or float64, got ",
                 dtype_name(dtype));
  SPARSEMM_CHECK(mask_mode >= 0 && mask_mode <= 2, "token_mask", "mode must be 0, 1 or 2, got ", mask_mode);
  SPARSEMM_CHECK(mask_mode == 0 || n == 0 || mask != 0, "token_mask", "pointer must be non-null");
  SPARSEMM_CHECK(num_experts * capacity == 0 || out != 0, "out", "pointer must be non-null");
  SPARSEMM_CHECK(n == 0 || num_experts == 0 || scores != 0, "scores", "pointer must be non-null");
  const auto* m = reinterpret_cast<const uint8_t*>(mask);
  const auto* lim = reinterpret_cast<const int64_t*>(limit);
  auto* o = reinterpret_cast<int64_t*>(out);
  if (dtype == kFloat32)
    route_all(reinterpret_cast<const float*>(scores), n, num_experts, stride_n, stride_e, m, mask_mode,
              mask_stride_n, mask_stride_e, lim, capacity, o);
  else
    route_all(reinterpret_cast<const double*>(scores), n, num_experts, stride_n, stride_e, m, mask_mode,
              mask_stride_n, mask_stride_e, lim, capacity, o);
}

}  // namespace sparsemm
