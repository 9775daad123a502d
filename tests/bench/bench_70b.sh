#!/usr/bin/env bash
# llama-2-70b-shaped Q4_0 on 4 local workers in 2 GiB memory cgroups, streaming from one disk (not CI).
#
#   tests/bench/bench_70b.sh [MESHLM_BIN]          (default build/meshlm; run as root for the cgroups)
#
# Writes the model once into $MESHLM_BENCH_CACHE (default /work/cache; about 39 GB; free disk is checked
# first) and reuses it, measures the disk's sequential O_DIRECT read itself (dd iflag=direct, one
# stream and four at once), then runs exact TP, all-reduce TP and a 4-stage pipeline, each on 4 local
# workers with --mem-budget 2G (so 2 GiB cgroups, page cache counted), 1 thread each, every link
# emulated at 1 Gbit/s and 1 ms, and prints one table: decode s/token, TTFT of a 16-token prompt, the
# planner's predicted s/token, per worker peak RSS (VmHWM) and cgroup peak, the disk MB/s achieved and
# the share of read time hidden behind compute. Then one node alone (`run --mem-budget 2G`).
# Environment: MESHLM_BENCH_CACHE, MESHLM_BENCH_MODEL (another GGUF instead of the 70B, e.g. to try the
# script), BUDGET (2G), N_GEN (4 generated tokens, 3 of them decoded: each streams the model once), LAN (1000:1),
# LAYOUTS ("exact allreduce pipeline"), SINGLE (1: also the single node), THREADS_SINGLE (1),
# SINGLE_PROMPT ("a": BOS and one token; one node computes all 80 blocks of a 16-token prompt alone),
# PROMPT (the cluster runs' prompt; default 16 tokens), OUT (directory for the raw outputs; default a new
# one under /tmp), TABLE_ONLY (1: print the table of the runs already in OUT, measure nothing).
set -euo pipefail

bin="${1:-build/meshlm}"
[ -x "$bin" ] || { echo "bench_70b: no meshlm binary at $bin (build first, or pass its path)" >&2; exit 2; }
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
cache="${MESHLM_BENCH_CACHE:-/work/cache}"
model="${MESHLM_BENCH_MODEL:-$cache/llama-2-70b-q4_0.gguf}"
budget="${BUDGET:-2G}"
n_gen="${N_GEN:-4}"
lan="${LAN:-1000:1}"
layouts="${LAYOUTS:-exact allreduce pipeline}"
single="${SINGLE:-1}"
out="${OUT:-$(mktemp -d /tmp/bench70b.XXXXXX)}"
mkdir -p "$out"
# BOS and 15 single-letter words: 16 prompt tokens with gen-model's vocabulary (checked below)
prompt="${PROMPT:-a b c d e f g h i j k l m n o}"

# --- the model, written once

if [ ! -f "$model" ]; then
    [ -z "${MESHLM_BENCH_MODEL:-}" ] || { echo "bench_70b: $model does not exist" >&2; exit 2; }
    mkdir -p "$cache"
    # llama-2-70b Q4_0: 68.98e9 weights at 4.5 bits (output.weight Q6_K), 38.9e9 bytes; 2 GB to spare.
    need=$((41 * 1000 * 1000 * 1000))
    avail=$(df -B1 --output=avail "$cache" | tail -1 | tr -d ' ')
    if [ "$avail" -lt "$need" ]; then
        awk -v c="$cache" -v a="$avail" -v n="$need" 'BEGIN { printf "bench_70b: %s has %.1f GB free, the 70B model needs %.1f GB (39 GB and 2 to spare): free some disk or set MESHLM_BENCH_CACHE\n", c, a / 1e9, n / 1e9 }' >&2
        exit 1
    fi
    echo "bench_70b: writing $model (about 39 GB, once; 10-25 minutes)" >&2
    nice -n 10 "$bin" gen-model "$model" --preset llama-2-70b --quant Q4_0 --seed 1 >&2
fi
size=$(stat -c %s "$model")

# --- the disk's sequential direct read

if [ "${TABLE_ONLY:-0}" = 1 ]; then
    read -r one four < <(sed -n 's/.*one stream \([0-9]*\) MB\/s, four streams at once \([0-9]*\) MB\/s.*/\1 \2/p' "$out/disk.txt")
else

# MB/s of dd reading `count` 16 MiB blocks from block `skip` on with O_DIRECT (no page cache).
dd_mbs() {
    dd if="$model" of=/dev/null bs=16M iflag=direct skip="$1" count="$2" 2>&1 |
        awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^s,?$/) s = $(i - 1); print $1 / s / 1e6 }'
}
blocks=$((size / (16 << 20)))
per=$((blocks / 8 < 128 ? blocks / 8 : 128)) # at most 2 GiB per stream
[ "$per" -ge 1 ] || per=1
one=$(dd_mbs $((blocks / 2)) "$per")
four_t0=$(date +%s.%N)
for i in 0 1 2 3; do dd_mbs $((blocks * i / 4)) "$per" >"$out/dd4-$i" & done
wait
four_t1=$(date +%s.%N)
four=$(awk -v b="$per" -v a="$four_t0" -v z="$four_t1" 'BEGIN { printf "%.0f", 4 * b * 16 * 1048576 / (z - a) / 1e6 }')
printf 'disk: sequential O_DIRECT read of %s, 16 MiB blocks: one stream %.0f MB/s, four streams at once %s MB/s in all\n' \
    "$model" "$one" "$four" | tee "$out/disk.txt" >&2
fi

# --- runs

lan_mbit="${lan%%:*}"
lan_ms="${lan##*:}"
faults="delay:link=*:ms=$lan_ms,bw:link=*:mbit=$lan_mbit"
common=(-m "$model" -p "$prompt" -n "$n_gen" --greedy --ignore-eos --json --timeout 900000)
# On a machine loaded far beyond its cores a starved process can miss the links' 1 s heartbeat (a
# first run's prefill was declared lost after 308 s): long heartbeats, and no recovery onto survivors.
cluster_opts=(--heartbeat-ms 4000 --no-recover) # (4096 at most)

# One cluster run: name, then layout options. Leaves $out/NAME.json and $out/NAME.err.
run_cluster() {
    local name="$1"
    shift
    echo "bench_70b: $name: run --local 4 -t 1 --mem-budget $budget $* (links $lan_mbit Mbit/s, $lan_ms ms)" >&2
    MESHLM_FAULTS="$faults" "$bin" run "${common[@]}" --local 4 -t 1 --mem-budget "$budget" --keep-all --verbose --show-plan "${cluster_opts[@]}" "$@" \
        >"$out/$name.json" 2>"$out/$name.err" || { echo "bench_70b: $name failed, see $out/$name.err" >&2; tail -5 "$out/$name.err" >&2; return 1; }
}

# An all-reduce share streams attn_output's and ffn_down's columns from a columns file (in the model
# file they lie at a stride) and the rest from the model file: each worker writes its columns file into
# the shard cache once, together about 36% of the model.
shards="$cache/shards"
allreduce_fits() {
    local have want avail
    have=$(find "$shards" -name '*.cols' 2>/dev/null | wc -l)
    [ "$have" -ge 4 ] && return 0
    want=$((size * 36 / 100 + 2 * 1000 * 1000 * 1000))
    avail=$(df -B1 --output=avail "$cache" | tail -1 | tr -d ' ')
    [ "$avail" -ge "$want" ] && return 0
    awk -v a="$avail" -v w="$want" -v d="$shards" 'BEGIN { printf "bench_70b: allreduce skipped: its 4 workers write their columns files (together about 36%% of the model, %.1f GB with 2 to spare) into %s once, and the disk has %.1f GB free\n", w / 1e9, d, a / 1e9 }' |
        tee "$out/allreduce.skipped" >&2
    return 1
}

for lay in $layouts; do
    [ "${TABLE_ONLY:-0}" = 1 ] && break
    case "$lay" in
    exact) run_cluster exact --tp 4 --tp-mode exact || true ;;
    allreduce) allreduce_fits && { run_cluster allreduce --tp 4 --tp-mode allreduce --cache-dir "$shards" || true; } ;;
    pipeline) run_cluster pipeline --pp 4 || true ;;
    *) echo "bench_70b: unknown layout $lay" >&2 ;;
    esac
done
if [ "$single" = 1 ] && [ "${TABLE_ONLY:-0}" != 1 ]; then
    echo "bench_70b: single: run --mem-budget $budget -t ${THREADS_SINGLE:-1} (one node)" >&2
    "$bin" run "${common[@]}" -p "${SINGLE_PROMPT:-a}" -t "${THREADS_SINGLE:-1}" --mem-budget "$budget" \
        >"$out/single.json" 2>"$out/single.err" ||
        { echo "bench_70b: single failed, see $out/single.err" >&2; tail -5 "$out/single.err" >&2; }
fi

# --- the table (and the planner's figures for this disk: shared as here, and one disk per node)

python3 - "$out" "$one" "$four" "$layouts" "$single" "$model" "$bin" "$budget" "$lan_mbit" "$lan_ms" <<'EOF'
import json, os, re, subprocess, sys
out, one, four, layouts, single, model, meshlm, budget, mbit, lat = sys.argv[1:11]
one, four, layouts = float(one), float(four), layouts.split()
GiB = 1 << 30
asked = {"exact": ["--tp", "4", "--tp-mode", "exact"], "allreduce": ["--tp", "4", "--tp-mode", "allreduce"],
         "pipeline": ["--pp", "4"]}

def planned(n, gflops, shared, args, n_ctx):
    """The planner's s/token for n nodes of this machine (measured GFLOP/s, this disk's O_DIRECT MB/s)."""
    path = os.path.join(out, "nodes.txt")
    with open(path, "w") as f:
        for i in range(n):
            f.write("node-%d gflops=%.2f mem=%s lat_ms=%s mbit=%s disk=%.0f%s\n"
                    % (i, gflops, budget, lat, mbit, one * 1e6, " disk_id=1" if shared and n > 1 else ""))
    r = subprocess.run([meshlm, "plan", "-m", model, "--nodes-file", path, "--keep-all", "-c", str(n_ctx)] + args,
                       capture_output=True, text=True)
    m = re.search(r"\npredicted ([0-9.]+) ms/token", "\n" + r.stdout)
    return float(m.group(1)) / 1e3 if m else float("nan")

rows, gflops, n_ctx = [], 0.0, 4096
for name in layouts + (["single"] if single == "1" else []):
    try:
        j = json.load(open(os.path.join(out, name + ".json")))
        err = open(os.path.join(out, name + ".err")).read()
    except Exception:
        rows.append((name, None))
        continue
    r = {"prompt_tokens": len(j["prompt_tokens"]), "ttft_s": j["prompt_ms"] / 1e3}
    r["s_tok"] = 1.0 / j["tokens_per_s"] if j.get("tokens_per_s") else float("nan")
    m = re.search(r"predicted ([0-9.e+]+) ms/token", err)
    r["pred"] = float(m.group(1)) / 1e3 if m else float("nan")
    m = re.search(r"\| local-0 +\| +([0-9.]+) \|", err) # the plan table's GF/s of a worker (1 thread)
    if m and not gflops:
        gflops = float(m.group(1))
    m = re.search(r"layers, .*, n_ctx (\d+)", err) # the plan's context, as the run sized it
    if m:
        n_ctx = int(m.group(1))
    # per process: "[local-0] weights streamed: X MB read in N units (Y MB/s while reading), waited Z ms
    # (P% of reading hidden behind compute)"; one node alone: "meshlm: weights streamed: ..."
    st = re.findall(r"(?:\[(\S+)\]|meshlm:) weights streamed: ([0-9.]+) MB read in (\d+) units \(([0-9.]+) MB/s while "
                    r"reading\), waited ([0-9.]+) ms \(([0-9.]+)% of reading hidden", err)
    r["mb"] = sum(float(x[1]) for x in st)
    r["rate"] = [float(x[3]) for x in st]
    r["hidden"] = [float(x[5]) for x in st]
    mem = [p for p in j.get("memory", []) if p["process"] != "coordinator"] or j.get("memory", [])
    r["hwm"] = [p["vmhwm_bytes"] / GiB for p in mem if p.get("vmhwm_bytes")]
    r["cg"] = [p["cgroup_peak_bytes"] / GiB for p in mem if p.get("cgroup_peak_bytes")]
    wall = (j["prompt_ms"] + j["gen_ms"]) / 1e3
    r["agg"] = r["mb"] / wall if wall > 0 else 0 # every reader's bytes over the run's wall time
    r["n_gen"] = len(j.get("tokens", []))
    rows.append((name, r))
threads = int(os.environ.get("THREADS_SINGLE", "1"))
for name, r in rows:
    if not r:
        continue
    if name == "single":
        r["plan"] = planned(1, gflops * threads, True, [], n_ctx)
        r["own"] = r["plan"]
    else:
        r["plan"] = planned(4, gflops, True, asked[name], n_ctx)
        r["own"] = planned(4, gflops, False, asked[name], n_ctx)

print()
print("llama-2-70b-shaped Q4_0 (%.1f GB): %s" % (os.path.getsize(model) / 1e9, model))
print("disk: sequential O_DIRECT read (dd, 16 MiB blocks): one stream %.0f MB/s, four streams at once %.0f MB/s in all"
      % (one, four))
print("workers: 4 local, 1 thread each, --mem-budget %s (cgroup limit the same), links %s Mbit/s + %s ms; %.1f GFLOP/s"
      " per worker as measured at run time" % (budget, mbit, lat, gflops))
print()
print("| run | decode s/token | predicted at run time | planner, this disk | TTFT s (prompt tokens) "
      "| VmHWM per worker GiB | cgroup peak per worker GiB | disk MB/s over the run, all readers "
      "(per reader while reading) | reading hidden behind compute | planner, one disk per node |")
print("|---|---|---|---|---|---|---|---|---|---|")
fmt = lambda v: " / ".join("%.2f" % x for x in v) if v else "-"
for name, r in rows:
    if not r:
        why = os.path.join(out, name + ".skipped")
        what = (open(why).read().strip().replace("bench_70b: ", "") if os.path.exists(why)
                else "failed (see %s/%s.err)" % (out, name))
        pl = "%.2f" % planned(4, gflops, True, asked[name], n_ctx) if name in asked and gflops else ""
        own = "%.2f" % planned(4, gflops, False, asked[name], n_ctx) if name in asked and gflops else ""
        print("| %s | %s | | %s | | | | | | %s |" % (name, what, pl, own))
        continue
    print("| %s | %.2f | %s | %.2f | %.1f (%d) | %s | %s | %.0f (%s) | %s | %.2f |"
          % (name, r["s_tok"], "%.2f" % r["pred"] if r["pred"] == r["pred"] else "-", r["plan"], r["ttft_s"],
             r["prompt_tokens"], fmt(r["hwm"]), fmt(r["cg"]), r["agg"],
             " / ".join("%.0f" % x for x in r["rate"]) or "-",
             " / ".join("%.0f%%" % x for x in r["hidden"]) or "-", r["own"]))
print()
done = [r for _, r in rows if r]
if done:
    print("decode s/token: generation time over the %d decoded tokens (the first generated token comes with the prompt)"
          % (max(r["n_gen"] for r in done) - 1))
print("raw outputs: %s" % out)
EOF
