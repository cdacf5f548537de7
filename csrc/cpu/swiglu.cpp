// SwiGLU activation on the CPU: h = silu(g) * u forward, and (dg, du) = (dy u s (1 + g (1 - s)), dy silu(g)),
// s = sigmoid(g), backward, each one pass over the elements with one exponential per element. ATen spends four
// passes and two exponentials on the same backward (silu_backward, silu, two products).
//
// float32 uses a branch-free exp (Cephes' expf: range reduction by ln 2, degree-7 polynomial, about 1 ulp) that
// the compiler vectorises; the chunk functions are built for AVX-512, AVX2 and baseline x86-64 and the loader
// picks the best the machine has. float64 uses std::exp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "sparsemm/common.h"
#include "sparsemm/ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSEMM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define SPARSEMM_INLINE __attribute__((always_inline)) inline
#else
#define SPARSEMM_CLONES
#define SPARSEMM_INLINE inline
#endif

namespace sparsemm {
namespace {

constexpr int64_t kChunk = int64_t{1} << 14;  // elements per OpenMP task

// exp(t) for t <= 0 (NaN for NaN), written so the loop around it vectorises: selects, no branches. Results down
// into float32's subnormals are kept (2^k applied as two normal halves); below -104 it is 0.
SPARSEMM_INLINE float exp_nonpositive(float t) {
  const float lo = -104.0f;
  const float tc = t >= lo ? t : lo;  // NaN -> lo: the integer conversion below stays in range
  const float k = (tc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(tc / ln 2), in [-150, 0]
  const float r = tc - k * 0.693359375f - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ki = static_cast<int32_t>(k);
  const int32_t k1 = ki >> 1, k2 = ki - k1;  // each >= -75: 2^k1 and 2^k2 are normal floats
  const int32_t bits1 = (k1 + 127) << 23, bits2 = (k2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &bits1, sizeof(s1));
  std::memcpy(&s2, &bits2, sizeof(s2));
  const float e = t >= lo ? p * s1 * s2 : 0.0f;
  return t == t ? e : t;
}

SPARSEMM_INLINE float sigmoid(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Inlined into each clone, so that every clone vectorises it for its own instruction set.
template <typename T>
SPARSEMM_INLINE void forward_chunk(const T* __restrict g, const T* __restrict u, T* __restrict h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * sigmoid(g[i]) * u[i];
}

template <typename T>
SPARSEMM_INLINE void backward_chunk(const T* __restrict g, const T* __restrict u, const T* __restrict dy, T* __restrict dg,
                    T* __restrict du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T s = sigmoid(g[i]);
    const T d = dy[i];
    du[i] = d * g[i] * s;
    dg[i] = d * u[i] * s * (T(1) + g[i] * (T(1) - s));
  }
}

SPARSEMM_CLONES void forward_chunk_f32(const float* g, const float* u, float* h, int64_t n) {
  forward_chunk(g, u, h, n);
}

SPARSEMM_CLONES void backward_chunk_f32(const float* g, const float* u, const float* dy, float* dg, float* du,
                                        int64_t n) {
  backward_chunk(g, u, dy, dg, du, n);
}

// Row r of each operand starts at ptr + r * stride (unit column stride). Tasks of about kChunk elements: whole
// rows when rows are short, column slices of one row when they are long.
template <typename F>
void over_tasks(int64_t rows, int64_t cols, F&& body) {
  const int64_t col_chunk = std::min(cols, kChunk);
  const int64_t col_tasks = (cols + col_chunk - 1) / col_chunk;
  const int64_t rows_per_task = std::max<int64_t>(1, kChunk / cols);
  const int64_t row_tasks = (rows + rows_per_task - 1) / rows_per_task;
  const int64_t tasks = row_tasks * col_tasks;
#pragma omp parallel for schedule(static) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t r0 = t / col_tasks * rows_per_task, c0 = t % col_tasks * col_chunk;
    const int64_t len = std::min(col_chunk, cols - c0);
    for (int64_t r = r0; r < std::min(rows, r0 + rows_per_task); ++r) body(r, c0, len);
  }
}

// Inputs may repeat a row (stride 0: an expanded gradient); outputs may not overlap their own rows.
void check_args(int64_t rows, int64_t cols, int dtype, std::initializer_list<std::uintptr_t> ptrs,
                std::initializer_list<int64_t> in_strides, std::initializer_list<int64_t> out_strides) {
  SPARSEMM_CHECK(dtype == kFloat32 || dtype == kFloat64, "dtype", "float32 or float64 expected, got ",
                 dtype_name(dtype));
  SPARSEMM_CHECK(rows >= 0 && cols >= 0, "rows", "sizes must be >= 0, got ", rows, " x ", cols);
  for (std::uintptr_t p : ptrs) SPARSEMM_CHECK(rows * cols == 0 || p != 0, "gate", "null pointer");
  for (int64_t st : in_strides) SPARSEMM_CHECK(st >= 0, "stride", "input row stride ", st, " is negative");
  for (int64_t st : out_strides)
    SPARSEMM_CHECK(rows <= 1 || st >= cols, "stride", "output row stride ", st, " below ", cols);
}

template <typename T>
const T* in(std::uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

template <typename T>
T* out(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

void silu_mul_fwd_cpu(std::uintptr_t gate, int64_t gate_stride, std::uintptr_t up, int64_t up_stride,
                      std::uintptr_t h, int64_t h_stride, int64_t rows, int64_t cols, int dtype) {
  check_args(rows, cols, dtype, {gate, up, h}, {gate_stride, up_stride}, {h_stride});
  if (rows * cols == 0) return;
  if (dtype == kFloat32) {
    using T = float;
    over_tasks(rows, cols, [&](int64_t r, int64_t c, int64_t n) {
      forward_chunk_f32(in<T>(gate) + r * gate_stride + c, in<T>(up) + r * up_stride + c,
                        out<T>(h) + r * h_stride + c, n);
    });
  } else {
    using T = double;
    over_tasks(rows, cols, [&](int64_t r, int64_t c, int64_t n) {
      forward_chunk(in<T>(gate) + r * gate_stride + c, in<T>(up) + r * up_stride + c, out<T>(h) + r * h_stride + c,
                    n);
    });
  }
}

void silu_mul_bwd_cpu(std::uintptr_t gate, int64_t gate_stride, std::uintptr_t up, int64_t up_stride,
                      std::uintptr_t dy, int64_t dy_stride, std::uintptr_t dgate, int64_t dgate_stride,
                      std::uintptr_t dup, int64_t dup_stride, int64_t rows, int64_t cols, int dtype) {
  check_args(rows, cols, dtype, {gate, up, dy, dgate, dup}, {gate_stride, up_stride, dy_stride},
             {dgate_stride, dup_stride});
  if (rows * cols == 0) return;
  if (dtype == kFloat32) {
    using T = float;
    over_tasks(rows, cols, [&](int64_t r, int64_t c, int64_t n) {
      backward_chunk_f32(in<T>(gate) + r * gate_stride + c, in<T>(up) + r * up_stride + c,
                         in<T>(dy) + r * dy_stride + c, out<T>(dgate) + r * dgate_stride + c,
                         out<T>(dup) + r * dup_stride + c, n);
    });
  } else {
    using T = double;
    over_tasks(rows, cols, [&](int64_t r, int64_t c, int64_t n) {
      backward_chunk(in<T>(gate) + r * gate_stride + c, in<T>(up) + r * up_stride + c, in<T>(dy) + r * dy_stride + c,
                     out<T>(dgate) + r * dgate_stride + c, out<T>(dup) + r * dup_stride + c, n);
    });
  }
}

}  // namespace sparsemm
