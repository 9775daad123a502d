// libFuzzer target: the GGUF reader on arbitrary bytes, then a walk over everything it accepted and
// the shard keys it holds.
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "parallel/shard.h"
#include "worker/format/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    gguf_t *g = NULL;
    char err[512];
    if (gguf_open_mem(&g, data, size, "fuzz.gguf", err, sizeof err) != 0) {
        // a refusal must still leave a message naming the input
        if (!strstr(err, "fuzz.gguf")) __builtin_trap();
        return 0;
    }
    char buf[512];
    for (int64_t i = 0; i < gguf_n_kv(g); i++) {
        const gguf_value_t *v = gguf_kv_value(g, i);
        if (gguf_find(g, gguf_kv_key(g, i)) != v) __builtin_trap();
        gguf_value_format(v, buf, sizeof buf, 8);
        gguf_value_format(v, buf, 7, -1);
        if (v->type == GGUF_VT_ARRAY && v->v.arr.n > 0) {
            gguf_value_t e;
            float f;
            int64_t x;
            (void)gguf_arr_get(v, v->v.arr.n - 1, &e);
            (void)gguf_arr_f32(v, 0, &f);
            (void)gguf_arr_i64(v, v->v.arr.n - 1, &x);
        }
    }
    const uint8_t *base = gguf_base(g);
    volatile uint8_t sink = 0;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        const uint8_t *d = t->data;
        if (d < base || t->nbytes > (size_t)(base + size - d)) __builtin_trap();
        if (gguf_find_tensor(g, t->name) != t) __builtin_trap();
        if (t->nbytes) sink ^= (uint8_t)(d[0] ^ d[t->nbytes - 1]);
    }
    (void)sink;
    // a shard file's slice (meshlm.shard.*, the experts a placed one holds): consistent or refused
    shard_slice_t sl;
    bool is_shard = false;
    if (shard_file_slice(g, &sl, &is_shard) == 0 && is_shard && sl.placed) {
        const int n = shard_expert_count(&sl, SHARD_EXPERTS_MAX);
        for (int e = 0, q = 0; e < SHARD_EXPERTS_MAX; e++)
            if (shard_holds_expert(&sl, e) && shard_expert_plane(&sl, e) != q++) __builtin_trap();
        if (n < 0 || n > SHARD_EXPERTS_MAX) __builtin_trap();
    }
    gguf_close(&g);
    return 0;
}
