// Unicode helpers for the tokenizer: codepoint category flags, UTF-8 coding, GPT-2 byte-level map.
#ifndef MESHLM_UNICODE_H
#define MESHLM_UNICODE_H

#include <stddef.h>
#include <stdint.h>

// Category flags of a codepoint (the general category group, plus the White_Space property).
// A codepoint with no flag at all is unassigned (category Cn) or outside Unicode.
enum {
    UNI_NUMBER = 1,       // Nd, Nl, No  (\p{N})
    UNI_LETTER = 2,       // Lu, Ll, Lt, Lm, Lo  (\p{L})
    UNI_SEPARATOR = 4,    // Zs, Zl, Zp
    UNI_ACCENT_MARK = 8,  // Mn, Mc, Me
    UNI_PUNCTUATION = 16, // P*
    UNI_SYMBOL = 32,      // S*
    UNI_CONTROL = 64,     // Cc, Cf, Co, Cs
    UNI_WHITESPACE = 128, // White_Space property (\s)
};

#define UNI_REPLACEMENT 0xFFFDu   // U+FFFD, stands in for bytes that do not decode
#define UNI_MAX_CP 0x10FFFFu

typedef struct {
    uint32_t start;  // first codepoint of the run
    uint8_t flags;   // UNI_* bits shared by the whole run
} uni_range_t;

extern const uni_range_t uni_ranges[];  // (uni_n_ranges) generated, in unicode_data.c
extern const int uni_n_ranges;

// UNI_* flags of a codepoint; 0 for unassigned codepoints and anything above U+10FFFF.
unsigned uni_flags(uint32_t cp);

// Length of a UTF-8 sequence judged by its lead byte alone (1 for ASCII and stray continuation
// bytes, 2/3/4 for 110x/1110/1111 leads), as llama.cpp splits text into "characters".
int uni_len_utf8(unsigned char lead);

// Decodes one codepoint from s[0..n) (n >= 1) leniently, as llama.cpp does: a lead byte with the
// right number of continuation bytes decodes even if overlong or a surrogate. Anything else (a
// stray continuation byte, a truncated sequence, a value above U+10FFFF) gives U+FFFD and
// consumes one byte. *adv receives the number of bytes consumed.
uint32_t uni_decode(const unsigned char *s, size_t n, size_t *adv);

// Writes cp (<= U+10FFFF) as UTF-8 into out; returns the byte count (1..4), 0 if cp is too big.
int uni_encode(uint32_t cp, char out[4]);

// Strict UTF-8 check of the sequence starting at s[0] (n >= 1 bytes available).
// Returns 1 and *len = sequence length if s starts with a well-formed sequence; 0 if the bytes
// are a valid but incomplete prefix that reaches the end of s (*len = n); -1 if ill-formed, with
// *len = length of the maximal ill-formed subpart (>= 1), to be replaced by one U+FFFD.
int uni_utf8_check(const unsigned char *s, size_t n, size_t *len);

// GPT-2 byte-level BPE alphabet: byte b <-> a printable codepoint. Printable Latin-1 bytes
// ('!'..'~', 0xA1..0xAC, 0xAE..0xFF) map to themselves, the other 68 bytes to 256, 257, ... in order.
uint32_t uni_byte_to_cp(uint8_t b);
// Inverse of uni_byte_to_cp; -1 if cp is not in the alphabet.
int uni_cp_to_byte(uint32_t cp);

#endif
