/* CUDA entry points of nexus-gguf (nxkv_cuda.h): launch wrappers over the same native/core/*.h
 * math the CPU library runs. Built without FMA contraction (-fmad=false, CMakeLists.txt), so
 * every float and double operation rounds as the numpy references do: the results are the CPU
 * library's, bit for bit (tests/test_cuda.py compares them). */
#include <cuda_runtime.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "nxkv_cuda.h"
#include "../core/target.h"
#include "../core/e8.h"
#include "../core/f16.h"
#include "../core/hadamard.h"
#include "../core/lattice.h"
#include "../core/rans.h"
#include "../core/rope.h"
#include "../core/section.h"

#define RANS_SLOTS (1u << NXKV_RANS_PROB_BITS)
#define MAX_HEAD_DIM NXKV_MAX_HEAD_DIM

namespace {

void set_err(char *err, size_t n, const char *fmt, ...) {
    if (!err || !n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
}

/* Device buffers freed on every return path. */
struct Buffers {
    std::vector<void *> ptrs;
    ~Buffers() {
        for (void *p : ptrs) cudaFree(p);
    }
    template <typename T>
    cudaError_t alloc(T **p, size_t count) {
        *p = nullptr;
        if (!count) count = 1;
        cudaError_t e = cudaMalloc((void **)p, count * sizeof(T));
        if (e == cudaSuccess) ptrs.push_back(*p);
        return e;
    }
    template <typename T>
    cudaError_t upload(T **p, const T *src, size_t count) {
        cudaError_t e = alloc(p, count);
        if (e == cudaSuccess && count) e = cudaMemcpy(*p, src, count * sizeof(T), cudaMemcpyHostToDevice);
        return e;
    }
};

#define CU(call)                                                                                  \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) {                                                                  \
            set_err(err, err_size, "%s: %s", #call, cudaGetErrorString(e_));                       \
            return NXKV_CUDA_ERR_DEVICE;                                                          \
        }                                                                                         \
    } while (0)

#define LAUNCHED()                                                                                \
    do {                                                                                          \
        CU(cudaGetLastError());                                                                   \
        CU(cudaDeviceSynchronize());                                                              \
    } while (0)

thread_local double last_kernel_ms = 0.0;

/* Times the kernels launched while it lives (nxkv_cuda_last_kernel_ms). */
struct KernelTimer {
    cudaEvent_t start, stop;
    KernelTimer() {
        cudaEventCreate(&start);
        cudaEventCreate(&stop);
        cudaEventRecord(start);
    }
    void done() {
        cudaEventRecord(stop);
        cudaEventSynchronize(stop);
        float ms = 0;
        cudaEventElapsedTime(&ms, start, stop);
        last_kernel_ms = ms;
    }
    ~KernelTimer() {
        cudaEventDestroy(start);
        cudaEventDestroy(stop);
    }
};

unsigned blocks_for(size_t n, unsigned threads) { return (unsigned)((n + threads - 1) / threads); }

/* ---- per-op kernels ---- */

__global__ void k_lattice_dequantize(const uint8_t *coset, const int32_t *coord, const int32_t *coord_last,
                                     const double *step, size_t n, const double *mean, size_t mean_groups, float *out) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    nxkv_core_lattice_group(coset[i], coord + 7 * i, coord_last[i], step[i], mean_groups ? mean + 8 * (i % mean_groups) : nullptr,
                            out + 8 * i);
}

__global__ void k_lattice_quantize(const double *x, const double *step, size_t n, uint8_t *coset, int32_t *coord,
                                   int32_t *coord_last, int *bad) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    for (int j = 0; j < 8; ++j) {
        /* as the CPU library: |x / step| within int32 with room for the rounding */
        if (step[i] > 0 && !(fabs(x[8 * i + j] / step[i]) < 2147483000.0)) {
            *bad = 1;
            return;
        }
    }
    nxkv_core_lattice_point(x + 8 * i, step[i], coset + i, coord + 7 * i, coord_last + i);
}

__global__ void k_hadamard(float *x, size_t n_blocks, size_t block, float scale) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n_blocks) nxkv_core_hadamard(x + i * block, block, scale);
}

__global__ void k_rope(const float *x, float *out, size_t n_vectors, size_t n_heads, size_t head_dim, const double *cos,
                       const double *sin, size_t n_rot, int neox) {
    const size_t v = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (v >= n_vectors) return;
    const size_t half = n_rot / 2, row = v / n_heads;
    const float *xv = x + v * head_dim;
    float *ov = out + v * head_dim;
    for (size_t j = n_rot; j < head_dim; ++j) ov[j] = xv[j];
    for (size_t i = 0; i < half; ++i) {
        const size_t ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
        nxkv_core_rope_pair(xv[ia], xv[ib], cos[row * half + i], sin[row * half + i], ov + ia, ov + ib);
    }
}

__global__ void k_f32_to_f16(const float *src, uint16_t *dst, size_t n) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = nxkv_core_f32_to_f16(src[i]);
}

/* ---- rANS ---- */

/* One (chunk, lane) task of an interleaved stream. */
struct RansTask {
    int64_t offset;  /* its bytes in the payload */
    int64_t length;
    int64_t out;     /* its first symbol's index */
    int64_t count;   /* symbols */
    int32_t stride;  /* lanes: its symbols are out, out + stride, ... */
    int32_t stream;  /* whose table */
};

/* The packed slot table (core/rans.h nxkv_core_rans_packed_slot) of stream s: one block per
 * stream, a thread per slot, the slot's symbol by binary search over the cumulative frequencies. */
__global__ void k_rans_tables(const uint32_t *freqs, const uint32_t *cum, const int64_t *freq0, const int64_t *n_freqs,
                              uint32_t *packed) {
    const int64_t s = blockIdx.x;
    const uint32_t *c = cum + freq0[s];
    const int64_t m = n_freqs[s];
    for (uint32_t k = threadIdx.x; k < RANS_SLOTS; k += blockDim.x) {
        int64_t lo = 0, hi = m - 1; /* the last symbol whose cum <= k: it holds slot k (frequencies sum to 2^14) */
        while (lo < hi) {
            const int64_t mid = (lo + hi + 1) / 2;
            if (c[mid] <= k) lo = mid;
            else hi = mid - 1;
        }
        packed[s * RANS_SLOTS + k] = nxkv_core_rans_packed_slot(c, (uint32_t)lo, k);
    }
    (void)freqs;
}

/* Up to RANS_BLOCK tasks of one stream. */
struct RansBlock {
    int64_t task0, task1;
    int32_t stream;
};

#define RANS_BLOCK 128
#define RANS_SMEM (RANS_SLOTS * sizeof(uint32_t) + 4096 * sizeof(uint16_t))

/* A block per (stream, up to RANS_BLOCK of its tasks): the stream's packed table and frequencies
 * into shared memory (72 KiB), then a thread per task decodes its lane with them. */
__global__ void k_rans_decode(const uint8_t *payload, const RansTask *tasks, const RansBlock *blocks, const uint32_t *packed,
                              const uint32_t *freqs, const int64_t *freq0, const int64_t *n_freqs, int32_t *symbols,
                              int32_t *stream_status) {
    extern __shared__ uint32_t smem[];
    uint32_t *table = smem;
    uint16_t *freq = (uint16_t *)(smem + RANS_SLOTS);
    const RansBlock b = blocks[blockIdx.x];
    const uint4 *src = (const uint4 *)(packed + (size_t)b.stream * RANS_SLOTS);
    for (uint32_t k = threadIdx.x; k < RANS_SLOTS / 4; k += blockDim.x) ((uint4 *)table)[k] = src[k];
    const int64_t nf = n_freqs[b.stream];
    for (int64_t k = threadIdx.x; k < nf; k += blockDim.x) freq[k] = (uint16_t)freqs[freq0[b.stream] + k];
    __syncthreads();
    const int64_t t = b.task0 + threadIdx.x;
    if (t >= b.task1) return;
    const RansTask k = tasks[t];
    if (!k.count) return;
    if (nxkv_core_rans_decode_packed(payload + k.offset, (size_t)k.length, table, freq, symbols + k.out, (size_t)k.count,
                                     (size_t)k.stride)) {
        stream_status[k.stream] = NXKV_CUDA_ERR_CORRUPT;
    }
}

__global__ void k_rans_encode(const int64_t *symbols, const RansTask *tasks, size_t n_tasks, const uint32_t *freqs,
                              const uint32_t *cum, const uint32_t *rcp, const uint32_t *shift, uint8_t *out,
                              size_t slot_bytes, int64_t *lengths) {
    const size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (t >= n_tasks) return;
    const RansTask k = tasks[t];
    if (!k.count) {
        lengths[t] = 0;
        return;
    }
    uint8_t *end = out + (t + 1) * slot_bytes;
    lengths[t] = nxkv_core_rans_encode(symbols + k.out, (size_t)k.count, (size_t)k.stride, freqs, cum, rcp, shift, end,
                                       slot_bytes);
}

/* The (chunk, lane) tasks of a stream of n symbols, in the order of the file's lane table. */
void lane_tasks(int64_t n, int64_t lanes, int64_t chunk, int64_t out0, int32_t stream, std::vector<RansTask> &tasks) {
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t m = std::min(chunk, n - c0);
        for (int64_t j = 0; j < lanes; ++j) {
            RansTask k{};
            k.out = out0 + c0 + j;
            k.count = j < m ? (m - j + lanes - 1) / lanes : 0;
            k.stride = (int32_t)lanes;
            k.stream = stream;
            tasks.push_back(k);
        }
    }
}

int64_t n_lane_tasks(int64_t n, int64_t lanes, int64_t chunk) { return n ? (n + chunk - 1) / chunk * lanes : 0; }

/* ---- the batched section decode ---- */

struct Section {
    nxkv_section s;
    int64_t unit0;   /* its first (head, cell) unit */
    int64_t out_off; /* its rows' byte offset in the output buffer */
};

/* The last i < n whose start(i) <= u, for starts that grow with i and start(0) <= u: which
 * section (or head, or group run) a flat thread index falls in. */
template <typename Start>
__device__ int64_t last_start_at_or_below(int64_t n, int64_t u, Start start) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (start(mid) <= u) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}


/* One coded vector (a head, or a head group) of one cell: the lattice values (core/lattice.h),
 * sink rows, the inverse Hadamard (core/hadamard.h, its own inverse), RoPE (core/rope.h), then f16
 * or f32 rows (16-byte stores where the rows are cell-major). The vector lives in local memory
 * (L1): an instance for 64-value heads that kept it in registers measured no faster on an H200
 * (0.55 ms either way for a 4096-token SmolLM2 state). Sections on a PCA basis go to
 * k_section_basis. */
__global__ void k_section_values(const Section *sections, int64_t n_sections, int64_t n_units, nxkv_values arrays,
                                 uint8_t *out, int32_t *section_status) {
    const int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (u >= n_units) return;
    const int64_t lo = last_start_at_or_below(n_sections, u, [&](int64_t i) { return sections[i].unit0; });
    const Section &S = sections[lo];
    nxkv_section s = S.s;
    s.dest = out + S.out_off; /* the device copy of the rows */
    const int64_t d = s.head_dim, k = s.head_group, w = k * d, n_cells = s.n_cells, n_embd = s.n_heads * d;
    const int64_t local = u - S.unit0, vec = local / n_cells, cell = local % n_cells; /* cells adjacent: coalesced V^T */
    float v[MAX_HEAD_DIM];
    const int r = nxkv_core_section_vector(&s, &arrays, vec, cell, v, 0);
    if (r) {
        section_status[lo] = r;
        return;
    }
    if (s.out_f16 && !s.transposed) { /* 16-byte stores: d and n_embd are multiples of 8 */
        uint4 *row = (uint4 *)((uint16_t *)s.dest + cell * n_embd + vec * w);
        for (int64_t q = 0; q < w / 8; ++q) {
            uint32_t b[4];
            for (int j = 0; j < 4; ++j) {
                b[j] = (uint32_t)nxkv_core_f32_to_f16(v[q * 8 + 2 * j]) | ((uint32_t)nxkv_core_f32_to_f16(v[q * 8 + 2 * j + 1]) << 16);
            }
            row[q] = make_uint4(b[0], b[1], b[2], b[3]);
        }
    } else {
        for (int64_t j = 0; j < k; ++j) nxkv_core_section_store(&s, vec * k + j, cell, v + j * d);
    }
}

/* A tile of cells of one vector of a section on a PCA basis: a thread block of BASIS_THREADS. */
struct BasisTile {
    int64_t section, vec, cell0, cells; /* cells: the tile's size, a multiple of 8 (the last tile may hold fewer) */
};
#define BASIS_THREADS 128
#define BASIS_MAX_TILE 32

/* The cells of a tile per vector width w, so that its shared memory (12 w bytes a cell) stays
 * within 48 KB. */
int64_t basis_tile_cells(int64_t w) { return w <= 128 ? 32 : w <= 256 ? 16 : 8; }

/* One tile of a basis section, in four steps with the block's threads: (1) each point group's
 * doubled coordinates (core/transform.h) into P [w][cells] as doubles, each cell's magnitude sum
 * l1; (2) the exact sums S[i] = sum over j of basis[j w + i] p2[j], eight cells a thread for one i
 * (a basis entry read once for eight products), in doubles where 2^shift l1 < 2^52 proves every
 * partial sum exact, else in int64, so S is the integer the CPU computes; then x = (float)(S c
 * [* cscale] [+ mean]) into X [cells][w] (nxkv_core_section_basis_terms: the CPU's double
 * operations); (3) core/section.h's finish a thread per cell (sink rows, inverse Hadamard, RoPE,
 * the finite check); (4) rows stored with adjacent threads on adjacent values (or cells, where V
 * is transposed). */
__global__ void __launch_bounds__(BASIS_THREADS) k_section_basis(const Section *sections, const BasisTile *tiles,
                                                                 nxkv_values a, uint8_t *out, int32_t *section_status) {
    extern __shared__ double basis_smem[];
    __shared__ unsigned long long l1s[BASIS_MAX_TILE];
    __shared__ int bad;
    const BasisTile T = tiles[blockIdx.x];
    const Section &S = sections[T.section];
    nxkv_section s = S.s;
    s.dest = out + S.out_off;
    const int64_t d = s.head_dim, w = s.head_group * d, n = s.n_cells, vec = T.vec, c0 = T.cell0, tc = T.cells;
    const int64_t nc = min(tc, n - c0), groups = w / 8;
    double *P = basis_smem;             /* P[j tc + c] */
    float *X = (float *)(P + w * tc);   /* X[c w + i] */
    for (int64_t c = threadIdx.x; c < tc; c += blockDim.x) l1s[c] = 0;
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    for (int64_t it = threadIdx.x; it < tc * groups; it += blockDim.x) {
        const int64_t c = it / groups, q = it % groups;
        int64_t p2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (c < nc) {
            int32_t z7[7], last;
            const int64_t coset = nxkv_core_point_group(&s, &a, c0 + c, vec * groups + q, z7, &last);
            if (coset != 0 && coset != 1) bad = 1;
            atomicAdd(&l1s[c], (unsigned long long)nxkv_core_doubled_group(coset & 1, z7, last, p2));
        }
        for (int j = 0; j < 8; ++j) P[(q * 8 + j) * tc + c] = (double)p2[j]; /* |p2| < 2^34: exact */
    }
    __syncthreads();
    if (bad) {
        if (threadIdx.x == 0) section_status[T.section] = 1;
        return;
    }
    const float *B = a.bases + s.basis0 + vec * w * w;
    const unsigned long long narrow = 1ull << (52 - s.basis_shift);
    for (int64_t it = threadIdx.x; it < w * (tc / 8); it += blockDim.x) {
        const int64_t i = it % w, cg = it / w * 8;
        if (cg >= nc) continue;
        bool wide = false;
        for (int c = 0; c < 8; ++c) wide |= l1s[cg + c] >= narrow;
        double sum[8];
        if (!wide) {
            double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t j = 0; j < w; ++j) {
                const double b = (double)B[j * w + i];
                const double *pj = P + j * tc + cg;
                for (int c = 0; c < 8; ++c) acc[c] += b * pj[c];
            }
            for (int c = 0; c < 8; ++c) sum[c] = acc[c];
        } else { /* only damaged files come here */
            int64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t j = 0; j < w; ++j) {
                const int64_t b = (int64_t)B[j * w + i];
                const double *pj = P + j * tc + cg;
                for (int c = 0; c < 8; ++c) acc[c] += b * (int64_t)pj[c];
            }
            for (int c = 0; c < 8; ++c) sum[c] = (double)acc[c];
        }
        for (int c = 0; c < 8 && cg + c < nc; ++c) {
            double cc;
            const double *mean, *cscale;
            nxkv_core_section_basis_terms(&s, &a, vec, c0 + cg + c, &cc, &mean, &cscale);
            double x = sum[c] * cc;
            if (cscale) x = x * cscale[i];
            if (mean) x = x + mean[i];
            X[(cg + c) * w + i] = (float)x;
        }
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < nc; c += blockDim.x) {
        const int r = nxkv_core_section_finish(&s, &a, vec, c0 + c, X + c * w);
        if (r) section_status[T.section] = r; /* the host discards the rows */
    }
    __syncthreads();
    const int64_t n_embd = s.n_heads * d;
    for (int64_t it = threadIdx.x; it < nc * w; it += blockDim.x) {
        int64_t c, i, at;
        if (s.transposed) {
            i = it / nc, c = it % nc, at = (vec * w + i) * n + c0 + c;
        } else {
            c = it / w, i = it % w, at = (c0 + c) * n_embd + vec * w + i;
        }
        if (s.out_f16) ((uint16_t *)s.dest)[at] = nxkv_core_f32_to_f16(X[c * w + i]);
        else ((float *)s.dest)[at] = X[c * w + i];
    }
}

struct Timer {
    cudaEvent_t ev[6];
    int n = 0;
    Timer() {
        for (auto &e : ev) cudaEventCreate(&e);
    }
    ~Timer() {
        for (auto &e : ev) cudaEventDestroy(e);
    }
    void mark() { cudaEventRecord(ev[n++]); }
    void times(double *ms) {
        cudaEventSynchronize(ev[n - 1]);
        for (int i = 0; i + 1 < n; ++i) {
            float t = 0;
            cudaEventElapsedTime(&t, ev[i], ev[i + 1]);
            ms[i] = t;
        }
    }
};

int check_freqs(const int64_t *freqs, int64_t n, std::vector<uint32_t> &f32, std::vector<uint32_t> &cum) {
    uint64_t total = 0;
    for (int64_t s = 0; s < n; ++s) {
        if (freqs[s] < 0 || freqs[s] > (int64_t)RANS_SLOTS) return NXKV_CUDA_ERR_ARG;
        f32.push_back((uint32_t)freqs[s]);
        cum.push_back((uint32_t)total);
        total += (uint64_t)freqs[s];
    }
    return total == RANS_SLOTS ? NXKV_CUDA_OK : NXKV_CUDA_ERR_ARG;
}

} // namespace

extern "C" {

int nxkv_cuda_abi_version(void) { return NXKV_CUDA_ABI_VERSION; }

double nxkv_cuda_last_kernel_ms(void) { return last_kernel_ms; }

int nxkv_cuda_device(char *name, size_t name_size, int *major, int *minor) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        set_err(name, name_size, "%s", e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device");
        return NXKV_CUDA_ERR_DEVICE;
    }
    int dev = 0;
    cudaDeviceProp p;
    if ((e = cudaGetDevice(&dev)) != cudaSuccess || (e = cudaGetDeviceProperties(&p, dev)) != cudaSuccess) {
        set_err(name, name_size, "%s", cudaGetErrorString(e));
        return NXKV_CUDA_ERR_DEVICE;
    }
    set_err(name, name_size, "%s", p.name);
    *major = p.major;
    *minor = p.minor;
    return NXKV_CUDA_OK;
}

int nxkv_cuda_lattice_dequantize(const uint8_t *coset, const int32_t *coord, const int32_t *coord_last,
                                 const double *step, size_t n_groups, const double *mean, size_t mean_groups, float *out,
                                 char *err, size_t err_size) {
    if (mean_groups && (n_groups % mean_groups)) return NXKV_CUDA_ERR_ARG;
    if (!n_groups) return NXKV_CUDA_OK;
    Buffers b;
    uint8_t *d_coset;
    int32_t *d_coord, *d_last;
    double *d_step, *d_mean;
    float *d_out;
    CU(b.upload(&d_coset, coset, n_groups));
    CU(b.upload(&d_coord, coord, 7 * n_groups));
    CU(b.upload(&d_last, coord_last, n_groups));
    CU(b.upload(&d_step, step, n_groups));
    CU(b.upload(&d_mean, mean, mean_groups ? 8 * mean_groups : 0));
    CU(b.alloc(&d_out, 8 * n_groups));
    KernelTimer timer;
    k_lattice_dequantize<<<blocks_for(n_groups, 256), 256>>>(d_coset, d_coord, d_last, d_step, n_groups, d_mean, mean_groups,
                                                             d_out);
    timer.done();
    LAUNCHED();
    CU(cudaMemcpy(out, d_out, 8 * n_groups * sizeof(float), cudaMemcpyDeviceToHost));
    return NXKV_CUDA_OK;
}

int nxkv_cuda_lattice_quantize(const double *x, const double *step, size_t n_groups, uint8_t *coset, int32_t *coord,
                               int32_t *coord_last, char *err, size_t err_size) {
    if (!n_groups) return NXKV_CUDA_OK;
    Buffers b;
    double *d_x, *d_step;
    uint8_t *d_coset;
    int32_t *d_coord, *d_last;
    int *d_bad, bad = 0;
    CU(b.upload(&d_x, x, 8 * n_groups));
    CU(b.upload(&d_step, step, n_groups));
    CU(b.alloc(&d_coset, n_groups));
    CU(b.alloc(&d_coord, 7 * n_groups));
    CU(b.alloc(&d_last, n_groups));
    CU(b.upload(&d_bad, &bad, 1));
    KernelTimer timer;
    k_lattice_quantize<<<blocks_for(n_groups, 256), 256>>>(d_x, d_step, n_groups, d_coset, d_coord, d_last, d_bad);
    timer.done();
    LAUNCHED();
    CU(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
    if (bad) return NXKV_CUDA_ERR_ARG;
    CU(cudaMemcpy(coset, d_coset, n_groups, cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(coord, d_coord, 7 * n_groups * sizeof(int32_t), cudaMemcpyDeviceToHost));
    CU(cudaMemcpy(coord_last, d_last, n_groups * sizeof(int32_t), cudaMemcpyDeviceToHost));
    return NXKV_CUDA_OK;
}

int nxkv_cuda_hadamard_blocks(const float *x, float *out, size_t n_values, size_t block, char *err, size_t err_size) {
    if (!block || (block & (block - 1)) || n_values % block) return NXKV_CUDA_ERR_ARG;
    if (!n_values) return NXKV_CUDA_OK;
    Buffers b;
    float *d_x;
    CU(b.upload(&d_x, x, n_values));
    const size_t n_blocks = n_values / block;
    KernelTimer timer;
    k_hadamard<<<blocks_for(n_blocks, 128), 128>>>(d_x, n_blocks, block, (float)(1.0 / sqrt((double)block)));
    timer.done();
    LAUNCHED();
    CU(cudaMemcpy(out, d_x, n_values * sizeof(float), cudaMemcpyDeviceToHost));
    return NXKV_CUDA_OK;
}

int nxkv_cuda_rope_rotate(const float *x, float *out, size_t n_rows, size_t n_heads, size_t head_dim, const double *cos,
                          const double *sin, size_t n_rot, int neox, char *err, size_t err_size) {
    if (n_rot > head_dim || n_rot % 2) return NXKV_CUDA_ERR_ARG;
    const size_t n = n_rows * n_heads * head_dim;
    if (!n) return NXKV_CUDA_OK;
    Buffers b;
    float *d_x, *d_out;
    double *d_cos, *d_sin;
    CU(b.upload(&d_x, x, n));
    CU(b.alloc(&d_out, n));
    CU(b.upload(&d_cos, cos, n_rows * (n_rot / 2)));
    CU(b.upload(&d_sin, sin, n_rows * (n_rot / 2)));
    KernelTimer timer;
    k_rope<<<blocks_for(n_rows * n_heads, 128), 128>>>(d_x, d_out, n_rows * n_heads, n_heads, head_dim, d_cos, d_sin, n_rot,
                                                       neox);
    timer.done();
    LAUNCHED();
    CU(cudaMemcpy(out, d_out, n * sizeof(float), cudaMemcpyDeviceToHost));
    return NXKV_CUDA_OK;
}

int nxkv_cuda_f32_to_f16(const float *src, uint16_t *dst, size_t n, char *err, size_t err_size) {
    if (!n) return NXKV_CUDA_OK;
    Buffers b;
    float *d_src;
    uint16_t *d_dst;
    CU(b.upload(&d_src, src, n));
    CU(b.alloc(&d_dst, n));
    KernelTimer timer;
    k_f32_to_f16<<<blocks_for(n, 256), 256>>>(d_src, d_dst, n);
    timer.done();
    LAUNCHED();
    CU(cudaMemcpy(dst, d_dst, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    return NXKV_CUDA_OK;
}

} // extern "C"

namespace {

/* The decode shared by nxkv_cuda_decode_sections and nxkv_cuda_rans_decode_lanes: symbols_out,
 * when given, receives the symbol buffer instead of the sections being made. */
int decode(nxkv_cuda_batch *bt, int32_t *symbols_out, char *err, size_t err_size) {
    /* host-side checks: every task's bytes inside the payload, empty lanes empty, tables valid */
    std::vector<RansTask> tasks;
    std::vector<RansBlock> rans_blocks;
    std::vector<uint32_t> f32, cum;
    std::vector<int64_t> freq0, n_freqs;
    for (int64_t i = 0; i < bt->n_streams; ++i) {
        const nxkv_cuda_rans_stream &st = bt->streams[i];
        if (st.n_symbols < 0 || st.lanes < 1 || st.chunk < st.lanes || st.out0 < 0 || st.out0 + st.n_symbols > bt->n_symbols ||
            st.freq0 < 0 || st.n_freqs < 1 || st.freq0 + st.n_freqs > bt->n_freqs || st.payload_offset < 0 || st.task0 < 0) {
            return NXKV_CUDA_ERR_ARG;
        }
        bt->stream_status[i] = 0;
        freq0.push_back((int64_t)f32.size());
        n_freqs.push_back(st.n_freqs);
        if (st.n_freqs > 4096 || check_freqs(bt->freqs + st.freq0, st.n_freqs, f32, cum) != NXKV_CUDA_OK) {
            bt->stream_status[i] = NXKV_CUDA_ERR_CORRUPT;
            return NXKV_CUDA_ERR_CORRUPT;
        }
        const size_t first = tasks.size();
        lane_tasks(st.n_symbols, st.lanes, st.chunk, st.out0, (int32_t)i, tasks);
        const int64_t count = (int64_t)(tasks.size() - first);
        for (int64_t t0 = 0; t0 < count; t0 += RANS_BLOCK) {
            rans_blocks.push_back(RansBlock{(int64_t)first + t0, (int64_t)first + std::min(count, t0 + RANS_BLOCK), (int32_t)i});
        }
        if (st.task0 + count > bt->n_task_lengths) return NXKV_CUDA_ERR_ARG;
        int64_t offset = st.payload_offset;
        for (int64_t k = 0; k < count; ++k) {
            RansTask &t = tasks[first + k];
            const int64_t len = bt->task_lengths[st.task0 + k];
            if (len < 0 || len > bt->payload_size - offset || (!t.count && len)) {
                bt->stream_status[i] = NXKV_CUDA_ERR_CORRUPT;
                return NXKV_CUDA_ERR_CORRUPT;
            }
            t.offset = offset;
            t.length = len;
            offset += len;
        }
    }
    if (bt->n_host_symbols && (bt->host_symbols0 < 0 || bt->host_symbols0 + bt->n_host_symbols > bt->n_symbols)) {
        return NXKV_CUDA_ERR_ARG;
    }
    std::vector<Section> sections;
    std::vector<BasisTile> tiles;
    int64_t units = 0, out_bytes = 0, basis_smem = 0;
    if (bt->n_bases < 0 || bt->n_columns < 0 || (bt->n_bases && !bt->bases) || (bt->n_columns && !bt->columns)) {
        return NXKV_CUDA_ERR_ARG;
    }
    for (int64_t i = 0; i < bt->n_sections; ++i) {
        const nxkv_section &s = bt->sections[i];
        bt->section_status[i] = 0;
        const nxkv_values host = {nullptr, bt->n_symbols, nullptr, bt->n_steps, nullptr,    bt->n_means,
                                  bt->sink_map, bt->n_sink_map, nullptr, bt->n_sinks, nullptr, nullptr,
                                  bt->n_trig, nullptr, bt->n_bases, bt->columns, bt->n_columns};
        if (!nxkv_core_section_fits(&s, &host)) return NXKV_CUDA_ERR_ARG; /* the CPU library's check */
        const int64_t d = s.head_dim, n = s.n_cells, h = s.n_heads, k = s.head_group;
        sections.push_back(Section{s, units, out_bytes});
        if (s.basis) {
            const int64_t tc = basis_tile_cells(k * d);
            for (int64_t vec = 0; vec < h / k; ++vec) {
                for (int64_t c0 = 0; c0 < n; c0 += tc) tiles.push_back(BasisTile{i, vec, c0, tc});
            }
            basis_smem = std::max(basis_smem, 12 * k * d * tc);
        } else {
            units += n * (h / k);
        }
        out_bytes += n * h * d * (s.out_f16 ? 2 : 4);
    }

    Timer timer;
    Buffers b;
    uint8_t *d_payload, *d_out = nullptr;
    RansTask *d_tasks;
    uint32_t *d_f32, *d_cum, *d_packed;
    RansBlock *d_blocks;
    int64_t *d_freq0, *d_nfreqs;
    int32_t *d_symbols, *d_stream_status, *d_section_status, *d_sink_map;
    double *d_steps, *d_means, *d_cos, *d_sin;
    uint16_t *d_sinks;
    float *d_bases;
    int64_t *d_columns;
    Section *d_sections;
    BasisTile *d_tiles;
    timer.mark();
    CU(b.upload(&d_payload, bt->payload, (size_t)bt->payload_size));
    CU(b.upload(&d_tasks, tasks.data(), tasks.size()));
    CU(b.upload(&d_f32, f32.data(), f32.size()));
    CU(b.upload(&d_cum, cum.data(), cum.size()));
    CU(b.upload(&d_freq0, freq0.data(), freq0.size()));
    CU(b.upload(&d_nfreqs, n_freqs.data(), n_freqs.size()));
    CU(b.upload(&d_stream_status, bt->stream_status, (size_t)bt->n_streams));
    CU(b.alloc(&d_packed, (size_t)bt->n_streams * RANS_SLOTS));
    CU(b.upload(&d_blocks, rans_blocks.data(), rans_blocks.size()));
    CU(b.alloc(&d_symbols, (size_t)bt->n_symbols));
    if (bt->n_host_symbols) {
        CU(cudaMemcpy(d_symbols + bt->host_symbols0, bt->host_symbols, (size_t)bt->n_host_symbols * sizeof(int32_t),
                      cudaMemcpyHostToDevice));
    }
    CU(b.upload(&d_steps, bt->steps, (size_t)bt->n_steps));
    CU(b.upload(&d_means, bt->means, (size_t)bt->n_means));
    CU(b.upload(&d_sink_map, bt->sink_map, (size_t)bt->n_sink_map));
    CU(b.upload(&d_sinks, bt->sinks, (size_t)bt->n_sinks));
    CU(b.upload(&d_cos, bt->cos, (size_t)bt->n_trig));
    CU(b.upload(&d_sin, bt->sin, (size_t)bt->n_trig));
    CU(b.upload(&d_bases, bt->bases, (size_t)bt->n_bases));
    CU(b.upload(&d_columns, bt->columns, (size_t)bt->n_columns));
    CU(b.upload(&d_sections, sections.data(), sections.size()));
    CU(b.upload(&d_tiles, tiles.data(), tiles.size()));
    CU(b.upload(&d_section_status, bt->section_status, (size_t)bt->n_sections));
    if (out_bytes) CU(b.alloc(&d_out, (size_t)out_bytes));
    timer.mark();
    if (bt->n_streams) {
        k_rans_tables<<<(unsigned)bt->n_streams, 256>>>(d_f32, d_cum, d_freq0, d_nfreqs, d_packed);
        CU(cudaGetLastError());
    }
    timer.mark();
    if (!rans_blocks.empty()) {
        CU(cudaFuncSetAttribute(k_rans_decode, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)RANS_SMEM));
        k_rans_decode<<<(unsigned)rans_blocks.size(), RANS_BLOCK, RANS_SMEM>>>(d_payload, d_tasks, d_blocks, d_packed, d_f32,
                                                                              d_freq0, d_nfreqs, d_symbols, d_stream_status);
        CU(cudaGetLastError());
    }
    timer.mark();
    const nxkv_values arrays = {d_symbols, bt->n_symbols, d_steps, bt->n_steps, d_means, bt->n_means,
                                d_sink_map, bt->n_sink_map, d_sinks, bt->n_sinks, d_cos, d_sin,
                                bt->n_trig, d_bases, bt->n_bases, d_columns, bt->n_columns};
    if (units) {
        const unsigned threads = 128, grid = blocks_for((size_t)units, threads);
        const int64_t ns = (int64_t)sections.size();
        k_section_values<<<grid, threads>>>(d_sections, ns, units, arrays, d_out, d_section_status);
        CU(cudaGetLastError());
    }
    if (!tiles.empty()) {
        CU(cudaFuncSetAttribute(k_section_basis, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)basis_smem));
        k_section_basis<<<(unsigned)tiles.size(), BASIS_THREADS, (size_t)basis_smem>>>(d_sections, d_tiles, arrays, d_out,
                                                                                      d_section_status);
        CU(cudaGetLastError());
    }
    timer.mark();
    CU(cudaDeviceSynchronize());
    if (bt->n_streams) {
        CU(cudaMemcpy(bt->stream_status, d_stream_status, (size_t)bt->n_streams * sizeof(int32_t), cudaMemcpyDeviceToHost));
    }
    if (bt->n_sections) {
        CU(cudaMemcpy(bt->section_status, d_section_status, (size_t)bt->n_sections * sizeof(int32_t), cudaMemcpyDeviceToHost));
    }
    int status = NXKV_CUDA_OK;
    for (int64_t i = 0; i < bt->n_streams; ++i) status = bt->stream_status[i] ? NXKV_CUDA_ERR_CORRUPT : status;
    for (int64_t i = 0; i < bt->n_sections; ++i) status = bt->section_status[i] ? NXKV_CUDA_ERR_CORRUPT : status;
    if (status == NXKV_CUDA_OK) {
        if (symbols_out && bt->n_symbols) {
            CU(cudaMemcpy(symbols_out, d_symbols, (size_t)bt->n_symbols * sizeof(int32_t), cudaMemcpyDeviceToHost));
        }
        for (const Section &S : sections) {
            const size_t bytes = (size_t)(S.s.n_cells * S.s.n_heads * S.s.head_dim * (S.s.out_f16 ? 2 : 4));
            if (bytes) CU(cudaMemcpy(S.s.dest, d_out + S.out_off, bytes, cudaMemcpyDeviceToHost));
        }
    }
    timer.mark();
    timer.times(bt->ms);
    return status;
}

} // namespace

extern "C" {

int nxkv_cuda_decode_sections(nxkv_cuda_batch *batch, char *err, size_t err_size) {
    return decode(batch, nullptr, err, err_size);
}

int nxkv_cuda_rans_decode_lanes(const uint8_t *data, size_t n_data, const int64_t *lengths, size_t n_tasks,
                                const int64_t *freqs, size_t n_freqs, int32_t *out, size_t n, size_t lanes, size_t chunk,
                                char *err, size_t err_size) {
    if (!lanes || chunk < lanes || (size_t)n_lane_tasks((int64_t)n, (int64_t)lanes, (int64_t)chunk) != n_tasks) {
        return NXKV_CUDA_ERR_ARG;
    }
    nxkv_cuda_rans_stream st = {0, 0, (int64_t)n, (int64_t)lanes, (int64_t)chunk, 0, (int64_t)n_freqs, 0};
    int32_t stream_status = 0;
    nxkv_cuda_batch batch;
    memset(&batch, 0, sizeof batch);
    batch.payload = data;
    batch.payload_size = (int64_t)n_data;
    batch.task_lengths = lengths;
    batch.n_task_lengths = (int64_t)n_tasks;
    batch.freqs = freqs;
    batch.n_freqs = (int64_t)n_freqs;
    batch.streams = &st;
    batch.n_streams = 1;
    batch.n_symbols = (int64_t)n;
    batch.stream_status = &stream_status;
    /* no sections: the symbol buffer comes back instead */
    return decode(&batch, out, err, err_size);
}

int nxkv_cuda_rans_encode_lanes(const int64_t *symbols, size_t n, const int64_t *freqs, size_t n_freqs, size_t lanes,
                                size_t chunk, uint8_t *out, size_t slot_bytes, int64_t *lengths, size_t n_tasks,
                                char *err, size_t err_size) {
    if (!lanes || chunk < lanes || (size_t)n_lane_tasks((int64_t)n, (int64_t)lanes, (int64_t)chunk) != n_tasks) {
        return NXKV_CUDA_ERR_ARG;
    }
    std::vector<uint32_t> f32, cum;
    if (check_freqs(freqs, (int64_t)n_freqs, f32, cum) != NXKV_CUDA_OK) return NXKV_CUDA_ERR_ARG;
    for (size_t i = 0; i < n; ++i) {
        if (symbols[i] < 0 || (size_t)symbols[i] >= n_freqs || !f32[(size_t)symbols[i]]) return NXKV_CUDA_ERR_ARG;
    }
    if (!n_tasks) return NXKV_CUDA_OK;
    std::vector<uint32_t> rcp(n_freqs), shift(n_freqs);
    for (size_t s = 0; s < n_freqs; ++s) nxkv_core_rans_reciprocal(f32[s], &rcp[s], &shift[s]);
    std::vector<RansTask> tasks;
    lane_tasks((int64_t)n, (int64_t)lanes, (int64_t)chunk, 0, 0, tasks);
    Buffers b;
    int64_t *d_symbols, *d_lengths;
    RansTask *d_tasks;
    uint32_t *d_f, *d_cum, *d_rcp, *d_shift;
    uint8_t *d_out;
    CU(b.upload(&d_symbols, symbols, n));
    CU(b.upload(&d_tasks, tasks.data(), tasks.size()));
    CU(b.upload(&d_f, f32.data(), n_freqs));
    CU(b.upload(&d_cum, cum.data(), n_freqs));
    CU(b.upload(&d_rcp, rcp.data(), n_freqs));
    CU(b.upload(&d_shift, shift.data(), n_freqs));
    CU(b.alloc(&d_out, n_tasks * slot_bytes));
    CU(b.alloc(&d_lengths, n_tasks));
    KernelTimer timer;
    k_rans_encode<<<blocks_for(n_tasks, 64), 64>>>(d_symbols, d_tasks, n_tasks, d_f, d_cum, d_rcp, d_shift, d_out, slot_bytes,
                                                   d_lengths);
    timer.done();
    LAUNCHED();
    CU(cudaMemcpy(lengths, d_lengths, n_tasks * sizeof(int64_t), cudaMemcpyDeviceToHost));
    for (size_t k = 0; k < n_tasks; ++k) {
        if (lengths[k] < 0) return NXKV_CUDA_ERR_ARG;
    }
    CU(cudaMemcpy(out, d_out, n_tasks * slot_bytes, cudaMemcpyDeviceToHost));
    return NXKV_CUDA_OK;
}

int nxkv_cuda_copy_times(size_t bytes, int repeats, double *d2d_ms, double *h2d_ms, double *h2d_pinned_ms, char *err,
                         size_t err_size) {
    if (!bytes || repeats < 1) return NXKV_CUDA_ERR_ARG;
    Buffers b;
    uint8_t *d_a, *d_b, *pinned = nullptr;
    CU(b.alloc(&d_a, bytes));
    CU(b.alloc(&d_b, bytes));
    CU(cudaMemset(d_a, 1, bytes));
    std::vector<uint8_t> pageable(bytes, 7);
    CU(cudaMallocHost((void **)&pinned, bytes));
    memset(pinned, 7, bytes);
    cudaEvent_t t0, t1;
    cudaEventCreate(&t0);
    cudaEventCreate(&t1);
    std::vector<double> d2d, h2d, h2dp;
    int status = NXKV_CUDA_OK;
    for (int r = 0; r <= repeats && status == NXKV_CUDA_OK; ++r) { /* the first round warms up */
        float ms[3];
        const void *src[3] = {d_a, pageable.data(), pinned};
        for (int k = 0; k < 3; ++k) {
            cudaEventRecord(t0);
            cudaError_t e = cudaMemcpy(d_b, src[k], bytes, k ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice);
            cudaEventRecord(t1);
            cudaEventSynchronize(t1);
            if (e != cudaSuccess) {
                set_err(err, err_size, "cudaMemcpy: %s", cudaGetErrorString(e));
                status = NXKV_CUDA_ERR_DEVICE;
                break;
            }
            cudaEventElapsedTime(&ms[k], t0, t1);
        }
        if (r && status == NXKV_CUDA_OK) {
            d2d.push_back(ms[0]);
            h2d.push_back(ms[1]);
            h2dp.push_back(ms[2]);
        }
    }
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
    cudaFreeHost(pinned);
    if (status != NXKV_CUDA_OK) return status;
    auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
    };
    *d2d_ms = median(d2d);
    *h2d_ms = median(h2d);
    *h2d_pinned_ms = median(h2dp);
    return NXKV_CUDA_OK;
}

} // extern "C"

/* ---- the batched section encode ---- */

namespace {

struct EncSection {
    nxkv_cuda_encode_section s;
    int64_t unit0;   /* its first (head, cell) unit */
    int64_t x0;      /* its values in x: [n_cells, n_heads, head_dim] floats */
    int64_t chan0;   /* its channel means: n_heads * head_dim */
    int64_t sym0;    /* its point streams: coset [n g], coord [n g 7], coord_last [n g] */
    int64_t step0;   /* its steps: n_heads */
    int64_t n_sink;
    int64_t sink0;   /* its sink rows in the sink buffer (f16) */
    int64_t map0;    /* sink_map offset or -1 */
};

__device__ inline float row_value(const nxkv_cuda_encode_section &s, const uint8_t *rows, int64_t cell, int64_t c) {
    const int64_t n_embd = s.n_heads * s.head_dim;
    const int64_t i = s.transposed ? c * s.n_cells + cell : cell * n_embd + c;
    return s.rows_f16 ? nxkv_core_f16_to_f32(((const uint16_t *)rows)[i]) : ((const float *)rows)[i];
}

__device__ int64_t find_section(const EncSection *sections, int64_t n_sections, int64_t u) {
    const int64_t lo = last_start_at_or_below(n_sections, u, [&](int64_t i) { return sections[i].unit0; });
    return lo;
}

/* RoPE removal and the Hadamard rotation of one head vector of one cell (the encode direction
 * of k_section_values), its sink row as f16. */
__global__ void k_enc_transform(const EncSection *sections, int64_t n_sections, int64_t n_units, const uint8_t *const *rows,
                                const int32_t *sink_map, const double *cos, const double *sin, float *x, uint16_t *sinks) {
    const int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (u >= n_units) return;
    const int64_t si = find_section(sections, n_sections, u);
    const EncSection &E = sections[si];
    const nxkv_cuda_encode_section &s = E.s;
    const int64_t d = s.head_dim, n_cells = s.n_cells;
    const int64_t local = u - E.unit0, head = local / n_cells, cell = local % n_cells;
    float v[MAX_HEAD_DIM];
    for (int64_t j = 0; j < d; ++j) v[j] = row_value(s, rows[si], cell, head * d + j);
    if (s.rope) nxkv_core_rope_vector(v, s.rope, s.n_rot, cos + s.trig0 + cell * (s.n_rot / 2), sin + s.trig0 + cell * (s.n_rot / 2));
    if (s.hadamard) nxkv_core_hadamard_vector(v, d);
    float *o = x + E.x0 + (cell * s.n_heads + head) * d;
    for (int64_t j = 0; j < d; ++j) o[j] = v[j];
    if (E.map0 >= 0) {
        const int32_t r = sink_map[E.map0 + cell];
        if (r >= 0) {
            uint16_t *so = sinks + E.sink0 + ((int64_t)r * s.n_heads + head) * d;
            for (int64_t j = 0; j < d; ++j) so[j] = nxkv_core_f32_to_f16(v[j]);
        }
    }
}

/* Channel means over the cells that are not sinks (all cells if every one is), as numpy's
 * mean(axis=0): the cells summed in order in double, then divided; stored as f16 and used as
 * the f16 value. A thread per (section, channel). */
__global__ void k_enc_mean(const EncSection *sections, int64_t n_sections, int64_t n_channels, const float *x,
                           const int32_t *sink_map, uint16_t *mean16, double *mean) {
    const int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (u >= n_channels) return;
    const int64_t lo = last_start_at_or_below(n_sections, u, [&](int64_t i) { return sections[i].chan0; });
    const EncSection &E = sections[lo];
    const nxkv_cuda_encode_section &s = E.s;
    const int64_t c = u - E.chan0, n_embd = s.n_heads * s.head_dim;
    if (!s.center) return;
    const bool all = E.n_sink == s.n_cells;
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t cell = 0; cell < s.n_cells; ++cell) {
        if (!all && E.map0 >= 0 && sink_map[E.map0 + cell] >= 0) continue;
        const double v = (double)x[E.x0 + cell * n_embd + c];
        sum = count ? sum + v : v; /* numpy starts from the first row: -0.0 stays -0.0 */
        ++count;
    }
    const uint16_t h = nxkv_core_f64_to_f16(count ? sum / (double)count : 0.0);
    mean16[u] = h;
    mean[u] = (double)nxkv_core_f16_to_f32(h);
}

/* Each head's sum of squares after centring, over all cells: a block per (section, head),
 * strided partial sums then a fixed tree, so the same bits every run. */
__global__ void k_enc_sumsq(const EncSection *sections, const int64_t *head0, int64_t n_sections, const float *x,
                            const double *mean, double *sumsq) {
    __shared__ double part[256];
    const int64_t hh = blockIdx.x;
    const int64_t lo = last_start_at_or_below(n_sections, hh, [&](int64_t i) { return head0[i]; });
    const EncSection &E = sections[lo];
    const nxkv_cuda_encode_section &s = E.s;
    const int64_t head = hh - head0[lo], d = s.head_dim, n_embd = s.n_heads * d, total = s.n_cells * d;
    double acc = 0.0;
    for (int64_t k = threadIdx.x; k < total; k += blockDim.x) {
        const int64_t cell = k / d, j = k % d;
        double v = (double)x[E.x0 + cell * n_embd + head * d + j];
        if (s.center) v = v - mean[E.chan0 + head * d + j];
        acc += v * v;
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) sumsq[hh] = part[0];
}

/* E8 points of one 8-value group of one cell (core/lattice.h), centred values at the head's
 * step; each stream's extremes. */
__global__ void k_enc_quantize(const EncSection *sections, const int64_t *group0, int64_t n_sections, int64_t n_groups,
                               const float *x, const double *mean, const double *steps, int32_t *symbols, int32_t *minmax,
                               int *bad) {
    const int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (u >= n_groups) return;
    const int64_t lo = last_start_at_or_below(n_sections, u, [&](int64_t i) { return group0[i]; });
    const EncSection &E = sections[lo];
    const nxkv_cuda_encode_section &s = E.s;
    const int64_t gi = u - group0[lo], d = s.head_dim, g = s.n_heads * d / 8, ng = s.n_cells * g;
    const int64_t within = gi % g, head = within / (d / 8);
    const double step = steps[E.step0 + head];
    double v[8];
    for (int j = 0; j < 8; ++j) {
        v[j] = (double)x[E.x0 + gi * 8 + j];
        if (s.center) v[j] = v[j] - mean[E.chan0 + within * 8 + j];
        if (step > 0 && !(fabs(v[j] / step) < 2147483000.0)) *bad = 1; /* as the CPU library */
    }
    uint8_t coset;
    int32_t z7[7], last;
    nxkv_core_lattice_point(v, step, &coset, z7, &last);
    int32_t *cs = symbols + E.sym0, *co = cs + ng, *cl = co + 7 * ng;
    cs[gi] = coset;
    int32_t zmin = z7[0], zmax = z7[0];
    for (int j = 0; j < 7; ++j) {
        co[7 * gi + j] = z7[j];
        zmin = min(zmin, z7[j]);
        zmax = max(zmax, z7[j]);
    }
    cl[gi] = last;
    int32_t *mm = minmax + 6 * lo;
    atomicMin(mm + 0, (int32_t)coset);
    atomicMax(mm + 1, (int32_t)coset);
    atomicMin(mm + 2, zmin);
    atomicMax(mm + 3, zmax);
    atomicMin(mm + 4, last);
    atomicMax(mm + 5, last);
}

/* A block per 4096 symbols of one stream: a histogram in shared memory, then added to the
 * stream's counts. */
struct HistBlock {
    int64_t first, count, hist, lo, size;
};

__global__ void k_enc_hist(const HistBlock *blocks, const int32_t *symbols, unsigned long long *hist) {
    __shared__ unsigned int local[4096];
    const HistBlock b = blocks[blockIdx.x];
    for (int64_t k = threadIdx.x; k < b.size; k += blockDim.x) local[k] = 0;
    __syncthreads();
    for (int64_t k = threadIdx.x; k < b.count; k += blockDim.x) atomicAdd(&local[symbols[b.first + k] - b.lo], 1u);
    __syncthreads();
    for (int64_t k = threadIdx.x; k < b.size; k += blockDim.x) {
        if (local[k]) atomicAdd(hist + b.hist + k, (unsigned long long)local[k]);
    }
}

__global__ void k_enc_index(const int32_t *symbols, int64_t first, int64_t n, int64_t lo, int64_t *index) {
    const int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (k < n) index[k] = (int64_t)symbols[first + k] - lo;
}

struct EncTask {
    int64_t first;     /* its first symbol in the index buffer */
    int64_t count;
    int64_t stride;
    int64_t table;     /* its stream's frequency tables at freqs/cum/rcp/shift + table */
    int64_t slot;      /* its slot's end offset in the scratch buffer */
    int64_t capacity;
};

__global__ void k_enc_rans(const int64_t *index, const EncTask *tasks, int64_t n_tasks, const uint32_t *freqs,
                           const uint32_t *cum, const uint32_t *rcp, const uint32_t *shift, uint8_t *scratch,
                           int64_t *lengths) {
    const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= n_tasks) return;
    const EncTask k = tasks[t];
    if (!k.count) {
        lengths[t] = 0;
        return;
    }
    lengths[t] = nxkv_core_rans_encode(index + k.first, (size_t)k.count, (size_t)k.stride, freqs + k.table, cum + k.table,
                                       rcp + k.table, shift + k.table, scratch + k.slot, (size_t)k.capacity);
}

/* A block per task: its bytes (the end of its slot) to their place in the body. */
__global__ void k_enc_gather(const EncTask *tasks, const int64_t *lengths, const int64_t *offsets, const uint8_t *scratch,
                             uint8_t *body) {
    const int64_t t = blockIdx.x;
    const int64_t len = lengths[t];
    const uint8_t *src = scratch + tasks[t].slot - len;
    for (int64_t k = threadIdx.x; k < len; k += blockDim.x) body[offsets[t] + k] = src[k];
}

} // namespace

struct nxkv_cuda_encoder {
    std::vector<EncSection> sections;
    std::vector<int64_t> head0, group0;
    Buffers b;
    EncSection *d_sections = nullptr;
    int64_t *d_head0 = nullptr, *d_group0 = nullptr;
    float *x = nullptr;
    double *mean = nullptr;
    int32_t *symbols = nullptr;
    int64_t n_symbols = 0, n_groups = 0, n_heads = 0;
};

extern "C" {

void nxkv_cuda_encode_free(nxkv_cuda_encoder *e) { delete e; }

int nxkv_cuda_encode_begin(nxkv_cuda_encode_section *sections, int64_t n_sections, const int32_t *sink_map,
                           int64_t n_sink_map, const double *cos, const double *sin, int64_t n_trig,
                           nxkv_cuda_encoder **encoder, char *err, size_t err_size) {
    *encoder = nullptr;
    nxkv_cuda_encoder *e = new nxkv_cuda_encoder();
    struct Guard {
        nxkv_cuda_encoder *&e;
        ~Guard() { delete e; }
    } guard{e};
    int64_t units = 0, xs = 0, chans = 0, syms = 0, sink_rows = 0, heads = 0, groups = 0;
    for (int64_t i = 0; i < n_sections; ++i) {
        const nxkv_cuda_encode_section &s = sections[i];
        const int64_t d = s.head_dim, n = s.n_cells, h = s.n_heads;
        if (d < 8 || d % 8 || d > MAX_HEAD_DIM || n < 1 || h < 1 || !s.rows ||
            (s.rope && (s.n_rot < 2 || s.n_rot % 2 || s.n_rot > d || s.trig0 < 0 || s.trig0 + n * (s.n_rot / 2) > n_trig)) ||
            (s.sink_map0 >= 0 && s.sink_map0 + n > n_sink_map)) {
            return NXKV_CUDA_ERR_ARG;
        }
        int64_t n_sink = 0;
        if (s.sink_map0 >= 0) {
            for (int64_t c = 0; c < n; ++c) {
                const int32_t r = sink_map[s.sink_map0 + c];
                if (r >= 0 && r != n_sink) return NXKV_CUDA_ERR_ARG; /* sink rows in cell order */
                n_sink += r >= 0;
            }
        }
        EncSection E{};
        E.s = s;
        E.unit0 = units;
        E.x0 = xs;
        E.chan0 = chans;
        E.sym0 = syms;
        E.step0 = heads;
        E.n_sink = n_sink;
        E.sink0 = sink_rows;
        E.map0 = s.sink_map0;
        e->sections.push_back(E);
        e->head0.push_back(heads);
        e->group0.push_back(groups);
        units += n * h;
        xs += n * h * d;
        chans += h * d;
        syms += 9 * n * h * d / 8;
        sink_rows += n_sink * h * d;
        heads += h;
        groups += n * h * d / 8;
    }
    e->n_symbols = syms;
    e->n_groups = groups;
    e->n_heads = heads;
    Buffers &b = e->b;
    std::vector<const uint8_t *> d_rows(n_sections);
    for (int64_t i = 0; i < n_sections; ++i) {
        const nxkv_cuda_encode_section &s = sections[i];
        uint8_t *p;
        const size_t bytes = (size_t)(s.n_cells * s.n_heads * s.head_dim * (s.rows_f16 ? 2 : 4));
        CU(b.upload(&p, (const uint8_t *)s.rows, bytes));
        d_rows[i] = p;
    }
    const uint8_t **d_row_ptrs;
    int32_t *d_map;
    double *d_cos, *d_sin, *d_sumsq;
    uint16_t *d_sinks, *d_mean16;
    CU(b.upload(&d_row_ptrs, d_rows.data(), d_rows.size()));
    CU(b.upload(&d_map, sink_map, (size_t)n_sink_map));
    CU(b.upload(&d_cos, cos, (size_t)n_trig));
    CU(b.upload(&d_sin, sin, (size_t)n_trig));
    CU(b.upload(&e->d_sections, e->sections.data(), e->sections.size()));
    CU(b.upload(&e->d_head0, e->head0.data(), e->head0.size()));
    CU(b.upload(&e->d_group0, e->group0.data(), e->group0.size()));
    CU(b.alloc(&e->x, (size_t)xs));
    CU(b.alloc(&e->mean, (size_t)chans));
    CU(b.alloc(&d_mean16, (size_t)chans));
    CU(b.alloc(&d_sinks, (size_t)sink_rows));
    CU(b.alloc(&d_sumsq, (size_t)heads));
    CU(b.alloc(&e->symbols, (size_t)syms));
    k_enc_transform<<<blocks_for((size_t)units, 128), 128>>>(e->d_sections, n_sections, units, d_row_ptrs, d_map, d_cos, d_sin,
                                                             e->x, d_sinks);
    CU(cudaGetLastError());
    k_enc_mean<<<blocks_for((size_t)chans, 128), 128>>>(e->d_sections, n_sections, chans, e->x, d_map, d_mean16, e->mean);
    CU(cudaGetLastError());
    if (heads) {
        k_enc_sumsq<<<(unsigned)heads, 256>>>(e->d_sections, e->d_head0, n_sections, e->x, e->mean, d_sumsq);
        CU(cudaGetLastError());
    }
    CU(cudaDeviceSynchronize());
    std::vector<uint16_t> mean16((size_t)chans), sinks_h((size_t)sink_rows);
    std::vector<double> sumsq((size_t)heads);
    if (chans) CU(cudaMemcpy(mean16.data(), d_mean16, (size_t)chans * 2, cudaMemcpyDeviceToHost));
    if (sink_rows) CU(cudaMemcpy(sinks_h.data(), d_sinks, (size_t)sink_rows * 2, cudaMemcpyDeviceToHost));
    if (heads) CU(cudaMemcpy(sumsq.data(), d_sumsq, (size_t)heads * 8, cudaMemcpyDeviceToHost));
    for (const EncSection &E : e->sections) {
        const nxkv_cuda_encode_section &s = E.s;
        const int64_t hd = s.n_heads * s.head_dim;
        if (s.center && s.mean_out) memcpy(s.mean_out, mean16.data() + E.chan0, (size_t)hd * 2);
        if (E.n_sink && s.sinks_out) memcpy(s.sinks_out, sinks_h.data() + E.sink0, (size_t)(E.n_sink * hd) * 2);
        if (s.sumsq_out) memcpy(s.sumsq_out, sumsq.data() + E.step0, (size_t)s.n_heads * 8);
    }
    *encoder = e;
    e = nullptr; /* the guard lets it live */
    return NXKV_CUDA_OK;
}

int nxkv_cuda_encode_quantize(nxkv_cuda_encoder *e, const double *steps, int64_t n_steps, int64_t *minmax, char *err,
                              size_t err_size) {
    if (n_steps != e->n_heads) return NXKV_CUDA_ERR_ARG;
    const int64_t ns = (int64_t)e->sections.size();
    Buffers b;
    double *d_steps;
    int32_t *d_minmax;
    int *d_bad, bad = 0;
    std::vector<int32_t> mm((size_t)(6 * ns));
    for (int64_t i = 0; i < ns; ++i) {
        for (int k = 0; k < 3; ++k) {
            mm[(size_t)(6 * i + 2 * k)] = INT32_MAX;
            mm[(size_t)(6 * i + 2 * k + 1)] = INT32_MIN;
        }
    }
    CU(b.upload(&d_steps, steps, (size_t)n_steps));
    CU(b.upload(&d_minmax, mm.data(), mm.size()));
    CU(b.upload(&d_bad, &bad, 1));
    if (e->n_groups) {
        k_enc_quantize<<<blocks_for((size_t)e->n_groups, 128), 128>>>(e->d_sections, e->d_group0, ns, e->n_groups, e->x, e->mean,
                                                                       d_steps, e->symbols, d_minmax, d_bad);
        CU(cudaGetLastError());
    }
    CU(cudaDeviceSynchronize());
    CU(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
    if (bad) return NXKV_CUDA_ERR_ARG;
    if (!mm.empty()) CU(cudaMemcpy(mm.data(), d_minmax, mm.size() * 4, cudaMemcpyDeviceToHost));
    for (size_t k = 0; k < mm.size(); ++k) minmax[k] = mm[k];
    return NXKV_CUDA_OK;
}

} // extern "C"

namespace {

/* (first symbol, count) of stream k = 3 * section + part in the encoder's symbol buffer. */
void stream_span(const nxkv_cuda_encoder *e, int64_t k, int64_t *first, int64_t *count) {
    const EncSection &E = e->sections[(size_t)(k / 3)];
    const int64_t ng = E.s.n_cells * E.s.n_heads * E.s.head_dim / 8;
    const int64_t part = k % 3;
    *first = E.sym0 + (part == 0 ? 0 : part == 1 ? ng : 8 * ng);
    *count = part == 1 ? 7 * ng : ng;
}

} // namespace

extern "C" {

int nxkv_cuda_encode_histogram(nxkv_cuda_encoder *e, const int64_t *hist_offset, const int64_t *lo, const int64_t *size,
                               int64_t *hist, int64_t n_hist, char *err, size_t err_size) {
    const int64_t n_streams = 3 * (int64_t)e->sections.size();
    std::vector<HistBlock> blocks;
    for (int64_t k = 0; k < n_streams; ++k) {
        if (hist_offset[k] < 0) continue;
        if (size[k] < 1 || size[k] > 4096 || hist_offset[k] + size[k] > n_hist) return NXKV_CUDA_ERR_ARG;
        int64_t first, count;
        stream_span(e, k, &first, &count);
        for (int64_t c0 = 0; c0 < count; c0 += 4096) {
            blocks.push_back(HistBlock{first + c0, std::min((int64_t)4096, count - c0), hist_offset[k], lo[k], size[k]});
        }
    }
    Buffers b;
    HistBlock *d_blocks;
    unsigned long long *d_hist;
    CU(b.upload(&d_blocks, blocks.data(), blocks.size()));
    CU(b.alloc(&d_hist, (size_t)n_hist));
    if (n_hist) CU(cudaMemset(d_hist, 0, (size_t)n_hist * sizeof(unsigned long long)));
    if (!blocks.empty()) {
        k_enc_hist<<<(unsigned)blocks.size(), 256>>>(d_blocks, e->symbols, d_hist);
        CU(cudaGetLastError());
    }
    CU(cudaDeviceSynchronize());
    if (n_hist) CU(cudaMemcpy(hist, d_hist, (size_t)n_hist * 8, cudaMemcpyDeviceToHost));
    return NXKV_CUDA_OK;
}

int nxkv_cuda_encode_rans(nxkv_cuda_encoder *e, const int64_t *freq_offset, const int64_t *freqs, int64_t n_freqs,
                          const int64_t *lo, int64_t lanes, const int64_t *chunk, int64_t *lengths, int64_t n_lengths,
                          uint8_t *body, int64_t *body_size, char *err, size_t err_size) {
    if (lanes < 1) return NXKV_CUDA_ERR_ARG;
    const int64_t n_streams = 3 * (int64_t)e->sections.size();
    std::vector<uint32_t> f32, cum, rcp, shift;
    std::vector<EncTask> tasks;
    int64_t n_index = 0, scratch = 0;
    for (int64_t k = 0; k < n_streams; ++k) {
        if (freq_offset[k] < 0) continue;
        int64_t first, count;
        stream_span(e, k, &first, &count);
        /* the alphabet runs to the next stream's table (or the end) */
        int64_t size = -1;
        for (int64_t j = k + 1; j <= n_streams; ++j) {
            if (j == n_streams || freq_offset[j] >= 0) {
                size = (j == n_streams ? n_freqs : freq_offset[j]) - freq_offset[k];
                break;
            }
        }
        if (size < 1 || size > 4096 || freq_offset[k] + size > n_freqs || chunk[k] < lanes) return NXKV_CUDA_ERR_ARG;
        const int64_t table = (int64_t)f32.size();
        std::vector<uint32_t> f, c;
        if (check_freqs(freqs + freq_offset[k], size, f, c) != NXKV_CUDA_OK) return NXKV_CUDA_ERR_ARG;
        for (int64_t q = 0; q < size; ++q) {
            uint32_t r, sh;
            nxkv_core_rans_reciprocal(f[(size_t)q], &r, &sh);
            f32.push_back(f[(size_t)q]);
            cum.push_back(c[(size_t)q]);
            rcp.push_back(r);
            shift.push_back(sh);
        }
        std::vector<RansTask> t2;
        lane_tasks(count, lanes, chunk[k], n_index, 0, t2);
        for (const RansTask &t : t2) {
            EncTask k2{};
            k2.first = t.out;
            k2.count = t.count;
            k2.stride = t.stride;
            k2.table = table;
            k2.capacity = 2 * t.count + 8; /* at most 2 bytes a symbol with 14-bit probabilities, and the state */
            scratch += k2.capacity;
            k2.slot = scratch;
            tasks.push_back(k2);
        }
        n_index += count;
    }
    if ((int64_t)tasks.size() != n_lengths) return NXKV_CUDA_ERR_ARG;
    Buffers b;
    int64_t *d_index, *d_lengths, *d_offsets;
    EncTask *d_tasks;
    uint32_t *d_f, *d_cum, *d_rcp, *d_shift;
    uint8_t *d_scratch, *d_body;
    CU(b.alloc(&d_index, (size_t)n_index));
    for (int64_t k = 0, at = 0; k < n_streams; ++k) { /* the coded streams' symbol indices, back to back */
        if (freq_offset[k] < 0) continue;
        int64_t first, count;
        stream_span(e, k, &first, &count);
        if (count) {
            k_enc_index<<<blocks_for((size_t)count, 256), 256>>>(e->symbols, first, count, lo[k], d_index + at);
            CU(cudaGetLastError());
        }
        at += count;
    }
    CU(b.upload(&d_tasks, tasks.data(), tasks.size()));
    CU(b.upload(&d_f, f32.data(), f32.size()));
    CU(b.upload(&d_cum, cum.data(), cum.size()));
    CU(b.upload(&d_rcp, rcp.data(), rcp.size()));
    CU(b.upload(&d_shift, shift.data(), shift.size()));
    CU(b.alloc(&d_scratch, (size_t)scratch));
    CU(b.alloc(&d_lengths, tasks.size()));
    if (!tasks.empty()) {
        k_enc_rans<<<blocks_for(tasks.size(), 64), 64>>>(d_index, d_tasks, (int64_t)tasks.size(), d_f, d_cum, d_rcp, d_shift,
                                                         d_scratch, d_lengths);
        CU(cudaGetLastError());
    }
    CU(cudaDeviceSynchronize());
    if (!tasks.empty()) CU(cudaMemcpy(lengths, d_lengths, tasks.size() * 8, cudaMemcpyDeviceToHost));
    std::vector<int64_t> offsets(tasks.size());
    int64_t total = 0;
    for (size_t t = 0; t < tasks.size(); ++t) {
        if (lengths[t] < 0) return NXKV_CUDA_ERR_ARG; /* a symbol without frequency: the caller's tables were wrong */
        offsets[t] = total;
        total += lengths[t];
    }
    if (total > *body_size) return NXKV_CUDA_ERR_ARG;
    CU(b.upload(&d_offsets, offsets.data(), offsets.size()));
    CU(b.alloc(&d_body, (size_t)total));
    if (!tasks.empty()) {
        k_enc_gather<<<(unsigned)tasks.size(), 128>>>(d_tasks, d_lengths, d_offsets, d_scratch, d_body);
        CU(cudaGetLastError());
    }
    CU(cudaDeviceSynchronize());
    if (total) CU(cudaMemcpy(body, d_body, (size_t)total, cudaMemcpyDeviceToHost));
    *body_size = total;
    return NXKV_CUDA_OK;
}

int nxkv_cuda_encode_symbols(nxkv_cuda_encoder *e, int64_t stream, int32_t *out, int64_t n, char *err, size_t err_size) {
    if (stream < 0 || stream >= 3 * (int64_t)e->sections.size()) return NXKV_CUDA_ERR_ARG;
    int64_t first, count;
    stream_span(e, stream, &first, &count);
    if (n != count) return NXKV_CUDA_ERR_ARG;
    if (count) CU(cudaMemcpy(out, e->symbols + first, (size_t)count * 4, cudaMemcpyDeviceToHost));
    return NXKV_CUDA_OK;
}

} // extern "C"
