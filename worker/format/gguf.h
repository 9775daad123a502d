// GGUF reader: maps a model file and validates every header field before anything uses it.
#ifndef MESHLM_GGUF_H
#define MESHLM_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/kernels/quant.h"

#define GGUF_MAX_DIMS 4
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_ARRAY_DEPTH 8   // arrays nested deeper than this (array of array of ...) are refused

// Metadata value types (file format ids).
typedef enum {
    GGUF_VT_UINT8 = 0,
    GGUF_VT_INT8 = 1,
    GGUF_VT_UINT16 = 2,
    GGUF_VT_INT16 = 3,
    GGUF_VT_UINT32 = 4,
    GGUF_VT_INT32 = 5,
    GGUF_VT_FLOAT32 = 6,
    GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8,
    GGUF_VT_ARRAY = 9,
    GGUF_VT_UINT64 = 10,
    GGUF_VT_INT64 = 11,
    GGUF_VT_FLOAT64 = 12,
    GGUF_VT_COUNT = 13,
} gguf_vtype_t;

typedef struct gguf_value gguf_value_t;

// One parsed metadata value. Strings point into the mapping and are NOT NUL-terminated.
struct gguf_value {
    gguf_vtype_t type;
    union {
        uint64_t u;                    // UINT8..UINT64 (zero-extended)
        int64_t i;                     // INT8..INT64 (sign-extended)
        double f;                      // FLOAT32, FLOAT64
        bool b;                        // BOOL
        struct {
            const char *ptr;           // borrowed from the mapping
            uint64_t len;              // bytes
        } str;
        struct {
            gguf_vtype_t type;         // element type
            uint64_t n;                // element count
            const uint8_t *raw;        // numeric/bool elements: n packed little-endian values in the mapping
            gguf_value_t *items;       // STRING or ARRAY elements: n parsed values (raw is NULL)
        } arr;
    } v;
};

typedef struct {
    const char *name;            // NUL-terminated, owned by the gguf_t
    int n_dims;                  // 1..GGUF_MAX_DIMS
    int64_t ne[GGUF_MAX_DIMS];   // elements per dimension, ggml order (ne[0] contiguous); unused dims are 1
    qtype_t type;                // element type (known to qtype_traits)
    uint64_t offset;             // relative to the start of the data section
    size_t nbytes;               // validated: offset + nbytes lies inside the file
    const void *data;            // borrowed: points into the mapping
} gguf_tensor_t;

typedef struct gguf gguf_t;

// Maps and parses the file at path. On failure returns a negative MLM_ code, *out is NULL and
// err (if not NULL) holds a message naming the file, the field and its byte offset.
int gguf_open(gguf_t **out, const char *path, char *err, size_t errlen);

// Same, over a caller's buffer (borrowed until gguf_close); name is used in messages.
int gguf_open_mem(gguf_t **out, const void *buf, size_t len, const char *name, char *err, size_t errlen);

// Unmaps and frees; accepts NULL and NULLs the pointer.
void gguf_close(gguf_t **self_p);

uint32_t gguf_version(const gguf_t *g);
const char *gguf_path(const gguf_t *g);        // file name given at open
size_t gguf_file_size(const gguf_t *g);
size_t gguf_alignment(const gguf_t *g);
size_t gguf_data_offset(const gguf_t *g);      // byte offset of the tensor data section (<= file size)
const void *gguf_base(const gguf_t *g);        // start of the mapping
// Gives back the pages of bytes [p, p + len) of a file gguf_open mapped: out of this process's
// resident set (read again from the page cache or the file when touched); nothing for a gguf over
// the caller's memory. For one-pass readers of a large file (writing a shard of it).
void gguf_drop_pages(const gguf_t *g, const void *p, size_t len);

// --- metadata
int64_t gguf_n_kv(const gguf_t *g);
const char *gguf_kv_key(const gguf_t *g, int64_t i);           // NUL-terminated, owned by g
const gguf_value_t *gguf_kv_value(const gguf_t *g, int64_t i);
const gguf_value_t *gguf_find(const gguf_t *g, const char *key); // NULL if absent

// Typed getters: 0 on success, MLM_ENOTFOUND if absent, MLM_EFORMAT if the stored type cannot
// represent the result (integers convert between widths when the value fits).
int gguf_get_u64(const gguf_t *g, const char *key, uint64_t *out);
int gguf_get_u32(const gguf_t *g, const char *key, uint32_t *out);
int gguf_get_i64(const gguf_t *g, const char *key, int64_t *out);
int gguf_get_f32(const gguf_t *g, const char *key, float *out);   // from FLOAT32/FLOAT64 or an integer
int gguf_get_bool(const gguf_t *g, const char *key, bool *out);
int gguf_get_str(const gguf_t *g, const char *key, const char **ptr, size_t *len); // not NUL-terminated

// Element access for arrays of numbers (any integer/float/bool element type): 0 or MLM_EFORMAT/ERANGE.
int gguf_arr_f32(const gguf_value_t *arr, uint64_t i, float *out);
int gguf_arr_i64(const gguf_value_t *arr, uint64_t i, int64_t *out);
// Element i of a numeric/bool array decoded into a scalar value (type = the element type):
// 0, MLM_EFORMAT for arrays of strings/arrays, MLM_ERANGE for i past the end.
int gguf_arr_get(const gguf_value_t *arr, uint64_t i, gguf_value_t *out);

// Writes a value as text (strings quoted and escaped; arrays abbreviated after max_items).
// Returns the number of bytes that a full write needs, like snprintf.
int gguf_value_format(const gguf_value_t *v, char *buf, size_t cap, int max_items);

// --- tensors
int64_t gguf_n_tensors(const gguf_t *g);
const gguf_tensor_t *gguf_tensor(const gguf_t *g, int64_t i);
const gguf_tensor_t *gguf_find_tensor(const gguf_t *g, const char *name); // NULL if absent
int64_t gguf_tensor_nelements(const gguf_tensor_t *t);

// Type name text of a metadata value type ("uint32", "string", ...).
const char *gguf_vtype_name(int type);

// Bytes of one value of a fixed-size metadata type (1, 2, 4 or 8); 0 for STRING, ARRAY and unknown types.
size_t gguf_vtype_size(int type);

#endif
