#!/usr/bin/env bash
# Sliced experts (exact tensor parallelism) against placed experts (expert parallelism) and the planner's own choice, on 4 local workers (1 thread each) with every link emulated at 1 Gbit/s + 1 ms.
#   tests/bench/ep_bench.sh MESHLM_BIN MODEL.gguf [bench options]   (default: -p 16 -n 16 -r 2)
# The model: meshlm gen-model /work/cache/mixtral-4l-q4_0.gguf --preset mixtral-8x7b --quant Q4_0 --layers 4
set -euo pipefail
bin="${1:?usage: ep_bench.sh MESHLM_BIN MODEL.gguf [bench options]}"
model="${2:?usage: ep_bench.sh MESHLM_BIN MODEL.gguf [bench options]}"
shift 2
opts=("$@")
[ ${#opts[@]} -gt 0 ] || opts=(-p 16 -n 16 -r 2)
for lay in "--tp 4 --ep off --keep-all" "--ep 4 --keep-all" "--keep-all"; do
  echo "== meshlm bench --local 4 --lan 1000:1 $lay"
  # shellcheck disable=SC2086
  "$bin" bench -m "$model" -t 1 --local 4 --lan 1000:1 $lay "${opts[@]}" 2>&1 | grep -v '^\[' || true
done
