// MOEFORGE_HOST_DEVICE: functions shared by the CUDA kernels and host code (the CPU kernels, the
// GoogleTest references). Kept apart from numeric.h so that host-only code (csrc/cpu) needs no
// CUDA headers: a CPU-only build works without the CUDA toolkit.
#pragma once

#if defined(__CUDACC__)
#define MOEFORGE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOEFORGE_HOST_DEVICE inline
#endif
