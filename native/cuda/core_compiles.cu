/* Every core header compiled as CUDA device code: keeps native/core/*.h usable by the GPU
 * kernels (what NXKV_FN in target.h promises) before those kernels exist. Built only by
 * tests/test_native_core.py, where nvcc is installed; it runs nothing. */
#include "../core/target.h"
#include "../core/byteplane.h"
#include "../core/e8.h"
#include "../core/f16.h"
#include "../core/hadamard.h"
#include "../core/lattice.h"
#include "../core/rans.h"
#include "../core/rope.h"

__global__ void nxkv_core_compiles(double *x, float *f, uint16_t *h, int32_t *out, const uint8_t *data,
                                   const uint32_t *slots, const uint32_t *lookup) {
    nxkv_core_e8_nearest(x, x);
    const int32_t z[7] = {0, 1, 2, 3, 4, 5, 6};
    nxkv_core_lattice_group(1, z, 3, 0.5, x, f);
    nxkv_core_rope_pair(f[0], f[1], 0.5, 0.5, f, f + 1);
    nxkv_core_hadamard(f, 8, 0.35355339f);
    h[0] = nxkv_core_f32_to_f16(f[0]);
    const uint8_t *streams[1] = {data};
    size_t lengths[1] = {8}, pos[1];
    uint32_t states[1];
    nxkv_core_rans_decode_interleaved(streams, lengths, 1, slots, lookup, out, 1, states, pos);
    nxkv_core_rans_decode(data, 8, slots, lookup, out, 1, 1);
    uint8_t planes[8];
    nxkv_core_byteplane_split_range(data, planes, 4, 2, 0, 4);
    nxkv_core_byteplane_merge_range(planes, planes, 4, 2, 0, 4);
}
