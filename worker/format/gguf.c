// GGUF reader: maps a model file read-only and validates every header field before anything uses it.
#include "worker/format/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/bytes.h"
#include "core/err.h"

// --- types

#define MIN_KV_BYTES 13      // key length (8) + value type (4) + smallest value (1)
#define MIN_TENSOR_BYTES 32  // name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8)
#define MIN_STRING_BYTES 8   // length field of an empty string
#define MIN_ARRAY_BYTES 12   // element type (4) + count (8) of an empty array
#define NAME_SHOWN_MAX 80    // longest key / tensor name quoted in an error message

typedef struct {
    char *key;               // NUL-terminated copy of the key
    gguf_value_t val;        // parsed value; strings and numeric arrays borrow from the file bytes
} gguf_kv_t;

typedef struct {
    const char *name;        // borrowed from the kv / tensor entry; NULL for an empty slot
    int64_t idx;             // index of the entry
} name_slot_t;

typedef struct {
    name_slot_t *slot;       // (mask + 1) slots, open addressing with linear probing
    size_t mask;             // capacity - 1; capacity is a power of two
} name_index_t;

struct gguf {
    char *path;              // name given at open (copy)
    const uint8_t *base;     // the file bytes: our mapping or the caller's buffer
    size_t size;             // bytes in the file
    bool mapped;             // base is a mapping we unmap at close
    uint32_t version;        // 2 or 3
    size_t alignment;        // general.alignment, or GGUF_DEFAULT_ALIGNMENT
    size_t data_offset;      // start of the tensor data section (file offset)
    int64_t n_kv;            // entries parsed so far / in total
    gguf_kv_t *kv;           // (n_kv)
    name_index_t kv_index;   // key -> index into kv
    int64_t n_tensors;       // entries parsed so far / in total
    gguf_tensor_t *tensors;  // (n_tensors)
    name_index_t tensor_index; // name -> index into tensors
};

// Cursor over the file bytes plus what an error message needs to say where it is.
typedef struct {
    const uint8_t *buf;      // file bytes
    size_t size;             // bytes in buf
    size_t pos;              // next byte to read
    const char *file;        // file name for messages
    const char *kind;        // "kv", "tensor", or NULL for header fields
    int64_t index;           // index of the kv / tensor being parsed
    const char *item;        // its key / name once known, else NULL
    char *err;               // caller's message buffer (may be NULL)
    size_t errlen;           // its capacity
} parser_t;

// --- helpers: messages

// Copies s into dst with non-printable bytes as \xNN, shortened with "..." past NAME_SHOWN_MAX.
static void name_shown(char *dst, size_t cap, const char *s) {
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p && n + 8 < cap; p++) {
        if (p - (const unsigned char *)s >= NAME_SHOWN_MAX) {
            memcpy(dst + n, "...", 3);
            n += 3;
            break;
        }
        if (*p >= 0x20 && *p < 0x7f && *p != '\'' && *p != '\\') {
            dst[n++] = (char)*p;
        } else {
            n += (size_t)snprintf(dst + n, cap - n, "\\x%02x", *p);
        }
    }
    dst[n] = '\0';
}

// Writes "FILE: FIELD at offset OFF: PROBLEM" into the caller's buffer and returns code.
static int fail(parser_t *ps, int code, size_t off, const char *part, const char *fmt, ...) {
    if (!ps->err || ps->errlen == 0) return code;
    char problem[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(problem, sizeof problem, fmt, ap);
    va_end(ap);
    char field[NAME_SHOWN_MAX * 4 + 96];
    if (!ps->kind) {
        snprintf(field, sizeof field, "%s", part);
    } else if (!ps->item) {
        snprintf(field, sizeof field, "%s[%lld] %s", ps->kind, (long long)ps->index, part);
    } else {
        char shown[NAME_SHOWN_MAX * 4 + 8];
        name_shown(shown, sizeof shown, ps->item);
        snprintf(field, sizeof field, "%s[%lld] '%s' %s", ps->kind, (long long)ps->index, shown, part);
    }
    return mlm_fail(ps->err, ps->errlen, code, "%s: %s at offset %zu: %s", ps->file, field, off, problem);
}

// --- helpers: little-endian reads

// An n-byte little-endian unsigned integer (n = 1, 2, 4 or 8).
static uint64_t load_le(const uint8_t *p, size_t n) {
    switch (n) {
    case 1: return p[0];
    case 2: return mlm_get16(p);
    case 4: return mlm_get32(p);
    case 8: return mlm_get64(p);
    default: return 0;
    }
}

static size_t remaining(const parser_t *ps) { return ps->size - ps->pos; }

// Reads an n-byte little-endian unsigned integer (n <= 8) at the cursor.
static int read_uint(parser_t *ps, size_t n, const char *part, uint64_t *out) {
    *out = 0;
    if (remaining(ps) < n)
        return fail(ps, MLM_EFORMAT, ps->pos, part, "needs %zu bytes but only %zu remain (file truncated?)", n,
                    remaining(ps));
    *out = load_le(ps->buf + ps->pos, n);
    ps->pos += n;
    return 0;
}

static int read_u32(parser_t *ps, const char *part, uint32_t *out) {
    uint64_t v = 0;
    int rc = read_uint(ps, 4, part, &v);
    *out = (uint32_t)v;
    return rc;
}

// Reads a string header (u64 length) and checks the bytes are in the file; ptr borrows them.
static int read_str(parser_t *ps, const char *part, const char **ptr, uint64_t *len) {
    size_t at = ps->pos;
    uint64_t n = 0;
    *ptr = NULL;
    *len = 0;
    int rc = read_uint(ps, 8, part, &n);
    if (rc) return rc;
    if (n > remaining(ps))
        return fail(ps, MLM_EFORMAT, at, part, "string length %llu exceeds the %zu bytes left in the file",
                    (unsigned long long)n, remaining(ps));
    *ptr = (const char *)ps->buf + ps->pos;
    *len = n;
    ps->pos += (size_t)n;
    return 0;
}

// Reads a key or tensor name: a string without NUL bytes, copied NUL-terminated (caller frees).
static int read_name(parser_t *ps, const char *part, char **out) {
    size_t at = ps->pos;
    const char *p = NULL;
    uint64_t n = 0;
    int rc = read_str(ps, part, &p, &n);
    if (rc) return rc;
    if (memchr(p, 0, (size_t)n)) return fail(ps, MLM_EFORMAT, at, part, "contains a NUL byte");
    char *s = malloc((size_t)n + 1);
    if (!s) return fail(ps, MLM_ENOMEM, at, part, "out of memory for %llu bytes", (unsigned long long)n);
    memcpy(s, p, (size_t)n);
    s[n] = '\0';
    *out = s;
    return 0;
}

// --- helpers: name index

static uint64_t name_hash(const char *s) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static int index_init(name_index_t *ix, int64_t n) {
    size_t cap = 16;
    while (cap < (size_t)n * 2) cap *= 2;
    ix->slot = calloc(cap, sizeof *ix->slot);
    if (!ix->slot) return MLM_ENOMEM;
    ix->mask = cap - 1;
    return 0;
}

// Index of the entry with this name, or -1.
static int64_t index_find(const name_index_t *ix, const char *name) {
    if (!ix->slot) return -1;
    for (size_t i = (size_t)name_hash(name) & ix->mask;; i = (i + 1) & ix->mask) {
        if (!ix->slot[i].name) return -1;
        if (strcmp(ix->slot[i].name, name) == 0) return ix->slot[i].idx;
    }
}

// Adds name -> idx; returns the index of an existing entry with the same name, or -1 if added.
// The table never fills: its capacity is at least twice the number of entries.
static int64_t index_add(name_index_t *ix, const char *name, int64_t idx) {
    size_t i = (size_t)name_hash(name) & ix->mask;
    for (; ix->slot[i].name; i = (i + 1) & ix->mask)
        if (strcmp(ix->slot[i].name, name) == 0) return ix->slot[i].idx;
    ix->slot[i].name = name;
    ix->slot[i].idx = idx;
    return -1;
}

// --- helpers: values

static bool vtype_unsigned(int t) {
    return t == GGUF_VT_UINT8 || t == GGUF_VT_UINT16 || t == GGUF_VT_UINT32 || t == GGUF_VT_UINT64;
}

static bool vtype_signed(int t) {
    return t == GGUF_VT_INT8 || t == GGUF_VT_INT16 || t == GGUF_VT_INT32 || t == GGUF_VT_INT64;
}

// Decodes one fixed-size value of type t from little-endian bytes.
static void decode_scalar(gguf_vtype_t t, const uint8_t *p, gguf_value_t *out) {
    uint64_t raw = load_le(p, gguf_vtype_size(t));
    out->type = t;
    switch (t) {
    case GGUF_VT_INT8: out->v.i = (int8_t)(uint8_t)raw; break;
    case GGUF_VT_INT16: out->v.i = (int16_t)(uint16_t)raw; break;
    case GGUF_VT_INT32: out->v.i = (int32_t)(uint32_t)raw; break;
    case GGUF_VT_INT64: out->v.i = (int64_t)raw; break;
    case GGUF_VT_FLOAT32: {
        uint32_t b = (uint32_t)raw;
        float f;
        memcpy(&f, &b, sizeof f);
        out->v.f = f;
        break;
    }
    case GGUF_VT_FLOAT64: {
        double d;
        memcpy(&d, &raw, sizeof d);
        out->v.f = d;
        break;
    }
    case GGUF_VT_BOOL: out->v.b = raw != 0; break;
    default: out->v.u = raw; break;
    }
}

static void value_free(gguf_value_t *v) {
    if (v->type != GGUF_VT_ARRAY || !v->v.arr.items) return;
    for (uint64_t i = 0; i < v->v.arr.n; i++) value_free(&v->v.arr.items[i]);
    free(v->v.arr.items);
    v->v.arr.items = NULL;
}

// Parses a value of type t at the cursor; depth counts the arrays that enclose it.
static int parse_value(parser_t *ps, gguf_vtype_t t, gguf_value_t *out, int depth) {
    size_t at = ps->pos;
    memset(out, 0, sizeof *out);
    out->type = t;
    if (t == GGUF_VT_STRING) return read_str(ps, "value", &out->v.str.ptr, &out->v.str.len);
    if (t != GGUF_VT_ARRAY) {
        size_t sz = gguf_vtype_size(t);
        if (remaining(ps) < sz)
            return fail(ps, MLM_EFORMAT, at, "value", "%s needs %zu bytes but only %zu remain (file truncated?)",
                        gguf_vtype_name(t), sz, remaining(ps));
        if (t == GGUF_VT_BOOL && ps->buf[at] > 1)
            return fail(ps, MLM_EFORMAT, at, "value", "bool byte is %u, not 0 or 1", ps->buf[at]);
        decode_scalar(t, ps->buf + at, out);
        ps->pos += sz;
        return 0;
    }
    if (depth >= GGUF_MAX_ARRAY_DEPTH)
        return fail(ps, MLM_EFORMAT, at, "value", "arrays nested more than %d deep", GGUF_MAX_ARRAY_DEPTH);
    uint32_t et = 0;
    int rc = read_u32(ps, "array element type", &et);
    if (rc) return rc;
    if (et >= GGUF_VT_COUNT) return fail(ps, MLM_EFORMAT, at, "value", "unknown array element type %u", et);
    size_t count_at = ps->pos;
    uint64_t n = 0;
    rc = read_uint(ps, 8, "array count", &n);
    if (rc) return rc;
    out->v.arr.type = (gguf_vtype_t)et;
    size_t esz = gguf_vtype_size((int)et);
    size_t min = esz ? esz : (et == GGUF_VT_STRING ? MIN_STRING_BYTES : MIN_ARRAY_BYTES);
    if (n > remaining(ps) / min)
        return fail(ps, MLM_EFORMAT, count_at, "value",
                    "array of %llu %s cannot fit in the %zu bytes left in the file", (unsigned long long)n,
                    gguf_vtype_name((int)et), remaining(ps));
    if (esz) {
        const uint8_t *raw = ps->buf + ps->pos;
        if (et == GGUF_VT_BOOL)
            for (uint64_t i = 0; i < n; i++)
                if (raw[i] > 1)
                    return fail(ps, MLM_EFORMAT, ps->pos + (size_t)i, "value",
                                "bool array item %llu is %u, not 0 or 1", (unsigned long long)i, raw[i]);
        out->v.arr.raw = raw;
        out->v.arr.n = n;
        ps->pos += (size_t)n * esz;
        return 0;
    }
    if (n == 0) return 0;
    if (n > SIZE_MAX / sizeof(gguf_value_t))
        return fail(ps, MLM_EFORMAT, count_at, "value", "array count %llu is too large", (unsigned long long)n);
    gguf_value_t *items = calloc((size_t)n, sizeof *items);
    if (!items)
        return fail(ps, MLM_ENOMEM, count_at, "value", "out of memory for %llu array items", (unsigned long long)n);
    out->v.arr.items = items;
    out->v.arr.n = n;
    for (uint64_t i = 0; i < n; i++) {
        rc = parse_value(ps, (gguf_vtype_t)et, &items[i], depth + 1);
        if (rc) return rc;  // the caller frees the partly built array
    }
    return 0;
}

// --- helpers: parsing

static int parse_header(parser_t *ps, gguf_t *g, uint64_t *n_kv, uint64_t *n_tensors) {
    if (ps->size < 4)
        return fail(ps, MLM_EFORMAT, 0, "magic", "file is %zu bytes, too short to be GGUF", ps->size);
    if (memcmp(ps->buf, "GGUF", 4) != 0) {
        if (memcmp(ps->buf, "FUGG", 4) == 0)
            return fail(ps, MLM_EUNSUPPORTED, 0, "magic", "file is big-endian (byte-swapped magic); only "
                        "little-endian GGUF is supported");
        return fail(ps, MLM_EFORMAT, 0, "magic", "not a GGUF file (first bytes %02x %02x %02x %02x)", ps->buf[0],
                    ps->buf[1], ps->buf[2], ps->buf[3]);
    }
    ps->pos = 4;
    uint32_t ver = 0;
    int rc = read_u32(ps, "version", &ver);
    if (rc) return rc;
    if (ver == 1)
        return fail(ps, MLM_EUNSUPPORTED, 4, "version", "GGUF version 1 is not supported (only 2 and 3); "
                    "re-convert the model with a current tool");
    uint32_t sw = __builtin_bswap32(ver);
    if (sw >= 1 && sw <= 3)
        return fail(ps, MLM_EUNSUPPORTED, 4, "version", "version field reads 0x%08x: the file is big-endian "
                    "(GGUF version %u byte-swapped); only little-endian GGUF is supported", ver, sw);
    if (ver == 0) return fail(ps, MLM_EFORMAT, 4, "version", "GGUF version 0 is invalid");
    if (ver > 3)
        return fail(ps, MLM_EUNSUPPORTED, 4, "version", "GGUF version %u is not supported (only 2 and 3)", ver);
    g->version = ver;
    rc = read_uint(ps, 8, "n_tensors", n_tensors);
    if (rc) return rc;
    rc = read_uint(ps, 8, "n_kv", n_kv);
    if (rc) return rc;
    size_t left = remaining(ps);
    if (*n_tensors > left / MIN_TENSOR_BYTES)
        return fail(ps, MLM_EFORMAT, 8, "n_tensors", "%llu tensor infos cannot fit in the %zu bytes left",
                    (unsigned long long)*n_tensors, left);
    if (*n_kv > left / MIN_KV_BYTES)
        return fail(ps, MLM_EFORMAT, 16, "n_kv", "%llu key/value pairs cannot fit in the %zu bytes left",
                    (unsigned long long)*n_kv, left);
    if (*n_tensors * MIN_TENSOR_BYTES + *n_kv * MIN_KV_BYTES > left)
        return fail(ps, MLM_EFORMAT, 8, "n_tensors", "%llu tensor infos and %llu key/value pairs cannot fit in the "
                    "%zu bytes left", (unsigned long long)*n_tensors, (unsigned long long)*n_kv, left);
    return 0;
}

static int parse_kvs(parser_t *ps, gguf_t *g, uint64_t n_kv) {
    g->kv = calloc(n_kv ? (size_t)n_kv : 1, sizeof *g->kv);
    if (!g->kv || index_init(&g->kv_index, (int64_t)n_kv))
        return fail(ps, MLM_ENOMEM, ps->pos, "n_kv", "out of memory for %llu key/value pairs",
                    (unsigned long long)n_kv);
    ps->kind = "kv";
    size_t align_at = 0;
    for (uint64_t i = 0; i < n_kv; i++) {
        ps->index = (int64_t)i;
        ps->item = NULL;
        size_t key_at = ps->pos;
        gguf_kv_t *kv = &g->kv[i];
        int rc = read_name(ps, "key", &kv->key);
        if (rc) return rc;
        g->n_kv = (int64_t)i + 1;
        ps->item = kv->key;
        if (kv->key[0] == '\0') return fail(ps, MLM_EFORMAT, key_at, "key", "key is empty");
        int64_t dup = index_add(&g->kv_index, kv->key, (int64_t)i);
        if (dup >= 0) return fail(ps, MLM_EFORMAT, key_at, "key", "duplicate key (first at kv[%lld])", (long long)dup);
        size_t type_at = ps->pos;
        uint32_t t = 0;
        rc = read_u32(ps, "value type", &t);
        if (rc) return rc;
        if (t >= GGUF_VT_COUNT) return fail(ps, MLM_EFORMAT, type_at, "value type", "unknown value type %u", t);
        if (strcmp(kv->key, "general.alignment") == 0) align_at = ps->pos;
        rc = parse_value(ps, (gguf_vtype_t)t, &kv->val, 0);
        if (rc) return rc;
    }
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t ai = index_find(&g->kv_index, "general.alignment");
    if (ai >= 0) {
        ps->index = ai;
        ps->item = g->kv[ai].key;
        uint32_t a;
        if (gguf_get_u32(g, "general.alignment", &a) != 0)
            return fail(ps, MLM_EFORMAT, align_at, "value", "alignment must be an unsigned integer, not %s",
                        gguf_vtype_name(g->kv[ai].val.type));
        if (a == 0 || (a & (a - 1)) != 0)
            return fail(ps, MLM_EFORMAT, align_at, "value", "alignment %u is not a non-zero power of two", a);
        g->alignment = a;
    }
    return 0;
}

// Reads one tensor info at the cursor into t; *offset_at receives where its offset field is.
static int parse_tensor_info(parser_t *ps, gguf_t *g, gguf_tensor_t *t, size_t *offset_at) {
    size_t name_at = ps->pos;
    char *name = NULL;
    int rc = read_name(ps, "name", &name);
    if (rc) return rc;
    t->name = name;
    g->n_tensors++;
    ps->item = t->name;
    int64_t dup = index_add(&g->tensor_index, t->name, ps->index);
    if (dup >= 0)
        return fail(ps, MLM_EFORMAT, name_at, "name", "duplicate tensor name (first at tensor[%lld])", (long long)dup);
    size_t dims_at = ps->pos;
    uint32_t nd = 0;
    rc = read_u32(ps, "n_dims", &nd);
    if (rc) return rc;
    if (nd < 1 || nd > GGUF_MAX_DIMS)
        return fail(ps, MLM_EFORMAT, dims_at, "n_dims", "n_dims is %u, not in 1..%d", nd, GGUF_MAX_DIMS);
    t->n_dims = (int)nd;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    int64_t nel = 1;
    for (uint32_t d = 0; d < nd; d++) {
        size_t at = ps->pos;
        uint64_t ne = 0;
        rc = read_uint(ps, 8, "dims", &ne);
        if (rc) return rc;
        if (ne > (uint64_t)INT64_MAX)
            return fail(ps, MLM_EFORMAT, at, "dims", "dimension %u is %llu (negative as int64)", d,
                        (unsigned long long)ne);
        t->ne[d] = (int64_t)ne;
        if (__builtin_mul_overflow(nel, t->ne[d], &nel))
            return fail(ps, MLM_EFORMAT, at, "dims", "element count overflows");
    }
    size_t type_at = ps->pos;
    uint32_t type = 0;
    rc = read_u32(ps, "type", &type);
    if (rc) return rc;
    const qtype_traits_t *tr = qtype_traits((int)type);
    if (!tr) return fail(ps, MLM_EUNSUPPORTED, type_at, "type", "unknown tensor type id %u", type);
    t->type = (qtype_t)type;
    if (t->ne[0] % tr->blck != 0)
        return fail(ps, MLM_EFORMAT, dims_at, "dims", "row length %lld is not a multiple of the %s block size %lld",
                    (long long)t->ne[0], tr->name, (long long)tr->blck);
    uint64_t nbytes = (uint64_t)(t->ne[0] / tr->blck);
    bool ovf = __builtin_mul_overflow(nbytes, (uint64_t)tr->type_size, &nbytes);
    for (int d = 1; d < GGUF_MAX_DIMS && !ovf; d++) ovf = __builtin_mul_overflow(nbytes, (uint64_t)t->ne[d], &nbytes);
    if (ovf || nbytes > SIZE_MAX) return fail(ps, MLM_EFORMAT, dims_at, "dims", "byte size overflows");
    t->nbytes = (size_t)nbytes;
    *offset_at = ps->pos;
    rc = read_uint(ps, 8, "offset", &t->offset);
    if (rc) return rc;
    if (t->offset % g->alignment != 0)
        return fail(ps, MLM_EFORMAT, *offset_at, "offset", "data offset %llu is not a multiple of the alignment %zu",
                    (unsigned long long)t->offset, g->alignment);
    return 0;
}

typedef struct {
    uint64_t begin;          // data offset
    uint64_t end;            // begin + nbytes
    int64_t idx;             // tensor index
} extent_t;

static int extent_cmp(const void *a, const void *b) {
    const extent_t *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->idx < y->idx ? -1 : (x->idx > y->idx);
}

// Places every tensor in the data section and refuses data past the end or overlapping data.
static int place_tensors(parser_t *ps, gguf_t *g, const size_t *offset_at) {
    if (g->n_tensors == 0) {
        if (g->data_offset > g->size) g->data_offset = g->size;  // no data section; the padding may be absent
        return 0;
    }
    if (g->data_offset > g->size)
        return fail(ps, MLM_EFORMAT, ps->pos, "data section",
                    "tensor data would start at %zu, past the end of the file (%zu bytes)", g->data_offset, g->size);
    size_t avail = g->size - g->data_offset;
    extent_t *ext = malloc((size_t)g->n_tensors * sizeof *ext);
    if (!ext) return fail(ps, MLM_ENOMEM, ps->pos, "data section", "out of memory");
    size_t n_ext = 0;
    int rc = 0;
    ps->kind = "tensor";
    for (int64_t i = 0; i < g->n_tensors && !rc; i++) {
        gguf_tensor_t *t = &g->tensors[i];
        ps->index = i;
        ps->item = t->name;
        if (t->offset > avail || t->nbytes > avail - t->offset) {
            rc = fail(ps, MLM_EFORMAT, offset_at[i], "offset",
                      "data [%llu, %llu + %zu) runs past the end of the data section (%zu bytes, file truncated?)",
                      (unsigned long long)t->offset, (unsigned long long)t->offset, t->nbytes, avail);
            break;
        }
        t->data = g->base + g->data_offset + t->offset;
        if (t->nbytes) ext[n_ext++] = (extent_t){t->offset, t->offset + t->nbytes, i};
    }
    if (!rc && n_ext > 1) {
        qsort(ext, n_ext, sizeof *ext, extent_cmp);
        for (size_t k = 1; k < n_ext && !rc; k++) {
            if (ext[k].begin >= ext[k - 1].end) continue;
            const gguf_tensor_t *t = &g->tensors[ext[k].idx];
            ps->index = ext[k].idx;
            ps->item = t->name;
            char shown[NAME_SHOWN_MAX * 4 + 8];
            name_shown(shown, sizeof shown, g->tensors[ext[k - 1].idx].name);
            rc = fail(ps, MLM_EFORMAT, offset_at[ext[k].idx], "offset", "data overlaps tensor[%lld] '%s'",
                      (long long)ext[k - 1].idx, shown);
        }
    }
    free(ext);
    return rc;
}

static int parse_tensors(parser_t *ps, gguf_t *g, uint64_t n_tensors) {
    g->tensors = calloc(n_tensors ? (size_t)n_tensors : 1, sizeof *g->tensors);
    size_t *offset_at = malloc((n_tensors ? (size_t)n_tensors : 1) * sizeof *offset_at);
    if (!g->tensors || !offset_at || index_init(&g->tensor_index, (int64_t)n_tensors)) {
        free(offset_at);
        return fail(ps, MLM_ENOMEM, ps->pos, "n_tensors", "out of memory for %llu tensor infos",
                    (unsigned long long)n_tensors);
    }
    ps->kind = "tensor";
    int rc = 0;
    for (uint64_t i = 0; i < n_tensors && !rc; i++) {
        ps->index = (int64_t)i;
        ps->item = NULL;
        rc = parse_tensor_info(ps, g, &g->tensors[i], &offset_at[i]);
    }
    if (!rc) {
        size_t a = g->alignment;
        size_t end = ps->pos;
        g->data_offset = end + (a - end % a) % a;
        ps->kind = NULL;
        rc = place_tensors(ps, g, offset_at);
    }
    free(offset_at);
    return rc;
}

static int parse(gguf_t *g, char *err, size_t errlen) {
    parser_t ps = {.buf = g->base, .size = g->size, .file = g->path, .err = err, .errlen = errlen};
    uint64_t n_kv = 0, n_tensors = 0;
    int rc = parse_header(&ps, g, &n_kv, &n_tensors);
    if (!rc) rc = parse_kvs(&ps, g, n_kv);
    if (!rc) rc = parse_tensors(&ps, g, n_tensors);
    return rc;
}

// Takes the file bytes (mapped or borrowed), parses them, and on failure frees everything.
static int open_bytes(gguf_t **out, const void *buf, size_t len, bool mapped, const char *name, char *err,
                      size_t errlen) {
    gguf_t *g = calloc(1, sizeof *g);
    char *path = g ? strdup(name) : NULL;
    if (!path) {
        free(g);
        if (mapped && len) munmap((void *)buf, len);
        return mlm_fail(err, errlen, MLM_ENOMEM, "%s: out of memory", name);
    }
    g->path = path;
    g->base = buf;
    g->size = len;
    g->mapped = mapped;
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int rc = parse(g, err, errlen);
    if (rc) {
        gguf_close(&g);
        return rc;
    }
    *out = g;
    return 0;
}

// --- public API: open / close

int gguf_open(gguf_t **out, const char *path, char *err, size_t errlen) {
    if (!out) return MLM_EINVAL;
    *out = NULL;
    if (!path) return mlm_fail(err, errlen, MLM_EINVAL, "gguf_open: no path given");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mlm_fail(err, errlen, MLM_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int rc = 0;
    void *map = NULL;
    size_t len = 0;
    if (fstat(fd, &st) != 0) {
        rc = mlm_fail(err, errlen, MLM_EIO, "%s: cannot stat: %s", path, strerror(errno));
    } else if (!S_ISREG(st.st_mode)) {
        rc = mlm_fail(err, errlen, MLM_EIO, "%s: cannot map: %s", path,
                      S_ISDIR(st.st_mode) ? strerror(EISDIR) : "not a regular file");
    } else if ((uint64_t)st.st_size > SIZE_MAX) {
        rc = mlm_fail(err, errlen, MLM_EIO, "%s: cannot map: %s", path, strerror(EFBIG));
    } else if ((len = (size_t)st.st_size) > 0) {
        map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED)
            rc = mlm_fail(err, errlen, MLM_EIO, "%s: cannot map %zu bytes: %s", path, len, strerror(errno));
    }
    close(fd);
    if (rc != 0) return rc;
    return open_bytes(out, map, len, len > 0, path, err, errlen);
}

int gguf_open_mem(gguf_t **out, const void *buf, size_t len, const char *name, char *err, size_t errlen) {
    if (!out) return MLM_EINVAL;
    *out = NULL;
    if (!name) name = "<memory>";
    if (!buf && len) return mlm_fail(err, errlen, MLM_EINVAL, "%s: no buffer given", name);
    return open_bytes(out, buf, len, false, name, err, errlen);
}

void gguf_drop_pages(const gguf_t *g, const void *p, size_t len) {
    if (!g || !g->mapped || !len) return;
    // the kernel maps up to 64 KiB of cached pages around a faulting one (fault-around): those go too
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE), around = 64u << 10;
    uintptr_t a = (uintptr_t)p / around * around, b = ((uintptr_t)p + len + around - 1) / around * around;
    const uintptr_t lo = (uintptr_t)g->base, hi = lo + (g->size + pg - 1) / pg * pg;
    if (a < lo) a = lo;
    if (b > hi) b = hi;
    if (b > a) (void)madvise((void *)a, b - a, MADV_DONTNEED);
}

void gguf_close(gguf_t **self_p) {
    if (!self_p || !*self_p) return;
    gguf_t *g = *self_p;
    for (int64_t i = 0; i < g->n_kv; i++) {
        free(g->kv[i].key);
        value_free(&g->kv[i].val);
    }
    free(g->kv);
    for (int64_t i = 0; i < g->n_tensors; i++) free((char *)g->tensors[i].name);
    free(g->tensors);
    free(g->kv_index.slot);
    free(g->tensor_index.slot);
    if (g->mapped) munmap((void *)g->base, g->size);
    free(g->path);
    free(g);
    *self_p = NULL;
}

// --- public API: file facts

uint32_t gguf_version(const gguf_t *g) { return g ? g->version : 0; }
const char *gguf_path(const gguf_t *g) { return g ? g->path : NULL; }
size_t gguf_file_size(const gguf_t *g) { return g ? g->size : 0; }
size_t gguf_alignment(const gguf_t *g) { return g ? g->alignment : 0; }
size_t gguf_data_offset(const gguf_t *g) { return g ? g->data_offset : 0; }
const void *gguf_base(const gguf_t *g) { return g ? g->base : NULL; }

// --- public API: metadata

int64_t gguf_n_kv(const gguf_t *g) { return g ? g->n_kv : 0; }

const char *gguf_kv_key(const gguf_t *g, int64_t i) {
    return (g && i >= 0 && i < g->n_kv) ? g->kv[i].key : NULL;
}

const gguf_value_t *gguf_kv_value(const gguf_t *g, int64_t i) {
    return (g && i >= 0 && i < g->n_kv) ? &g->kv[i].val : NULL;
}

const gguf_value_t *gguf_find(const gguf_t *g, const char *key) {
    if (!g || !key) return NULL;
    int64_t i = index_find(&g->kv_index, key);
    return i >= 0 ? &g->kv[i].val : NULL;
}

int gguf_get_u64(const gguf_t *g, const char *key, uint64_t *out) {
    const gguf_value_t *v = gguf_find(g, key);
    if (!v) return MLM_ENOTFOUND;
    if (vtype_unsigned(v->type)) {
        *out = v->v.u;
        return 0;
    }
    if (vtype_signed(v->type) && v->v.i >= 0) {
        *out = (uint64_t)v->v.i;
        return 0;
    }
    return MLM_EFORMAT;
}

int gguf_get_u32(const gguf_t *g, const char *key, uint32_t *out) {
    uint64_t u;
    int rc = gguf_get_u64(g, key, &u);
    if (rc) return rc;
    if (u > UINT32_MAX) return MLM_EFORMAT;
    *out = (uint32_t)u;
    return 0;
}

int gguf_get_i64(const gguf_t *g, const char *key, int64_t *out) {
    const gguf_value_t *v = gguf_find(g, key);
    if (!v) return MLM_ENOTFOUND;
    if (vtype_signed(v->type)) {
        *out = v->v.i;
        return 0;
    }
    if (vtype_unsigned(v->type) && v->v.u <= (uint64_t)INT64_MAX) {
        *out = (int64_t)v->v.u;
        return 0;
    }
    return MLM_EFORMAT;
}

int gguf_get_f32(const gguf_t *g, const char *key, float *out) {
    const gguf_value_t *v = gguf_find(g, key);
    if (!v) return MLM_ENOTFOUND;
    if (v->type == GGUF_VT_FLOAT32 || v->type == GGUF_VT_FLOAT64) *out = (float)v->v.f;
    else if (vtype_unsigned(v->type)) *out = (float)v->v.u;
    else if (vtype_signed(v->type)) *out = (float)v->v.i;
    else return MLM_EFORMAT;
    return 0;
}

int gguf_get_bool(const gguf_t *g, const char *key, bool *out) {
    const gguf_value_t *v = gguf_find(g, key);
    if (!v) return MLM_ENOTFOUND;
    if (v->type != GGUF_VT_BOOL) return MLM_EFORMAT;
    *out = v->v.b;
    return 0;
}

int gguf_get_str(const gguf_t *g, const char *key, const char **ptr, size_t *len) {
    const gguf_value_t *v = gguf_find(g, key);
    if (!v) return MLM_ENOTFOUND;
    if (v->type != GGUF_VT_STRING) return MLM_EFORMAT;
    *ptr = v->v.str.ptr;
    *len = (size_t)v->v.str.len;
    return 0;
}

int gguf_arr_get(const gguf_value_t *arr, uint64_t i, gguf_value_t *out) {
    if (!arr || arr->type != GGUF_VT_ARRAY || !arr->v.arr.raw) return MLM_EFORMAT;
    size_t esz = gguf_vtype_size(arr->v.arr.type);
    if (!esz) return MLM_EFORMAT;
    if (i >= arr->v.arr.n) return MLM_ERANGE;
    decode_scalar(arr->v.arr.type, arr->v.arr.raw + i * esz, out);
    return 0;
}

int gguf_arr_f32(const gguf_value_t *arr, uint64_t i, float *out) {
    gguf_value_t e;
    int rc = gguf_arr_get(arr, i, &e);
    if (rc) return rc;
    if (e.type == GGUF_VT_FLOAT32 || e.type == GGUF_VT_FLOAT64) *out = (float)e.v.f;
    else if (vtype_unsigned(e.type)) *out = (float)e.v.u;
    else if (vtype_signed(e.type)) *out = (float)e.v.i;
    else *out = e.v.b ? 1.0f : 0.0f;
    return 0;
}

int gguf_arr_i64(const gguf_value_t *arr, uint64_t i, int64_t *out) {
    gguf_value_t e;
    int rc = gguf_arr_get(arr, i, &e);
    if (rc) return rc;
    if (vtype_signed(e.type)) {
        *out = e.v.i;
    } else if (vtype_unsigned(e.type)) {
        if (e.v.u > (uint64_t)INT64_MAX) return MLM_ERANGE;
        *out = (int64_t)e.v.u;
    } else if (e.type == GGUF_VT_BOOL) {
        *out = e.v.b;
    } else {
        // float element: only an integral value in range converts
        if (!(e.v.f >= -9223372036854775808.0 && e.v.f < 9223372036854775808.0) || e.v.f != floor(e.v.f))
            return MLM_EFORMAT;
        *out = (int64_t)e.v.f;
    }
    return 0;
}

// --- helpers: formatting

typedef struct {
    char *buf;               // caller's buffer (may be NULL)
    size_t cap;              // its capacity
    size_t n;                // bytes a full write needs so far
} sbuf_t;

static void sb_put(sbuf_t *s, const char *p, size_t n) {
    if (s->n < s->cap) {
        size_t room = s->cap - 1 - s->n;  // keep one byte for the NUL
        memcpy(s->buf + s->n, p, n < room ? n : room);
    }
    s->n += n;
}

static void sb_str(sbuf_t *s, const char *p) { sb_put(s, p, strlen(p)); }

// Length of a valid UTF-8 sequence of 2..4 bytes (not a C1 control) at p, or 0.
static size_t utf8_len(const uint8_t *p, size_t n) {
    uint8_t c = p[0];
    size_t len;
    uint8_t lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0) lo = 0xa0;      // no overlong forms
        if (c == 0xed) hi = 0x9f;      // no surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0) lo = 0x90;      // no overlong forms
        if (c == 0xf4) hi = 0x8f;      // nothing past U+10FFFF
    } else {
        return 0;
    }
    if (len > n || p[1] < lo || p[1] > hi) return 0;
    for (size_t k = 2; k < len; k++)
        if ((p[k] & 0xc0) != 0x80) return 0;
    if (c == 0xc2 && p[1] < 0xa0) return 0;  // U+0080..U+009F control characters
    return len;
}

static void format_string(sbuf_t *s, const char *ptr, uint64_t len) {
    const uint8_t *p = (const uint8_t *)ptr;
    sb_put(s, "\"", 1);
    for (uint64_t i = 0; i < len;) {
        uint8_t c = p[i];
        char esc[8];
        size_t u;
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c;
            sb_put(s, esc, 2);
        } else if (c == '\n') {
            sb_put(s, "\\n", 2);
        } else if (c == '\t') {
            sb_put(s, "\\t", 2);
        } else if (c == '\r') {
            sb_put(s, "\\r", 2);
        } else if (c >= 0x20 && c < 0x7f) {
            sb_put(s, (const char *)&p[i], 1);
        } else if (c >= 0x80 && (u = utf8_len(p + i, (size_t)(len - i))) > 0) {
            sb_put(s, (const char *)&p[i], u);
            i += u;
            continue;
        } else {
            snprintf(esc, sizeof esc, "\\x%02x", c);
            sb_put(s, esc, 4);
        }
        i++;
    }
    sb_put(s, "\"", 1);
}

// Shortest %g text that reads back as the same float (f32) or double.
static void format_float(sbuf_t *s, double f, bool single) {
    char t[40];
    if (isnan(f)) {
        sb_str(s, "nan");
        return;
    }
    if (isinf(f)) {
        sb_str(s, f < 0 ? "-inf" : "inf");
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(t, sizeof t, "%.*g", prec, f);
        if (single ? strtof(t, NULL) == (float)f : strtod(t, NULL) == f) break;
    }
    sb_str(s, t);
}

static void format_value(sbuf_t *s, const gguf_value_t *v, int max_items) {
    char t[48];
    switch (v->type) {
    case GGUF_VT_UINT8: case GGUF_VT_UINT16: case GGUF_VT_UINT32: case GGUF_VT_UINT64:
        snprintf(t, sizeof t, "%llu", (unsigned long long)v->v.u);
        sb_str(s, t);
        break;
    case GGUF_VT_INT8: case GGUF_VT_INT16: case GGUF_VT_INT32: case GGUF_VT_INT64:
        snprintf(t, sizeof t, "%lld", (long long)v->v.i);
        sb_str(s, t);
        break;
    case GGUF_VT_FLOAT32: format_float(s, v->v.f, true); break;
    case GGUF_VT_FLOAT64: format_float(s, v->v.f, false); break;
    case GGUF_VT_BOOL: sb_str(s, v->v.b ? "true" : "false"); break;
    case GGUF_VT_STRING: format_string(s, v->v.str.ptr, v->v.str.len); break;
    case GGUF_VT_ARRAY: {
        uint64_t n = v->v.arr.n;
        uint64_t shown = (max_items >= 0 && n > (uint64_t)max_items) ? (uint64_t)max_items : n;
        sb_put(s, "[", 1);
        for (uint64_t i = 0; i < shown; i++) {
            if (i) sb_put(s, ", ", 2);
            gguf_value_t e;
            if (v->v.arr.items) format_value(s, &v->v.arr.items[i], max_items);
            else if (gguf_arr_get(v, i, &e) == 0) format_value(s, &e, max_items);
        }
        if (shown < n) {
            snprintf(t, sizeof t, "%s... (%llu items)", shown ? ", " : "", (unsigned long long)n);
            sb_str(s, t);
        }
        sb_put(s, "]", 1);
        break;
    }
    default: sb_str(s, "?"); break;
    }
}

// --- public API: formatting and names

int gguf_value_format(const gguf_value_t *v, char *buf, size_t cap, int max_items) {
    sbuf_t s = {buf, buf ? cap : 0, 0};
    if (v) format_value(&s, v, max_items);
    if (s.cap) s.buf[s.n < s.cap ? s.n : s.cap - 1] = '\0';
    return s.n > INT_MAX ? INT_MAX : (int)s.n;
}

const char *gguf_vtype_name(int type) {
    static const char *const names[GGUF_VT_COUNT] = {
        "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
        "bool", "string", "array", "uint64", "int64", "float64",
    };
    return (type >= 0 && type < GGUF_VT_COUNT) ? names[type] : "unknown";
}

size_t gguf_vtype_size(int type) {
    switch (type) {
    case GGUF_VT_UINT8: case GGUF_VT_INT8: case GGUF_VT_BOOL: return 1;
    case GGUF_VT_UINT16: case GGUF_VT_INT16: return 2;
    case GGUF_VT_UINT32: case GGUF_VT_INT32: case GGUF_VT_FLOAT32: return 4;
    case GGUF_VT_UINT64: case GGUF_VT_INT64: case GGUF_VT_FLOAT64: return 8;
    default: return 0;
    }
}

// --- public API: tensors

int64_t gguf_n_tensors(const gguf_t *g) { return g ? g->n_tensors : 0; }

const gguf_tensor_t *gguf_tensor(const gguf_t *g, int64_t i) {
    return (g && i >= 0 && i < g->n_tensors) ? &g->tensors[i] : NULL;
}

const gguf_tensor_t *gguf_find_tensor(const gguf_t *g, const char *name) {
    if (!g || !name) return NULL;
    int64_t i = index_find(&g->tensor_index, name);
    return i >= 0 ? &g->tensors[i] : NULL;
}

int64_t gguf_tensor_nelements(const gguf_tensor_t *t) {
    if (!t) return 0;
    int64_t n = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) n *= t->ne[d];
    return n;
}
