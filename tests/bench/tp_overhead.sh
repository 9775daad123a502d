#!/usr/bin/env bash
# Tensor-parallel overhead on one host: one process with T threads against T local worker processes of
# one thread each (--local T --tp T), exact mode with the group's exchanges through shared memory (the
# default for ipc workers), the same in all-reduce mode (--tp-mode allreduce: half the exchanges, last
# bits differ), and exact mode over ZeroMQ messages (MESHLM_SHM=off), in interleaved rounds.
#
# usage: tests/bench/tp_overhead.sh [-t T] [-p N_PROMPT] [-n N_GEN] [-r ROUNDS] [FILE.gguf]
#   T          processes of the pair / threads of the single process (default 2)
#   FILE.gguf  default /work/cache/tl-Q4_0.gguf (`meshlm gen-model FILE --preset tinyllama-1.1b --quant Q4_0 --seed 1`)
#   MESHLM     meshlm binary (default: build/meshlm beside this script's repo)
# Each round runs the four configurations one after the other (A B C D A B C D ...), so the load of other
# processes on a shared machine falls on all alike; the table gives the median tokens/s over the rounds
# and each one's ratio to the single process. `uptime` is printed before and after. Not run in CI.
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
T=2 np=64 ng=32 rounds=5
while getopts "t:p:n:r:h" o; do
  case $o in
    t) T=$OPTARG ;; p) np=$OPTARG ;; n) ng=$OPTARG ;; r) rounds=$OPTARG ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
file=${1:-/work/cache/tl-Q4_0.gguf}
MESHLM=${MESHLM:-$here/build/meshlm}
[ -x "$MESHLM" ] || { echo "tp_overhead: no meshlm at $MESHLM" >&2; exit 1; }
[ -f "$file" ] || { echo "tp_overhead: no file $file" >&2; exit 1; }
out=$(mktemp -d /tmp/tp_overhead.XXXXXX)
trap 'rm -rf "$out"' EXIT
echo "tp_overhead: $(date -u '+%Y-%m-%d %H:%M UTC') $file T=$T pp$np tg$ng rounds=$rounds"
echo "tp_overhead: load before: $(uptime)"

# one run: label, env assignment (or ""), meshlm bench arguments; appends "label pp tg"
run() {
  local label=$1 envset=$2 j pp tg
  shift 2
  j=$(env $envset "$MESHLM" bench -m "$file" -p "$np" -n "$ng" -r 1 --json "$@" 2>/dev/null | tr -d '\t\n ')
  pp=$(printf '%s' "$j" | grep -o '"test":"pp[0-9]*"[^}]*"avg_ts":[0-9.e+-]*' | grep -o '"avg_ts":[0-9.e+-]*' | cut -d: -f2)
  tg=$(printf '%s' "$j" | grep -o '"test":"tg[0-9]*"[^}]*"avg_ts":[0-9.e+-]*' | grep -o '"avg_ts":[0-9.e+-]*' | cut -d: -f2)
  echo "$label ${pp:--} ${tg:--}" >>"$out/runs"
}

for r in $(seq 1 "$rounds"); do
  run single "" -t "$T"
  run shm "" -t 1 --local "$T" --tp "$T"
  run shm_ar "" -t 1 --local "$T" --tp "$T" --tp-mode allreduce
  run zmq "MESHLM_SHM=off" -t 1 --local "$T" --tp "$T"
  echo "tp_overhead: round $r: $(tail -4 "$out/runs" | awk '{ printf "%s pp %.2f tg %.2f; ", $1, $2, $3 }')"
done
echo "tp_overhead: load after: $(uptime)"

median() { # label column -> median of that column over the rounds ("-" when none)
  awk -v l="$1" -v c="$2" '$1 == l && $c != "-" { print $c }' "$out/runs" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# median over the rounds of label's tokens/s / the single process's in the same round (column c)
round_ratio() {
  awk -v l="$1" -v c="$2" '$1 == "single" { s[++ns] = $c } $1 == l { v[++nv] = $c }
    END { for (i = 1; i <= nv && i <= ns; i++) if (v[i] != "-" && s[i] != "-" && s[i] > 0) print v[i] / s[i] }' "$out/runs" |
    sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
fmt() { awk -v a="$1" 'BEGIN { if (a == "-") print "-"; else printf "%.2f", a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
sp=$(median single 2) st=$(median single 3)
echo "tp_overhead: medians over $rounds rounds; \"per round\" is the median of each round's ratio to that round's single process"
printf '| %-34s | %9s | %9s | %11s | %11s | %13s | %13s |\n' configuration "pp$np t/s" "tg$ng t/s" "pp / single" "tg / single" "pp per round" "tg per round"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' ------------------------------------ ----------- ----------- ------------- ------------- --------------- ---------------
for l in single shm shm_ar zmq; do
  case $l in
    single) name="1 process, $T threads" ;;
    shm) name="$T processes x 1, shared memory" ;;
    shm_ar) name="$T x 1, shared memory, allreduce" ;;
    zmq) name="$T processes x 1, ZeroMQ ipc" ;;
  esac
  p=$(median $l 2) t=$(median $l 3)
  printf '| %-34s | %9s | %9s | %11s | %11s | %13s | %13s |\n' "$name" "$(fmt "$p")" "$(fmt "$t")" "$(ratio "$p" "$sp")" \
    "$(ratio "$t" "$st")" "$(round_ratio $l 2)" "$(round_ratio $l 3)"
done
