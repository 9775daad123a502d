// Unicode helpers for the tokenizer: flag lookup in the generated range table, UTF-8, byte-level map.
#include "worker/text/unicode.h"

#include <stdbool.h>

// --- helpers

// True for the bytes the GPT-2 byte-level alphabet keeps as themselves.
static bool byte_is_printable(unsigned b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

// --- public API

unsigned uni_flags(uint32_t cp) {
    if (cp > UNI_MAX_CP) return 0;
    // last run whose start is <= cp (uni_ranges[0].start is 0)
    int lo = 0, hi = uni_n_ranges - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (uni_ranges[mid].start <= cp) lo = mid;
        else hi = mid - 1;
    }
    return uni_ranges[lo].flags;
}

int uni_len_utf8(unsigned char lead) {
    static const uint8_t len_by_high_nibble[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return len_by_high_nibble[lead >> 4];
}

uint32_t uni_decode(const unsigned char *s, size_t n, size_t *adv) {
    unsigned char c = s[0];
    *adv = 1;
    if (c < 0x80) return c;
    size_t need;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) { need = 2; cp = c & 0x1Fu; }
    else if ((c & 0xF0) == 0xE0) { need = 3; cp = c & 0x0Fu; }
    else if ((c & 0xF8) == 0xF0) { need = 4; cp = c & 0x07u; }
    else return UNI_REPLACEMENT;  // continuation byte or 0xF8..0xFF as a lead
    if (n < need) return UNI_REPLACEMENT;
    for (size_t i = 1; i < need; i++) {
        if ((s[i] & 0xC0) != 0x80) return UNI_REPLACEMENT;
        cp = (cp << 6) | (s[i] & 0x3Fu);
    }
    if (cp > UNI_MAX_CP) return UNI_REPLACEMENT;
    *adv = need;
    return cp;
}

int uni_encode(uint32_t cp, char out[4]) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    if (cp <= UNI_MAX_CP) {
        out[0] = (char)(0xF0 | (cp >> 18));
        out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (char)(0x80 | (cp & 0x3F));
        return 4;
    }
    return 0;
}

int uni_utf8_check(const unsigned char *s, size_t n, size_t *len) {
    unsigned char c = s[0];
    *len = 1;
    if (c < 0x80) return 1;
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;        // no overlongs
        else if (c == 0xED) hi = 0x9F;   // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;        // no overlongs
        else if (c == 0xF4) hi = 0x8F;   // nothing above U+10FFFF
    } else return -1;
    for (size_t i = 1; i < need; i++) {
        if (i >= n) {
            *len = n;
            return 0;
        }
        unsigned char b = s[i];
        unsigned char l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (b < l || b > h) {
            *len = i;
            return -1;
        }
    }
    *len = need;
    return 1;
}

uint32_t uni_byte_to_cp(uint8_t b) {
    if (byte_is_printable(b)) return b;
    uint32_t n = 0;  // number of non-printable bytes below b
    for (unsigned x = 0; x < b; x++) n += !byte_is_printable(x);
    return 256 + n;
}

int uni_cp_to_byte(uint32_t cp) {
    if (cp < 256) return byte_is_printable(cp) ? (int)cp : -1;
    uint32_t n = 256;
    for (unsigned x = 0; x < 256; x++) {
        if (byte_is_printable(x)) continue;
        if (n == cp) return (int)x;
        n++;
    }
    return -1;
}
