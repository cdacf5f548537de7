// Shared by every file of the extension: dtype codes, the one argument-check macro, CUDA_CHECK.
//
// Nothing here includes a torch header: the extension sees tensors only as raw pointers, sizes and strides,
// which is what lets one build serve every torch version (see csrc/README.md).
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace sparsemm {

// Bumped whenever an entry point's signature or meaning changes, so that Python refuses a stale _C left
// behind by an older editable build instead of calling it with the wrong arguments. Mirrored in _ext.py.
constexpr int kAbiVersion = 7;

// Dtype codes crossing the boundary. Mirrored in sparsemm_kernels/_ext.py (DTYPE_*); keep both in sync.
enum DType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kInt32 = 4,
  kInt64 = 5,
};

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kInt32: return "int32";
    case kInt64: return "int64";
    default: return "unknown dtype code";
  }
}

namespace detail {
inline void stream_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void stream_all(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  stream_all(os, rest...);
}

template <typename... Args>
[[noreturn]] void fail_check(const char* arg, const Args&... parts) {
  std::ostringstream os;
  os << "`" << arg << "`: ";
  stream_all(os, parts...);
  // std::invalid_argument becomes ValueError in Python (pybind11's standard translation).
  throw std::invalid_argument(os.str());
}
}  // namespace detail

}  // namespace sparsemm

// SPARSEMM_CHECK(cond, "argname", message parts...): the only way the extension rejects its input. The
// Python wrappers check first and with better context; this is the last line that keeps a bad call from
// reading or writing out of bounds.
#define SPARSEMM_CHECK(cond, arg, ...)                         \
  do {                                                         \
    if (!(cond)) ::sparsemm::detail::fail_check(arg, __VA_ARGS__); \
  } while (0)

#if defined(__CUDACC__)
#include <cuda_runtime.h>

// CUDA_CHECK(expr): a failed runtime call becomes std::runtime_error (RuntimeError in Python) carrying the
// CUDA error string and the call that failed.
#define CUDA_CHECK(expr)                                                                         \
  do {                                                                                           \
    cudaError_t sparsemm_err_ = (expr);                                                          \
    if (sparsemm_err_ != cudaSuccess) {                                                          \
      throw std::runtime_error(std::string("CUDA error in `" #expr "`: ") +                      \
                               cudaGetErrorName(sparsemm_err_) + ": " +                          \
                               cudaGetErrorString(sparsemm_err_));                               \
    }                                                                                            \
  } while (0)
#endif
