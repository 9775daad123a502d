#!/usr/bin/env bash
# KV devices benchmark (not CI): decode tokens/s of a TinyLlama-shaped Q4_0 model (n_ctx 32768) at contexts of
# 1k, 4k, 16k and 32k positions with the KV cache on host, file (a --mem-budget whose RAM share is a quarter
# of the KV: the KV is 4x the node's RAM for it), storage (a meshlm kvstore over ipc) and the simulated
# HBM2-PIM (measured host time beside the simulated attention time); bytes per token on the storage link,
# bytes read from the file tier, peak RSS; then the target check per context: file's fastest decode step
# against host's (the target: at least half of host's speed).
# Each configuration is one bench_kvdepth process (see tests/bench/bench_kvdepth.c for exactly what is
# measured: a real prefill of PREFILL tokens, the context filled with its k/v rows repeated, DECODE decode
# steps through the whole model at that depth). ROUNDS > 1 repeats the devices in turn (host, file, ...,
# host, file, ...) so that a busy machine disturbs every device alike; the check takes each device's
# fastest step over the rounds.
#   BUILD=build MODEL=/work/cache/tl-ctx32k-Q4_0.gguf CTXS="1024 4096 16384 32768" DEVS="host file storage pim" \
#   THREADS=2 PREFILL=128 DECODE=6 ROUNDS=1 tests/bench/kv_bench.sh
set -euo pipefail
BUILD=${BUILD:-build}
MODEL=${MODEL:-/work/cache/tl-ctx32k-Q4_0.gguf}
CTXS=${CTXS:-"1024 4096 16384 32768"}
DEVS=${DEVS:-"host file storage pim"}
THREADS=${THREADS:-2}
PREFILL=${PREFILL:-128}
DECODE=${DECODE:-6}
ROUNDS=${ROUNDS:-1}
WORK=$(mktemp -d)
KVPID=
cleanup() { if [ -n "$KVPID" ]; then kill "$KVPID" 2>/dev/null; wait "$KVPID" 2>/dev/null || true; fi; rm -rf "$WORK"; }
trap cleanup EXIT
if [ ! -f "$MODEL" ]; then
    echo "generating $MODEL (tinyllama-1.1b shape, Q4_0, n_ctx 32768)" >&2
    "$BUILD/meshlm" gen-model "$MODEL" --preset tinyllama-1.1b --quant Q4_0 --ctx 32768 --threads "$THREADS" >&2
fi
mkdir -p "$WORK/kv" "$WORK/kvs"
case " $DEVS " in *" storage "*)
    "$BUILD/meshlm" kvstore --listen "ipc://$WORK/kv.sock" --dir "$WORK/kvs" -t "$THREADS" -q & KVPID=$!
    sleep 0.5 ;;
esac
echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); prefill $PREFILL, decode $DECODE, -t $THREADS, $ROUNDS round(s)"
printf '| ctx | device | KV MiB | in RAM MiB | decode t/s | median ms/t | fastest ms/t | CPU ms/t | vs host (fastest) | sim attn ms/t | file read MiB/t | link KiB/t | peak RSS MiB | fill s |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n'
: > "$WORK/all.jsonl"
for ctx in $CTXS; do
    for round in $(seq "$ROUNDS"); do
        host_ms=""
        for dev in $DEVS; do
            extra=()
            case $dev in
            host) kd=host ;;
            file) kd="file:$WORK/kv"; extra=(--kv-ram-frac 0.25) ;;
            storage) kd="storage:ipc://$WORK/kv.sock,timeout=600000" ;;
            pim) kd=pim:hbm2-pim ;;
            *) kd=$dev ;;
            esac
            "$BUILD/bench_kvdepth" "$MODEL" -d "$kd" -c "$ctx" -p "$PREFILL" -n "$DECODE" -t "$THREADS" "${extra[@]}" \
                > "$WORK/out.json" 2> "$WORK/err.txt" || { cat "$WORK/err.txt" >&2; exit 1; }
            python3 - "$WORK/out.json" "$dev" "${host_ms:-0}" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
dev, host_ms = sys.argv[2], float(sys.argv[3])
best = d["min_ms_per_token"]
rel = "%.2fx" % (host_ms / best) if host_ms else "-"
name = dev
if dev == "file":
    name = "file (budget %.1f MiB, RAM share %.1f MiB = KV/4)" % (d["mem_budget"] / 2**20, d["kv_ram_share"] / 2**20)
sim = "%.3f (simulated)" % d["sim_ms_per_token"] if dev == "pim" else "-"
rd = "%.1f" % (d["read_per_token"] / 2**20) if dev == "file" else "-"
link = "%.1f" % (d["link_per_token"] / 1024) if dev == "storage" else "-"
print("| %d | %s | %.1f | %.1f | %.2f | %.1f | %.1f | %.1f | %s | %s | %s | %s | %.0f | %.1f |" % (d["ctx"], name,
      d["kv_bytes"] / 2**20, d["kv_bytes_ram"] / 2**20, d["decode_tok_s"], d["median_ms_per_token"], best,
      d["cpu_ms_per_token"], rel, sim, rd, link, d["vmhwm"] / 2**20, d["fill_s"]))
d["dev"] = dev
open(sys.argv[1] + ".ms", "w").write(str(best))
PY
            python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["dev"]=sys.argv[2]; print(json.dumps(d))' \
                "$WORK/out.json" "$dev" >> "$WORK/all.jsonl"
            if [ "$dev" = host ]; then host_ms=$(cat "$WORK/out.json.ms"); fi
        done
    done
done
python3 - "$WORK/all.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print()
print("Target: the file device with a RAM share of a quarter of the KV decodes at >= 0.5x the host device's speed")
for ctx in sorted({r["ctx"] for r in rows}):
    h = [r["min_ms_per_token"] for r in rows if r["ctx"] == ctx and r["dev"] == "host"]
    f = [r["min_ms_per_token"] for r in rows if r["ctx"] == ctx and r["dev"] == "file"]
    if h and f:
        ratio = min(h) / min(f)
        print("  ctx %d: host %.1f ms/token, file %.1f ms/token (fastest step of %d and %d run(s)): %.2fx host -> %s"
              % (ctx, min(h), min(f), len(h), len(f), ratio, "met" if ratio >= 0.5 else "NOT met"))
PY
