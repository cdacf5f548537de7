// Per-group RMSNorm / LayerNorm on the CPU, forward and backward, one pass over the rows each.
//
// Row r of D values belongs to group g = ids[r / heads] (clamped into [0, G)) when ids is given, else to the
// group whose offsets range holds r (a plan's sorted rows). The forward writes y and the row statistics the
// backward reuses; the backward writes dx and the weight (and bias) gradients. ATen's own rms_norm backward is
// a chain of elementwise ops, each a pass over the whole tensor with a fresh allocation: these read each row
// once while it sits in L1.
//
// Weight gradients are summed per fixed chunk of rows (the chunking depends on the sizes only, never on the
// thread count) in double, then the chunks are added in order: the result is the same on any machine.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "sparsemm/common.h"
#include "sparsemm/ops.h"

namespace sparsemm {
namespace {

constexpr int64_t kRowsPerChunk = 256;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kPartialBudgetBytes = int64_t{64} << 20;  // per-chunk weight-gradient partials, in all
constexpr int64_t kParallelMinElements = int64_t{1} << 15;  // below this, OpenMP's fork costs more than it saves

// Statistics are accumulated in float for float rows (16 vector lanes of partial sums), double for double.
template <typename T>
struct Norm {
  const T* x;
  int64_t x_stride;
  const T* w;
  const T* b;
  const int64_t* ids;
  const int64_t* offsets;
  int64_t heads, rows, dim, groups;
  bool is_rms;

  int64_t group_of(int64_t r) const {
    int64_t g;
    if (ids != nullptr) {
      g = ids[r / heads];
    } else {  // the first g whose range ends past r
      g = std::upper_bound(offsets + 1, offsets + groups + 1, r) - (offsets + 1);
    }
    return std::min<int64_t>(std::max<int64_t>(g, 0), groups - 1);
  }
};

template <typename T>
void forward_rows(const Norm<T>& p, double eps, T* y, T* mean_out, T* rstd_out) {
  const int64_t D = p.dim;
  const T inv_d = T(1) / T(D);
#pragma omp parallel for schedule(static) if (p.rows * D >= kParallelMinElements)
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* __restrict xr = p.x + r * p.x_stride;
    T* __restrict yr = y + r * D;
    const int64_t g = p.group_of(r);
    const T* __restrict w = p.w + g * D;
    T mean = 0;
    if (!p.is_rms) {
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += xr[d];
      mean = s * inv_d;
    }
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += (xr[d] - mean) * (xr[d] - mean);
    const T rstd = T(1) / std::sqrt(ss * inv_d + T(eps));
    if (p.b != nullptr) {
      const T* __restrict bg = p.b + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yr[d] = (xr[d] - mean) * rstd * w[d] + bg[d];
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yr[d] = (xr[d] - mean) * rstd * w[d];
    }
    if (!p.is_rms) mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

template <typename T>
void backward_rows(const Norm<T>& p, const T* dy, int64_t dy_stride, const T* mean_in, const T* rstd_in, T* dx,
                   T* dw, T* db) {
  const int64_t D = p.dim, G = p.groups;
  const T inv_d = T(1) / T(D);
  const bool need_w = dw != nullptr, need_b = db != nullptr;
  // Fixed chunks of rows, each with its own double partial sums of dW (and db) per group; without weight
  // gradients nothing is summed across rows and every 256-row block is a chunk of its own.
  int64_t chunks = std::max<int64_t>(1, (p.rows + kRowsPerChunk - 1) / kRowsPerChunk);
  if (need_w || need_b) {
    const int64_t per_chunk = G * D * int64_t(sizeof(double)) * (need_w + need_b);
    chunks = std::max<int64_t>(1, std::min({kMaxChunks, chunks, kPartialBudgetBytes / per_chunk}));
  }
  const int64_t rows_per_chunk = (p.rows + chunks - 1) / chunks;
  std::vector<double> part_w(need_w ? chunks * G * D : 0), part_b(need_b ? chunks * G * D : 0);
  std::vector<char> touched(chunks * G, 0);

#pragma omp parallel for schedule(static) if (p.rows * D >= kParallelMinElements)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r_end = std::min(p.rows, (c + 1) * rows_per_chunk);
    for (int64_t r = c * rows_per_chunk; r < r_end; ++r) {
      const T* __restrict xr = p.x + r * p.x_stride;
      const T* __restrict dyr = dy + r * dy_stride;
      const int64_t g = p.group_of(r);
      const T* __restrict w = p.w + g * D;
      const T mean = p.is_rms ? T(0) : mean_in[r];
      const T rstd = rstd_in[r];
      touched[c * G + g] = 1;
      if (dx != nullptr) {
        T c1 = 0, c2 = 0;  // mean of (dy w) x_hat, mean of dy w
#pragma omp simd reduction(+ : c1, c2)
        for (int64_t d = 0; d < D; ++d) {
          const T gd = dyr[d] * w[d];
          c1 += gd * (xr[d] - mean) * rstd;
          c2 += gd;
        }
        c1 *= inv_d;
        c2 = p.is_rms ? T(0) : c2 * inv_d;
        T* __restrict dxr = dx + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dxr[d] = rstd * (dyr[d] * w[d] - (xr[d] - mean) * rstd * c1 - c2);
      }
      if (need_w) {
        double* __restrict pw = part_w.data() + (c * G + g) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) pw[d] += double(dyr[d] * ((xr[d] - mean) * rstd));
      }
      if (need_b) {
        double* __restrict pb = part_b.data() + (c * G + g) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) pb[d] += double(dyr[d]);
      }
    }
  }

  // Chunks in order, so the sums do not depend on the thread count; a group no row of which exists gets zeros.
  for (int pass = 0; pass < 2; ++pass) {
    T* out = pass == 0 ? dw : db;
    const std::vector<double>& part = pass == 0 ? part_w : part_b;
    if (out == nullptr) continue;
#pragma omp parallel for schedule(static) if (G * D * chunks >= kParallelMinElements)
    for (int64_t i = 0; i < G * D; ++i) {
      const int64_t g = i / D;
      double s = 0;
      for (int64_t c = 0; c < chunks; ++c)
        if (touched[c * G + g]) s += part[c * G * D + i];
      out[i] = T(s);
    }
  }
}

template <typename T>
Norm<T> make_norm(std::uintptr_t x, int64_t x_stride, std::uintptr_t w, std::uintptr_t b, std::uintptr_t ids,
                  std::uintptr_t offsets, int64_t heads, int64_t rows, int64_t dim, int64_t groups, bool is_rms) {
  return Norm<T>{reinterpret_cast<const T*>(x), x_stride, reinterpret_cast<const T*>(w),
                 reinterpret_cast<const T*>(b), reinterpret_cast<const int64_t*>(ids),
                 reinterpret_cast<const int64_t*>(offsets), heads, rows, dim, groups, is_rms};
}

void check_common(std::uintptr_t x, int64_t x_stride, std::uintptr_t w, std::uintptr_t ids, std::uintptr_t offsets,
                  int64_t heads, int64_t rows, int64_t dim, int64_t groups, int dtype) {
  SPARSEMM_CHECK(dtype == kFloat32 || dtype == kFloat64, "dtype", "float32 or float64 expected, got ",
                 dtype_name(dtype));
  SPARSEMM_CHECK(rows >= 0 && dim >= 1, "x", "needs rows >= 0 and dim >= 1, got ", rows, " x ", dim);
  SPARSEMM_CHECK(groups >= 1, "weight", "needs at least one group, got ", groups);
  SPARSEMM_CHECK(x_stride >= 0, "x", "row stride ", x_stride, " is negative");
  SPARSEMM_CHECK((ids != 0) != (offsets != 0), "ids", "exactly one of ids and offsets must be given");
  SPARSEMM_CHECK(ids == 0 || (heads >= 1 && rows % heads == 0), "heads", "must divide rows, got ", heads);
  SPARSEMM_CHECK(rows == 0 || (x != 0 && w != 0), "x", "null pointer");
  if (offsets != 0 && rows > 0) {
    const int64_t* off = reinterpret_cast<const int64_t*>(offsets);
    SPARSEMM_CHECK(off[0] == 0 && off[groups] == rows, "offsets", "must start at 0 and end at rows = ", rows);
    for (int64_t g = 0; g < groups; ++g)
      SPARSEMM_CHECK(off[g] <= off[g + 1], "offsets", "must be non-decreasing (offsets[", g, "] > offsets[",
                     g + 1, "])");
  }
}

}  // namespace

void group_norm_fwd_cpu(std::uintptr_t x, int64_t x_stride_row, std::uintptr_t weight, std::uintptr_t bias,
                        std::uintptr_t ids, std::uintptr_t offsets, int64_t heads, int64_t num_rows, int64_t dim,
                        int64_t num_groups, double eps, bool is_rms, std::uintptr_t y, std::uintptr_t mean,
                        std::uintptr_t rstd, int dtype) {
  check_common(x, x_stride_row, weight, ids, offsets, heads, num_rows, dim, num_groups, dtype);
  SPARSEMM_CHECK(num_rows == 0 || (y != 0 && rstd != 0 && (is_rms || mean != 0)), "y", "null output pointer");
  if (num_rows == 0) return;
  if (dtype == kFloat32) {
    forward_rows(make_norm<float>(x, x_stride_row, weight, bias, ids, offsets, heads, num_rows, dim, num_groups,
                                  is_rms),
                 eps, reinterpret_cast<float*>(y), reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd));
  } else {
    forward_rows(make_norm<double>(x, x_stride_row, weight, bias, ids, offsets, heads, num_rows, dim, num_groups,
                                   is_rms),
                 eps, reinterpret_cast<double*>(y), reinterpret_cast<double*>(mean),
                 reinterpret_cast<double*>(rstd));
  }
}

void group_norm_bwd_cpu(std::uintptr_t dy, int64_t dy_stride_row, std::uintptr_t x, int64_t x_stride_row,
                        std::uintptr_t weight, std::uintptr_t ids, std::uintptr_t offsets, int64_t heads,
                        int64_t num_rows, int64_t dim, int64_t num_groups, bool is_rms, std::uintptr_t mean,
                        std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias,
                        int dtype) {
  check_common(x, x_stride_row, weight, ids, offsets, heads, num_rows, dim, num_groups, dtype);
  SPARSEMM_CHECK(dy_stride_row >= 0, "dy", "row stride ", dy_stride_row, " is negative");
  SPARSEMM_CHECK(num_rows == 0 || (dy != 0 && rstd != 0 && (is_rms || mean != 0)), "dy", "null pointer");
  if (dtype == kFloat32) {
    using T = float;
    backward_rows(make_norm<T>(x, x_stride_row, weight, 0, ids, offsets, heads, num_rows, dim, num_groups, is_rms),
                  reinterpret_cast<const T*>(dy), dy_stride_row, reinterpret_cast<const T*>(mean),
                  reinterpret_cast<const T*>(rstd), reinterpret_cast<T*>(dx), reinterpret_cast<T*>(dweight),
                  reinterpret_cast<T*>(dbias));
  } else {
    using T = double;
    backward_rows(make_norm<T>(x, x_stride_row, weight, 0, ids, offsets, heads, num_rows, dim, num_groups, is_rms),
                  reinterpret_cast<const T*>(dy), dy_stride_row, reinterpret_cast<const T*>(mean),
                  reinterpret_cast<const T*>(rstd), reinterpret_cast<T*>(dx), reinterpret_cast<T*>(dweight),
                  reinterpret_cast<T*>(dbias));
  }
}

}  // namespace sparsemm
