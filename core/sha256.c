// SHA-256 through OpenSSL's EVP interface (hardware SHA extensions when the CPU has them).
#include "core/sha256.h"

#include <errno.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"

// --- public API

int sha256_file(const char *path, uint8_t out[32], char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return MLM_EIO;
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char *buf = malloc(1 << 20);
    int rc = (ctx && buf && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1) ? 0 : MLM_ENOMEM;
    size_t n;
    while (rc == 0 && (n = fread(buf, 1, 1 << 20, f)) > 0)
        if (EVP_DigestUpdate(ctx, buf, n) != 1) rc = MLM_EIO;
    if (rc == 0 && ferror(f)) rc = MLM_EIO;
    unsigned len = 32;
    if (rc == 0 && EVP_DigestFinal_ex(ctx, out, &len) != 1) rc = MLM_EIO;
    if (rc != 0) snprintf(err, errlen, "%s: cannot hash: %s", path, rc == MLM_ENOMEM ? "out of memory" : "read error");
    EVP_MD_CTX_free(ctx);
    free(buf);
    fclose(f);
    return rc;
}

void sha256_buf(const void *buf, size_t len, uint8_t out[32]) {
    unsigned n = 32;
    EVP_Digest(buf, len, out, &n, EVP_sha256(), NULL);
}

void sha256_hex(const uint8_t d[32], char out[65]) {
    static const char hx[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = hx[d[i] >> 4];
        out[2 * i + 1] = hx[d[i] & 15];
    }
    out[64] = 0;
}
