// Host/device arithmetic that gives the CPU and CUDA kernels the same bits.
//
// nvcc contracts a * b + c into an FMA by default while x86 builds round the
// product first, so a coordinate computed by the same expression can differ in
// the last bit between devices. Writing the arithmetic with mul_rn/add_rn
// (correctly rounded, never contracted) removes that difference. Used by every
// op whose CPU and CUDA kernels must agree exactly (RoIAlign geometry, mask
// pasting, deformable-attention sampling coordinates).
#pragma once

#include <c10/macros/Macros.h>

namespace instseg {
namespace exact_math {

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
template <typename T>
inline T mul_rn(T a, T b) { return a * b; }
template <typename T>
inline T add_rn(T a, T b) { return a + b; }
#endif

// Unit roundoff of T (float or double): margins for values computed in it.
template <typename T>
C10_HOST_DEVICE inline double unit_roundoff() { return sizeof(T) == 4 ? 5.97e-8 : 1.12e-16; }

// Finite test that survives -ffast-math style assumptions about NaN.
template <typename T>
C10_HOST_DEVICE inline bool is_finite(T v) {
  // NaN fails the first comparison; +-inf fails the second.
  return v == v && v - v == T(0);
}

}  // namespace exact_math
}  // namespace instseg
