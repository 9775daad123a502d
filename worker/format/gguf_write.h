// GGUF v3 writer: collect metadata and tensor infos, then stream tensor data to disk in order.
#ifndef MESHLM_GGUF_WRITE_H
#define MESHLM_GGUF_WRITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/format/gguf.h"
#include "worker/kernels/quant.h"

typedef struct gguf_writer gguf_writer_t;

// An empty writer (alignment GGUF_DEFAULT_ALIGNMENT). NULL if out of memory.
gguf_writer_t *gguf_writer_new(void);

// Frees; a file still being written is closed and its temporary removed. Accepts NULL, NULLs the pointer.
void gguf_writer_destroy(gguf_writer_t **self_p);

// --- metadata. Setting a key again replaces its value in place (the order stays that of the
// first set). All return 0, MLM_EINVAL (bad key/value; general.alignment must be a UINT32 power
// of two), MLM_ENOMEM, or MLM_ESTATE once the file has been opened.
int gguf_writer_set_u8(gguf_writer_t *w, const char *key, uint8_t v);
int gguf_writer_set_i8(gguf_writer_t *w, const char *key, int8_t v);
int gguf_writer_set_u16(gguf_writer_t *w, const char *key, uint16_t v);
int gguf_writer_set_i16(gguf_writer_t *w, const char *key, int16_t v);
int gguf_writer_set_u32(gguf_writer_t *w, const char *key, uint32_t v);
int gguf_writer_set_i32(gguf_writer_t *w, const char *key, int32_t v);
int gguf_writer_set_u64(gguf_writer_t *w, const char *key, uint64_t v);
int gguf_writer_set_i64(gguf_writer_t *w, const char *key, int64_t v);
int gguf_writer_set_f32(gguf_writer_t *w, const char *key, float v);
int gguf_writer_set_f64(gguf_writer_t *w, const char *key, double v);
int gguf_writer_set_bool(gguf_writer_t *w, const char *key, bool v);
int gguf_writer_set_str(gguf_writer_t *w, const char *key, const char *s);              // NUL-terminated
int gguf_writer_set_strn(gguf_writer_t *w, const char *key, const char *s, size_t len);  // any bytes
// Array of n numbers or bools of elem_type, packed in host order (bool: one byte each). Copied.
int gguf_writer_set_arr(gguf_writer_t *w, const char *key, gguf_vtype_t elem_type, const void *data,
                        uint64_t n);
// Array of n NUL-terminated strings. Copied.
int gguf_writer_set_arr_str(gguf_writer_t *w, const char *key, const char *const *strs, uint64_t n);
// Any value as the reader represents it, including arrays of arrays (copied, borrowed only for the call).
int gguf_writer_set_value(gguf_writer_t *w, const char *key, const gguf_value_t *v);

// Copies every KV of src whose key starts with prefix (all of them for ""), in src's order.
// Returns the number copied (>= 0) or a negative MLM_ code.
int gguf_writer_copy_kv(gguf_writer_t *w, const gguf_t *src, const char *prefix);

int64_t gguf_writer_n_kv(const gguf_writer_t *w);

// --- tensors, in file order. ne is in ggml order (ne[0] is the row length, a multiple of the
// type's block size). Returns the tensor's index, or MLM_EINVAL (bad name, shape or type,
// duplicate name), MLM_ENOMEM, MLM_ESTATE once the file is open.
int64_t gguf_writer_add_tensor(gguf_writer_t *w, const char *name, qtype_t type, int n_dims,
                               const int64_t *ne);

int64_t gguf_writer_n_tensors(const gguf_writer_t *w);
size_t gguf_writer_tensor_nbytes(const gguf_writer_t *w, int64_t i);   // 0 for a bad index
uint64_t gguf_writer_data_size(const gguf_writer_t *w);   // tensor data incl. padding (after open)
uint64_t gguf_writer_bytes_written(const gguf_writer_t *w);// file bytes written so far

// --- output. Opens "<path>.tmp<pid>", writes header, KVs, tensor infos and padding.
// Returns 0, MLM_EIO / MLM_EFULL (with a message in err), or MLM_ESTATE if already open.
int gguf_writer_open(gguf_writer_t *w, const char *path, char *err, size_t errlen);

// Appends n bytes of tensor data; chunks may cross tensor boundaries, padding between tensors is
// written automatically. MLM_ERANGE if more bytes arrive than the tensors hold. On any write error
// the temporary file is removed and every later call fails with MLM_ESTATE.
int gguf_writer_write_data(gguf_writer_t *w, const void *data, size_t n, char *err, size_t errlen);

// Name of the tensor that write_data expects next, or NULL when all data is in.
const char *gguf_writer_next_tensor(const gguf_writer_t *w);

// Flushes, closes and renames the temporary to path. MLM_ESTATE if tensor data is missing (the
// temporary is then removed); MLM_EIO / MLM_EFULL on a write or rename failure.
int gguf_writer_finish(gguf_writer_t *w, char *err, size_t errlen);

// Fills one whole tensor into buf (nbytes long, owned by the writer). Returns 0 or a negative MLM_ code.
typedef int (*gguf_writer_fill_fn)(void *ctx, int64_t i, void *buf, size_t nbytes, char *err, size_t errlen);

// open + fill(i) for every tensor in order + finish. Holds one tensor in memory at a time.
int gguf_writer_write_file(gguf_writer_t *w, const char *path, gguf_writer_fill_fn fill, void *ctx,
                           char *err, size_t errlen);

#endif
