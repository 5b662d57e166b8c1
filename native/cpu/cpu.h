/* What the CPU library's source files share and do not export. */
#ifndef NXKV_CPU_H
#define NXKV_CPU_H

/* The extensions the kernels may take (nxkv_use_cpu_extensions): 0 none, 1 AVX2 and F16C, 2 AVX-512 too */
__attribute__((visibility("hidden"))) int nxkv_cpu_extensions_on(void);

#endif
