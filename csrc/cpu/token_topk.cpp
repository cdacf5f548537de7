// Token-choice routing on the CPU: per token the indices of its k largest logits, descending, ties to the lower
// expert index (a partial sort of the row's expert indices). Rows are independent: OpenMP over tokens, each row
// written by one thread, so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "sparsemm/common.h"
#include "sparsemm/ops.h"

namespace sparsemm {
namespace {

template <typename T>
void topk_rows(const T* logits, int64_t n, int64_t e_count, int64_t stride_n, int64_t stride_e, int64_t k,
               int64_t* out) {
#pragma omp parallel
  {
    std::vector<int64_t> order(e_count);
    std::vector<T> row(e_count);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t e = 0; e < e_count; ++e) {
        const T v = logits[t * stride_n + e * stride_e];
        row[e] = std::isnan(v) ? -INFINITY : v;  // NaN (possible only unchecked) ranks last
      }
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
        return row[a] > row[b] || (row[a] == row[b] && a < b);
      });
      std::copy(order.begin(), order.begin() + k, out + t * k);
    }
  }
}

}  // namespace

void token_topk_cpu(std::uintptr_t logits, int dtype, int64_t n, int64_t num_experts, int64_t stride_n,
                    int64_t stride_e, int64_t k, std::uintptr_t out) {
  SPARSEMM_CHECK(n >= 0 && num_experts >= 1, "logits", "sizes must be N >= 0, E >= 1, got ", n, " x ",
                 num_experts);
  SPARSEMM_CHECK(k >= 1 && k <= num_experts, "top_k", "must be in [1, ", num_experts, "], got ", k);
  SPARSEMM_CHECK(dtype == kFloat32 || dtype == kFloat64, "logits", "must be float32 or float64, got ",
                 dtype_name(dtype));
  SPARSEMM_CHECK(n == 0 || (logits != 0 && out != 0), "logits", "pointers must be non-null when N > 0");
  auto* o = reinterpret_cast<int64_t*>(out);
  if (dtype == kFloat32)
    topk_rows(reinterpret_cast<const float*>(logits), n, num_experts, stride_n, stride_e, k, o);
  else
    topk_rows(reinterpret_cast<const double*>(logits), n, num_experts, stride_n, stride_e, k, o);
}

}  // namespace sparsemm
