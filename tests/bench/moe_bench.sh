#!/usr/bin/env bash
# One node, a Mixtral-shaped MoE under memory budgets, each run in its own memory cgroup (limit = the
# budget + 64 MiB for the binary and libraries; the page cache counts, and the model's cached pages are
# dropped before each run): naive on-demand expert loading (no cache, no prefetch) beside the expert
# cache with and without prefetch, LRU and LFU. Prints a markdown table: tok/s, hit rate, prefetch
# accuracy, stall and bytes read per token, the cgroup's peak.
#   tests/bench/moe_bench.sh MESHLM_BIN MODEL.gguf BUDGET [BUDGET...]     (e.g. 2G 1100M)
# Make the model once (the realistic router; fewer layers if the full 32 take too long):
#   meshlm gen-model /work/cache/mixtral-L8-real-Q4_0.gguf --preset mixtral-8x7b --layers 8 --quant Q4_0 --router realistic
# Needs root and cgroup v1 (memory controller at /sys/fs/cgroup/memory) or v2.
# N_GEN (16) tokens per run, THREADS (2); MOE_CONFIGS, ';'-separated --expert-cache values, chooses the rows
# (default "off;auto --expert-prefetch off;auto;auto --expert-policy lfu", naive first); MESHLM_EXPERTS_IO=pread
# reads buffered instead of O_DIRECT. LLAMA_BENCH=/path/llama-bench adds llama.cpp in the same cgroup: it maps
# the file and leaves the budget to the page cache (its way on a node with too little memory: no expert cache);
# LLAMA_TIMEOUT (600) seconds at most for its warm-up and N_GEN tokens.
set -euo pipefail
bin="${1:?usage: moe_bench.sh MESHLM_BIN MODEL.gguf BUDGET [BUDGET...]}"
model="${2:?usage: moe_bench.sh MESHLM_BIN MODEL.gguf BUDGET [BUDGET...]}"
shift 2
[ $# -gt 0 ] || set -- 2G 1100M
N_GEN="${N_GEN:-16}"
THREADS="${THREADS:-2}"

bytes() { # 2G / 1100M -> bytes
  local v="${1%[KMGkmg]}" u="${1: -1}"
  case "$u" in K|k) echo $((v << 10));; M|m) echo $((v << 20));; G|g) echo $((v << 30));; *) echo "$1";; esac
}

drop_cache() { python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$1"; }

# Runs "$@" in a fresh memory cgroup limited to $1 bytes; prints the group's peak (bytes) on fd 3.
in_cgroup() {
  local limit="$1"; shift
  local name="moebench-$$-$RANDOM" dir peak
  if [ -d /sys/fs/cgroup/memory ]; then
    dir="/sys/fs/cgroup/memory/$name"; mkdir "$dir"
    echo "$limit" > "$dir/memory.limit_in_bytes"
    [ -e "$dir/memory.memsw.limit_in_bytes" ] && echo "$limit" > "$dir/memory.memsw.limit_in_bytes" || true
    (echo "$BASHPID" > "$dir/cgroup.procs"; exec "$@") || true
    peak=$(cat "$dir/memory.max_usage_in_bytes")
  else
    dir="/sys/fs/cgroup/$name"; mkdir "$dir"
    echo "$limit" > "$dir/memory.max"; echo 0 > "$dir/memory.swap.max" 2>/dev/null || true
    (echo "$BASHPID" > "$dir/cgroup.procs"; exec "$@") || true
    peak=$(cat "$dir/memory.peak" 2>/dev/null || echo 0)
  fi
  rmdir "$dir" 2>/dev/null || true
  echo "$peak" >&3
}

printf '| budget | expert cache | tok/s | vs naive | hit rate | prefetch accuracy | stall ms/tok | MB read/tok | cgroup peak MiB |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for budget in "$@"; do
  b=$(bytes "$budget")
  naive=""
  IFS=';' read -r -a cfgs <<< "${MOE_CONFIGS:-off;auto --expert-prefetch off;auto;auto --expert-policy lfu}"
  for cfg in "${cfgs[@]}"; do
    drop_cache "$model"
    out=$(mktemp) pk=$(mktemp)
    # shellcheck disable=SC2086
    in_cgroup $((b + (64 << 20))) "$bin" bench -m "$model" -p 0 -n "$N_GEN" -r 1 -t "$THREADS" --mem-budget "$budget" \
      --expert-cache $cfg --json > "$out" 3> "$pk" 2>/dev/null
    python3 - "$out" "$(cat "$pk")" "$budget" "$cfg" "${naive:-0}" > "$out.row" <<'PY'
import json, sys
path, peak, budget, cfg, naive = sys.argv[1], int(sys.argv[2] or 0), sys.argv[3], sys.argv[4], float(sys.argv[5])
try:
    r = [x for x in json.load(open(path)) if x["test"].startswith("tg")][0]
except Exception:
    print(f"| {budget} | {cfg} | failed | | | | | | {peak / 2**20:.0f} |"); sys.exit(0)
ts = r["avg_ts"]
name = {"off": "none (naive on-demand)"}.get(cfg, cfg.replace("auto", "auto (LRU)", 1) if "lfu" not in cfg else "auto, LFU")
print(f"| {budget} | {name} | {ts:.3f} | {ts / naive if naive else 1:.2f}x | {100 * r.get('expert_hit_rate', 0):.1f}% | "
      f"{100 * r.get('expert_prefetch_accuracy', 0):.0f}% | {r.get('expert_stall_ms_per_token', 0):.0f} | "
      f"{r.get('expert_bytes_read_per_token', 0) / 1e6:.0f} | {peak / 2**20:.0f} |")
PY
    cat "$out.row"
    if [ "$cfg" = off ]; then naive=$(python3 -c 'import json,sys; print([x for x in json.load(open(sys.argv[1])) if x["test"].startswith("tg")][0]["avg_ts"])' "$out" 2>/dev/null || echo 0); fi
    rm -f "$out" "$out.row" "$pk"
  done
  if [ -n "${LLAMA_BENCH:-}" ] && [ -x "$LLAMA_BENCH" ]; then
    drop_cache "$model"
    out=$(mktemp) pk=$(mktemp)
    in_cgroup $((b + (64 << 20))) timeout "${LLAMA_TIMEOUT:-600}" "$LLAMA_BENCH" -m "$model" -p 0 -n "$N_GEN" -r 1 \
      -t "$THREADS" -o json > "$out" 3> "$pk" 2>/dev/null
    python3 - "$out" "$(cat "$pk")" "$budget" "${naive:-0}" "${LLAMA_TIMEOUT:-600}" <<'PY'
import json, sys
path, peak, budget, naive, limit = sys.argv[1], int(sys.argv[2] or 0), sys.argv[3], float(sys.argv[4]), sys.argv[5]
try:
    ts = [x for x in json.load(open(path)) if x.get("n_gen", 0) > 0][0]["avg_ts"]
    print(f"| {budget} | llama.cpp (mapped, the page cache only) | {ts:.3f} | {ts / naive if naive else 1:.2f}x | - | - | - | - | {peak / 2**20:.0f} |")
except Exception:
    print(f"| {budget} | llama.cpp (mapped, the page cache only) | no result in {limit} s | | | | | | {peak / 2**20:.0f} |")
PY
    rm -f "$out" "$pk"
  fi
done
