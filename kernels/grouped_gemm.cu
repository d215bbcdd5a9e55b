// Grouped GEMM launchers for float and double (kernel templates in kernels/grouped_gemm_impl.cuh,
// contract in moeforge/kernels/grouped_gemm.h). The half types live in grouped_gemm_f16.cu and
// grouped_gemm_bf16.cu so that the three files compile in parallel.
#include "grouped_gemm_impl.cuh"

MOEFORGE_INSTANTIATE_GROUPED_GEMM(float, float, float)
MOEFORGE_INSTANTIATE_GROUPED_GEMM(double, double, double)
MOEFORGE_INSTANTIATE_GROUPED_GEMM_WGRAD(float, float, float)
MOEFORGE_INSTANTIATE_GROUPED_GEMM_WGRAD(double, double, double)
MOEFORGE_INSTANTIATE_GROUPED_ROW_SUM(float)
MOEFORGE_INSTANTIATE_GROUPED_ROW_SUM(double)
