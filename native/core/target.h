/* Qualifiers for code written once and compiled for every target: the CPU library today, CUDA
 * and Metal wrappers over the same headers later (they define their own NXKV_FN). */
#ifndef NXKV_CORE_TARGET_H
#define NXKV_CORE_TARGET_H

#if defined(__CUDACC__)
#define NXKV_FN static inline __host__ __device__
/* unroll where the trip count is known at compile time (a GPU thread's values then stay in
 * registers); the CPU compilers decide for themselves */
#define NXKV_UNROLL _Pragma("unroll")
#else
#define NXKV_FN static inline
#define NXKV_UNROLL
#endif

#endif
