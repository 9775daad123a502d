#!/usr/bin/env bash
# Side-by-side decode/prefill speed of meshlm, llama.cpp (llama-bench) and distributed-llama (dllama) on the same files.
#
# usage: tests/bench/peers.sh [-t THREADS] [-p N_PROMPT] [-n N_GEN] [-r ROUNDS] [-b READ_GBS] FILE.gguf [FILE.gguf ...]
#   MESHLM=build/meshlm           meshlm binary (default: build/meshlm beside this script's repo)
#   LLAMA_BENCH=/path/llama-bench llama.cpp's llama-bench (skipped when unset or not executable)
#   DLLAMA=/path/dllama           distributed-llama's dllama (skipped when unset or not executable); it needs its
#                                 own model format: FILE.gguf is run as FILE.dllama.m with tokenizer FILE.dllama.t
#                                 when both exist beside it (otherwise that file's dllama cell is "-")
#   BENCH_MEMBW=build/bench_membw measures the read bandwidth with THREADS threads just before every run of
#                                 every engine (a host's bandwidth can change state within a minute), or -b
#                                 gives one figure for all runs
# Each round runs every engine once on every file, one after another (interleaved, so load from other
# processes on a shared machine falls on all of them alike); the table shows the median over rounds of
# tokens/s, the decode GB/s (tg tokens/s x the weight bytes a token reads, as meshlm bench reports them),
# the median of each run's share of the bandwidth measured just before it, and the median over rounds of
# each peer's tg over meshlm's tg on the same file in the same round. Not run in CI.
# dllama's files come from tests/bench/gguf2dllama.py FILE.gguf (stdlib Python; writes FILE.dllama.m and .t):
#   a Q4_0 file converts block for block and runs with --buffer-float-type q80; dllama has no CPU kernel for
#   Q8_0 or F16 weights, so those need --weights f32 (run with f32 buffers, 4 bytes a weight, noted under the
#   table) and k-quants are refused. Its prompts start without BOS (see the converter's header).
#   e.g. tests/bench/gguf2dllama.py m-Q4_0.gguf && DLLAMA=../distributed-llama/dllama tests/bench/peers.sh m-Q4_0.gguf
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
threads=2 np=64 ng=32 rounds=3 readbw=""
while getopts "t:p:n:r:b:h" o; do
  case $o in
    t) threads=$OPTARG ;; p) np=$OPTARG ;; n) ng=$OPTARG ;; r) rounds=$OPTARG ;; b) readbw=$OPTARG ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n '2,22p' "$0"; exit 2; }
MESHLM=${MESHLM:-$here/build/meshlm}
BENCH_MEMBW=${BENCH_MEMBW:-$here/build/bench_membw}
LLAMA_BENCH=${LLAMA_BENCH:-}
DLLAMA=${DLLAMA:-}
[ -x "$MESHLM" ] || { echo "peers.sh: no meshlm at $MESHLM" >&2; exit 1; }
have_llama=0; [ -n "$LLAMA_BENCH" ] && [ -x "$LLAMA_BENCH" ] && have_llama=1
have_dllama=0; [ -n "$DLLAMA" ] && [ -x "$DLLAMA" ] && have_dllama=1
out=$(mktemp -d /tmp/peers.XXXXXX)
trap 'rm -rf "$out"' EXIT

# The read bandwidth is measured before every run (the host's moves within minutes), unless -b gives it.
measure_bw=0; [ -z "$readbw" ] && [ -x "$BENCH_MEMBW" ] && measure_bw=1
run_bw() { # prints the median GB/s of 5 passes over 2 GB, or -b's figure, or 0
  if [ $measure_bw = 1 ]; then
    "$BENCH_MEMBW" -s 2048 -j "$threads" -r 5 | awk -v t="$threads" '$1 == t { print $3 }' | tee -a "$out/bw"
  else
    echo "${readbw:-0}"
  fi
}
echo "peers: threads=$threads pp$np tg$ng rounds=$rounds read bandwidth=$([ $measure_bw = 1 ] && echo "measured before each run" || echo "${readbw:-?} GB/s")"
echo "peers: llama-bench=$([ $have_llama = 1 ] && echo "$LLAMA_BENCH" || echo none) dllama=$([ $have_dllama = 1 ] && echo "$DLLAMA" || echo none)"

# --- one run of each engine; each appends "engine file pp tg" to $out/runs (tokens/s, "-" when absent),
# then the loop below adds the round and the bandwidth measured before the run

run_meshlm() { # file
  local j pp tg bytes
  j=$("$MESHLM" bench -m "$1" -t "$threads" -p "$np" -n "$ng" -r 1 --json 2>/dev/null) || { echo "meshlm $1 - -" >>"$out/runs"; return; }
  pp=$(printf '%s' "$j" | tr -d '\t\n ' | grep -o '"test":"pp[0-9]*"[^}]*"avg_ts":[0-9.e+-]*' | grep -o '"avg_ts":[0-9.e+-]*' | cut -d: -f2)
  tg=$(printf '%s' "$j" | tr -d '\t\n ' | grep -o '"test":"tg[0-9]*"[^}]*"avg_ts":[0-9.e+-]*' | grep -o '"avg_ts":[0-9.e+-]*' | cut -d: -f2)
  bytes=$(printf '%s' "$j" | tr -d '\t\n ' | grep -o '"weight_bytes_per_token":[0-9]*' | head -1 | cut -d: -f2)
  echo "meshlm $1 ${pp:--} ${tg:--}" >>"$out/runs"
  [ -n "$bytes" ] && echo "$1 $bytes" >>"$out/bytes"
}

run_llama() { # file
  local c pp tg
  c=$("$LLAMA_BENCH" -m "$1" -t "$threads" -p "$np" -n "$ng" -r 1 -o csv 2>/dev/null) || { echo "llama.cpp $1 - -" >>"$out/runs"; return; }
  # columns by header name: n_prompt, n_gen, avg_ts
  read -r pp tg < <(printf '%s\n' "$c" | awk -F, '
    NR == 1 { for (i = 1; i <= NF; i++) { h = $i; gsub(/"/, "", h); col[h] = i }; next }
    { gsub(/"/, ""); if ($col["n_gen"] == 0) pp = $col["avg_ts"]; else tg = $col["avg_ts"] }
    END { print (pp == "" ? "-" : pp), (tg == "" ? "-" : tg) }')
  echo "llama.cpp $1 $pp $tg" >>"$out/runs"
}

run_dllama() { # file
  local m=${1%.gguf}.dllama.m t=${1%.gguf}.dllama.t o pp tg wt buf
  if [ ! -f "$m" ] || [ ! -f "$t" ]; then echo "dllama $1 - -" >>"$out/runs"; return; fi
  # the weight type is header key 13 of the .m (int32 magic, int32 header bytes, int32 key/value pairs):
  # Q40 (2) computes with q80 buffers, F32 (0) with f32 ones; dllama's CPU has no kernel for the others
  wt=$(od -An -v -t d4 -N 512 "$m" | awk '{ for (i = 1; i <= NF; i++) v[++n] = $i }
         END { for (i = 3; i < v[2] / 4; i += 2) if (v[i] == 13) { print v[i + 1]; exit } }')
  case $wt in
    2) buf=q80 ;;
    0) buf=f32; grep -qxF "$1" "$out/f32" 2>/dev/null || echo "$1" >>"$out/f32" ;;
    *) echo "peers.sh: $m: weight type ${wt:-?} has no dllama CPU kernel (Q40 and F32 do)" >&2
       echo "dllama $1 - -" >>"$out/runs"; return ;;
  esac
  o=$("$DLLAMA" inference --model "$m" --tokenizer "$t" --buffer-float-type "$buf" --nthreads "$threads" \
        --max-seq-len 1024 --steps $((np + ng)) --prompt "$(yes hello | head -n "$np" | tr '\n' ' ')" 2>/dev/null)
  pp=$(printf '%s\n' "$o" | awk '/^Evaluation/ { e = 1 } /^Prediction/ { e = 0 } e && /tokens\/s/ { print $2; exit }')
  tg=$(printf '%s\n' "$o" | awk '/^Prediction/ { p = 1 } p && /tokens\/s/ { print $2; exit }')
  echo "dllama $1 ${pp:--} ${tg:--}" >>"$out/runs"
}

one_run() { # engine-function file round: the run's line in $out/runs gains " round bandwidth"
  local bw
  bw=$(run_bw)
  "$1" "$2"
  sed -i "\$ s/\$/ $3 ${bw:-0}/" "$out/runs"
}

for ((r = 1; r <= rounds; r++)); do
  for f in "$@"; do
    one_run run_meshlm "$f" "$r"
    [ $have_llama = 1 ] && one_run run_llama "$f" "$r"
    [ $have_dllama = 1 ] && one_run run_dllama "$f" "$r"
  done
  echo "peers: round $r/$rounds done" >&2
done
if [ $measure_bw = 1 ] && [ -s "$out/bw" ]; then
  echo "peers: read bandwidth before the runs: $(sort -g "$out/bw" | awk '{ a[NR] = $1 } END { printf "%.1f to %.1f GB/s, median %.1f", a[1], a[NR], NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }') ($threads threads)"
fi

# --- table: medians per (engine, file)
engines="meshlm"
[ $have_llama = 1 ] && engines="$engines llama.cpp"
[ $have_dllama = 1 ] && engines="$engines dllama"
printf '\n| file | engine | pp%s t/s | tg%s t/s | tg GB/s | share of read bw | tg vs meshlm |\n|---|---|---|---|---|---|---|\n' "$np" "$ng"
for f in "$@"; do
  bytes=$(awk -v f="$f" '$1 == f { print $2; exit }' "$out/bytes" 2>/dev/null)
  for e in $engines; do
    awk -v e="$e" -v f="$f" -v bytes="${bytes:-0}" '
      function med(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
                                      return n == 0 ? "" : (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) }
      $2 != f { next }
      $1 == "meshlm" && $4 != "-" { base[$5] = $4 }
      $1 == e { if ($3 != "-") pp[++np] = $3; if ($4 != "-") { tg[++nt] = $4; round[nt] = $5; if ($6 > 0 && bytes > 0) sh[++ns] = 100 * $4 * bytes / 1e9 / $6 } }
      END {
        for (i = 1; i <= nt; i++) if (round[i] in base && base[round[i]] > 0) rt[++nr] = tg[i] / base[round[i]]
        p = med(pp, np); t = med(tg, nt); s = med(sh, ns); q = med(rt, nr); n = split(f, parts, "/")
        gbs = (t != "" && bytes > 0) ? sprintf("%.1f", t * bytes / 1e9) : "-"
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", parts[n], e, (p == "" ? "-" : sprintf("%.1f", p)),
               (t == "" ? "-" : sprintf("%.1f", t)), gbs, (s == "" ? "-" : sprintf("%.0f%%", s)),
               (q == "" ? "-" : sprintf("%.2fx", q))
      }' "$out/runs"
  done
done
echo
echo "tokens/s are medians of $rounds interleaved rounds; GB/s = tg t/s x weight bytes read per token (meshlm's count, the same file);"
echo "the share is the median of each run's GB/s over the read bandwidth measured just before that run."
echo "'tg vs meshlm' is the median over rounds of the peer's tg over meshlm's in the same round (below 1: meshlm is faster)."
if [ -f "$out/f32" ]; then
  sed 's|^|dllama ran F32 weights (gguf2dllama.py --weights f32, 4 bytes a weight) for |' "$out/f32"
fi
