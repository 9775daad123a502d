#!/usr/bin/env bash
# KV devices benchmark (not CI): decode tokens/s of a TinyLlama-shaped Q4_0 model at contexts of 1k,
# 4k and 16k positions with the KV cache on the host device, paged to a file with a RAM share of a
# quarter of the KV (the KV is 4x the node's RAM for it), and on the simulated HBM2-PIM (measured
# host time beside the simulated attention time); peak RSS of each run; the devices' tokens must agree.
#   MESHLM=build/meshlm MODEL=/work/cache/tl-ctx32k-Q4_0.gguf CTXS="1024 4096 16384" DEVS="host file pim" \
#   THREADS=2 NGEN=32 tests/bench/kv_bench.sh
set -euo pipefail
MESHLM=${MESHLM:-build/meshlm}
MODEL=${MODEL:-/work/cache/tl-ctx32k-Q4_0.gguf}
CTXS=${CTXS:-"1024 4096 16384"}
DEVS=${DEVS:-"host file pim"}
THREADS=${THREADS:-2}
NGEN=${NGEN:-32}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ ! -f "$MODEL" ]; then
    echo "generating $MODEL (tinyllama-1.1b shape, Q4_0, n_ctx 32768)" >&2
    "$MESHLM" gen-model "$MODEL" --preset tinyllama-1.1b --quant Q4_0 --ctx 32768 --threads "$THREADS" >&2
fi
# KV bytes per position: 2 (k, v) * 22 layers * 4 KV heads * 64 * 2 bytes (F16)
KV_POS=$((2 * 22 * 4 * 64 * 2))
printf '| %6s | %-5s | %9s | %9s | %9s | %11s | %14s | %12s | %9s |\n' ctx device "KV MiB" "RAM MiB" "decode t/s" "vs host" \
    "sim attn ms/t" "read MiB/t" "peak RSS"
printf '|%s|\n' "--------|-------|-----------|-----------|-----------|-------------|----------------|--------------|-----------"
for ctx in $CTXS; do
    # a prompt of about ctx - NGEN - 16 tokens: numbered words tokenize to ~3 tokens each
    python3 - "$ctx" "$NGEN" > "$WORK/prompt.txt" <<'PY'
import sys
n = (int(sys.argv[1]) - int(sys.argv[2]) - 16) // 3
print(" ".join("w%d" % (i % 97) for i in range(n)))
PY
    host_tps=""
    host_toks=""
    for dev in $DEVS; do
        case $dev in
        host) kd=host ;;
        file) mkdir -p "$WORK/kv"; kd="file:$WORK/kv,ram=$((ctx * KV_POS / 4))" ;;
        pim) kd=pim:hbm2-pim ;;
        *) kd=$dev ;;
        esac
        "$MESHLM" run -m "$MODEL" -f "$WORK/prompt.txt" -n "$NGEN" --ignore-eos --greedy -c "$ctx" -b 256 \
            -t "$THREADS" --kv-device "$kd" --json > "$WORK/out.json" 2> "$WORK/err.txt" || { cat "$WORK/err.txt" >&2; exit 1; }
        python3 - "$WORK/out.json" "$ctx" "$dev" "$NGEN" "${host_tps:-0}" "$host_toks" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ctx, dev, ngen, host_tps, host_toks = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
k = d.get("kv_device", {})
tps = d["tokens_per_s"]
rss = max((p.get("vmhwm_bytes") or 0 for p in d.get("memory", [])), default=0)
rel = "%.2fx" % (tps / host_tps) if host_tps else "-"
sim = "%.3f" % (k["decode_sim_time_ms"] / (ngen - 1)) if k.get("simulated") else "-"
rd = "%.1f" % (k["decode_bytes_read"] / (ngen - 1) / 2**20) if k.get("decode_bytes_read") else "-"
toks = ",".join(map(str, d["tokens"]))
same = "" if not host_toks or toks == host_toks else "  TOKENS DIFFER FROM HOST"
print("| %6d | %-5s | %9.1f | %9.1f | %9.2f | %11s | %14s | %12s | %9s |%s" % (ctx, dev, k.get("kv_bytes", 0) / 2**20,
      k.get("kv_bytes_ram", 0) / 2**20, tps, rel, sim, rd, "%.0f MiB" % (rss / 2**20) if rss else "-", same))
open(sys.argv[1] + ".toks", "w").write(toks)
open(sys.argv[1] + ".tps", "w").write(str(tps))
PY
        if [ "$dev" = host ]; then host_tps=$(cat "$WORK/out.json.tps"); host_toks=$(cat "$WORK/out.json.toks"); fi
    done
done
