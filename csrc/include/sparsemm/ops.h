// The C boundary: every entry point the Python module exposes, as plain functions of integers.
//
// Tensors arrive as addresses (std::uintptr_t, from `tensor.data_ptr()`), element strides and sizes as
// int64_t, element types as the dtype codes of common.h, CUDA streams as the integer value of their
// cudaStream_t handle. Outputs are allocated by the caller. bindings.cpp maps each function 1:1 to Python.
#pragma once

#include <cstdint>

namespace sparsemm {

// Stable counting sort of `n` group ids (int32 or int64) into `num_groups` groups; outputs int64.
// An id outside [0, num_groups) is sorted as the nearest valid id, so the outputs are always a complete
// plan. Returns -1 when every id lies in [0, num_groups), else the index of the first id that does not.
int64_t group_plan_cpu(std::uintptr_t ids, int ids_dtype, int64_t n, int64_t num_groups,
                       std::uintptr_t sorted_to_orig, std::uintptr_t counts, std::uintptr_t offsets);

// C[cr, j] = sum_k A[ar, k] * B[g, k, j] (+ bias[g, j]) for each sorted position r of group g, with
// ar = gather_a ? rows[r] : r and cr = scatter_c ? rows[r] : r. A and C have unit column stride; B has
// arbitrary element strides, which is how one function serves both x @ W^T and dy @ W. Offsets must be
// sorted within [0, num_positions] (else an error); a position whose ar is outside [0, a_rows) or cr outside
// [0, c_rows) is skipped, so no index reaches outside A, C or rows.
void grouped_gemm_cpu(std::uintptr_t a, int64_t a_stride_row, std::uintptr_t b, int64_t b_stride_g,
                      int64_t b_stride_k, int64_t b_stride_j, std::uintptr_t bias, int64_t bias_stride_g,
                      std::uintptr_t c, int64_t c_stride_row, std::uintptr_t offsets, std::uintptr_t rows,
                      bool gather_a, bool scatter_c, int64_t num_groups, int64_t k_dim, int64_t j_dim,
                      int64_t a_rows, int64_t c_rows, int64_t num_positions, int dtype);

// dW[g, n, k] = sum_r dY[rd, n] * X[rx, k] and dbias[g, n] = sum_r dY[rd, n] (when dbias != 0), summed over
// the sorted positions r of group g in increasing order, rd = gather_dy ? rows[r] : r, rx = gather_x ?
// rows[r] : r. dW is contiguous [G, N, K], dbias contiguous [G, N]; an empty group gives exact zeros. Offsets
// sorted within [0, num_positions]; a position whose rows[r] is outside [0, num_rows) is skipped.
void grouped_gemm_dw_cpu(std::uintptr_t dy, int64_t dy_stride_row, std::uintptr_t x, int64_t x_stride_row,
                         std::uintptr_t dw, std::uintptr_t dbias, std::uintptr_t offsets,
                         std::uintptr_t rows, bool gather_dy, bool gather_x, int64_t num_groups, int64_t n_dim,
                         int64_t k_dim, int64_t num_rows, int64_t num_positions, int dtype);

// Expert-choice routing (a segmented top-k): for each expert e, out[e, :] = the min(capacity, n, limit[e])
// tokens t with the highest scores[t * stride_n + e * stride_e] (ties to the lower t), in ascending order, then
// -1 up to `capacity`. float32/float64 scores; NaN and -inf are never chosen, nor tokens whose mask byte is 0
// (mask_mode 0: no mask, 1: mask[t * mask_stride_n], 2: mask[t * mask_stride_n + e * mask_stride_e]). `limit`
// is null or int64[num_experts]; out is contiguous int64 [num_experts, capacity].
void expert_choice_cpu(std::uintptr_t scores, int dtype, int64_t n, int64_t num_experts, int64_t stride_n,
                       int64_t stride_e, std::uintptr_t mask, int mask_mode, int64_t mask_stride_n,
                       int64_t mask_stride_e, std::uintptr_t limit, int64_t capacity, std::uintptr_t out);

// Token-choice routing: out[t, :] = the k experts with the highest logits[t * stride_n + e * stride_e],
// descending, ties to the lower e (NaN ranks last). float32/float64; out contiguous int64 [n, k], 1 <= k <= E.
void token_topk_cpu(std::uintptr_t logits, int dtype, int64_t n, int64_t num_experts, int64_t stride_n,
                    int64_t stride_e, int64_t k, std::uintptr_t out);

// token_topk_cpu fused with the rest of token-choice routing: expert_idx [n, k] as token_topk_cpu's out,
// gates [n, k] (the logits' dtype) = softmax over each row's k chosen logits (computed in double), and the stable
// counting sort of the n * k pairs p = t * k + j by expert, as group_plan_cpu of expert_idx would give it:
// sorted_to_orig [n * k], slots [n * k] (= sorted_to_orig / k, the token of each sorted pair), counts [E],
// offsets [E + 1], orig_to_sorted [n * k] (the inverse permutation). Every output int64 except gates, contiguous.
void token_choice_plan_cpu(std::uintptr_t logits, int dtype, int64_t n, int64_t num_experts, int64_t stride_n,
                           int64_t stride_e, int64_t k, std::uintptr_t expert_idx, std::uintptr_t gates,
                           std::uintptr_t sorted_to_orig, std::uintptr_t slots, std::uintptr_t counts,
                           std::uintptr_t offsets, std::uintptr_t orig_to_sorted);

// Per-group RMSNorm (is_rms) or LayerNorm of num_rows rows of dim values (float32/float64, unit column stride,
// row stride x_stride_row). Row r's group: ids[r / heads] clamped into [0, num_groups) when ids is given, else
// the g with offsets[g] <= r < offsets[g + 1] (offsets int64 [G + 1], 0 .. num_rows, non-decreasing); exactly one
// of ids / offsets is non-null. y[r] = (x[r] - mean_r) * rstd_r * weight[g] (+ bias[g]); y contiguous; mean
// (LayerNorm only) and rstd [num_rows] in x's dtype. weight, bias contiguous [G, dim].
void group_norm_fwd_cpu(std::uintptr_t x, int64_t x_stride_row, std::uintptr_t weight, std::uintptr_t bias,
                        std::uintptr_t ids, std::uintptr_t offsets, int64_t heads, int64_t num_rows, int64_t dim,
                        int64_t num_groups, double eps, bool is_rms, std::uintptr_t y, std::uintptr_t mean,
                        std::uintptr_t rstd, int dtype);

// Its backward from the forward's mean/rstd: dx (contiguous, or null to skip), dweight and dbias ([G, dim]
// contiguous, or null to skip; written, not accumulated; a group without rows gets zeros). Rows and groups as
// in group_norm_fwd_cpu; dy has unit column stride and row stride dy_stride_row.
void group_norm_bwd_cpu(std::uintptr_t dy, int64_t dy_stride_row, std::uintptr_t x, int64_t x_stride_row,
                        std::uintptr_t weight, std::uintptr_t ids, std::uintptr_t offsets, int64_t heads,
                        int64_t num_rows, int64_t dim, int64_t num_groups, bool is_rms, std::uintptr_t mean,
                        std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dweight, std::uintptr_t dbias,
                        int dtype);

// SwiGLU activation over a rows x cols block (float32/float64; each operand unit column stride, its own row
// stride): h = silu(gate) * up.
void silu_mul_fwd_cpu(std::uintptr_t gate, int64_t gate_stride, std::uintptr_t up, int64_t up_stride,
                      std::uintptr_t h, int64_t h_stride, int64_t rows, int64_t cols, int dtype);

// Its backward: dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * silu(gate), s = sigmoid(gate); operands
// as in silu_mul_fwd_cpu (dgate and dup may interleave in one buffer: gate_up's gradient).
void silu_mul_bwd_cpu(std::uintptr_t gate, int64_t gate_stride, std::uintptr_t up, int64_t up_stride,
                      std::uintptr_t dy, int64_t dy_stride, std::uintptr_t dgate, int64_t dgate_stride,
                      std::uintptr_t dup, int64_t dup_stride, int64_t rows, int64_t cols, int dtype);

#if defined(SPARSEMM_WITH_CUDA)
// Bytes of device scratch that group_plan_cuda needs for these sizes (a host-side query; launches nothing).
int64_t group_plan_cuda_workspace_bytes(int64_t n, int64_t num_groups, int ids_dtype);

// group_plan_cpu on the device, enqueued on `stream`, with no host synchronisation and no allocation.
// Out-of-range ids are counted into *invalid_count (one int64) and sorted as the nearest valid id.
void group_plan_cuda(std::uintptr_t ids, int ids_dtype, int64_t n, int64_t num_groups,
                     std::uintptr_t sorted_to_orig, std::uintptr_t counts, std::uintptr_t offsets,
                     std::uintptr_t invalid_count, std::uintptr_t workspace, int64_t workspace_bytes,
                     std::uintptr_t stream);
#endif

}  // namespace sparsemm
