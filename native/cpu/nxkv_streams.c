/* A section's stream container (docs/FORMAT.md, stages/entropy.py) parsed in one call: every
 * stream record, and every rANS stream's table and lane lengths. A load parses about a thousand
 * streams; in Python that was a quarter of the host's preparation of the GPU batch (measured).
 * Only valid input is accelerated: anything the Python reader would refuse makes this return
 * NXKV_ERR_CORRUPT (container) or leave the stream's rans_ok at 0 (its rANS table), and the
 * Python reader then says what is wrong, as before. */
#include <string.h>

#include "nxkv.h"


/* LEB128 of at most 6 bytes (byte_reader.py's varint): 0, or -1 past the end or too long. */
static int read_varint(const uint8_t *data, int64_t size, int64_t *pos, int64_t *value) {
    int64_t v = 0;
    for (int i = 0; i < 6; ++i) {
        if (*pos >= size) return -1;
        const uint8_t b = data[(*pos)++];
        v |= (int64_t)(b & 0x7F) << (7 * i);
        if (b < 0x80) {
            *value = v;
            return 0;
        }
    }
    return -1;
}

static uint32_t read_u32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* The rANS table of stream s (method 1 or 3) at data[s->payload_offset ..): 1 if it parses and
 * passes stages/entropy.py's checks, its frequencies and lane lengths appended to values. */
static int parse_rans(const uint8_t *data, nxkv_stream_info *s, int64_t *values, int64_t capacity, int64_t *n_values) {
    const int64_t end = s->payload_offset + s->payload_size;
    int64_t pos = s->payload_offset, size, sum = 0;
    if (s->payload_size < 4) return 0;
    s->lo = (int32_t)read_u32(data + pos);
    pos += 4;
    if (read_varint(data, end, &pos, &size) || size <= 0 || size > NXKV_FORMAT_MAX_ALPHABET) return 0;
    s->freq0 = *n_values;
    s->n_freqs = size;
    for (int64_t i = 0; i < size; ++i) {
        int64_t f;
        if (*n_values >= capacity || read_varint(data, end, &pos, &f)) return 0;
        values[(*n_values)++] = f;
        sum += f;
    }
    if (sum != (int64_t)1 << NXKV_FORMAT_RANS_PROB_BITS) return 0;
    s->length0 = *n_values;
    if (s->method == NXKV_FORMAT_METHOD_RANS) {
        s->lanes = 1;
        s->chunk = s->n > 1 ? s->n : 1;
        s->n_lengths = s->n ? 1 : 0;
        if (s->n) {
            if (*n_values >= capacity) return 0;
            values[(*n_values)++] = end - pos;
        }
    } else {
        int64_t lanes, chunk;
        if (read_varint(data, end, &pos, &lanes) || read_varint(data, end, &pos, &chunk) || lanes < 1 ||
            lanes > NXKV_FORMAT_MAX_LANES || chunk < lanes) {
            return 0;
        }
        s->lanes = lanes;
        s->chunk = chunk;
        s->n_lengths = s->n ? (s->n + chunk - 1) / chunk * lanes : 0;
        for (int64_t i = 0; i < s->n_lengths; ++i) {
            int64_t len;
            if (*n_values >= capacity || read_varint(data, end, &pos, &len)) return 0;
            values[(*n_values)++] = len;
        }
    }
    s->body_offset = pos;
    s->body_size = end - pos;
    return 1;
}

int nxkv_parse_streams(const uint8_t *data, int64_t size, int64_t max_items, nxkv_stream_info *streams,
                       int64_t max_streams, int64_t *n_streams, int64_t *values, int64_t capacity, int64_t *n_values) {
    *n_streams = 0;
    *n_values = 0;
    if (size < 1) return NXKV_ERR_CORRUPT;
    const int64_t count = data[0], limit = max_items > 1 ? max_items : 1;
    if (count > max_streams) return NXKV_ERR_ARG;
    int64_t pos = 1;
    for (int64_t k = 0; k < count; ++k) {
        nxkv_stream_info *s = streams + k;
        memset(s, 0, sizeof *s);
        if (pos >= size) return NXKV_ERR_CORRUPT;
        s->name_size = data[pos];
        s->name_offset = pos + 1;
        pos += 1 + s->name_size;
        if (pos + 2 > size) return NXKV_ERR_CORRUPT;
        s->dtype = data[pos];
        s->ndim = data[pos + 1];
        pos += 2;
        if (s->ndim > 4 || pos + 4 * s->ndim + 5 > size) return NXKV_ERR_CORRUPT;
        int64_t n = 1, zero = 0;
        for (int64_t j = 0; j < s->ndim; ++j) zero |= (s->shape[j] = read_u32(data + pos + 4 * j)) == 0;
        for (int64_t j = 0; j < s->ndim && !zero; ++j) {
            n *= s->shape[j];
            if (n > limit) return NXKV_ERR_CORRUPT; /* checked at each factor: no overflow */
        }
        s->n = zero ? 0 : n;
        pos += 4 * s->ndim;
        s->method = data[pos];
        s->payload_size = read_u32(data + pos + 1);
        pos += 5;
        s->payload_offset = pos;
        if (s->payload_size > size - pos) return NXKV_ERR_CORRUPT;
        pos += s->payload_size;
        if (s->method == NXKV_FORMAT_METHOD_RANS || s->method == NXKV_FORMAT_METHOD_RANS_LANES) {
            const int64_t kept = *n_values;
            s->rans_ok = parse_rans(data, s, values, capacity, n_values);
            if (!s->rans_ok) *n_values = kept; /* nothing of it kept */
        }
        *n_streams = k + 1;
    }
    return pos == size ? NXKV_OK : NXKV_ERR_CORRUPT;
}
