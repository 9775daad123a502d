#!/usr/bin/env bash
# Side-by-side decode/prefill speed of meshlm, llama.cpp (llama-bench) and distributed-llama (dllama) on the same files.
#
# usage: tests/bench/peers.sh [-t THREADS] [-p N_PROMPT] [-n N_GEN] [-r ROUNDS] [-b READ_GBS] FILE.gguf [FILE.gguf ...]
#   MESHLM=build/meshlm           meshlm binary (default: build/meshlm beside this script's repo)
#   LLAMA_BENCH=/path/llama-bench llama.cpp's llama-bench (skipped when unset or not executable)
#   DLLAMA=/path/dllama           distributed-llama's dllama (skipped when unset or not executable); it needs its
#                                 own model format: FILE.gguf is run as FILE.dllama.m with tokenizer FILE.dllama.t
#                                 when both exist beside it (otherwise that file's dllama cell is "-")
#   BENCH_MEMBW=build/bench_membw measures the read bandwidth with THREADS threads before every round (the
#                                 table uses the median; or give it with -b)
# Each round runs every engine once on every file, one after another (interleaved, so load from other
# processes on a shared machine falls on all of them alike); the table shows the median over rounds of
# tokens/s, the decode GB/s (tg tokens/s x the weight bytes a token reads, as meshlm bench reports them),
# its share of the read bandwidth, and each peer's ratio to meshlm. Not run in CI.
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
    *) sed -n '2,19p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n '2,19p' "$0"; exit 2; }
MESHLM=${MESHLM:-$here/build/meshlm}
BENCH_MEMBW=${BENCH_MEMBW:-$here/build/bench_membw}
LLAMA_BENCH=${LLAMA_BENCH:-}
DLLAMA=${DLLAMA:-}
[ -x "$MESHLM" ] || { echo "peers.sh: no meshlm at $MESHLM" >&2; exit 1; }
have_llama=0; [ -n "$LLAMA_BENCH" ] && [ -x "$LLAMA_BENCH" ] && have_llama=1
have_dllama=0; [ -n "$DLLAMA" ] && [ -x "$DLLAMA" ] && have_dllama=1
out=$(mktemp -d /tmp/peers.XXXXXX)
trap 'rm -rf "$out"' EXIT

# The read bandwidth is measured before every round (the host's moves within minutes) and the median
# of those is the table's reference, unless -b gives it.
measure_bw=0; [ -z "$readbw" ] && [ -x "$BENCH_MEMBW" ] && measure_bw=1
round_bw() { "$BENCH_MEMBW" -s 2048 -j "$threads" -r 5 | awk -v t="$threads" '$1 == t { print $3 }' >>"$out/bw"; }
echo "peers: threads=$threads pp$np tg$ng rounds=$rounds read bandwidth=$([ $measure_bw = 1 ] && echo "measured each round" || echo "${readbw:-?} GB/s")"
echo "peers: llama-bench=$([ $have_llama = 1 ] && echo "$LLAMA_BENCH" || echo none) dllama=$([ $have_dllama = 1 ] && echo "$DLLAMA" || echo none)"

# --- one run of each engine; each appends "engine file pp tg" to $out/runs (tokens/s, "-" when absent)

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

for ((r = 1; r <= rounds; r++)); do
  [ $measure_bw = 1 ] && round_bw
  for f in "$@"; do
    run_meshlm "$f"
    [ $have_llama = 1 ] && run_llama "$f"
    [ $have_dllama = 1 ] && run_dllama "$f"
  done
  echo "peers: round $r/$rounds done$([ $measure_bw = 1 ] && echo ", read bandwidth $(tail -n 1 "$out/bw") GB/s")" >&2
done
if [ $measure_bw = 1 ] && [ -s "$out/bw" ]; then
  readbw=$(sort -g "$out/bw" | awk '{ a[NR] = $1 } END { printf "%.1f", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
  echo "peers: read bandwidth $readbw GB/s (median of the rounds' $(tr '\n' ' ' <"$out/bw"| sed 's/ $//'), $threads threads)"
fi

# --- table: medians per (engine, file)
engines="meshlm"
[ $have_llama = 1 ] && engines="$engines llama.cpp"
[ $have_dllama = 1 ] && engines="$engines dllama"
printf '\n| file | engine | pp%s t/s | tg%s t/s | tg GB/s | share of read bw | tg vs meshlm |\n|---|---|---|---|---|---|---|\n' "$np" "$ng"
for f in "$@"; do
  bytes=$(awk -v f="$f" '$1 == f { print $2; exit }' "$out/bytes" 2>/dev/null)
  base=""
  for e in $engines; do
    awk -v e="$e" -v f="$f" -v bytes="${bytes:-0}" -v bw="${readbw:-0}" -v base="$base" '
      function med(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
                                      return n == 0 ? "" : (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) }
      $1 == e && $2 == f { if ($3 != "-") pp[++np] = $3; if ($4 != "-") tg[++nt] = $4 }
      END {
        p = med(pp, np); t = med(tg, nt); n = split(f, parts, "/")
        gbs = (t != "" && bytes > 0) ? sprintf("%.1f", t * bytes / 1e9) : "-"
        share = (gbs != "-" && bw > 0) ? sprintf("%.0f%%", 100 * t * bytes / 1e9 / bw) : "-"
        ratio = (t != "" && base != "" && base > 0) ? sprintf("%.2fx", t / base) : (e == "meshlm" ? "1.00x" : "-")
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", parts[n], e, (p == "" ? "-" : sprintf("%.1f", p)),
               (t == "" ? "-" : sprintf("%.1f", t)), gbs, share, ratio
      }' "$out/runs"
    [ "$e" = meshlm ] && base=$(awk -v f="$f" '$1 == "meshlm" && $2 == f && $4 != "-" { print $4 }' "$out/runs" | sort -g | awk '{ a[NR] = $1 } END { if (NR) print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }')
  done
done
echo
echo "tokens/s are medians of $rounds interleaved rounds; GB/s = tg t/s x weight bytes read per token (meshlm's count, the same file)."
echo "'tg vs meshlm' is the peer's tg over meshlm's (below 1: meshlm is faster)."
if [ -f "$out/f32" ]; then
  sed 's|^|dllama ran F32 weights (gguf2dllama.py --weights f32, 4 bytes a weight) for |' "$out/f32"
fi
