#!/usr/bin/env bash
# Seeds the planner-input fuzzer's corpus ($1): a plan file, node lists, a node file and routing counts.
set -euo pipefail
corpus="$1"
mkdir -p "$corpus"
printf '\000# meshlm plan v1\nstage layers=0-10 nodes=0,1\nstage layers=11-21 nodes=2:2,3\n' > "$corpus/plan"
printf '\0012,1,1:512M' > "$corpus/nodes"
printf '\0011:4G@1/1000,2:8G@5/300' > "$corpus/nodes-link"
printf '\0011:2G@1/1000:disk=950M:disk_id=1,2:disk=1.2G,0.5@0.5/100:4G' > "$corpus/nodes-disk"
printf '\000# meshlm plan v2\ntp mode=allreduce\nstage layers=0-79 nodes=0:1,1:1,2:1,3:1\n' > "$corpus/plan-v2"
printf '\002desk gflops=120 mem_bw=20G mem=24G lat_ms=0.2 mbit=1000\npi speed=0.2 mem=4G\n' > "$corpus/nodefile"
printf '\002board mem=2G disk=950M disk_id=1 lat_ms=1 mbit=1000\n' > "$corpus/nodefile-disk"
printf '\003# counts\nlayers 3 experts 4 top_k 2 tokens 10\n0: 5 5 5 5\n1: 0 0 0 0\n2: 12 3 4 1\n' > "$corpus/routing"
exit 0
