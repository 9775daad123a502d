// SHA-256 of files (model identity on the wire and in the shard cache), via OpenSSL's libcrypto.
#ifndef MESHLM_SHA256_H
#define MESHLM_SHA256_H

#include <stddef.h>
#include <stdint.h>

// Hashes the whole file at path. 0, or MLM_EIO with a message.
int sha256_file(const char *path, uint8_t out[32], char *err, size_t errlen);

// Hashes a buffer.
void sha256_buf(const void *buf, size_t len, uint8_t out[32]);

// Lower-case hex of a digest into out (65 bytes with the NUL).
void sha256_hex(const uint8_t d[32], char out[65]);

#endif
