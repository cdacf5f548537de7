// sparsemm_kernels._C: one thin m.def per entry point of sparsemm/ops.h, nothing else.
//
// Every function releases the GIL (they only touch raw memory), so CPU ops can run beside Python threads.
// Argument errors surface as ValueError (std::invalid_argument), CUDA failures as RuntimeError.
#include <pybind11/pybind11.h>

#include "sparsemm/common.h"
#include "sparsemm/ops.h"

namespace py = pybind11;
using py::arg;

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsemm_kernels native ops: raw pointers (ints), sizes, strides, dtype codes, stream handles.";
  m.attr("ABI_VERSION") = sparsemm::kAbiVersion;

  m.def(
      "has_cuda",
      []() {
#if defined(SPARSEMM_WITH_CUDA)
        return true;
#else
        return false;
#endif
      },
      "True when the module was built with its CUDA ops (group_plan_cuda, ...).");

  m.def("group_plan_cpu", &sparsemm::group_plan_cpu,
        "Stable counting sort of ids[n] (int32/int64) into num_groups groups. Writes int64 "
        "sorted_to_orig[n], counts[G], offsets[G+1]; an id outside [0, num_groups) is sorted as the nearest "
        "valid id. Returns -1, or the index of the first such id.",
        arg("ids_ptr"), arg("ids_dtype"), arg("n"), arg("num_groups"), arg("sorted_to_orig_ptr"),
        arg("counts_ptr"), arg("offsets_ptr"), py::call_guard<py::gil_scoped_release>());

  m.def("grouped_gemm_cpu", &sparsemm::grouped_gemm_cpu,
        "C[cr, j] = sum_k A[ar, k] * B[g, k, j] (+ bias[g, j]) over each group's sorted positions r, "
        "ar = rows[r] if gather_a else r, cr = rows[r] if scatter_c else r. float32/float64; A, C unit "
        "column stride; B arbitrary element strides; offsets/rows int64. Offsets sorted in [0, num_positions]; "
        "positions whose row index falls outside A (a_rows) or C (c_rows) are skipped.",
        arg("a_ptr"), arg("a_stride_row"), arg("b_ptr"), arg("b_stride_g"), arg("b_stride_k"),
        arg("b_stride_j"), arg("bias_ptr"), arg("bias_stride_g"), arg("c_ptr"), arg("c_stride_row"),
        arg("offsets_ptr"), arg("rows_ptr"), arg("gather_a"), arg("scatter_c"), arg("num_groups"),
        arg("k_dim"), arg("j_dim"), arg("a_rows"), arg("c_rows"), arg("num_positions"), arg("dtype"),
        py::call_guard<py::gil_scoped_release>());

  m.def("grouped_gemm_dw_cpu", &sparsemm::grouped_gemm_dw_cpu,
        "dW[g, n, k] = sum_r dY[rd, n] * X[rx, k], dbias[g, n] = sum_r dY[rd, n] (if dbias_ptr), r over "
        "group g in increasing order, rd = rows[r] if gather_dy else r, rx likewise with gather_x. dw "
        "contiguous [G, N, K], dbias "
        "contiguous [G, N]; float32/float64. Offsets sorted in [0, num_positions]; gathered rows outside "
        "[0, num_rows) are skipped.",
        arg("dy_ptr"), arg("dy_stride_row"), arg("x_ptr"), arg("x_stride_row"), arg("dw_ptr"),
        arg("dbias_ptr"), arg("offsets_ptr"), arg("rows_ptr"), arg("gather_dy"), arg("gather_x"),
        arg("num_groups"), arg("n_dim"), arg("k_dim"), arg("num_rows"), arg("num_positions"), arg("dtype"),
        py::call_guard<py::gil_scoped_release>());

m.def("expert_choice_cpu", &sparsemm::expert_choice_cpu,
        "Expert-choice routing: out[e, :] = expert e's min(capacity, n, limit[e]) top-scoring tokens (ties to "
        "the lower token) in ascending order, then -1. float32/float64 scores with strides (stride_n, "
        "stride_e); NaN, -inf and masked tokens never chosen (mask_mode 0 none, 1 per token, 2 per token and "
        "expert, uint8); limit null or int64[E]; out contiguous int64 [E, capacity].",
        arg("scores_ptr"), arg("dtype"), arg("n"), arg("num_experts"), arg("stride_n"), arg("stride_e"),
        arg("mask_ptr"), arg("mask_mode"), arg("mask_stride_n"), arg("mask_stride_e"), arg("limit_ptr"),
        arg("capacity"), arg("out_ptr"), py::call_guard<py::gil_scoped_release>());

m.def("token_topk_cpu", &sparsemm::token_topk_cpu,
        "Token-choice routing: out[t, :] = the k experts with the highest logits of token t, descending, ties "
        "to the lower expert (NaN last). float32/float64 logits with strides (stride_n, stride_e); out "
        "contiguous int64 [n, k].",
        arg("logits_ptr"), arg("dtype"), arg("n"), arg("num_experts"), arg("stride_n"), arg("stride_e"), arg("k"),
        arg("out_ptr"), py::call_guard<py::gil_scoped_release>());

  m.def("token_choice_plan_cpu", &sparsemm::token_choice_plan_cpu,
        "token_topk_cpu fused with the softmax gates over each row's k chosen logits (logits' dtype, computed in "
        "double) and the stable counting sort of the n * k pairs p = t * k + j by expert: writes int64 "
        "expert_idx [n, k], gates [n, k], sorted_to_orig / slots / orig_to_sorted [n * k], counts [E], offsets "
        "[E + 1], all contiguous.",
        arg("logits_ptr"), arg("dtype"), arg("n"), arg("num_experts"), arg("stride_n"), arg("stride_e"), arg("k"),
        arg("expert_idx_ptr"), arg("gates_ptr"), arg("sorted_to_orig_ptr"), arg("slots_ptr"), arg("counts_ptr"),
        arg("offsets_ptr"), arg("orig_to_sorted_ptr"), py::call_guard<py::gil_scoped_release>());

  m.def("group_norm_fwd_cpu", &sparsemm::group_norm_fwd_cpu,
        "Per-group RMSNorm/LayerNorm of num_rows rows of dim (float32/float64): row r's group is "
        "ids[r / heads] (clamped) or the offsets range holding r. Writes y (contiguous), mean (LayerNorm) "
        "and rstd [num_rows] in x's dtype.",
        arg("x_ptr"), arg("x_stride_row"), arg("weight_ptr"), arg("bias_ptr"), arg("ids_ptr"), arg("offsets_ptr"),
        arg("heads"), arg("num_rows"), arg("dim"), arg("num_groups"), arg("eps"), arg("is_rms"), arg("y_ptr"),
        arg("mean_ptr"), arg("rstd_ptr"), arg("dtype"), py::call_guard<py::gil_scoped_release>());

  m.def("group_norm_bwd_cpu", &sparsemm::group_norm_bwd_cpu,
        "Backward of group_norm_fwd_cpu from its mean/rstd: dx (contiguous), dweight, dbias ([G, dim]); a null "
        "pointer skips that gradient. Weight gradients summed in double over fixed row chunks (the same on any "
        "thread count).",
        arg("dy_ptr"), arg("dy_stride_row"), arg("x_ptr"), arg("x_stride_row"), arg("weight_ptr"), arg("ids_ptr"),
        arg("offsets_ptr"), arg("heads"), arg("num_rows"), arg("dim"), arg("num_groups"), arg("is_rms"),
        arg("mean_ptr"), arg("rstd_ptr"), arg("dx_ptr"), arg("dweight_ptr"), arg("dbias_ptr"), arg("dtype"),
        py::call_guard<py::gil_scoped_release>());

  m.def("silu_mul_fwd_cpu", &sparsemm::silu_mul_fwd_cpu,
        "h = silu(gate) * up over a rows x cols block of float32/float64 (unit column strides, row strides given), "
        "one pass.",
        arg("gate_ptr"), arg("gate_stride"), arg("up_ptr"), arg("up_stride"), arg("h_ptr"), arg("h_stride"),
        arg("rows"), arg("cols"), arg("dtype"), py::call_guard<py::gil_scoped_release>());

  m.def("silu_mul_bwd_cpu", &sparsemm::silu_mul_bwd_cpu,
        "dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * silu(gate), s = sigmoid(gate), over a rows x cols "
        "block of float32/float64 (unit column strides, row strides given), one pass.",
        arg("gate_ptr"), arg("gate_stride"), arg("up_ptr"), arg("up_stride"), arg("dy_ptr"), arg("dy_stride"),
        arg("dgate_ptr"), arg("dgate_stride"), arg("dup_ptr"), arg("dup_stride"), arg("rows"), arg("cols"),
        arg("dtype"), py::call_guard<py::gil_scoped_release>());

#if defined(SPARSEMM_WITH_CUDA)
  m.def("group_plan_cuda_workspace_bytes", &sparsemm::group_plan_cuda_workspace_bytes,
        "Bytes of device scratch group_plan_cuda needs for (n, num_groups, ids_dtype). Launches nothing; "
        "call with the target device current.",
        arg("n"), arg("num_groups"), arg("ids_dtype"), py::call_guard<py::gil_scoped_release>());

  m.def("group_plan_cuda", &sparsemm::group_plan_cuda,
        "group_plan_cpu on the device, enqueued on `stream` (cudaStream_t as int, 0 = default) without "
        "host sync or allocation. Ids outside [0, num_groups) are counted into invalid_count (int64[1]) "
        "and sorted as the nearest valid id.",
        arg("ids_ptr"), arg("ids_dtype"), arg("n"), arg("num_groups"), arg("sorted_to_orig_ptr"),
        arg("counts_ptr"), arg("offsets_ptr"), arg("invalid_count_ptr"), arg("workspace_ptr"),
        arg("workspace_bytes"), arg("stream"), py::call_guard<py::gil_scoped_release>());
#endif
}
