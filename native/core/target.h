/* Qualifiers for code written once and compiled for every target: the CPU library today, CUDA
 * and Metal wrappers over the same headers later (they define their own NXKV_FN). */
#ifndef NXKV_CORE_TARGET_H
#define NXKV_CORE_TARGET_H

#if defined(__CUDACC__)
#define NXKV_FN static inline __host__ __device__
#else
#define NXKV_FN static inline
#endif

#endif
