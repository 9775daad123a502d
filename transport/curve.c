// CurveZMQ keys, key files and the ZAP handler (RFC 27) that admits only known client keys.
#include "transport/curve.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zmq.h>

#include "core/err.h"

// --- types

struct curve_zap {
    void *sock;                // REP on inproc://zeromq.zap.01 (used by the thread only)
    pthread_t thread;
    atomic_bool stop;
    atomic_int refused;
    curve_peers_t peers;
    char who[64];
    pthread_mutex_t mu;        // guards last_addr and last_key
    char last_addr[256];       // the last refused peer's address ("" = none yet)
    char last_key[CURVE_KEY_LEN + 1]; // its key, or its mechanism when not CURVE
};

// --- internals

static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == '\n' || e[-1] == '\r' || e[-1] == ' ' || e[-1] == '\t')) *--e = 0;
    return s;
}

// One frame of a ZAP request into buf (NUL-terminated, cut at cap - 1); its size, or -1.
static int frame(void *sock, char *buf, size_t cap, bool *more) {
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, sock, 0) < 0) {
        zmq_msg_close(&m);
        return -1;
    }
    const size_t n = zmq_msg_size(&m);
    const size_t k = n < cap - 1 ? n : cap - 1;
    memcpy(buf, zmq_msg_data(&m), k);
    buf[k] = 0;
    *more = zmq_msg_more(&m);
    zmq_msg_close(&m);
    return (int)n;
}

static void reply(void *sock, const char *version, const char *id, size_t id_len, const char *code, const char *text) {
    zmq_send(sock, version, strlen(version), ZMQ_SNDMORE);
    zmq_send(sock, id, id_len, ZMQ_SNDMORE);
    zmq_send(sock, code, strlen(code), ZMQ_SNDMORE);
    zmq_send(sock, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(sock, "", 0, ZMQ_SNDMORE); // user id
    zmq_send(sock, "", 0, 0);           // metadata
}

// One request: version, request id, domain, address, identity, mechanism, credentials.
static void serve_one(curve_zap_t *z) {
    char f[7][256];
    int len[7] = {0};
    bool more = true;
    int n = 0;
    while (more && n < 7) {
        if ((len[n] = frame(z->sock, f[n], sizeof f[n], &more)) < 0) return;
        n++;
    }
    while (more) { // frames past the credentials
        char skip[8];
        if (frame(z->sock, skip, sizeof skip, &more) < 0) return;
    }
    if (n < 6) return; // not a ZAP request: no reply possible
    const char *mech = f[5];
    bool ok = false;
    char key[CURVE_KEY_LEN + 1] = "";
    if (!strcmp(mech, "CURVE") && n == 7 && len[6] == 32) {
        zmq_z85_encode(key, (const uint8_t *)f[6], 32);
        for (int i = 0; i < z->peers.n && !ok; i++) ok = !strcmp(key, z->peers.key[i]);
    }
    if (ok) {
        reply(z->sock, "1.0", f[1], (size_t)len[1], "200", "OK");
        return;
    }
    pthread_mutex_lock(&z->mu);
    snprintf(z->last_addr, sizeof z->last_addr, "%s", f[3][0] ? f[3] : "?");
    snprintf(z->last_key, sizeof z->last_key, "%.40s", strcmp(mech, "CURVE") ? mech : key);
    pthread_mutex_unlock(&z->mu);
    atomic_fetch_add(&z->refused, 1);
    fprintf(stderr, "meshlm: %s: refused a connection from %s: %s%s%s\n", z->who, f[3][0] ? f[3] : "?",
            strcmp(mech, "CURVE") ? "it does not use CURVE (" : "its key ", strcmp(mech, "CURVE") ? mech : key,
            strcmp(mech, "CURVE") ? ")" : " is not among the keys this node accepts");
    reply(z->sock, "1.0", f[1], (size_t)len[1], "400", "unknown key");
}

static void *zap_main(void *arg) {
    curve_zap_t *z = arg;
    while (!atomic_load(&z->stop)) {
        zmq_pollitem_t it = {.socket = z->sock, .events = ZMQ_POLLIN};
        const int r = zmq_poll(&it, 1, 100);
        if (r < 0 && errno == ETERM) break;
        if (r > 0) serve_one(z);
    }
    zmq_close(z->sock);
    return NULL;
}

// --- public API

int curve_key_valid(const char *t) {
    if (!t || strlen(t) != CURVE_KEY_LEN) return 0;
    uint8_t raw[32];
    return zmq_z85_decode(raw, t) != NULL;
}

int curve_keygen(curve_keypair_t *k, char *err, size_t errlen) {
    if (!zmq_has("curve") || zmq_curve_keypair(k->pub, k->sec) != 0)
        return mlm_fail(err, errlen, MLM_EUNSUPPORTED, "this libzmq has no CURVE support");
    return 0;
}

int curve_write_keypair(const char *base, const curve_keypair_t *k, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s.key", base);
    const mode_t old = umask(077);
    FILE *f = fopen(path, "w");
    umask(old);
    if (!f || fprintf(f, "public %s\nsecret %s\n", k->pub, k->sec) < 0 || fclose(f) != 0)
        return mlm_fail(err, errlen, MLM_EIO, "%s: cannot write: %s", path, strerror(errno));
    snprintf(path, sizeof path, "%s.pub", base);
    f = fopen(path, "w");
    if (!f || fprintf(f, "%s\n", k->pub) < 0 || fclose(f) != 0)
        return mlm_fail(err, errlen, MLM_EIO, "%s: cannot write: %s", path, strerror(errno));
    return 0;
}

int curve_read_keypair(const char *path, curve_keypair_t *k, char *err, size_t errlen) {
    memset(k, 0, sizeof *k);
    FILE *f = fopen(path, "r");
    if (!f) return mlm_fail(err, errlen, MLM_EIO, "%s: cannot open: %s", path, strerror(errno));
    char line[512];
    int ln = 0;
    while (fgets(line, sizeof line, f)) {
        ln++;
        char *s = trim(line);
        if (!*s || *s == '#') continue;
        char *dst = !strncmp(s, "public ", 7) ? k->pub : !strncmp(s, "secret ", 7) ? k->sec : NULL;
        char *v = trim(s + 7);
        if (!dst || !curve_key_valid(v)) {
            fclose(f);
            return mlm_fail(err, errlen, MLM_EFORMAT, "%s:%d: expected 'public KEY' or 'secret KEY' (40 Z85 characters)",
                            path, ln);
        }
        memcpy(dst, v, CURVE_KEY_LEN + 1);
    }
    fclose(f);
    if (!k->pub[0] || !k->sec[0]) return mlm_fail(err, errlen, MLM_EFORMAT, "%s: needs a public and a secret key", path);
    return 0;
}

int curve_read_peers(const char *path, curve_peers_t *p, char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    FILE *f = fopen(path, "r");
    if (!f) return mlm_fail(err, errlen, MLM_EIO, "%s: cannot open: %s", path, strerror(errno));
    char line[1024];
    int ln = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        ln++;
        char *s = trim(line);
        if (!*s || *s == '#') continue;
        char *sp = strpbrk(s, " \t");
        char *ep = sp ? trim(sp + 1) : "";
        if (sp) *sp = 0;
        char key[CURVE_KEY_LEN + 1] = "";
        if (curve_key_valid(s)) {
            memcpy(key, s, CURVE_KEY_LEN + 1);
        } else { // a .pub file
            FILE *pf = fopen(s, "r");
            char kl[128] = "";
            if (pf && fgets(kl, sizeof kl, pf) && curve_key_valid(trim(kl))) memcpy(key, trim(kl), CURVE_KEY_LEN + 1);
            if (pf) fclose(pf);
            if (!key[0])
                rc = mlm_fail(err, errlen, MLM_EFORMAT, "%s:%d: '%.80s' is neither a key (40 Z85 characters) nor a .pub file",
                              path, ln, s);
        }
        if (rc == 0 && p->n == CURVE_MAX_PEERS)
            rc = mlm_fail(err, errlen, MLM_EFULL, "%s:%d: more than %d keys", path, ln, CURVE_MAX_PEERS);
        if (rc == 0) {
            memcpy(p->key[p->n], key, sizeof key);
            snprintf(p->endpoint[p->n], sizeof p->endpoint[p->n], "%s", ep);
            p->n++;
        }
    }
    fclose(f);
    if (rc == 0 && p->n == 0) rc = mlm_fail(err, errlen, MLM_EFORMAT, "%s: no key", path);
    return rc;
}

const char *curve_peer_key(const curve_peers_t *p, const char *endpoint) {
    for (int i = 0; i < p->n; i++)
        if (!strcmp(p->endpoint[i], endpoint)) return p->key[i];
    return NULL;
}

int curve_zap_start(curve_zap_t **out, void *zctx, const curve_peers_t *peers, const char *who, char *err,
                    size_t errlen) {
    *out = NULL;
    curve_zap_t *z = calloc(1, sizeof *z);
    if (!z) return mlm_fail(err, errlen, MLM_ENOMEM, "out of memory");
    z->peers = *peers;
    pthread_mutex_init(&z->mu, NULL);
    snprintf(z->who, sizeof z->who, "%s", who ? who : "link");
    z->sock = zmq_socket(zctx, ZMQ_REP);
    if (!z->sock || zmq_bind(z->sock, "inproc://zeromq.zap.01") != 0) {
        const int e = errno;
        if (z->sock) zmq_close(z->sock);
        pthread_mutex_destroy(&z->mu);
        free(z);
        return mlm_fail(err, errlen, MLM_EIO, "cannot start the key check (ZAP): %s", zmq_strerror(e));
    }
    if (pthread_create(&z->thread, NULL, zap_main, z) != 0) {
        zmq_close(z->sock);
        pthread_mutex_destroy(&z->mu);
        free(z);
        return mlm_fail(err, errlen, MLM_ENOMEM, "cannot start the key check thread");
    }
    *out = z;
    return 0;
}

int curve_zap_refused(const curve_zap_t *z) { return z ? atomic_load(&z->refused) : 0; }

void curve_zap_last_refused(curve_zap_t *z, char *addr, size_t cap, char *key) {
    if (cap) addr[0] = 0;
    key[0] = 0;
    if (!z) return;
    pthread_mutex_lock(&z->mu);
    if (cap) snprintf(addr, cap, "%s", z->last_addr);
    snprintf(key, CURVE_KEY_LEN + 1, "%s", z->last_key);
    pthread_mutex_unlock(&z->mu);
}

void curve_zap_stop(curve_zap_t **self_p) {
    if (!self_p || !*self_p) return;
    curve_zap_t *z = *self_p;
    atomic_store(&z->stop, true);
    pthread_join(z->thread, NULL);
    pthread_mutex_destroy(&z->mu);
    free(z);
    *self_p = NULL;
}
