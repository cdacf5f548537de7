// Grouped GEMM on the CPU (float32, float64): forward/dX (grouped_gemm_cpu) and weight gradient
// (grouped_gemm_dw_cpu).
//
// Determinism: every output element is produced by exactly one thread, which sums its terms in a fixed
// order (k increasing for the forward, sorted position r increasing for dW). Tiling only decides which
// thread owns which elements, never the order of a sum, so results are bitwise identical for any thread
// count. No floating-point atomics, no reductions across threads.
//
// Speed comes from register-tiled micro-kernels (kR x Lanes accumulators the compiler keeps in vector
// registers) over packed or L2-sized blocks; there is no ISA-specific code, so this is a correct,
// portable fallback rather than a BLAS.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "sparsemm/common.h"
#include "sparsemm/ops.h"

namespace sparsemm {
namespace {

// Register tile of the micro-kernels: kR rows x Lanes<T> columns of accumulators, held in Vec<T>
// (16-byte GCC/Clang vector extension: SSE2 on x86-64, NEON on aarch64, no ISA-specific code). 8 vector
// registers of accumulators for either dtype; written explicitly because auto-vectorisation of this loop
// nest vectorised across rows instead and spilled.
constexpr int kR = 4;
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(16)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kVecLanes = 16 / sizeof(T);
template <typename T>
constexpr int Lanes = 2 * kVecLanes<T>;

template <typename T>
Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

// Forward task: up to kRowChunk sorted rows of one group x kColBlock output columns. B[g][:, cols] is
// packed once per task (k-major, zero-padded to whole register tiles), amortised over kRowChunk rows.
constexpr int64_t kRowChunk = 64;
constexpr int64_t kColBlock = 128;
// dW task: kDwRows x kDwCols outputs, accumulated over the group's rows kDwRowBlock at a time so the block
// of X being read stays in L2.
constexpr int64_t kDwRows = 16;
constexpr int64_t kDwCols = 256;
constexpr int64_t kDwRowBlock = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Positions offsets[0]..offsets[G] index `rows` (or A and C directly), so they must be sorted and lie in
// [0, num_positions]: a wrong plan is an error here, never a read past the end.
void check_offsets(const int64_t* offsets, int64_t num_groups, int64_t num_positions) {
  SPARSEMM_CHECK(offsets[0] >= 0, "offsets", "offsets[0] must be >= 0, got ", offsets[0]);
  for (int64_t g = 0; g < num_groups; ++g) {
    SPARSEMM_CHECK(offsets[g + 1] >= offsets[g], "offsets", "must be non-decreasing, got offsets[", g,
                   "]=", offsets[g], " > offsets[", g + 1, "]=", offsets[g + 1]);
  }
  SPARSEMM_CHECK(offsets[num_groups] <= num_positions, "offsets", "offsets[G]=", offsets[num_groups],
                 " is past the ", num_positions, " positions");
}

// A row index read through `rows` outside [0, limit) names no row: its position is skipped (neither read
// nor written), so a corrupt plan can only leave rows unwritten, never touch memory outside the tensors.
inline bool row_ok(int64_t row, int64_t limit) { return row >= 0 && row < limit; }

template <typename T>
struct FwdArgs {
  const T* a;
  int64_t a_stride_row;
  const T* b;
  int64_t b_stride_g, b_stride_k, b_stride_j;
  const T* bias;
  int64_t bias_stride_g;
  T* c;
  int64_t c_stride_row;
  const int64_t* offsets;
  const int64_t* rows;
  bool gather_a, scatter_c;
  int64_t num_groups, k_dim, j_dim;
  int64_t a_rows, c_rows;  // bounds for gathered / scattered row indices
};

// crow[i][v] = sum_k arow[i][k] * bp[k * ldb + v] (+ bias[v]) for i < nr, v < nv; k increasing. The
// accumulators are a local array (never addressed from outside) so they can live in registers.
template <typename T>
void fwd_micro(const T* const (&arow)[kR], const T* bp, int64_t ldb, int64_t k_dim, const T* bias,
               T* const (&crow)[kR], int64_t nr, int64_t nv) {
  constexpr int L = kVecLanes<T>;
  Vec<T> acc[kR][2] = {};
  for (int64_t k = 0; k < k_dim; ++k) {
    const Vec<T> b0 = load_vec(bp + k * ldb), b1 = load_vec(bp + k * ldb + L);
    for (int i = 0; i < kR; ++i) {
      const T s = arow[i][k];
      acc[i][0] += s * b0;
      acc[i][1] += s * b1;
    }
  }
  for (int64_t i = 0; i < nr; ++i) {
    T sums[2 * L];
    std::memcpy(sums, acc[i], sizeof(sums));
    for (int64_t v = 0; v < nv; ++v) crow[i][v] = bias ? sums[v] + bias[v] : sums[v];
  }
}

// Sorted positions [r0, r1) of group g, output columns [j0, j1); `packed` is this thread's scratch.
template <typename T>
void fwd_task(const FwdArgs<T>& p, int64_t g, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
              std::vector<T>& packed) {
  constexpr int V = Lanes<T>;
  const int64_t jw = j1 - j0;
  const int64_t ldb = ceil_div(jw, V) * V;
  packed.assign(static_cast<size_t>(p.k_dim * ldb), T(0));
  const T* bg = p.b + g * p.b_stride_g;
  for (int64_t k = 0; k < p.k_dim; ++k)
    for (int64_t j = 0; j < jw; ++j) packed[k * ldb + j] = bg[k * p.b_stride_k + (j0 + j) * p.b_stride_j];
  const T* bias = p.bias ? p.bias + g * p.bias_stride_g : nullptr;

  // Positions whose row index is out of range are dropped first, so a register tile never holds one.
  std::vector<int64_t> keep;
  keep.reserve(static_cast<size_t>(r1 - r0));
  for (int64_t r = r0; r < r1; ++r) {
    if ((!p.gather_a || row_ok(p.rows[r], p.a_rows)) && (!p.scatter_c || row_ok(p.rows[r], p.c_rows)))
      keep.push_back(r);
  }
  const int64_t nkeep = static_cast<int64_t>(keep.size());
  for (int64_t i0 = 0; i0 < nkeep; i0 += kR) {
    const int64_t nr = std::min<int64_t>(kR, nkeep - i0);
    const T* arow[kR];
    T* crow[kR];
    for (int i = 0; i < kR; ++i) {
      // A short last tile repeats its last row: computed, never stored.
      const int64_t r = keep[i0 + std::min<int64_t>(i, nr - 1)];
      arow[i] = p.a + (p.gather_a ? p.rows[r] : r) * p.a_stride_row;
      crow[i] = p.c + (p.scatter_c ? p.rows[r] : r) * p.c_stride_row;
    }
    for (int64_t jj = 0; jj < jw; jj += V) {
      T* out[kR];
      for (int i = 0; i < kR; ++i) out[i] = crow[i] + j0 + jj;
      fwd_micro(arow, packed.data() + jj, ldb, p.k_dim, bias ? bias + j0 + jj : nullptr, out, nr,
                std::min<int64_t>(V, jw - jj));
    }
  }
}

template <typename T>
void grouped_gemm_impl(const FwdArgs<T>& p) {
  // Tasks never straddle a group; task_start[g] is the first task of group g.
  const int64_t col_blocks = ceil_div(p.j_dim, kColBlock);
  std::vector<int64_t> task_start(p.num_groups + 1, 0);
  for (int64_t g = 0; g < p.num_groups; ++g)
    task_start[g + 1] = task_start[g] + ceil_div(p.offsets[g + 1] - p.offsets[g], kRowChunk) * col_blocks;
  const int64_t num_tasks = task_start[p.num_groups];

#pragma omp parallel
  {
    std::vector<T> packed;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const int64_t g =
          std::upper_bound(task_start.begin(), task_start.end(), t) - task_start.begin() - 1;
      const int64_t local = t - task_start[g];
      const int64_t r0 = p.offsets[g] + local / col_blocks * kRowChunk;
      const int64_t j0 = local % col_blocks * kColBlock;
      fwd_task(p, g, r0, std::min(r0 + kRowChunk, p.offsets[g + 1]), j0, std::min(j0 + kColBlock, p.j_dim),
               packed);
    }
  }
}

// out[i][k0 + v] += sum over sorted positions r in [r0, r1) of dY[rr, n[i]] * X[rr, k0 + v], r increasing,
// for v < Lanes (kFull) or v < 1 (the K tail). The accumulators start from and return to dW memory, so
// splitting r into blocks keeps the order of every sum.
template <typename T, bool kFull>
void dw_micro(const T* dy, int64_t dy_stride_row, const T* x, int64_t x_stride_row, const int64_t* rows,
              bool gather_dy, bool gather_x, int64_t num_rows, int64_t r0, int64_t r1, const int64_t (&n)[kR],
              int64_t nr, int64_t k0, T* const (&out)[kR]) {
  constexpr int L = kVecLanes<T>;
  constexpr int W = kFull ? 2 * L : 1;
  T init[kR][2 * L] = {};
  for (int64_t i = 0; i < nr; ++i) std::memcpy(init[i], out[i] + k0, W * sizeof(T));
  Vec<T> acc[kR][2];
  for (int i = 0; i < kR; ++i) {
    acc[i][0] = load_vec(init[i]);
    acc[i][1] = load_vec(init[i] + L);
  }
  for (int64_t r = r0; r < r1; ++r) {
    if ((gather_dy || gather_x) && !row_ok(rows[r], num_rows)) continue;
    const T* dyr = dy + (gather_dy ? rows[r] : r) * dy_stride_row;
    const T* xr = x + (gather_x ? rows[r] : r) * x_stride_row + k0;
    Vec<T> x0{}, x1{};
    if (kFull) {
      x0 = load_vec(xr);
      x1 = load_vec(xr + L);
    } else {
      x0[0] = xr[0];
    }
    for (int i = 0; i < kR; ++i) {
      const T s = dyr[n[i]];
      acc[i][0] += s * x0;
      if (kFull) acc[i][1] += s * x1;
    }
  }
  for (int64_t i = 0; i < nr; ++i) {
    T sums[2 * L];
    std::memcpy(sums, acc[i], sizeof(sums));
    std::memcpy(out[i] + k0, sums, W * sizeof(T));
  }
}

template <typename T>
void grouped_gemm_dw_impl(const T* dy, int64_t dy_stride_row, const T* x, int64_t x_stride_row, T* dw,
                          T* dbias, const int64_t* offsets, const int64_t* rows, bool gather_dy, bool gather_x,
                          int64_t num_rows, int64_t num_groups, int64_t n_dim, int64_t k_dim) {
  constexpr int V = Lanes<T>;
  const int64_t n_tiles = ceil_div(n_dim, kDwRows);
  const int64_t k_tiles = ceil_div(k_dim, kDwCols);
  const int64_t num_tasks = num_groups * n_tiles * k_tiles;

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < num_tasks; ++task) {
    const int64_t g = task / (n_tiles * k_tiles);
    const int64_t n0 = (task / k_tiles) % n_tiles * kDwRows;
    const int64_t k0 = task % k_tiles * kDwCols;
    const int64_t n1 = std::min(n0 + kDwRows, n_dim);
    const int64_t k1 = std::min(k0 + kDwCols, k_dim);
    T* dwg = dw + g * n_dim * k_dim;
    for (int64_t n = n0; n < n1; ++n) std::fill(dwg + n * k_dim + k0, dwg + n * k_dim + k1, T(0));
    for (int64_t rb = offsets[g]; rb < offsets[g + 1]; rb += kDwRowBlock) {
      const int64_t re = std::min(rb + kDwRowBlock, offsets[g + 1]);
      for (int64_t ni = n0; ni < n1; ni += kR) {
        const int64_t nr = std::min<int64_t>(kR, n1 - ni);
        int64_t n[kR];
        T* out[kR];
        for (int i = 0; i < kR; ++i) {
          n[i] = ni + std::min<int64_t>(i, nr - 1);  // padding rows re-read a valid column, never stored
          out[i] = dwg + n[i] * k_dim;
        }
        int64_t k = k0;
        for (; k + V <= k1; k += V)
          dw_micro<T, true>(dy, dy_stride_row, x, x_stride_row, rows, gather_dy, gather_x, num_rows, rb, re, n,
                            nr, k, out);
        for (; k < k1; ++k)
          dw_micro<T, false>(dy, dy_stride_row, x, x_stride_row, rows, gather_dy, gather_x, num_rows, rb, re, n,
                             nr, k, out);
      }
    }
  }

  if (!dbias) return;
  const int64_t nb_tiles = ceil_div(n_dim, kDwCols);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < num_groups * nb_tiles; ++task) {
    const int64_t g = task / nb_tiles;
    const int64_t n0 = task % nb_tiles * kDwCols;
    const int64_t n1 = std::min(n0 + kDwCols, n_dim);
    T* out = dbias + g * n_dim;
    std::fill(out + n0, out + n1, T(0));
    for (int64_t r = offsets[g]; r < offsets[g + 1]; ++r) {
      if ((gather_dy || gather_x) && !row_ok(rows[r], num_rows)) continue;
      const T* dyr = dy + (gather_dy ? rows[r] : r) * dy_stride_row;
      for (int64_t n = n0; n < n1; ++n) out[n] += dyr[n];
    }
  }
}

void check_float_dtype(int dtype) {
  SPARSEMM_CHECK(dtype == kFloat32 || dtype == kFloat64, "dtype",
                 "the C++ grouped GEMM supports float32 and float64, got ", dtype_name(dtype));
}

}  // namespace

void grouped_gemm_cpu(std::uintptr_t a, int64_t a_stride_row, std::uintptr_t b, int64_t b_stride_g,
                      int64_t b_stride_k, int64_t b_stride_j, std::uintptr_t bias, int64_t bias_stride_g,
                      std::uintptr_t c, int64_t c_stride_row, std::uintptr_t offsets, std::uintptr_t rows,
                      bool gather_a, bool scatter_c, int64_t num_groups, int64_t k_dim, int64_t j_dim,
                      int64_t a_rows, int64_t c_rows, int64_t num_positions, int dtype) {
  check_float_dtype(dtype);
  SPARSEMM_CHECK(num_groups >= 0, "num_groups", "must be >= 0, got ", num_groups);
  SPARSEMM_CHECK(k_dim >= 0 && j_dim >= 0, "k_dim", "sizes must be >= 0, got k_dim=", k_dim,
                 " j_dim=", j_dim);
  SPARSEMM_CHECK(a_rows >= 0 && c_rows >= 0 && num_positions >= 0, "num_positions",
                 "row counts must be >= 0");
  // Without `rows`, a position is itself the row of A and of C.
  SPARSEMM_CHECK((gather_a || num_positions <= a_rows) && (scatter_c || num_positions <= c_rows),
                 "num_positions", num_positions, " positions but A has ", a_rows, " and C ", c_rows, " rows");
  SPARSEMM_CHECK(offsets != 0, "offsets", "pointer must be non-null");
  const auto* off = reinterpret_cast<const int64_t*>(offsets);
  check_offsets(off, num_groups, num_positions);
  if (off[num_groups] == off[0] || j_dim == 0) return;
  // Empty tensors may have a null data pointer, so pointers are only required once there is work.
  SPARSEMM_CHECK(rows != 0 || !(gather_a || scatter_c), "rows",
                 "pointer must be non-null when gather_a or scatter_c is set");
  SPARSEMM_CHECK(c != 0 && (a != 0 || k_dim == 0) && (b != 0 || k_dim == 0), "c",
                 "data pointers must be non-null when there is work");

  const auto* rws = reinterpret_cast<const int64_t*>(rows);
  if (dtype == kFloat32) {
    using T = float;
    grouped_gemm_impl(FwdArgs<T>{reinterpret_cast<const T*>(a), a_stride_row,
                                 reinterpret_cast<const T*>(b), b_stride_g, b_stride_k, b_stride_j,
                                 reinterpret_cast<const T*>(bias), bias_stride_g, reinterpret_cast<T*>(c),
                                 c_stride_row, off, rws, gather_a, scatter_c, num_groups, k_dim, j_dim,
                                 a_rows, c_rows});
  } else {
    using T = double;
    grouped_gemm_impl(FwdArgs<T>{reinterpret_cast<const T*>(a), a_stride_row,
                                 reinterpret_cast<const T*>(b), b_stride_g, b_stride_k, b_stride_j,
                                 reinterpret_cast<const T*>(bias), bias_stride_g, reinterpret_cast<T*>(c),
                                 c_stride_row, off, rws, gather_a, scatter_c, num_groups, k_dim, j_dim,
                                 a_rows, c_rows});
  }
}

void grouped_gemm_dw_cpu(std::uintptr_t dy, int64_t dy_stride_row, std::uintptr_t x, int64_t x_stride_row,
                         std::uintptr_t dw, std::uintptr_t dbias, std::uintptr_t offsets,
                         std::uintptr_t rows, bool gather_dy, bool gather_x, int64_t num_groups, int64_t n_dim,
                         int64_t k_dim, int64_t num_rows, int64_t num_positions, int dtype) {
  const bool gathered = gather_dy || gather_x;
  check_float_dtype(dtype);
  SPARSEMM_CHECK(num_groups >= 0, "num_groups", "must be >= 0, got ", num_groups);
  SPARSEMM_CHECK(n_dim >= 0 && k_dim >= 0, "n_dim", "sizes must be >= 0, got n_dim=", n_dim,
                 " k_dim=", k_dim);
  SPARSEMM_CHECK(num_rows >= 0 && (gathered || num_positions <= num_rows), "num_positions", num_positions,
                 " positions but dY and X have ", num_rows, " rows");
  SPARSEMM_CHECK(offsets != 0, "offsets", "pointer must be non-null");
  const auto* off = reinterpret_cast<const int64_t*>(offsets);
  check_offsets(off, num_groups, num_positions);
  // An operand that is not gathered is read at the positions themselves.
  SPARSEMM_CHECK((gather_dy && gather_x) || off[num_groups] <= num_rows, "offsets", "end at ", off[num_groups],
                 " but dY and X have ", num_rows, " rows (an operand that is not gathered is read at the positions)");
  SPARSEMM_CHECK(rows != 0 || !gathered || off[num_groups] == off[0], "rows",
                 "pointer must be non-null when gathered is set");
  // dW (and dbias) are written even for empty groups, so they must exist whenever they have elements.
  SPARSEMM_CHECK(dw != 0 || num_groups * n_dim * k_dim == 0, "dw", "pointer must be non-null");
  SPARSEMM_CHECK((dy != 0 && x != 0) || off[num_groups] == off[0], "dy",
                 "data pointers must be non-null when there are rows");

  const auto* rws = reinterpret_cast<const int64_t*>(rows);
  if (dtype == kFloat32) {
    using T = float;
    grouped_gemm_dw_impl(reinterpret_cast<const T*>(dy), dy_stride_row, reinterpret_cast<const T*>(x),
                         x_stride_row, reinterpret_cast<T*>(dw), reinterpret_cast<T*>(dbias), off, rws,
                         gather_dy, gather_x, num_rows, num_groups, n_dim, k_dim);
  } else {
    using T = double;
    grouped_gemm_dw_impl(reinterpret_cast<const T*>(dy), dy_stride_row, reinterpret_cast<const T*>(x),
                         x_stride_row, reinterpret_cast<T*>(dw), reinterpret_cast<T*>(dbias), off, rws,
                         gather_dy, gather_x, num_rows, num_groups, n_dim, k_dim);
  }
}

}  // namespace sparsemm
