// Grouped GEMM launchers for __half (kernel templates in kernels/grouped_gemm_impl.cuh, contract in
// moeforge/kernels/grouped_gemm.h): __half throughout, plus the mixed combinations of split LoRA,
// whose rank-r intermediates stay in float32 (x A_e^T and grad_delta B_e computed into float,
// then multiplied by __half weights into __half outputs).
#include "grouped_gemm_impl.cuh"

MOEFORGE_INSTANTIATE_GROUPED_GEMM(__half, __half, __half)
MOEFORGE_INSTANTIATE_GROUPED_GEMM(__half, __half, float)
MOEFORGE_INSTANTIATE_GROUPED_GEMM(float, __half, __half)
MOEFORGE_INSTANTIATE_GROUPED_GEMM_WGRAD(__half, __half, __half)
MOEFORGE_INSTANTIATE_GROUPED_GEMM_WGRAD(float, __half, __half)
MOEFORGE_INSTANTIATE_GROUPED_ROW_SUM(__half)
