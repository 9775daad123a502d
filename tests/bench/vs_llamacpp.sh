#!/usr/bin/env bash
# meshlm against llama.cpp's CPU library, side by side: prefill and decode tokens/s per type and thread count.
#
# usage: LLAMACPP_BENCH=/path/llcbench tests/bench/vs_llamacpp.sh [-t "1 2"] [-p 128] [-n 64] [-r 3] [-k RUNS] [FILE.gguf ...]
#        tests/bench/vs_llamacpp.sh -f RUNS [-t "1 2"] [FILE.gguf ...]   (table from a kept RUNS file, nothing run)
#   LLAMACPP_BENCH   a bench program built against llama.cpp's llama.h (required). Called as
#                    `$LLAMACPP_BENCH -m FILE -t T -p N_PROMPT -n N_GEN -r 1`; it prints one line per
#                    repetition holding "pp_ts=X" and "tg_ts=Y" (prefill tokens/s of one N_PROMPT-token batch,
#                    decode tokens/s of N_GEN single-token steps). The README's speed section says how the one
#                    used there was built (not part of this repository).
#   MESHLM           meshlm binary (default: build/meshlm beside this script's repo), run as
#                    `meshlm bench -m FILE -t T -p N_PROMPT -n N_GEN -r 1 --json`.
#   FILE.gguf        default: /work/cache/tl-{F16,Q8_0,Q4_0,Q4_K,Q6_K}.gguf (TinyLlama-1.1B-shaped random
#                    models: `meshlm gen-model FILE --preset tinyllama-1.1b --quant TYPE --seed 1`).
# Each round runs, for every file and thread count, meshlm then llama.cpp (A B A B ...), so the load of
# other processes on a shared machine falls on both alike; the table gives the median over the rounds
# and meshlm / llama.cpp. `uptime` is printed before and after each round. -k RUNS appends every run's
# line ("engine file threads pp_ts tg_ts") to RUNS as it finishes, so an interrupted session keeps its
# rounds; -f RUNS prints the table of such a file. Not run in CI.
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
threads="1 2" np=128 ng=64 rounds=3 keep="" from=""
while getopts "t:p:n:r:k:f:h" o; do
  case $o in
    t) threads=$OPTARG ;; p) np=$OPTARG ;; n) ng=$OPTARG ;; r) rounds=$OPTARG ;; k) keep=$OPTARG ;; f) from=$OPTARG ;;
    *) sed -n '2,19p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ $# -eq 0 ]; then
  set -- /work/cache/tl-F16.gguf /work/cache/tl-Q8_0.gguf /work/cache/tl-Q4_0.gguf /work/cache/tl-Q4_K.gguf \
         /work/cache/tl-Q6_K.gguf
fi
out=$(mktemp -d /tmp/vs_llamacpp.XXXXXX)
trap 'rm -rf "$out"' EXIT
MESHLM=${MESHLM:-$here/build/meshlm}
LLAMACPP_BENCH=${LLAMACPP_BENCH:-}

if [ -n "$from" ]; then
  cp "$from" "$out/runs" || exit 1
  rounds=0
else
  [ -x "$MESHLM" ] || { echo "vs_llamacpp: no meshlm at $MESHLM" >&2; exit 1; }
  [ -n "$LLAMACPP_BENCH" ] && [ -x "$LLAMACPP_BENCH" ] || { echo "vs_llamacpp: set LLAMACPP_BENCH" >&2; exit 1; }
  for f in "$@"; do [ -f "$f" ] || { echo "vs_llamacpp: no file $f" >&2; exit 1; }; done
fi
[ "$rounds" -gt 0 ] && echo "vs_llamacpp: $(date -u '+%Y-%m-%d %H:%M UTC') threads=[$threads] pp$np tg$ng rounds=$rounds"
[ "$rounds" -gt 0 ] && echo "vs_llamacpp: meshlm=$MESHLM llama.cpp=$LLAMACPP_BENCH"
[ "$rounds" -gt 0 ] && echo "vs_llamacpp: load before: $(uptime)"

# --- one run of each engine; each appends "engine file threads pp tg" (tokens/s, "-" when it failed)

run_meshlm() { # file threads
  local j pp tg
  j=$("$MESHLM" bench -m "$1" -t "$2" -p "$np" -n "$ng" -r 1 --json 2>/dev/null | tr -d '\t\n ')
  pp=$(printf '%s' "$j" | grep -o '"test":"pp[0-9]*"[^}]*"avg_ts":[0-9.e+-]*' | grep -o '"avg_ts":[0-9.e+-]*' | cut -d: -f2)
  tg=$(printf '%s' "$j" | grep -o '"test":"tg[0-9]*"[^}]*"avg_ts":[0-9.e+-]*' | grep -o '"avg_ts":[0-9.e+-]*' | cut -d: -f2)
  echo "meshlm $1 $2 ${pp:--} ${tg:--}" | tee -a ${keep:+"$keep"} >>"$out/runs"
}

run_llamacpp() { # file threads
  local o pp tg
  o=$("$LLAMACPP_BENCH" -m "$1" -t "$2" -p "$np" -n "$ng" -r 1 2>/dev/null)
  pp=$(printf '%s\n' "$o" | grep -o 'pp_ts=[0-9.]*' | head -1 | cut -d= -f2)
  tg=$(printf '%s\n' "$o" | grep -o 'tg_ts=[0-9.]*' | head -1 | cut -d= -f2)
  echo "llama.cpp $1 $2 ${pp:--} ${tg:--}" | tee -a ${keep:+"$keep"} >>"$out/runs"
}

for ((r = 1; r <= rounds; r++)); do
  for f in "$@"; do
    for t in $threads; do
      run_meshlm "$f" "$t"
      run_llamacpp "$f" "$t"
    done
  done
  echo "vs_llamacpp: round $r done, load: $(uptime | sed 's/.*load average: //')"
done
[ "$rounds" -gt 0 ] && echo "vs_llamacpp: load after: $(uptime)"

# --- table: median per (engine, file, threads), then meshlm / llama.cpp

median() { # values on stdin ("-" ignored), printed with one decimal
  grep -v '^-$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) printf "%.1f\n", v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2fx\n", a / b }'; }

echo
echo "| type | threads | prefill t/s meshlm | llama.cpp | ratio | decode t/s meshlm | llama.cpp | ratio |"
echo "|---|---|---|---|---|---|---|---|"
for f in "$@"; do
  type=$(basename "$f" .gguf); type=${type##*-}
  for t in $threads; do
    cell() { awk -v e="$1" -v f="$f" -v t="$t" -v c="$2" '$1 == e && $2 == f && $3 == t { print $c }' "$out/runs" | median; }
    mp=$(cell meshlm 4) mt=$(cell meshlm 5) lp=$(cell llama.cpp 4) lt=$(cell llama.cpp 5)
    echo "| $type | $t | $mp | $lp | $(ratio "$mp" "$lp") | $mt | $lt | $(ratio "$mt" "$lt") |"
  done
done
