// cuda_emulator.h -- lets a CUDA C kernel file compile as plain C++ so it can run on the CPU.
//
// minicnn.testing.emulator compiles each kernels/*.cu file with
//   g++ -std=c++17 -include cuda_emulator.h -Dscalar_t=... -Dacc_t=... -x c++ file.cu wrappers.cpp
// and the generated wrappers call each kernel once per thread of a launch, one after another,
// after setting the built-in variables below. Only what minicnn's kernels use is emulated:
// 1-D launches, no shared memory, no __syncthreads, no atomics (those fail to compile, with
// a message, rather than run wrongly: threads here run one at a time, not together).
#pragma once

#include <cmath>  // expf, sqrt, ... which NVRTC provides as built-ins

// Function and variable qualifiers: all code is ordinary host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// __restrict__ is a GNU C++ keyword already (g++ and clang++).

// The index types and the four built-in variables. A kernel reads them; the emulator's wrapper
// sets them before each call. thread_local: launches from several host threads do not mix.
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// Read-only cache loads are plain loads on the CPU.
template <typename T>
inline T __ldg(const T* p) { return *p; }

// Products rounded on their own, which nvcc never fuses into an fma (the emulator compiles with
// -ffp-contract=off, so g++ fuses nothing anyway).
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// Block-cooperative features need threads that run together; this emulator runs them in turn.
#define __syncthreads() \
    static_assert(false, "minicnn emulator: __syncthreads() is not supported (threads run in turn)")
#define __shared__ \
    static_assert(false, "minicnn emulator: __shared__ is not supported (threads run in turn)");
