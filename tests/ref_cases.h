// Loading the llama.cpp reference cases in shared/reference (json + float32 logits).
#ifndef MESHLM_REF_CASES_H
#define MESHLM_REF_CASES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    char name[128];          // case name, e.g. "stories260K.p0"
    char model_path[1024];   // resolved path of the GGUF under shared/models
    char *prompt;            // prompt text (owned)
    int32_t *prompt_tokens;  // (n_prompt) owned
    int n_prompt;
    int32_t *greedy;         // (n_greedy) owned
    int n_greedy;
    int n_vocab;
    float *logits;           // (n_prompt + n_greedy, n_vocab) owned
    unsigned char *text;     // greedy continuation bytes (owned)
    size_t text_len;
} ref_case_t;

// Names of all cases (sorted), as "<model>.p<k>"; returns the count, or -1. Caller frees with ref_names_free.
int ref_list(char ***names_out);
void ref_names_free(char **names, int n);

// Loads one case by name; 0 or -1 (message on stderr).
int ref_load(const char *name, ref_case_t *out);
void ref_free(ref_case_t *c);

// Tolerance fraction of the row's logit range for a weight type name: 0.001 for F32/F16/BF16, 0.01 otherwise.
double ref_tolerance(const char *type_name);

// Max |a - b| over a row of n, and the row's max - min of b.
void ref_row_diff(const float *a, const float *b, int n, double *maxdiff, double *range);

// Top-1 minus top-2 of a row.
double ref_row_gap(const float *row, int n);

#endif
