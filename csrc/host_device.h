// CAML_HOST_DEVICE: the helpers that the C++ kernels and the CUDA kernels share
// (csrc/philox.h, csrc/layout.h) are inline host functions in C++ and
// __host__ __device__ ones under nvcc.
#pragma once

#if defined(__CUDACC__)
#define CAML_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CAML_HOST_DEVICE inline
#endif
