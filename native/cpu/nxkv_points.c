/* nxkv_point_layout: where a lattice section's point streams are and how a cell's point row reads
 * them (section_decode.py's numpy path, the readable truth: _class_layout, _point_keys,
 * _stream_rows, _column_slots and the step buckets' cell map). A section has about 60 point
 * streams (3 types x component classes x step buckets); made in numpy, a few dozen small array
 * operations a section were about a quarter of a 4096-token load's preparation (in situ, one
 * thread). Anything the numpy path would refuse returns NXKV_ERR_CORRUPT here, and that path
 * then says what is wrong. */
#include <stdlib.h>
#include <string.h>

#include "nxkv.h"

enum { N_TYPES = 3, N_CLASSES = 8, NO_CLASS = N_CLASSES, MAX_BUCKET_ID = 255 };

/* The record of (bucket id or -1, type, class or -1), or -1: the last record with that role
 * (the numpy path's name index keeps the last of equal names). */
typedef struct {
    int32_t row[MAX_BUCKET_ID + 2][N_TYPES][N_CLASSES + 1];
} role_index;

static int stream_has_shape(const nxkv_stream_info *r, int64_t ndim, int64_t d0, int64_t d1, int64_t d2) {
    const int64_t want[3] = {d0, d1, d2};
    if (r->ndim != ndim) return 0;
    for (int64_t a = 0; a < ndim; ++a) {
        if (r->shape[a] != want[a]) return 0;
    }
    return 1;
}

int nxkv_point_layout(const nxkv_stream_info *records, int64_t n_records, const int32_t *roles, int64_t n_cells, int64_t g,
                      const uint8_t *classes, const int64_t *buckets, int64_t *key_rows, int64_t max_keys, int64_t *n_keys,
                      int64_t *bucket_ids, int64_t *tables_m, int64_t *n_tables, int64_t *slot, int64_t *rank, int64_t *width,
                      int64_t *cell_map) {
    if (n_records < 0 || n_cells < 0 || g < 0 || max_keys < 0) return NXKV_ERR_ARG;
    /* the tables: one (all cells), or one per step bucket present, ascending */
    int64_t count[MAX_BUCKET_ID + 1] = {0}, table_of_bucket[MAX_BUCKET_ID + 1];
    int64_t tables = 1;
    if (buckets) {
        for (int64_t c = 0; c < n_cells; ++c) {
            if (buckets[c] < 0 || buckets[c] > MAX_BUCKET_ID) return NXKV_ERR_ARG;
            ++count[buckets[c]];
        }
        tables = 0;
        for (int64_t b = 0; b <= MAX_BUCKET_ID; ++b) {
            if (!count[b]) continue;
            if (tables == NXKV_MAX_TABLES) return NXKV_ERR_ARG;
            table_of_bucket[b] = tables;
            bucket_ids[tables] = b;
            tables_m[tables++] = count[b];
        }
        int64_t next[NXKV_MAX_TABLES] = {0};
        for (int64_t c = 0; c < n_cells; ++c) {
            const int64_t t = table_of_bucket[buckets[c]];
            cell_map[2 * c] = t;
            cell_map[2 * c + 1] = next[t]++;
        }
    } else {
        bucket_ids[0] = -1;
        tables_m[0] = n_cells;
    }
    *n_tables = tables;
    /* each type's columns: their classes (a coset its group's largest), the classes present and
     * their column counts, each column's place among its class's */
    const int64_t type_width[N_TYPES] = {g, 7 * g, g};
    int64_t present[N_TYPES][N_CLASSES + 1], n_present[N_TYPES], per_class[N_TYPES][N_CLASSES + 1];
    int64_t col = 0, streams = 0; /* a table's streams so far */
    for (int t = 0; t < N_TYPES; ++t) {
        memset(per_class[t], 0, sizeof per_class[t]);
        int64_t stream_of[N_CLASSES + 1], seen[N_CLASSES + 1] = {0};
        for (int64_t i = 0; i < type_width[t]; ++i) {
            int k = NO_CLASS;
            if (classes) {
                const uint8_t *grp = classes + 8 * (t == 1 ? i / 7 : i);
                if (t == 0) {
                    k = grp[0];
                    for (int j = 1; j < 8; ++j) k = grp[j] > k ? grp[j] : k;
                } else {
                    k = t == 1 ? grp[i % 7] : grp[7];
                }
                if (k >= N_CLASSES) return NXKV_ERR_ARG;
            }
            rank[col + i] = seen[k]++;
            slot[col + i] = k; /* the class for now: its stream below */
        }
        n_present[t] = 0;
        for (int k = 0; k <= N_CLASSES; ++k) {
            if (!seen[k]) continue;
            present[t][n_present[t]++] = k;
            per_class[t][k] = seen[k];
            stream_of[k] = streams++;
        }
        for (int64_t i = 0; i < type_width[t]; ++i) {
            const int64_t k = slot[col + i];
            width[col + i] = classes ? per_class[t][k] : type_width[t];
            slot[col + i] = stream_of[k];
        }
        col += type_width[t];
    }
    if (!classes) { /* one stream per type, present however wide (an empty type's stream too) */
        for (int t = 0; t < N_TYPES; ++t) {
            n_present[t] = 1;
            present[t][0] = NO_CLASS;
        }
        streams = N_TYPES;
    }
    if (tables * streams > max_keys) return NXKV_ERR_ARG;
    /* every record with a point stream's role, the last of each */
    role_index *index = malloc(sizeof *index);
    if (!index) return NXKV_ERR_NOMEM;
    memset(index, 0xff, sizeof *index);
    for (int64_t r = 0; r < n_records; ++r) {
        const int32_t type = roles[3 * r], bucket = roles[3 * r + 1], cls = roles[3 * r + 2];
        if (type < 0 || type >= N_TYPES || bucket < -1 || bucket > MAX_BUCKET_ID || cls < -1 || cls >= N_CLASSES) continue;
        index->row[bucket + 1][type][cls < 0 ? NO_CLASS : cls] = (int32_t)r;
    }
    int64_t k = 0;
    int status = NXKV_OK;
    for (int64_t t = 0; t < tables && status == NXKV_OK; ++t) {
        const int64_t m = tables_m[t], b = bucket_ids[t];
        for (int type = 0; type < N_TYPES && status == NXKV_OK; ++type) {
            for (int64_t q = 0; q < n_present[type]; ++q) {
                const int cls = (int)present[type][q];
                const int32_t r = index->row[b + 1][type][cls];
                const int ok = r >= 0 && (classes ? stream_has_shape(records + r, 2, m, per_class[type][cls], 0)
                                          : type == 1 ? stream_has_shape(records + r, 3, m, g, 7)
                                                      : stream_has_shape(records + r, 2, m, g, 0));
                if (!ok) {
                    status = NXKV_ERR_CORRUPT;
                    break;
                }
                key_rows[k++] = r;
            }
        }
    }
    free(index);
    *n_keys = k;
    return status;
}
