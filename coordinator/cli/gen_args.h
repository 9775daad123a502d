// The options every generating command shares (run, coordinator, mpi): parsing, usage, JSON output.
#ifndef MESHLM_GEN_ARGS_H
#define MESHLM_GEN_ARGS_H

#include <getopt.h>
#include <stdbool.h>

#include "coordinator/runtime/generate.h"

typedef struct {
    const char *model;        // -m
    char *prompt;             // -p, or read from -f (then owned)
    bool prompt_owned;
    int n_predict;            // -n (default 128)
    int n_threads;            // -t (0 = all cores)
    int n_ctx;                // -c (0 = derived)
    int n_batch;              // -b (0 = 64)
    bool json;                // --json
    bool no_bos;              // --no-bos
    bool repack;              // !--no-repack
    bool kv_f32;              // --kv-type f32
    bool kv_q8;               // --kv-type q8_0 (changes outputs)
    const char *kv_device;    // --kv-device NAME[:ARG] (NULL = host; checked against the registry)
    const char *logits_path;  // --logits
    gen_opts_t gen;           // sampling and stopping
} gen_args_t;

// Option ids; a command numbers its own long options from GA_NEXT on.
enum { GA_TEMP = 1000, GA_TOPK, GA_TOPP, GA_MINP, GA_RP, GA_RLN, GA_SEED, GA_GREEDY, GA_IGNEOS, GA_NOBOS, GA_KV,
       GA_NOREPACK, GA_JSON, GA_LOGITS, GA_KVDEV, GA_NEXT };

#define GEN_ARGS_SHORTOPTS "m:p:f:n:t:c:b:h"
#define GEN_ARGS_LONGOPTS                                                                                       \
    {"model", required_argument, 0, 'm'}, {"prompt", required_argument, 0, 'p'},                             \
        {"file", required_argument, 0, 'f'}, {"n-predict", required_argument, 0, 'n'},                       \
        {"threads", required_argument, 0, 't'}, {"ctx-size", required_argument, 0, 'c'},                    \
        {"batch-size", required_argument, 0, 'b'}, {"temp", required_argument, 0, GA_TEMP},                  \
        {"top-k", required_argument, 0, GA_TOPK}, {"top-p", required_argument, 0, GA_TOPP},                  \
        {"min-p", required_argument, 0, GA_MINP}, {"repeat-penalty", required_argument, 0, GA_RP},           \
        {"repeat-last-n", required_argument, 0, GA_RLN}, {"seed", required_argument, 0, GA_SEED},            \
        {"greedy", no_argument, 0, GA_GREEDY}, {"ignore-eos", no_argument, 0, GA_IGNEOS},                    \
        {"no-bos", no_argument, 0, GA_NOBOS}, {"kv-type", required_argument, 0, GA_KV},                      \
        {"no-repack", no_argument, 0, GA_NOREPACK}, {"json", no_argument, 0, GA_JSON},                       \
        {"logits", required_argument, 0, GA_LOGITS}, {"kv-device", required_argument, 0, GA_KVDEV},           \
        {"help", no_argument, 0, 'h'}

// Usage of --kv-device (run, bench, worker, mpi).
#define KV_DEVICE_USAGE                                                                                         \
    "      --kv-device DEV     where the KV cache lives and attention runs (default host): host,\n"          \
    "                          file:DIR (RAM, then files in DIR past the RAM share of --mem-budget),\n"     \
    "                          storage:ENDPOINT (a meshlm kvstore process), pim:PRESET (simulated\n"       \
    "                          processing-in-memory: hbm2-pim, aim-gddr6, upmem, neupims); every\n"          \
    "                          device gives the host's tokens. Given to workers for their KV unless\n"     \
    "                          a worker has its own --kv-device\n"

// Usage lines of the shared options.
#define GEN_ARGS_USAGE                                                                                          \
    "  -m, --model FILE        GGUF model\n"                                                                  \
    "  -p, --prompt TEXT       prompt text\n"                                                                 \
    "  -f, --file FILE         read the prompt from a file\n"                                                 \
    "  -n, --n-predict N       tokens to generate (default 128)\n"                                            \
    "  -t, --threads N         threads (default: all cores)\n"                                                \
    "  -c, --ctx-size N        context positions (default: min(model's, 4096))\n"                             \
    "  -b, --batch-size N      prompt tokens per forward chunk (default 64)\n"                                \
    "      --temp X            temperature (default 0.8; 0 = greedy)\n"                                       \
    "      --top-k N           (default 40; 0 = off)\n"                                                       \
    "      --top-p X           (default 0.95; 1 = off)\n"                                                     \
    "      --min-p X           (default 0.05; 0 = off)\n"                                                     \
    "      --repeat-penalty X  (default 1.0 = off)\n"                                                         \
    "      --repeat-last-n N   tokens the penalty looks back over (default 64)\n"                             \
    "      --seed N            sampling seed (same seed, same text)\n"                                        \
    "      --greedy            always take the most likely token\n"                                           \
    "      --ignore-eos        do not stop at end-of-generation tokens\n"                                     \
    "      --no-bos            do not prepend the BOS token\n"                                                \
    "      --kv-type T         KV cache type: f16 (default, as llama.cpp), f32, or q8_0 (blocks of 32,\n"   \
    "                          0.53x f16's memory, CHANGES OUTPUTS; host and file devices)\n"             \
    KV_DEVICE_USAGE                                                                                           \
    "      --no-repack         compute on the file's layout (no repacked copy of the weights)\n"              \
    "      --json              print one JSON object on stdout instead of streaming text\n"                   \
    "      --logits FILE       write float32 logits for every prompt position and generated token\n"

void gen_args_init(gen_args_t *a);

// Handles one getopt result: 1 when it was a shared option, 0 when it is not, -1 for a bad value
// (message on stderr, naming cmd).
int gen_args_option(gen_args_t *a, int ch, const char *arg, const char *cmd);

// Checks what every generating command needs (model, prompt, sane counts): 0 or -1 with a message.
int gen_args_check(const gen_args_t *a, const char *cmd);

// Frees the prompt read from a file.
void gen_args_free(gen_args_t *a);

// Prints {"prompt_tokens","tokens","text","prompt_ms","gen_ms","tokens_per_s"} on stdout.
void gen_print_json(const int32_t *pt, int np, const gen_result_t *r);

// The same with "memory": the array memory (mem_report_json; takes ownership; NULL = no such key).
struct cJSON;
void gen_print_json_memory(const int32_t *pt, int np, const gen_result_t *r, struct cJSON *memory);
// The same with more members: every item of extras (an object; taken over, may be NULL) is added.
void gen_print_json_extra(const int32_t *pt, int np, const gen_result_t *r, struct cJSON *extras);

#endif
