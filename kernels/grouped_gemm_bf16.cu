// Grouped GEMM launchers for __nv_bfloat16 (kernel templates in kernels/grouped_gemm_impl.cuh,
// contract in moeforge/kernels/grouped_gemm.h): __nv_bfloat16 throughout, plus the mixed
// combinations of split LoRA, whose rank-r intermediates stay in float32 (x A_e^T and grad_delta
// B_e computed into float, then multiplied by __nv_bfloat16 weights into __nv_bfloat16 outputs).
#include "grouped_gemm_impl.cuh"

MOEFORGE_INSTANTIATE_GROUPED_GEMM(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
MOEFORGE_INSTANTIATE_GROUPED_GEMM(__nv_bfloat16, __nv_bfloat16, float)
MOEFORGE_INSTANTIATE_GROUPED_GEMM(float, __nv_bfloat16, __nv_bfloat16)
MOEFORGE_INSTANTIATE_GROUPED_GEMM_WGRAD(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
MOEFORGE_INSTANTIATE_GROUPED_GEMM_WGRAD(float, __nv_bfloat16, __nv_bfloat16)
MOEFORGE_INSTANTIATE_GROUPED_ROW_SUM(__nv_bfloat16)
