#!/usr/bin/env bash
# Seeds for fuzz_request: a byte of settings (context, BOS, template, chat in its top bit) + a JSON body.
set -euo pipefail
out=${1:?usage: seed_fuzz_request.sh CORPUS_DIR}
mkdir -p "$out"
n=0
seed() { n=$((n + 1)); { printf "\\x$(printf %02x "$1")"; printf '%s' "$2"; } >"$out/seed$n"; }
seed 3 '{"prompt":"Once upon a time","max_tokens":20,"temperature":0}'
seed 4 '{"prompt":["Once"],"max_tokens":5,"stream":true,"stop":["\n","The"],"seed":7,"top_k":40,"top_p":0.9}'
seed 5 '{"prompt":"x","model":"m","max_tokens":-1}'
seed 129 '{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}],"max_tokens":8}'
seed 130 '{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"},{"role":"user","content":"More"}]}'
seed 131 '{"messages":[{"role":"wizard","content":3}],"ignore_eos":true}'
seed 1 '{"prompt":"<s>[INST] hi [/INST]","max_completion_tokens":3,"n":1,"repeat_penalty":1.1,"min_p":0.05}'
seed 2 '[1,2,3]'
