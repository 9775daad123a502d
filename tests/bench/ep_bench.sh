#!/usr/bin/env bash
# Sliced experts (exact tensor parallelism) against placed experts (expert parallelism) and the planner's own choice, on
# 4 local workers (1 thread each) with every link emulated at 1 Gbit/s + 1 ms, in interleaved rounds; prints each run,
# then the median decode rate of each layout and its ratio to sliced experts.
#   tests/bench/ep_bench.sh MESHLM_BIN MODEL.gguf [ROUNDS [bench options]]   (default: 3 rounds of -p 0 -n 8 -r 1)
# The model: meshlm gen-model /work/cache/mixtral-4l-q4_0.gguf --preset mixtral-8x7b --quant Q4_0 --layers 4 --router realistic
# EP_HOT=COUNTS[:N] adds placed experts with hot copies (--ep 4 --ep-hot COUNTS[:N]; the counts from meshlm inspect
# MODEL --routing T --routing-out COUNTS). THREADS="1 2" runs every layout with each thread count per worker (default
# 1) and compares each row with sliced experts at their best thread count (the median of their fastest count).
set -euo pipefail
bin="${1:?usage: ep_bench.sh MESHLM_BIN MODEL.gguf [ROUNDS [bench options]]}"
model="${2:?usage: ep_bench.sh MESHLM_BIN MODEL.gguf [ROUNDS [bench options]]}"
rounds="${3:-3}"
shift $(($# < 3 ? $# : 3))
opts=("$@")
[ ${#opts[@]} -gt 0 ] || opts=(-p 0 -n 8 -r 1)
read -r -a threads <<<"${THREADS:-1}"
layouts=("--tp 4 --ep off" "--ep 4 --ep-attn all" "--ep 4" "--ep 4 --ep-replicas 2" "--ep-replicas 2")
names=("sliced experts (tp4)" "placed, attention replicated" "placed, attention on the first" "placed, first, 2 holders/expert" "planner's choice (may place, 2 holders)")
if [ -n "${EP_HOT:-}" ]; then
  layouts+=("--ep 4 --ep-hot $EP_HOT")
  names+=("placed, first, hot experts on 2")
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for ((r = 1; r <= rounds; r++)); do
  for t in "${threads[@]}"; do
    for i in "${!layouts[@]}"; do
      # shellcheck disable=SC2086
      line=$("$bin" bench -m "$model" -t "$t" --local 4 --lan 1000:1 --keep-all ${layouts[$i]} "${opts[@]}" --json 2>/dev/null |
        python3 -c 'import json,sys; d=json.load(sys.stdin); t=[x for x in d if x["n_gen"]>0][-1]
print("%.3f %s %.1f %.1f" % (t["avg_ts"], t["layout"].replace(" ","_"), t["comm_bytes_per_token"]/1024, t["predicted_ts"]))')
      echo "round $r: ${names[$i]} (${layouts[$i]}, -t $t): tg t/s, layout, KiB/token, predicted t/s: $line"
      echo "$i $t $line" >>"$out"
    done
  done
done
python3 - "$out" "${names[@]}" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
names = sys.argv[2:]
threads = sorted({int(r[1]) for r in rows})
def runs(i, t): return [r for r in rows if int(r[0]) == i and int(r[1]) == t]
def med(i, t):
    ts = [float(r[2]) for r in runs(i, t)]
    return statistics.median(ts) if ts else 0
base = max(med(0, t) for t in threads)  # sliced experts at their best thread count
print("| layout | threads per worker | layout chosen | tg t/s (median) | runs | vs sliced (best threads) | KiB/token | predicted t/s |")
print("|---|---|---|---|---|---|---|---|")
for i, n in enumerate(names):
    for t in threads:
        rs = runs(i, t)
        if not rs: continue
        print("| %s | %d | %s | %.2f | %s | %.2fx | %s | %s |" % (n, t, rs[-1][3].replace("_", " "), med(i, t),
              " / ".join(r[2] for r in rs), med(i, t) / base if base else 0, rs[-1][4], rs[-1][5]))
EOF
