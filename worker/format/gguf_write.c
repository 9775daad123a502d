// GGUF v3 writer: metadata serialised at set time, tensor data streamed through a small buffer.
#include "worker/format/gguf_write.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/bytes.h"
#include "core/err.h"

// --- types

#define GW_MAGIC "GGUF"
#define GW_VERSION 3u
#define GW_BUF_CAP (4u << 20) // write buffer; larger writes bypass it
// Written bytes are pushed to the disk and out of the page cache every GW_SYNC_BYTES: a worker in a
// small memory cgroup writing a shard of gigabytes would otherwise fill its limit with dirty pages,
// which a cgroup-v1 limit does not throttle (the kernel's OOM killer ends the writer instead).
#define GW_SYNC_BYTES (32u << 20)
#define GW_MAX_KEY 65535u
#define GW_MAX_DEPTH 8        // nesting limit for arrays of arrays

typedef struct {
    uint8_t *p;     // bytes
    size_t len;     // used
    size_t cap;     // allocated
    int oom;        // an append failed
} bytes_t;

typedef struct {
    char *key;      // NUL-terminated copy
    uint8_t *blob;  // the whole serialised KV: key string, type, value
    size_t len;     // bytes in blob
} gw_kv_t;

typedef struct {
    char *name;                 // NUL-terminated copy
    int n_dims;                 // 1..GGUF_MAX_DIMS
    int64_t ne[GGUF_MAX_DIMS];  // ggml order, unused dims 1
    qtype_t type;               // element type
    size_t nbytes;              // data bytes (without padding)
    uint64_t offset;            // relative to the data section, set at open
} gw_tensor_t;

enum { GW_COLLECT, GW_OPEN, GW_DONE, GW_FAILED };

struct gguf_writer {
    gw_kv_t *kv;            // (n_kv) metadata in file order
    int64_t n_kv, cap_kv;   // used / allocated
    gw_tensor_t *t;         // (n_t) tensor infos in file order
    int64_t n_t, cap_t;     // used / allocated
    uint32_t alignment;     // general.alignment, default 32
    int state;              // GW_*
    int fd;                 // temporary file while GW_OPEN, else -1
    char *path;             // final name
    char *tmp;              // temporary name
    uint8_t *buf;           // (GW_BUF_CAP) pending output
    size_t buf_len;         // bytes pending in buf
    uint64_t written;       // file bytes handed to write() or pending
    uint64_t on_disk;       // file bytes written out and dropped from the page cache
    uint64_t in_file;       // file bytes handed to write()
    uint64_t data_size;     // data section size incl. padding
    int64_t cur;            // tensor being streamed
    size_t cur_done;        // its bytes received
    uint8_t *fill_buf;      // write_file scratch for one tensor
    size_t fill_cap;        // its size
};

// --- helpers: bytes

static void b_put(bytes_t *b, const void *src, size_t n) {
    if (b->oom) return;
    if (b->len + n > b->cap) {
        size_t c = b->cap ? b->cap : 64;
        while (c < b->len + n) c *= 2;
        uint8_t *p = realloc(b->p, c);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = c;
    }
    if (n) memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void b_u32(bytes_t *b, uint32_t v) {
    uint8_t x[4];
    mlm_put32(x, v);
    b_put(b, x, 4);
}

static void b_u64(bytes_t *b, uint64_t v) {
    uint8_t x[8];
    mlm_put64(x, v);
    b_put(b, x, 8);
}

static void b_str(bytes_t *b, const char *s, uint64_t len) {
    b_u64(b, len);
    b_put(b, s, (size_t)len);
}

// Little-endian bytes of a scalar held in a reader value.
static void b_scalar(bytes_t *b, const gguf_value_t *v) {
    uint64_t bits = 0;
    switch (v->type) {
    case GGUF_VT_UINT8: case GGUF_VT_UINT16: case GGUF_VT_UINT32: case GGUF_VT_UINT64: bits = v->v.u; break;
    case GGUF_VT_INT8: case GGUF_VT_INT16: case GGUF_VT_INT32: case GGUF_VT_INT64: bits = (uint64_t)v->v.i; break;
    case GGUF_VT_BOOL: bits = v->v.b ? 1 : 0; break;
    case GGUF_VT_FLOAT32: {
        float f = (float)v->v.f;
        uint32_t u;
        memcpy(&u, &f, 4);
        bits = u;
        break;
    }
    case GGUF_VT_FLOAT64: memcpy(&bits, &v->v.f, 8); break;
    default: break;
    }
    uint8_t x[8];
    mlm_put64(x, bits);
    b_put(b, x, gguf_vtype_size(v->type));
}

// Serialises a value's payload (not its type id). MLM_EINVAL for a malformed value.
static int b_value(bytes_t *b, const gguf_value_t *v, int depth) {
    if (depth > GW_MAX_DEPTH) return MLM_EINVAL;
    if (v->type == GGUF_VT_STRING) {
        if (!v->v.str.ptr && v->v.str.len) return MLM_EINVAL;
        b_str(b, v->v.str.ptr, v->v.str.len);
        return 0;
    }
    if (v->type != GGUF_VT_ARRAY) {
        if (!gguf_vtype_size(v->type)) return MLM_EINVAL;
        b_scalar(b, v);
        return 0;
    }
    gguf_vtype_t et = v->v.arr.type;
    uint64_t n = v->v.arr.n;
    b_u32(b, (uint32_t)et);
    b_u64(b, n);
    if (et == GGUF_VT_STRING || et == GGUF_VT_ARRAY) {
        if (n && !v->v.arr.items) return MLM_EINVAL;
        for (uint64_t i = 0; i < n; i++) {
            if (v->v.arr.items[i].type != et) return MLM_EINVAL;
            int rc = b_value(b, &v->v.arr.items[i], depth + 1);
            if (rc) return rc;
        }
        return 0;
    }
    size_t es = gguf_vtype_size(et);
    if (!es) return MLM_EINVAL;
    if (n && !v->v.arr.raw) return MLM_EINVAL;
    if (n > SIZE_MAX / es) return MLM_EINVAL;
    b_put(b, v->v.arr.raw, (size_t)(n * es)); // packed little-endian, as the host (x86/arm LE)
    return 0;
}

// --- helpers: errors

static int errno_code(int e) {
    return (e == ENOSPC || e == EDQUOT || e == EFBIG) ? MLM_EFULL : MLM_EIO;
}

// Closes and removes the temporary; the writer stays failed.
static void abandon(gguf_writer_t *w) {
    if (w->fd >= 0) close(w->fd);
    w->fd = -1;
    if (w->tmp) unlink(w->tmp);
    w->state = GW_FAILED;
    w->buf_len = 0;
}

// --- helpers: metadata

static int key_ok(const char *key) {
    return key && key[0] && strlen(key) <= GW_MAX_KEY;
}

static int is_pow2(uint64_t x) { return x && !(x & (x - 1)); }

// Stores key = v (type + payload), replacing an existing key in place.
static int set_value(gguf_writer_t *w, const char *key, const gguf_value_t *v) {
    if (!w || !key_ok(key) || !v) return MLM_EINVAL;
    if (w->state != GW_COLLECT) return MLM_ESTATE;
    if (v->type < 0 || v->type >= GGUF_VT_COUNT) return MLM_EINVAL;
    if (!strcmp(key, "general.alignment")) {
        if (v->type != GGUF_VT_UINT32 || !is_pow2(v->v.u) || v->v.u > (1u << 20)) return MLM_EINVAL;
    }
    bytes_t b = {0};
    b_str(&b, key, strlen(key));
    b_u32(&b, (uint32_t)v->type);
    int rc = b_value(&b, v, 0);
    if (!rc && b.oom) rc = MLM_ENOMEM;
    if (rc) {
        free(b.p);
        return rc;
    }
    for (int64_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, key)) continue;
        free(w->kv[i].blob);
        w->kv[i].blob = b.p;
        w->kv[i].len = b.len;
        if (!strcmp(key, "general.alignment")) w->alignment = (uint32_t)v->v.u;
        return 0;
    }
    if (w->n_kv == w->cap_kv) {
        int64_t c = w->cap_kv ? w->cap_kv * 2 : 32;
        gw_kv_t *p = realloc(w->kv, (size_t)c * sizeof *p);
        if (!p) {
            free(b.p);
            return MLM_ENOMEM;
        }
        w->kv = p;
        w->cap_kv = c;
    }
    char *k = strdup(key);
    if (!k) {
        free(b.p);
        return MLM_ENOMEM;
    }
    w->kv[w->n_kv++] = (gw_kv_t){k, b.p, b.len};
    if (!strcmp(key, "general.alignment")) w->alignment = (uint32_t)v->v.u;
    return 0;
}

static int set_u(gguf_writer_t *w, const char *key, gguf_vtype_t t, uint64_t x) {
    gguf_value_t v = {.type = t};
    v.v.u = x;
    return set_value(w, key, &v);
}

static int set_i(gguf_writer_t *w, const char *key, gguf_vtype_t t, int64_t x) {
    gguf_value_t v = {.type = t};
    v.v.i = x;
    return set_value(w, key, &v);
}

// --- helpers: output

static int write_all(gguf_writer_t *w, const void *p, size_t n, char *err, size_t errlen) {
    const uint8_t *c = p;
    while (n) {
        ssize_t k = write(w->fd, c, n > (1u << 30) ? (1u << 30) : n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            int e = k < 0 ? errno : ENOSPC;
            int code = errno_code(e);
            mlm_fail(err, errlen, code, "%s: write failed: %s", w->path, strerror(e));
            abandon(w);
            return code;
        }
        c += k;
        n -= (size_t)k;
        w->in_file += (uint64_t)k;
    }
    if (w->in_file - w->on_disk >= GW_SYNC_BYTES) { // best effort: a file system without it keeps its pages
        const off_t a = (off_t)w->on_disk, len = (off_t)(w->in_file - w->on_disk);
        if (sync_file_range(w->fd, a, len, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                               SYNC_FILE_RANGE_WAIT_AFTER) == 0)
            (void)posix_fadvise(w->fd, a, len, POSIX_FADV_DONTNEED);
        w->on_disk = w->in_file;
    }
    return 0;
}

static int flush(gguf_writer_t *w, char *err, size_t errlen) {
    if (!w->buf_len) return 0;
    size_t n = w->buf_len;
    w->buf_len = 0;
    return write_all(w, w->buf, n, err, errlen);
}

static int emit(gguf_writer_t *w, const void *p, size_t n, char *err, size_t errlen) {
    w->written += n;
    if (w->buf_len + n > GW_BUF_CAP) {
        int rc = flush(w, err, errlen);
        if (rc) return rc;
        if (n >= GW_BUF_CAP / 2) return write_all(w, p, n, err, errlen);
    }
    memcpy(w->buf + w->buf_len, p, n);
    w->buf_len += n;
    return 0;
}

static int emit_zeros(gguf_writer_t *w, size_t n, char *err, size_t errlen) {
    static const uint8_t zeros[64] = {0};
    while (n) {
        size_t k = n < sizeof zeros ? n : sizeof zeros;
        int rc = emit(w, zeros, k, err, errlen);
        if (rc) return rc;
        n -= k;
    }
    return 0;
}

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// Moves past tensors that are complete (writing their padding), including empty ones.
static int advance(gguf_writer_t *w, char *err, size_t errlen) {
    while (w->cur < w->n_t && w->cur_done == w->t[w->cur].nbytes) {
        size_t pad = (size_t)(align_up(w->t[w->cur].nbytes, w->alignment) - w->t[w->cur].nbytes);
        int rc = emit_zeros(w, pad, err, errlen);
        if (rc) return rc;
        w->cur++;
        w->cur_done = 0;
    }
    return 0;
}

// --- public API: lifetime

gguf_writer_t *gguf_writer_new(void) {
    gguf_writer_t *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    w->alignment = GGUF_DEFAULT_ALIGNMENT;
    w->fd = -1;
    return w;
}

void gguf_writer_destroy(gguf_writer_t **self_p) {
    if (!self_p || !*self_p) return;
    gguf_writer_t *w = *self_p;
    if (w->state == GW_OPEN) abandon(w);
    for (int64_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].blob);
    }
    for (int64_t i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->kv);
    free(w->t);
    free(w->path);
    free(w->tmp);
    free(w->buf);
    free(w->fill_buf);
    free(w);
    *self_p = NULL;
}

// --- public API: metadata

int gguf_writer_set_u8(gguf_writer_t *w, const char *k, uint8_t v) { return set_u(w, k, GGUF_VT_UINT8, v); }
int gguf_writer_set_i8(gguf_writer_t *w, const char *k, int8_t v) { return set_i(w, k, GGUF_VT_INT8, v); }
int gguf_writer_set_u16(gguf_writer_t *w, const char *k, uint16_t v) { return set_u(w, k, GGUF_VT_UINT16, v); }
int gguf_writer_set_i16(gguf_writer_t *w, const char *k, int16_t v) { return set_i(w, k, GGUF_VT_INT16, v); }
int gguf_writer_set_u32(gguf_writer_t *w, const char *k, uint32_t v) { return set_u(w, k, GGUF_VT_UINT32, v); }
int gguf_writer_set_i32(gguf_writer_t *w, const char *k, int32_t v) { return set_i(w, k, GGUF_VT_INT32, v); }
int gguf_writer_set_u64(gguf_writer_t *w, const char *k, uint64_t v) { return set_u(w, k, GGUF_VT_UINT64, v); }
int gguf_writer_set_i64(gguf_writer_t *w, const char *k, int64_t v) { return set_i(w, k, GGUF_VT_INT64, v); }

int gguf_writer_set_f32(gguf_writer_t *w, const char *key, float x) {
    gguf_value_t v = {.type = GGUF_VT_FLOAT32};
    v.v.f = x;
    return set_value(w, key, &v);
}

int gguf_writer_set_f64(gguf_writer_t *w, const char *key, double x) {
    gguf_value_t v = {.type = GGUF_VT_FLOAT64};
    v.v.f = x;
    return set_value(w, key, &v);
}

int gguf_writer_set_bool(gguf_writer_t *w, const char *key, bool x) {
    gguf_value_t v = {.type = GGUF_VT_BOOL};
    v.v.b = x;
    return set_value(w, key, &v);
}

int gguf_writer_set_strn(gguf_writer_t *w, const char *key, const char *s, size_t len) {
    if (!s && len) return MLM_EINVAL;
    gguf_value_t v = {.type = GGUF_VT_STRING};
    v.v.str.ptr = s;
    v.v.str.len = len;
    return set_value(w, key, &v);
}

int gguf_writer_set_str(gguf_writer_t *w, const char *key, const char *s) {
    if (!s) return MLM_EINVAL;
    return gguf_writer_set_strn(w, key, s, strlen(s));
}

int gguf_writer_set_arr(gguf_writer_t *w, const char *key, gguf_vtype_t et, const void *data, uint64_t n) {
    if (!gguf_vtype_size(et) || (n && !data)) return MLM_EINVAL;
    gguf_value_t v = {.type = GGUF_VT_ARRAY};
    v.v.arr.type = et;
    v.v.arr.n = n;
    v.v.arr.raw = data;
    return set_value(w, key, &v);
}

int gguf_writer_set_arr_str(gguf_writer_t *w, const char *key, const char *const *strs, uint64_t n) {
    if (!w || (n && !strs)) return MLM_EINVAL;
    if (n > SIZE_MAX / sizeof(gguf_value_t)) return MLM_EINVAL;
    gguf_value_t *items = calloc(n ? (size_t)n : 1, sizeof *items);
    if (!items) return MLM_ENOMEM;
    for (uint64_t i = 0; i < n; i++) {
        if (!strs[i]) {
            free(items);
            return MLM_EINVAL;
        }
        items[i].type = GGUF_VT_STRING;
        items[i].v.str.ptr = strs[i];
        items[i].v.str.len = strlen(strs[i]);
    }
    gguf_value_t v = {.type = GGUF_VT_ARRAY};
    v.v.arr.type = GGUF_VT_STRING;
    v.v.arr.n = n;
    v.v.arr.items = items;
    int rc = set_value(w, key, &v);
    free(items);
    return rc;
}

int gguf_writer_set_value(gguf_writer_t *w, const char *key, const gguf_value_t *v) {
    return set_value(w, key, v);
}

int gguf_writer_copy_kv(gguf_writer_t *w, const gguf_t *src, const char *prefix) {
    if (!w || !src) return MLM_EINVAL;
    if (!prefix) prefix = "";
    size_t pl = strlen(prefix);
    int n = 0;
    for (int64_t i = 0; i < gguf_n_kv(src); i++) {
        const char *k = gguf_kv_key(src, i);
        if (!k || strncmp(k, prefix, pl)) continue;
        int rc = set_value(w, k, gguf_kv_value(src, i));
        if (rc) return rc;
        n++;
    }
    return n;
}

int64_t gguf_writer_n_kv(const gguf_writer_t *w) { return w ? w->n_kv : 0; }

// --- public API: tensors

int64_t gguf_writer_add_tensor(gguf_writer_t *w, const char *name, qtype_t type, int n_dims, const int64_t *ne) {
    if (!w || !name || !name[0] || !ne || n_dims < 1 || n_dims > GGUF_MAX_DIMS) return MLM_EINVAL;
    if (w->state != GW_COLLECT) return MLM_ESTATE;
    if (strlen(name) > GW_MAX_KEY) return MLM_EINVAL;
    const qtype_traits_t *tr = qtype_traits(type);
    if (!tr) return MLM_EINVAL;
    int64_t rows = 1;
    for (int d = 0; d < n_dims; d++) {
        if (ne[d] <= 0 || ne[d] > INT64_MAX / 2) return MLM_EINVAL;
        if (d > 0) {
            if (rows > INT64_MAX / ne[d]) return MLM_EINVAL;
            rows *= ne[d];
        }
    }
    if (ne[0] % tr->blck) return MLM_EINVAL;
    size_t row = qtype_row_size(type, ne[0]);
    if (!row || (uint64_t)rows > SIZE_MAX / row) return MLM_EINVAL;
    for (int64_t i = 0; i < w->n_t; i++)
        if (!strcmp(w->t[i].name, name)) return MLM_EINVAL;
    if (w->n_t == w->cap_t) {
        int64_t c = w->cap_t ? w->cap_t * 2 : 64;
        gw_tensor_t *p = realloc(w->t, (size_t)c * sizeof *p);
        if (!p) return MLM_ENOMEM;
        w->t = p;
        w->cap_t = c;
    }
    gw_tensor_t t = {.n_dims = n_dims, .type = type, .nbytes = row * (size_t)rows};
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t.ne[d] = d < n_dims ? ne[d] : 1;
    t.name = strdup(name);
    if (!t.name) return MLM_ENOMEM;
    w->t[w->n_t] = t;
    return w->n_t++;
}

int64_t gguf_writer_n_tensors(const gguf_writer_t *w) { return w ? w->n_t : 0; }

size_t gguf_writer_tensor_nbytes(const gguf_writer_t *w, int64_t i) {
    return (w && i >= 0 && i < w->n_t) ? w->t[i].nbytes : 0;
}

uint64_t gguf_writer_data_size(const gguf_writer_t *w) { return w ? w->data_size : 0; }
uint64_t gguf_writer_bytes_written(const gguf_writer_t *w) { return w ? w->written : 0; }

const char *gguf_writer_next_tensor(const gguf_writer_t *w) {
    if (!w || w->state != GW_OPEN || w->cur >= w->n_t) return NULL;
    return w->t[w->cur].name;
}

// --- public API: output

int gguf_writer_open(gguf_writer_t *w, const char *path, char *err, size_t errlen) {
    if (!w || !path || !path[0]) return mlm_fail(err, errlen, MLM_EINVAL, "gguf_writer_open: no path");
    if (w->state != GW_COLLECT) return mlm_fail(err, errlen, MLM_ESTATE, "%s: writer already used", path);
    free(w->path);
    free(w->tmp);
    w->path = strdup(path);
    size_t tl = strlen(path) + 32;
    w->tmp = malloc(tl);
    if (!w->buf) w->buf = malloc(GW_BUF_CAP);
    if (!w->path || !w->tmp || !w->buf) return mlm_fail(err, errlen, MLM_ENOMEM, "%s: out of memory", path);
    snprintf(w->tmp, tl, "%s.tmp%ld", path, (long)getpid());

    // offsets
    uint64_t off = 0;
    for (int64_t i = 0; i < w->n_t; i++) {
        w->t[i].offset = off;
        off += align_up(w->t[i].nbytes, w->alignment);
    }
    w->data_size = off;

    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        int e = errno;
        w->state = GW_FAILED;
        return mlm_fail(err, errlen, errno_code(e), "%s: cannot create its temporary %s: %s", path, w->tmp,
                        strerror(e));
    }
    w->state = GW_OPEN;
    w->written = w->in_file = w->on_disk = 0;
    w->buf_len = 0;
    w->cur = 0;
    w->cur_done = 0;

    bytes_t h = {0};
    b_put(&h, GW_MAGIC, 4);
    b_u32(&h, GW_VERSION);
    b_u64(&h, (uint64_t)w->n_t);
    b_u64(&h, (uint64_t)w->n_kv);
    if (h.oom) {
        free(h.p);
        abandon(w);
        return mlm_fail(err, errlen, MLM_ENOMEM, "%s: out of memory", path);
    }
    int rc = emit(w, h.p, h.len, err, errlen);
    free(h.p);
    for (int64_t i = 0; !rc && i < w->n_kv; i++) rc = emit(w, w->kv[i].blob, w->kv[i].len, err, errlen);
    for (int64_t i = 0; !rc && i < w->n_t; i++) {
        const gw_tensor_t *t = &w->t[i];
        bytes_t ti = {0};
        b_str(&ti, t->name, strlen(t->name));
        b_u32(&ti, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++) b_u64(&ti, (uint64_t)t->ne[d]);
        b_u32(&ti, (uint32_t)t->type);
        b_u64(&ti, t->offset);
        if (ti.oom) {
            free(ti.p);
            abandon(w);
            return mlm_fail(err, errlen, MLM_ENOMEM, "%s: out of memory", path);
        }
        rc = emit(w, ti.p, ti.len, err, errlen);
        free(ti.p);
    }
    if (!rc) rc = emit_zeros(w, (size_t)(align_up(w->written, w->alignment) - w->written), err, errlen);
    if (!rc) rc = advance(w, err, errlen); // zero-size tensors cannot exist, but keep the invariant
    return rc;
}

int gguf_writer_write_data(gguf_writer_t *w, const void *data, size_t n, char *err, size_t errlen) {
    if (!w || (n && !data)) return mlm_fail(err, errlen, MLM_EINVAL, "gguf_writer_write_data: bad argument");
    if (w->state != GW_OPEN) return mlm_fail(err, errlen, MLM_ESTATE, "gguf_writer_write_data: file not open");
    const uint8_t *p = data;
    while (n) {
        if (w->cur >= w->n_t)
            return mlm_fail(err, errlen, MLM_ERANGE, "%s: %zu bytes of tensor data past the last tensor",
                        w->path, n);
        size_t room = w->t[w->cur].nbytes - w->cur_done;
        size_t k = n < room ? n : room;
        int rc = emit(w, p, k, err, errlen);
        if (rc) return rc;
        w->cur_done += k;
        p += k;
        n -= k;
        rc = advance(w, err, errlen);
        if (rc) return rc;
    }
    return 0;
}

int gguf_writer_finish(gguf_writer_t *w, char *err, size_t errlen) {
    if (!w) return MLM_EINVAL;
    if (w->state != GW_OPEN) return mlm_fail(err, errlen, MLM_ESTATE, "gguf_writer_finish: file not open");
    if (w->cur < w->n_t) {
        int rc = mlm_fail(err, errlen, MLM_ESTATE, "%s: tensor data incomplete: '%s' has %zu of %zu bytes",
                      w->path, w->t[w->cur].name, w->cur_done, w->t[w->cur].nbytes);
        abandon(w);
        return rc;
    }
    int rc = flush(w, err, errlen);
    if (rc) return rc;
    int fd = w->fd;
    w->fd = -1;
    if (close(fd) != 0) {
        int e = errno;
        rc = mlm_fail(err, errlen, errno_code(e), "%s: close of its temporary %s failed: %s", w->path, w->tmp,
                      strerror(e));
        abandon(w);
        return rc;
    }
    if (rename(w->tmp, w->path) != 0) {
        int e = errno;
        rc = mlm_fail(err, errlen, MLM_EIO, "%s: cannot rename its temporary %s to it: %s", w->path, w->tmp,
                      strerror(e));
        abandon(w);
        return rc;
    }
    w->state = GW_DONE;
    return 0;
}

int gguf_writer_write_file(gguf_writer_t *w, const char *path, gguf_writer_fill_fn fill, void *ctx,
                           char *err, size_t errlen) {
    if (!w || !fill) return mlm_fail(err, errlen, MLM_EINVAL, "gguf_writer_write_file: bad argument");
    int rc = gguf_writer_open(w, path, err, errlen);
    if (rc) return rc;
    for (int64_t i = 0; i < w->n_t; i++) {
        size_t nb = w->t[i].nbytes;
        if (nb > w->fill_cap) {
            free(w->fill_buf);
            w->fill_buf = malloc(nb);
            w->fill_cap = w->fill_buf ? nb : 0;
            if (!w->fill_buf) {
                abandon(w);
                return mlm_fail(err, errlen, MLM_ENOMEM, "%s: no memory for tensor '%s' (%zu bytes)", path,
                            w->t[i].name, nb);
            }
        }
        rc = fill(ctx, i, w->fill_buf, nb, err, errlen);
        if (rc) {
            abandon(w);
            return rc;
        }
        rc = gguf_writer_write_data(w, w->fill_buf, nb, err, errlen);
        if (rc) return rc;
    }
    return gguf_writer_finish(w, err, errlen);
}
