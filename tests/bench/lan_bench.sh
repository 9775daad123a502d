#!/usr/bin/env bash
# TP, PP, hybrid and planner-chosen layouts of one model on 2 and 4 emulated hosts, at 1 Gbit/s +
# 1 ms and 300 Mbit/s + 5 ms per link (meshlm's fault-injecting transport; local worker processes,
# 1 thread each), each beside the planner's prediction.
#   tests/bench/lan_bench.sh MESHLM_BIN MODEL.gguf [-p 64] [-n 16] [-r 2]
set -euo pipefail
bin="${1:?usage: lan_bench.sh MESHLM_BIN MODEL.gguf [bench options]}"
model="${2:?usage: lan_bench.sh MESHLM_BIN MODEL.gguf [bench options]}"
shift 2
opts=("$@")
[ ${#opts[@]} -gt 0 ] || opts=(-p 64 -n 16 -r 2)
printf '| hosts | links | asked | layout | test | t/s | predicted t/s | TTFT ms | util | comm KiB/tok |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for hosts in 2 4; do
  for lan in 1000:1 300:5; do
    layouts=("--pp 1 --keep-all" "--pp $hosts --keep-all")
    [ "$hosts" = 4 ] && layouts+=("--pp 2 --tp 2 --keep-all")
    layouts+=("")
    for lay in "${layouts[@]}"; do
      # shellcheck disable=SC2086
      "$bin" bench -m "$model" -t 1 --local "$hosts" --lan "$lan" $lay "${opts[@]}" 2>/dev/null |
        awk -F'|' -v h="$hosts" -v l="$lan" -v a="${lay:-auto}" '
          NR > 2 { gsub(/ +/, " ");
                   printf "| %s | %s Mbit/s, %s ms | %s | %s | %s | %s | %s | %s | %s | %s |\n", h, substr(l, 1, index(l, ":") - 1),
                          substr(l, index(l, ":") + 1), a, $10, $7, $8, $11, $12, $13, $15 }'
    done
  done
done
