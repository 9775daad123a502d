// CUnit suite "kvstore": the KV store's messages, its engine's files and counters, and the storage:ENDPOINT
// device against real `meshlm kvstore` processes: the host's bits on the reference cases, a context
// whose KV is 4x a node's RAM budget, `meshlm run --kv-device storage:`, refused requests, a kvstore
// killed mid-request, and a full disk under its directory (a 256 KiB tmpfs in a mount namespace).
#include <CUnit/CUnit.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_util.h"
#include "ref_cases.h"
#include "core/clock.h"
#include "core/err.h"
#include "core/fp16.h"
#include "offload/kvstore_dev.h"
#include "proto/msg.h"
#include "transport/comm.h"
#include "transport/comm_link.h"
#include "worker/model/model.h"
#include "worker/node/attn_storage.h"

// --- a kvstore process

typedef struct {
    pid_t pid;
    char *dir;          // the test's directory (owned)
    char ep[400];       // ipc://<dir>/kv.sock
    char kvdir[400];    // <dir>/kv: the store's files
    char dev[420];      // "storage:<ep>"
} kvs_proc_t;

// Starts `meshlm kvstore` on a fresh ipc endpoint; with tmpfs_kb its directory is a tmpfs of that
// size in a mount namespace of its own (root only). false when it cannot be started.
static bool kvs_start(kvs_proc_t *k, int tmpfs_kb, const char *extra) {
    memset(k, 0, sizeof *k);
    k->pid = -1;
    const char *bin = test_meshlm_bin();
    if (!bin || !(k->dir = test_tmpdir())) return false;
    snprintf(k->ep, sizeof k->ep, "ipc://%s/kv.sock", k->dir);
    snprintf(k->kvdir, sizeof k->kvdir, "%s/kv", k->dir);
    snprintf(k->dev, sizeof k->dev, "storage:%s%s", k->ep, extra ? extra : "");
    char log[460];
    snprintf(log, sizeof log, "%s/log", k->dir);
    if (tmpfs_kb > 0) {
        char sh[2048];
        mkdir(k->kvdir, 0700);
        snprintf(sh, sizeof sh, "mount -t tmpfs -o size=%dk none %s && exec %s kvstore --listen %s --dir %s", tmpfs_kb,
                 k->kvdir, bin, k->ep, k->kvdir);
        const char *args[] = {"/usr/bin/unshare", "-m", "/bin/sh", "-c", sh, NULL};
        k->pid = test_spawn(args, log);
    } else {
        const char *args[] = {bin, "kvstore", "--listen", k->ep, "--dir", k->kvdir, "--internal-bw", "1000", NULL};
        k->pid = test_spawn(args, log);
    }
    return k->pid > 0;
}

// The store's log (owned), or NULL.
static char *kvs_log(const kvs_proc_t *k) {
    char log[460];
    snprintf(log, sizeof log, "%s/log", k->dir);
    size_t len = 0;
    return test_read_file(log, &len);
}

// Stops it (SIGTERM, SIGKILL after 3 s) and removes its directory. Returns whether it had removed its
// own files (the kv directory was empty).
static bool kvs_stop(kvs_proc_t *k) {
    if (k->pid > 0) {
        kill(k->pid, SIGTERM);
        const int64_t dl = mlm_deadline(3000);
        while (waitpid(k->pid, NULL, WNOHANG) == 0) {
            if (mlm_passed(dl)) {
                kill(k->pid, SIGKILL);
                waitpid(k->pid, NULL, 0);
                break;
            }
            usleep(5000);
        }
        k->pid = -1;
    }
    bool empty = rmdir(k->kvdir) == 0 || errno == ENOENT;
    if (!empty) test_rm_dir(strdup(k->kvdir));
    if (k->dir) test_rm_dir(k->dir);
    k->dir = NULL;
    return empty;
}

// Runs fn with this process's stderr going to a file; returns what was written (owned).
static char *with_stderr(const char *dir, int (*fn)(void *), void *arg, int *rc) {
    char path[460];
    snprintf(path, sizeof path, "%s/stderr", dir);
    fflush(stderr);
    int saved = dup(2), fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    *rc = fn(arg);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    close(fd);
    size_t len = 0;
    return test_read_file(path, &len);
}

static attn_params_t shape(int n_layer, int n_head, int n_head_kv, int hd, qtype_t t, int n_seq) {
    return (attn_params_t){.n_layer = n_layer, .head_dim = hd, .n_head = n_head, .n_head_kv = n_head_kv, .h0 = 0,
                           .h1 = n_head, .kv0 = 0, .kv1 = n_head_kv, .kv_type = t, .n_seq_max = n_seq};
}

// --- the messages

static void test_codec(void) {
    char err[512];
    msg_t m, d;
    msg_buf_t b;
    comm_msg_t view;
    float k[2 * 8], v[2 * 8], q[3 * 16];
    for (int i = 0; i < 16; i++) k[i] = (float)i, v[i] = -(float)i;
    for (int i = 0; i < 48; i++) q[i] = 0.5f * (float)i;
    // an ATTEND carrying its append round-trips with every field
    msg_init(&m, MSG_KV_REQUEST);
    msg_kv_request_t *r = &m.kv_request;
    *r = (msg_kv_request_t){.session = 7, .req_id = 99, .op = MSG_KV_ATTEND, .seq = 3, .layer = 5, .pos = 10, .n = 3,
                            .has_kv = true, .append_pos = 11, .append_n = 2, .has_q = true};
    r->k = (msg_tensor_t){.type = QT_F32, .n_dims = 2, .ne = {8, 2, 1, 1}, .nbytes = sizeof k, .data = k};
    r->v = (msg_tensor_t){.type = QT_F32, .n_dims = 2, .ne = {8, 2, 1, 1}, .nbytes = sizeof v, .data = v};
    r->q = (msg_tensor_t){.type = QT_F32, .n_dims = 2, .ne = {16, 3, 1, 1}, .nbytes = sizeof q, .data = q};
    CU_ASSERT_EQUAL_FATAL(msg_encode(&m, NULL, &b, err, sizeof err), 0);
    CU_ASSERT_EQUAL(b.n, 5); // prefix, header, k, v, q
    msg_buf_view(&b, &view);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&view, NULL, &d, err, sizeof err), 0);
    const msg_kv_request_t *g = &d.kv_request;
    CU_ASSERT(d.type == MSG_KV_REQUEST && g->session == 7 && g->req_id == 99 && g->op == MSG_KV_ATTEND && g->seq == 3 &&
              g->layer == 5 && g->pos == 10 && g->n == 3 && g->has_kv && g->append_pos == 11 && g->append_n == 2 && g->has_q);
    CU_ASSERT(g->k.ne[0] == 8 && g->k.ne[1] == 2 && memcmp(g->k.data, k, sizeof k) == 0);
    CU_ASSERT(memcmp(g->v.data, v, sizeof v) == 0 && memcmp(g->q.data, q, sizeof q) == 0);
    msg_clear(&d);
    // a frame missing is refused
    view.n--;
    CU_ASSERT_EQUAL(msg_decode(&view, NULL, &d, err, sizeof err), MLM_EPROTO);
    msg_buf_free(&b);
    // what the codec refuses to send (and so to accept)
    msg_kv_request_t ok = *r;
    msg_kv_request_t t;
#define REFUSED(code, ...)                                                          \
    do {                                                                             \
        t = ok;                                                                      \
        __VA_ARGS__;                                                                 \
        m.kv_request = t;                                                            \
        int rc_ = msg_encode(&m, NULL, &b, err, sizeof err);                         \
        if (rc_ != (code)) fprintf(stderr, "\n  %s: %d (%s)", #__VA_ARGS__, rc_, err); \
        CU_ASSERT_EQUAL(rc_, code);                                                  \
        msg_buf_free(&b);                                                            \
    } while (0)
    REFUSED(MLM_EFORMAT, t.op = MSG_KV_NONE);
    REFUSED(MLM_EFORMAT, t.op = (msg_kv_op_t)8);
    REFUSED(MLM_EFORMAT, t.session = 0);
    REFUSED(MLM_EFORMAT, t.has_q = false);
    REFUSED(MLM_EFORMAT, t.q.ne[1] = 2; t.q.nbytes = 2 * 16 * 4);           // rows != n
    REFUSED(MLM_EFORMAT, t.v.type = QT_F16; t.v.nbytes = sizeof v / 2);     // k and v differ
    REFUSED(MLM_EFORMAT, t.k.type = QT_Q8_0; t.k.ne[0] = 32; t.k.nbytes = 2 * 34); // not F16/F32
    REFUSED(MLM_EFORMAT, t.q.nbytes = 4);                                   // shape and bytes disagree
    REFUSED(MLM_ERANGE, t.seq = MSG_KV_MAX_SEQS);
    REFUSED(MLM_ERANGE, t.n = 0);
    REFUSED(MLM_ERANGE, t.append_pos = -1);
    REFUSED(MLM_EFORMAT, t.op = MSG_KV_SEQ_NEW; t.n_ctx = 8);               // tensors on a SEQ_NEW
    REFUSED(MLM_ERANGE, t.op = MSG_KV_SEQ_NEW; t.has_kv = t.has_q = false; t.n_ctx = 0);
    REFUSED(MLM_ERANGE, t.op = MSG_KV_OPEN; t.session = 0; t.has_kv = t.has_q = false;
            t.shape = (msg_kv_shape_t){.n_layer = 2, .head_dim = 8, .n_head = 6, .n_head_kv = 4, .heads = {0, 6},
                                       .kv_heads = {0, 4}, .kv_type = QT_F16, .n_seq_max = 1}); // 6 % 4
    REFUSED(MLM_EFORMAT, t.op = MSG_KV_OPEN; t.session = 0; t.has_kv = t.has_q = false;
            t.shape = (msg_kv_shape_t){.n_layer = 2, .head_dim = 8, .n_head = 4, .n_head_kv = 2, .heads = {0, 4},
                                       .kv_heads = {0, 2}, .kv_type = QT_Q8_0, .n_seq_max = 1});
    REFUSED(MLM_ERANGE, t.op = MSG_KV_OPEN; t.session = 0; t.has_kv = t.has_q = false;
            t.shape = (msg_kv_shape_t){.n_layer = 2, .head_dim = 8, .n_head = 4, .n_head_kv = 2, .heads = {0, 4},
                                       .kv_heads = {0, 2}, .kv_type = QT_F16, .n_seq_max = 0});
    // a payload over the receiver's limit is refused before it is looked at
    m.kv_request = ok;
    CU_ASSERT_EQUAL_FATAL(msg_encode(&m, NULL, &b, err, sizeof err), 0);
    msg_buf_view(&b, &view);
    msg_limits_t small = {.max_header = 1 << 20, .max_payload = 100};
    CU_ASSERT_EQUAL(msg_decode(&view, &small, &d, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);
    // a reply with its output and counters
    msg_init(&m, MSG_KV_REPLY);
    m.kv_reply = (msg_kv_reply_t){.session = 7, .req_id = 99, .has_out = true,
                                  .stats = {.kv_bytes = 1, .bytes_read = 2, .bytes_written = 3, .compute_ns = 4, .flash_ns = 5}};
    m.kv_reply.out = (msg_tensor_t){.type = QT_F32, .n_dims = 2, .ne = {16, 3, 1, 1}, .nbytes = sizeof q, .data = q};
    CU_ASSERT_EQUAL_FATAL(msg_encode(&m, NULL, &b, err, sizeof err), 0);
    msg_buf_view(&b, &view);
    CU_ASSERT_EQUAL_FATAL(msg_decode(&view, NULL, &d, err, sizeof err), 0);
    CU_ASSERT(d.kv_reply.req_id == 99 && d.kv_reply.has_out && d.kv_reply.stats.bytes_read == 2 &&
              d.kv_reply.stats.flash_ns == 5 && memcmp(d.kv_reply.out.data, q, sizeof q) == 0);
    msg_clear(&d);
    msg_buf_free(&b);
    m.kv_reply.out.type = QT_F16; // outputs are F32 only
    m.kv_reply.out.nbytes = sizeof q / 2;
    CU_ASSERT_EQUAL(msg_encode(&m, NULL, &b, err, sizeof err), MLM_EFORMAT);
    msg_buf_free(&b);
    m.kv_reply.has_out = false;
    m.kv_reply.status = 3;
    CU_ASSERT_EQUAL(msg_encode(&m, NULL, &b, err, sizeof err), MLM_ERANGE);
    msg_buf_free(&b);
}

// --- the engine

static void test_engine_files(void) {
    char *dir = test_tmpdir(), err[512], why[512] = "", path[1024];
    attn_params_t p = shape(2, 4, 2, 16, QT_F16, 2);
    attn_dev_t *d = NULL;
    kvstore_opts_t o = {.dir = dir, .prefix = "t", .internal_bw = 1e9, .errbuf = why, .errcap = sizeof why};
    CU_ASSERT_EQUAL_FATAL(kvstore_dev_new(&d, &p, &o, err, sizeof err), 0);
    const size_t row = 2 * 16 * 2; // KV heads x head_dim x F16
    float k[10 * 32], v[10 * 32], q[4 * 16], out[4 * 16];
    test_fill_floats(k, 10 * 32, 1, 1.0f);
    test_fill_floats(v, 10 * 32, 2, 1.0f);
    test_fill_floats(q, 4 * 16, 3, 1.0f);
    CU_ASSERT_EQUAL(attn_dev_seq_new(d, 1, 64), 0);
    snprintf(path, sizeof path, "%s/t-s1.kv", dir);
    struct stat st;
    CU_ASSERT(stat(path, &st) == 0 && (size_t)st.st_size == 2 * 2 * 64 * row); // (layers, k|v, n_ctx, row), sparse
    for (int l = 0; l < 2; l++) CU_ASSERT_EQUAL(attn_dev_append(d, 1, l, 0, k, v, 10), 0);
    CU_ASSERT_EQUAL(attn_dev_attend(d, 1, 1, q, 1, 9, out), 0);
    attn_stats_t s;
    attn_dev_stats(d, &s);
    CU_ASSERT_EQUAL(s.kv_bytes, 2 * 2 * 10 * row);
    CU_ASSERT_EQUAL(s.bytes_written, 2 * 2 * 10 * row);
    CU_ASSERT_EQUAL(s.bytes_read, 2 * 10 * row); // layer 1's k and v rows 0..9
    CU_ASSERT_EQUAL(s.kv_bytes_ram, 0);
    CU_ASSERT_DOUBLE_EQUAL(s.sim_time_ms, 2.0 * 10 * row / 1e9 * 1e3, 1e-9);
    // the rows are in the file where the layout says (layer 1's v row 3, as F16)
    int fd = open(path, O_RDONLY);
    mlm_f16_t h[32], want[32];
    CU_ASSERT_EQUAL(pread(fd, h, sizeof h, (off_t)((2 * 1 + 1) * 64 + 3) * (off_t)row), (ssize_t)sizeof h);
    close(fd);
    for (int i = 0; i < 32; i++) want[i] = mlm_f32_to_f16(v[3 * 32 + i]);
    CU_ASSERT_EQUAL(memcmp(h, want, sizeof h), 0);
    // its attention is the host device's, bit for bit
    attn_dev_t *hd = NULL;
    p.pool = NULL;
    CU_ASSERT_EQUAL_FATAL(attn_dev_new(&hd, "host", &p, err, sizeof err), 0);
    float ref[4 * 16]; // (heads x head_dim)
    attn_dev_seq_new(hd, 0, 64);
    attn_dev_append(hd, 0, 0, 0, k, v, 10);
    attn_dev_attend(hd, 0, 0, q, 1, 9, ref);
    CU_ASSERT_EQUAL(attn_dev_attend(d, 1, 0, q, 1, 9, out), 0);
    CU_ASSERT_EQUAL(memcmp(out, ref, sizeof ref), 0);
    attn_dev_free(&hd);
    // a rewind forgets, a drop removes the file
    CU_ASSERT_EQUAL(attn_dev_append(d, 1, 0, 4, k, v, 1), 0);
    attn_dev_stats(d, &s);
    CU_ASSERT_EQUAL(s.kv_bytes, 2 * (10 + 5) * row);
    attn_dev_seq_drop(d, 1);
    CU_ASSERT(stat(path, &st) != 0 && errno == ENOENT);
    attn_dev_stats(d, &s);
    CU_ASSERT_EQUAL(s.kv_bytes, 0);
    attn_dev_free(&d);
    // a directory that is not there
    o.dir = "/nonexistent-meshlm-kvstore";
    CU_ASSERT_EQUAL(kvstore_dev_new(&d, &p, &o, err, sizeof err), MLM_ENOTFOUND);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "/nonexistent-meshlm-kvstore"));
    test_rm_dir(dir);
}

// --- the storage device against a kvstore process

typedef struct {
    attn_dev_t *d;
    const float *k, *v, *q;
    float *out;
    int pos;
    pid_t victim;       // SIGKILLed after delay_ms by killer()
    int delay_ms;
} call_t;

static int append_attend(void *arg) {
    call_t *c = arg;
    int rc = attn_dev_append(c->d, 0, 0, c->pos, c->k, c->v, 1);
    return rc ? rc : attn_dev_attend(c->d, 0, 0, c->q, 1, c->pos, c->out);
}

static void *killer(void *arg) {
    call_t *c = arg;
    usleep((useconds_t)c->delay_ms * 1000);
    kill(c->victim, SIGKILL);
    return NULL;
}

// The kvstore killed while it holds a request: the call fails with MLM_EPEER long before the
// request's deadline, the line on stderr names the endpoint, later calls fail at once; a store that
// never answers is MLM_ETIMEOUT at the deadline, naming the endpoint.
static void test_killed_mid_request(void) {
    kvs_proc_t k;
    CU_ASSERT_FATAL(kvs_start(&k, 0, ",timeout=5000"));
    char err[1024];
    attn_params_t p = shape(1, 4, 2, 32, QT_F16, 1);
    attn_dev_t *d = NULL;
    CU_ASSERT_EQUAL_FATAL(attn_dev_new(&d, k.dev, &p, err, sizeof err), 0);
    float kv[64], q[128], out[128];
    test_fill_floats(kv, 64, 5, 1.0f);
    test_fill_floats(q, 128, 6, 1.0f);
    CU_ASSERT_EQUAL(attn_dev_seq_new(d, 0, 16), 0);
    call_t c = {.d = d, .k = kv, .v = kv, .q = q, .out = out, .victim = k.pid, .delay_ms = 300};
    for (c.pos = 0; c.pos < 4; c.pos++) CU_ASSERT_EQUAL(append_attend(&c), 0);
    kill(k.pid, SIGSTOP); // the next request waits in the store ...
    pthread_t th;
    pthread_create(&th, NULL, killer, &c); // ... until it is killed
    const double t0 = mlm_now_ms();
    int rc = 0;
    char *said = with_stderr(k.dir, append_attend, &c, &rc);
    const double ms = mlm_now_ms() - t0;
    pthread_join(th, NULL);
    waitpid(k.pid, NULL, 0);
    k.pid = -1;
    CU_ASSERT_EQUAL(rc, MLM_EPEER);
    CU_ASSERT(ms >= 250 && ms < 2500);
    fprintf(stderr, "(lost after %.0f ms, the kill at 300) ", ms);
    CU_ASSERT_PTR_NOT_NULL(said && strstr(said, k.ep));
    CU_ASSERT_PTR_NOT_NULL(said && strstr(said, "lost mid-request"));
    free(said);
    const double t1 = mlm_now_ms();
    c.pos = 5;
    CU_ASSERT_EQUAL(attn_dev_attend(d, 0, 0, q, 1, 0, out), MLM_EPEER);
    CU_ASSERT(mlm_now_ms() - t1 < 100);
    attn_dev_free(&d);
    CU_ASSERT(mlm_now_ms() - t1 < 500);
    // nobody there: the deadline, naming the endpoint
    char dev[600];
    snprintf(dev, sizeof dev, "storage:ipc://%s/nobody.sock,timeout=300", k.dir);
    const double t2 = mlm_now_ms();
    CU_ASSERT_EQUAL(attn_dev_new(&d, dev, &p, err, sizeof err), MLM_ETIMEOUT);
    CU_ASSERT(mlm_now_ms() - t2 < 2000);
    CU_ASSERT_PTR_NOT_NULL(strstr(err, "nobody.sock"));
    CU_ASSERT_PTR_NULL(d);
    CU_ASSERT_EQUAL(attn_dev_new(&d, "storage:localhost:5", &p, err, sizeof err), MLM_EINVAL);
    CU_ASSERT_EQUAL(attn_dev_new(&d, "storage:ipc:///x,timeout=abc", &p, err, sizeof err), MLM_EINVAL);
    kvs_stop(&k);
}

typedef struct {
    attn_dev_t *d;
    int n_pos;
    int *failed_at;
} fill_t;

static int fill(void *arg) {
    fill_t *f = arg;
    float rows[8 * 256];
    test_fill_floats(rows, 8 * 256, 9, 1.0f);
    for (int pos = 0; pos < f->n_pos; pos += 8)
        for (int l = 0; l < 2; l++) {
            int rc = attn_dev_append(f->d, 0, l, pos, rows, rows, 8);
            float q[256], out[256];
            if (rc == 0) rc = attn_dev_attend(f->d, 0, l, rows, 1, pos, out);
            (void)q;
            if (rc != 0) {
                *f->failed_at = pos;
                return rc;
            }
        }
    return 0;
}

// A full disk under the store's directory: MLM_EFULL, the line naming the file; the store goes on
// serving (a smaller sequence of another session fits). Root: a 256 KiB tmpfs in a mount namespace
// of the kvstore's own. Elsewhere the engine meets a file size limit (EFBIG) in this process instead.
static void test_full_disk(void) {
    attn_params_t p = shape(2, 4, 4, 64, QT_F32, 1); // rows of 1 KiB
    char err[1024];
    int at = -1;
    if (geteuid() != 0 || access("/usr/bin/unshare", X_OK) != 0) {
        fprintf(stderr, "(not root: the engine under RLIMIT_FSIZE) ");
        char *dir = test_tmpdir(), why[512] = "";
        struct rlimit old, lim;
        getrlimit(RLIMIT_FSIZE, &old);
        lim = old;
        lim.rlim_cur = 256 * 1024;
        signal(SIGXFSZ, SIG_IGN);
        setrlimit(RLIMIT_FSIZE, &lim);
        attn_dev_t *d = NULL;
        kvstore_opts_t o = {.dir = dir, .errbuf = why, .errcap = sizeof why};
        int rc = kvstore_dev_new(&d, &p, &o, err, sizeof err);
        if (rc == 0) rc = attn_dev_seq_new(d, 0, 1024);
        setrlimit(RLIMIT_FSIZE, &old);
        CU_ASSERT_EQUAL(rc, MLM_EFULL);
        CU_ASSERT_PTR_NOT_NULL(strstr(why, dir));
        attn_dev_free(&d);
        test_rm_dir(dir);
        return;
    }
    kvs_proc_t k;
    CU_ASSERT_FATAL(kvs_start(&k, 256, NULL));
    attn_dev_t *d = NULL;
    CU_ASSERT_EQUAL_FATAL(attn_dev_new(&d, k.dev, &p, err, sizeof err), 0);
    CU_ASSERT_EQUAL(attn_dev_seq_new(d, 0, 512), 0); // 2 MiB of rows, sparse: fits until written
    fill_t f = {.d = d, .n_pos = 512, .failed_at = &at};
    int rc = 0;
    char *said = with_stderr(k.dir, fill, &f, &rc);
    CU_ASSERT_EQUAL(rc, MLM_EFULL);
    CU_ASSERT(at > 0 && at < 128); // 256 KiB hold about 64 positions of 2 layers' k and v rows
    CU_ASSERT_PTR_NOT_NULL(said && strstr(said, k.kvdir));
    CU_ASSERT_PTR_NOT_NULL(said && strstr(said, k.ep));
    if (said) fprintf(stderr, "\n  %s", said);
    free(said);
    attn_dev_seq_drop(d, 0); // frees the space
    CU_ASSERT_EQUAL(attn_dev_seq_new(d, 0, 32), 0);
    f.n_pos = 32;
    CU_ASSERT_EQUAL(fill(&f), 0);
    attn_dev_free(&d);
    kvs_stop(&k);
}

// Requests the store must refuse, over a link of the test's own: it answers each with an error and
// goes on serving.
static int ask(comm_t *c, const comm_iov_t *f, int n, msg_t *rep, comm_msg_t *raw) {
    int rc = comm_send(c, 1, f, n, 5000), from;
    char err[512];
    if (rc == 0) rc = comm_recv(c, 1, raw, &from, 5000);
    if (rc == 0) rc = msg_decode(raw, NULL, rep, err, sizeof err);
    return rc;
}

static int ask_msg(comm_t *c, const msg_t *m, msg_t *rep, comm_msg_t *raw) {
    msg_buf_t b;
    char err[512];
    int rc = msg_encode(m, NULL, &b, err, sizeof err);
    if (rc == 0) rc = ask(c, b.iov, b.n, rep, raw);
    msg_buf_free(&b);
    return rc;
}

static void test_refused_requests(void) {
    kvs_proc_t k;
    CU_ASSERT_FATAL(kvs_start(&k, 0, NULL));
    comm_t *c = NULL;
    char err[512];
    const char *eps[1] = {k.ep};
    CU_ASSERT_EQUAL_FATAL(comm_link_connect(&c, eps, 1, NULL, err, sizeof err), 0);
    msg_t rep;
    comm_msg_t raw;
    // garbage frames
    const char junk[] = "not a message";
    comm_iov_t f[2] = {{junk, sizeof junk}, {junk, 3}};
    CU_ASSERT_EQUAL_FATAL(ask(c, f, 2, &rep, &raw), 0);
    CU_ASSERT(rep.type == MSG_KV_REPLY && rep.kv_reply.req_id == 0 && rep.kv_reply.status == MLM_EPROTO);
    msg_clear(&rep);
    comm_msg_free(&raw);
    // a header over the 1 MiB limit
    msg_t m;
    msg_init(&m, MSG_KV_REQUEST);
    m.kv_request = (msg_kv_request_t){.session = 1, .req_id = 5, .op = MSG_KV_STATS};
    msg_buf_t b;
    CU_ASSERT_EQUAL_FATAL(msg_encode(&m, NULL, &b, err, sizeof err), 0);
    char *big = calloc(1, (1 << 20) + 16);
    comm_iov_t fb[2] = {b.iov[0], {big, (1 << 20) + 16}};
    CU_ASSERT_EQUAL_FATAL(ask(c, fb, 2, &rep, &raw), 0);
    CU_ASSERT(rep.kv_reply.req_id == 0 && rep.kv_reply.status == MLM_ERANGE);
    msg_clear(&rep);
    comm_msg_free(&raw);
    msg_buf_free(&b);
    free(big);
    // another message type
    msg_t hb;
    msg_init(&hb, MSG_HEARTBEAT);
    snprintf(hb.heartbeat.node_id, sizeof hb.heartbeat.node_id, "x");
    CU_ASSERT_EQUAL_FATAL(ask_msg(c, &hb, &rep, &raw), 0);
    CU_ASSERT(rep.kv_reply.status == MLM_EPROTO && strstr(rep.kv_reply.text, "HEARTBEAT"));
    msg_clear(&rep);
    comm_msg_free(&raw);
    // a session that is not there
    CU_ASSERT_EQUAL_FATAL(ask_msg(c, &m, &rep, &raw), 0);
    CU_ASSERT(rep.kv_reply.req_id == 5 && rep.kv_reply.status == MLM_ESTATE);
    msg_clear(&rep);
    comm_msg_free(&raw);
    // a real session: a layer it does not have, rows of another width, a sequence not allocated
    m.kv_request = (msg_kv_request_t){.req_id = 6, .op = MSG_KV_OPEN,
                                      .shape = {.n_layer = 2, .head_dim = 8, .n_head = 2, .n_head_kv = 1, .heads = {0, 2},
                                                .kv_heads = {0, 1}, .kv_type = QT_F32, .n_seq_max = 1}};
    CU_ASSERT_EQUAL_FATAL(ask_msg(c, &m, &rep, &raw), 0);
    const uint64_t sess = rep.kv_reply.session;
    CU_ASSERT(rep.kv_reply.status == 0 && sess > 0);
    msg_clear(&rep);
    comm_msg_free(&raw);
    float rows[16] = {0};
    m.kv_request = (msg_kv_request_t){.session = sess, .req_id = 7, .op = MSG_KV_APPEND, .layer = 2, .has_kv = true,
                                      .append_n = 1};
    m.kv_request.k = (msg_tensor_t){.type = QT_F32, .n_dims = 2, .ne = {8, 1, 1, 1}, .nbytes = 32, .data = rows};
    m.kv_request.v = m.kv_request.k;
    CU_ASSERT_EQUAL_FATAL(ask_msg(c, &m, &rep, &raw), 0);
    CU_ASSERT_EQUAL(rep.kv_reply.status, MLM_EINVAL);
    msg_clear(&rep);
    comm_msg_free(&raw);
    m.kv_request.layer = 0;
    CU_ASSERT_EQUAL_FATAL(ask_msg(c, &m, &rep, &raw), 0);
    CU_ASSERT_EQUAL(rep.kv_reply.status, MLM_ESTATE); // no sequence 0 yet
    msg_clear(&rep);
    comm_msg_free(&raw);
    m.kv_request.k.ne[0] = m.kv_request.v.ne[0] = 16;
    m.kv_request.k.nbytes = m.kv_request.v.nbytes = 64;
    CU_ASSERT_EQUAL_FATAL(ask_msg(c, &m, &rep, &raw), 0);
    CU_ASSERT(rep.kv_reply.status == MLM_EFORMAT && strstr(rep.kv_reply.text, "8"));
    msg_clear(&rep);
    comm_msg_free(&raw);
    m.kv_request = (msg_kv_request_t){.session = sess, .req_id = 8, .op = MSG_KV_CLOSE};
    CU_ASSERT_EQUAL_FATAL(ask_msg(c, &m, &rep, &raw), 0);
    CU_ASSERT_EQUAL(rep.kv_reply.status, 0);
    msg_clear(&rep);
    comm_msg_free(&raw);
    comm_destroy(&c);
    char *log = kvs_log(&k);
    CU_ASSERT_PTR_NOT_NULL(log && strstr(log, "refused"));
    free(log);
    CU_ASSERT(kvs_stop(&k)); // no files left behind
}

// --- the forward pass on the storage device

// Prompt, then greedy tokens, on device dev: logit rows (n_prompt + n_greedy - 1, n_vocab), tokens.
static int run_case(const ref_case_t *rc, const model_t *m, const char *dev, int n_ctx, float *lg, int32_t *toks,
                    attn_stats_t *st) {
    char err[512];
    model_ctx_t *c = NULL;
    model_ctx_opts_t co = {.n_ctx = n_ctx, .n_threads = 1, .n_batch = 16, .attn_dev = dev};
    if (model_ctx_new(&c, m, &co, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s\n", dev, err);
        return -1;
    }
    const int nv = rc->n_vocab;
    int rcode = model_eval(c, rc->prompt_tokens, rc->n_prompt, lg, true);
    for (int i = 0; i < rc->n_greedy && rcode == 0; i++) {
        const float *row = lg + (size_t)(rc->n_prompt - 1 + i) * nv;
        int32_t best = 0;
        for (int j = 1; j < nv; j++) best = row[j] > row[best] ? j : best;
        toks[i] = best;
        if (i + 1 < rc->n_greedy) rcode = model_eval(c, &best, 1, lg + (size_t)(rc->n_prompt + i) * nv, true);
    }
    if (st) attn_dev_stats(model_ctx_attn(c), st);
    model_ctx_destroy(&c);
    return rcode;
}

// Every reference case: the storage device's logits and greedy tokens are the host device's bits; only
// q, k/v and outputs crossed the link (far fewer bytes than the KV its attention read).
static void test_reference_cases(void) {
    kvs_proc_t k;
    CU_ASSERT_FATAL(kvs_start(&k, 0, NULL));
    char **names = NULL;
    const int n = ref_list(&names);
    CU_ASSERT_FATAL(n > 0);
    int cases = 0;
    for (int i = 0; i < n; i++) {
        if (!strstr(names[i], ".p0") && !strstr(names[i], ".p1")) continue;
        ref_case_t rc;
        if (ref_load(names[i], &rc) != 0) continue;
        model_t *m = NULL;
        char err[512];
        if (model_load(&m, rc.model_path, NULL, err, sizeof err) != 0 || rc.n_greedy < 1) {
            ref_free(&rc);
            model_destroy(&m);
            continue;
        }
        const size_t rows = (size_t)(rc.n_prompt + rc.n_greedy), nctx = rows + 4;
        float *ref = calloc(rows * rc.n_vocab, sizeof(float)), *got = calloc(rows * rc.n_vocab, sizeof(float));
        int32_t *rt = calloc((size_t)rc.n_greedy, sizeof *rt), *gt = calloc((size_t)rc.n_greedy, sizeof *gt);
        attn_stats_t st;
        CU_ASSERT_EQUAL_FATAL(run_case(&rc, m, "host", (int)nctx, ref, rt, NULL), 0);
        CU_ASSERT_EQUAL(run_case(&rc, m, k.dev, (int)nctx, got, gt, &st), 0);
        const bool same = memcmp(ref, got, (rows - 1) * rc.n_vocab * sizeof(float)) == 0 &&
                          memcmp(rt, gt, (size_t)rc.n_greedy * sizeof *gt) == 0;
        if (!same) fprintf(stderr, "\n  %s: the storage device's logits or tokens differ from the host's", names[i]);
        CU_ASSERT(same);
        CU_ASSERT(st.kv_bytes_ram == 0 && st.bytes_to_dev > 0 && st.bytes_from_dev > 0 && st.bytes_written > 0 &&
                  st.bytes_read > 0 && st.time_ms > 0);
        cases++;
        free(ref);
        free(got);
        free(rt);
        free(gt);
        model_destroy(&m);
        ref_free(&rc);
    }
    CU_ASSERT(cases >= 10);
    ref_names_free(names, n);
    CU_ASSERT(kvs_stop(&k));
}

// A context whose KV cache is 4x the node's RAM budget for it: on the storage device the node holds
// none of it (the kvstore's files hold it all) and the tokens and logits are the host device's.
static void test_context_past_ram_budget(void) {
    kvs_proc_t k;
    CU_ASSERT_FATAL(kvs_start(&k, 0, NULL));
    ref_case_t rc;
    CU_ASSERT_EQUAL_FATAL(ref_load("stories260K.p0", &rc), 0);
    model_t *m = NULL;
    char err[512];
    CU_ASSERT_EQUAL_FATAL(model_load(&m, rc.model_path, NULL, err, sizeof err), 0);
    const model_hparams_t *hp = model_hparams(m);
    const int n_ctx = 1024;
    const uint64_t kv_host = 2ull * hp->n_layer * n_ctx * hp->n_head_kv * hp->head_dim * 2; // F16 k and v
    const uint64_t budget = kv_host / 4;
    // a long sequence: the case's prompt, then its greedy tokens fed back, to 900 positions
    ref_case_t lr = rc;
    int32_t *toks = malloc(900 * sizeof *toks);
    for (int i = 0; i < 900; i++) toks[i] = i < rc.n_prompt ? rc.prompt_tokens[i] : rc.greedy[i % rc.n_greedy];
    lr.prompt_tokens = toks;
    lr.n_prompt = 880;
    lr.n_greedy = 20;
    const size_t rows = 900;
    float *ref = calloc(rows * rc.n_vocab, sizeof(float)), *got = calloc(rows * rc.n_vocab, sizeof(float));
    int32_t rt[20], gt[20];
    attn_stats_t st;
    CU_ASSERT_EQUAL_FATAL(run_case(&lr, m, "host", n_ctx, ref, rt, NULL), 0);
    CU_ASSERT_EQUAL(run_case(&lr, m, k.dev, n_ctx, got, gt, &st), 0);
    CU_ASSERT_EQUAL(memcmp(ref, got, (rows - 1) * rc.n_vocab * sizeof(float)), 0);
    CU_ASSERT_EQUAL(memcmp(rt, gt, sizeof rt), 0);
    const uint64_t held = 2ull * hp->n_layer * 899 * hp->n_head_kv * hp->head_dim * 2; // positions appended
    CU_ASSERT_EQUAL(st.kv_bytes_ram, 0);
    CU_ASSERT(st.kv_bytes == held && held > 3 * budget);
    fprintf(stderr, "(KV %.1f KiB in the kvstore, node budget %.1f KiB, link %.1f KiB) ", held / 1024.0, budget / 1024.0,
            (st.bytes_to_dev + st.bytes_from_dev) / 1024.0);
    free(ref);
    free(got);
    free(toks);
    model_destroy(&m);
    ref_free(&rc);
    CU_ASSERT(kvs_stop(&k));
}

// `meshlm run --kv-device storage:EP` prints the host device's text, and a worker of a 2-node
// tensor-parallel run each keep a session of their own in one kvstore.
static void test_cli_run(void) {
    const char *bin = test_meshlm_bin();
    if (!bin) {
        CU_FAIL("MESHLM_BIN not set");
        return;
    }
    kvs_proc_t k;
    CU_ASSERT_FATAL(kvs_start(&k, 0, NULL));
    char model[1024], cmd[4096];
    test_shared_path(model, sizeof model, "models/stories260K.gguf");
    const char *variants[] = {"", "--local 2 --tp 2 --keep-all"};
    for (int v = 0; v < 2; v++) {
        char *out[2];
        for (int dev = 0; dev < 2; dev++) {
            snprintf(cmd, sizeof cmd, "%s run -m %s -p 'Once upon a time' -n 40 -t 1 %s %s%s 2>%s/run.err", bin, model,
                     variants[v], dev ? "--kv-device " : "", dev ? k.dev : "", k.dir);
            FILE *p = popen(cmd, "r");
            out[dev] = calloc(1, 65536);
            size_t got = p ? fread(out[dev], 1, 65535, p) : 0;
            const int status = p ? pclose(p) : -1;
            CU_ASSERT(status == 0 && got > 20);
            if (status != 0) {
                char path[500];
                snprintf(path, sizeof path, "%s/run.err", k.dir);
                size_t len;
                char *e = test_read_file(path, &len);
                fprintf(stderr, "\n  %s: %s", cmd, e ? e : "?");
                free(e);
            }
        }
        CU_ASSERT_STRING_EQUAL(out[0], out[1]);
        free(out[0]);
        free(out[1]);
    }
    char *log = kvs_log(&k);
    // the single node's session and one per worker of the tp2 run decoded (a worker also opens one
    // to probe its device at load)
    int decoded = 0;
    for (const char *s = log; s && (s = strstr(s, " 39 decode tokens")); s++) decoded++;
    CU_ASSERT_EQUAL(decoded, 3);
    CU_ASSERT_PTR_NOT_NULL(log && strstr(log, "heads 0-3,") && strstr(log, "heads 4-7,"));
    if (decoded != 3) fprintf(stderr, "\n  kvstore log:\n%s", log ? log : "");
    CU_ASSERT_PTR_NOT_NULL(log && strstr(log, "KiB/token"));
    free(log);
    CU_ASSERT(kvs_stop(&k));
}

// Runs `sh -c cmd`, stdout into out (cap bytes, NUL-terminated), stderr to err_path. The exit status.
static int sh_run(const char *cmd, char *out, size_t cap) {
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    size_t got = fread(out, 1, cap - 1, p);
    out[got] = 0;
    return pclose(p);
}

// `meshlm run --mem-budget B -c 4096 --kv-device storage:EP`, 1000 tokens generated: the context's KV
// (F16) is larger than the whole budget, which holds the weights only, and the text is the host
// device's without a budget; the host device with that budget is refused (the budget cannot hold the
// KV cache of 4096 positions).
static void test_cli_budget(void) {
    const char *bin = test_meshlm_bin();
    if (!bin) {
        CU_FAIL("MESHLM_BIN not set");
        return;
    }
    kvs_proc_t k;
    CU_ASSERT_FATAL(kvs_start(&k, 0, NULL));
    char model[1024], cmd[4096], *out[2];
    test_shared_path(model, sizeof model, "models/stories260K.gguf");
    const char *budget = "500K"; // stories260K: 5 layers x 4 KV heads x 8 x (k, v) x F16 = 640 B a position, so
                                 // the 1004 positions' KV is 627 KiB; the weights stream through the budget
    for (int dev = 0; dev < 2; dev++) {
        out[dev] = calloc(1, 1 << 20);
        snprintf(cmd, sizeof cmd, "%s run -m %s -p 'Once upon a time' -n 1000 --ignore-eos --greedy -t 1 -c 4096 %s%s%s%s 2>%s/run%d.err",
                 bin, model, dev ? "--mem-budget " : "", dev ? budget : "", dev ? " --kv-device " : "",
                 dev ? k.dev : "", k.dir, dev);
        const int st = sh_run(cmd, out[dev], 1 << 20);
        CU_ASSERT_EQUAL(st, 0);
        if (st != 0) fprintf(stderr, "\n  failed: %s", cmd);
    }
    CU_ASSERT(strlen(out[0]) > 1000);
    CU_ASSERT_STRING_EQUAL(out[0], out[1]);
    char *log = kvs_log(&k);
    const char *dec = log ? strstr(log, "decode tokens") : NULL;
    CU_ASSERT_PTR_NOT_NULL(dec);
    char path[500];
    snprintf(path, sizeof path, "%s/run1.err", k.dir);
    size_t len = 0;
    char *e = test_read_file(path, &len);
    // the node's report: its KV device held the cache, none of it in its RAM
    CU_ASSERT_PTR_NOT_NULL(e && strstr(e, "KV device storage") && strstr(e, "(0.0 KiB in RAM)"));
    if (e) fprintf(stderr, "\n  %s", strstr(e, "KV device") ? strstr(e, "KV device") : e);
    free(e);
    free(log);
    // the host device with that budget: refused, the KV does not fit
    snprintf(cmd, sizeof cmd, "%s run -m %s -p 'Once upon a time' -n 1000 -t 1 -c 4096 --mem-budget %s 2>&1", bin, model,
             budget);
    CU_ASSERT_NOT_EQUAL(sh_run(cmd, out[0], 1 << 20), 0);
    free(out[0]);
    free(out[1]);
    CU_ASSERT(kvs_stop(&k));
}

// `meshlm run --kv-device storage:` whose kvstore is stopped while it holds a request and then killed:
// the run fails soon after the kill (long before the 10 s deadline), naming the endpoint.
static void test_cli_killed(void) {
    const char *bin = test_meshlm_bin();
    if (!bin) {
        CU_FAIL("MESHLM_BIN not set");
        return;
    }
    kvs_proc_t k;
    CU_ASSERT_FATAL(kvs_start(&k, 0, NULL));
    char model[1024], err_path[500];
    test_shared_path(model, sizeof model, "models/stories260K.gguf");
    snprintf(err_path, sizeof err_path, "%s/run.err", k.dir);
    const char *args[] = {bin, "run", "-m", model, "-p", "Once upon a time", "-n", "200", "-t", "1", "--kv-device", k.dev, NULL};
    // the kvstore stops as soon as the run's session is open: the run then waits on a request
    pid_t run = -1;
    const int64_t dl = mlm_deadline(60000);
    bool stopped = false;
    run = test_spawn(args, err_path);
    while (!mlm_passed(dl)) {
        char *log = kvs_log(&k);
        const bool open = log && strstr(log, "open:");
        free(log);
        if (open) {
            kill(k.pid, SIGSTOP);
            stopped = true;
            break;
        }
        usleep(1000);
    }
    CU_ASSERT_FATAL(stopped);
    usleep(300 * 1000);
    kill(k.pid, SIGKILL);
    const double t0 = mlm_now_ms();
    int st = 0;
    while (waitpid(run, &st, WNOHANG) == 0 && mlm_now_ms() - t0 < 20000) usleep(2000);
    const double ms = mlm_now_ms() - t0;
    if (ms >= 20000) {
        kill(run, SIGKILL);
        waitpid(run, &st, 0);
    }
    waitpid(k.pid, NULL, 0);
    k.pid = -1;
    fprintf(stderr, "(the run ended %.0f ms after the kill) ", ms);
    CU_ASSERT(ms < 3000);
    CU_ASSERT(WIFEXITED(st) && WEXITSTATUS(st) != 0);
    size_t len = 0;
    char *e = test_read_file(err_path, &len);
    CU_ASSERT_PTR_NOT_NULL(e && strstr(e, k.ep) && strstr(e, "lost mid-request"));
    if (e && !strstr(e, "lost mid-request")) fprintf(stderr, "\n  %s", e);
    free(e);
    kvs_stop(&k);
}

int test_kvstore_suite(void) {
    CU_pSuite s = CU_add_suite("kvstore", NULL, NULL);
    if (!s) return -1;
    attn_storage_register();
    if (!CU_add_test(s, "KV_REQUEST / KV_REPLY: round trips and refusals", test_codec) ||
        !CU_add_test(s, "engine: sequence files, layout, counters, the host's bits", test_engine_files) ||
        !CU_add_test(s, "storage: a kvstore killed mid-request, or never there", test_killed_mid_request) ||
        !CU_add_test(s, "storage: a full disk under the kvstore's directory", test_full_disk) ||
        !CU_add_test(s, "kvstore: malformed, oversized and impossible requests refused", test_refused_requests) ||
        !CU_add_test(s, "storage: the host's logits and tokens on the reference cases", test_reference_cases) ||
        !CU_add_test(s, "storage: a context whose KV is 4x the node's RAM budget", test_context_past_ram_budget) ||
        !CU_add_test(s, "meshlm run --kv-device storage: (one node, and tp2 workers)", test_cli_run) ||
        !CU_add_test(s, "meshlm run --kv-device storage: with its kvstore killed mid-request", test_cli_killed) ||
        !CU_add_test(s, "meshlm run --mem-budget: a context whose KV outgrows the budget, on storage:", test_cli_budget))
        return -1;
    return 0;
}
