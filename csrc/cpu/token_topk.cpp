// Token-choice routing on the CPU: per token the indices of its k largest logits, descending, ties to the lower
// expert index (a partial sort of the row's expert indices). Rows are independent: OpenMP over tokens, each row
// written by one thread, so the result does not depend on the thread count.
//
// token_choice_plan_cpu fuses the rest of a token-choice layer's routing: the softmax gates over the k chosen
// logits and the stable counting sort of the n * k (token, expert) pairs p = t * k + j by expert. Tokens are cut
// into fixed blocks (kTokenBlock, not the thread count: the same work split on any machine); each block counts
// its experts while it chooses them, a serial scan over (expert, block) gives each block its first slot per
// expert, and each block then places its pairs in increasing p. That is the stable sort whatever the thread
// count, with no atomics.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "sparsemm/common.h"
#include "sparsemm/ops.h"

namespace sparsemm {
namespace {

constexpr int64_t kTokenBlock = 256;

// Row t's k best experts into order[0..k): row and order are the calling thread's scratch of length E.
template <typename T>
void top_k_of_row(const T* logits, int64_t t, int64_t e_count, int64_t stride_n, int64_t stride_e, int64_t k,
                  std::vector<T>& row, std::vector<int64_t>& order) {
  for (int64_t e = 0; e < e_count; ++e) {
    const T v = logits[t * stride_n + e * stride_e];
    row[e] = std::isnan(v) ? -INFINITY : v;  // NaN (possible only unchecked) ranks last
  }
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
    return row[a] > row[b] || (row[a] == row[b] && a < b);
  });
}

template <typename T>
void topk_rows(const T* logits, int64_t n, int64_t e_count, int64_t stride_n, int64_t stride_e, int64_t k,
               int64_t* out) {
#pragma omp parallel
  {
    std::vector<int64_t> order(e_count);
    std::vector<T> row(e_count);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
      top_k_of_row(logits, t, e_count, stride_n, stride_e, k, row, order);
      std::copy(order.begin(), order.begin() + k, out + t * k);
    }
  }
}

template <typename T>
void route_rows(const T* logits, int64_t n, int64_t e_count, int64_t stride_n, int64_t stride_e, int64_t k,
                int64_t* idx, T* gates, int64_t* sorted_to_orig, int64_t* slots, int64_t* counts,
                int64_t* offsets, int64_t* orig_to_sorted) {
  const int64_t blocks = (n + kTokenBlock - 1) / kTokenBlock;
  std::vector<int64_t> hist(static_cast<size_t>(blocks * e_count), 0);  // [block, expert]
#pragma omp parallel
  {
    std::vector<int64_t> order(e_count);
    std::vector<T> row(e_count);
    std::vector<double> w(k);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      int64_t* h = hist.data() + b * e_count;
      for (int64_t t = b * kTokenBlock; t < std::min(n, (b + 1) * kTokenBlock); ++t) {
        top_k_of_row(logits, t, e_count, stride_n, stride_e, k, row, order);
        // Softmax in double over the chosen logits, shifted by the first (the largest).
        const double top = static_cast<double>(row[order[0]]);
        double sum = 0.0;
        for (int64_t j = 0; j < k; ++j) sum += (w[j] = std::exp(static_cast<double>(row[order[j]]) - top));
        for (int64_t j = 0; j < k; ++j) {
          idx[t * k + j] = order[j];
          gates[t * k + j] = static_cast<T>(w[j] / sum);
          ++h[order[j]];
        }
      }
    }
  }
  // Exclusive scan, expert-major then block: hist[b][e] becomes block b's first slot for expert e.
  offsets[0] = 0;
  for (int64_t e = 0; e < e_count; ++e) {
    int64_t run = offsets[e];
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c = hist[b * e_count + e];
      hist[b * e_count + e] = run;
      run += c;
    }
    counts[e] = run - offsets[e];
    offsets[e + 1] = run;
  }
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t* cursor = hist.data() + b * e_count;
    for (int64_t p = b * kTokenBlock * k; p < std::min(n, (b + 1) * kTokenBlock) * k; ++p) {
      const int64_t pos = cursor[idx[p]]++;  // increasing p within the block: stable
      sorted_to_orig[pos] = p;
      slots[pos] = p / k;
      orig_to_sorted[p] = pos;
    }
  }
}

void check_route_args(std::uintptr_t logits, int dtype, int64_t n, int64_t num_experts, int64_t k,
                      std::uintptr_t out) {
  SPARSEMM_CHECK(n >= 0 && num_experts >= 1, "logits", "sizes must be N >= 0, E >= 1, got ", n, " x ",
                 num_experts);
  SPARSEMM_CHECK(k >= 1 && k <= num_experts, "top_k", "must be in [1, ", num_experts, "], got ", k);
  SPARSEMM_CHECK(dtype == kFloat32 || dtype == kFloat64, "logits", "must be float32 or float64, got ",
                 dtype_name(dtype));
  SPARSEMM_CHECK(n == 0 || (logits != 0 && out != 0), "logits", "pointers must be non-null when N > 0");
}

}  // namespace

void token_topk_cpu(std::uintptr_t logits, int dtype, int64_t n, int64_t num_experts, int64_t stride_n,
                    int64_t stride_e, int64_t k, std::uintptr_t out) {
  check_route_args(logits, dtype, n, num_experts, k, out);
  auto* o = reinterpret_cast<int64_t*>(out);
  if (dtype == kFloat32)
    topk_rows(reinterpret_cast<const float*>(logits), n, num_experts, stride_n, stride_e, k, o);
  else
    topk_rows(reinterpret_cast<const double*>(logits), n, num_experts, stride_n, stride_e, k, o);
}

void token_choice_plan_cpu(std::uintptr_t logits, int dtype, int64_t n, int64_t num_experts, int64_t stride_n,
                           int64_t stride_e, int64_t k, std::uintptr_t expert_idx, std::uintptr_t gates,
                           std::uintptr_t sorted_to_orig, std::uintptr_t slots, std::uintptr_t counts,
                           std::uintptr_t offsets, std::uintptr_t orig_to_sorted) {
  check_route_args(logits, dtype, n, num_experts, k, expert_idx);
  SPARSEMM_CHECK(counts != 0 && offsets != 0, "counts", "output pointers must be non-null");
  SPARSEMM_CHECK(n == 0 || (gates != 0 && sorted_to_orig != 0 && slots != 0 && orig_to_sorted != 0), "gates",
                 "output pointers must be non-null when N > 0");
  auto* idx = reinterpret_cast<int64_t*>(expert_idx);
  auto* s2o = reinterpret_cast<int64_t*>(sorted_to_orig);
  auto* sl = reinterpret_cast<int64_t*>(slots);
  auto* cnt = reinterpret_cast<int64_t*>(counts);
  auto* off = reinterpret_cast<int64_t*>(offsets);
  auto* o2s = reinterpret_cast<int64_t*>(orig_to_sorted);
  if (dtype == kFloat32)
    route_rows(reinterpret_cast<const float*>(logits), n, num_experts, stride_n, stride_e, k, idx,
               reinterpret_cast<float*>(gates), s2o, sl, cnt, off, o2s);
  else
    route_rows(reinterpret_cast<const double*>(logits), n, num_experts, stride_n, stride_e, k, idx,
               reinterpret_cast<double*>(gates), s2o, sl, cnt, off, o2s);
}

}  // namespace sparsemm
