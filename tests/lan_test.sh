#!/usr/bin/env bash
# Integration test: a cluster across 3 emulated LAN hosts (network namespaces, veth, bridge, 1 Gbit/s
# tbf) gives the same tokens as one node, tensor-parallel and as a 3-stage pipeline over links with
# 1 ms added latency. Needs root and iproute2 (CI runs as root).
set -euo pipefail
bin="$(realpath "${1:?usage: lan_test.sh MESHLM_BIN}")"
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="${MESHLM_SHARED:-$here/../shared}"
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
  echo "lan test: needs root and iproute2 (not available here)" >&2
  exit 77
fi
tag="t$$"
lan="$here/cluster/lan.sh"
cache="$(mktemp -d)"
cleanup() { bash "$lan" --tag "$tag" down >/dev/null 2>&1 || true; rm -rf "$cache"; }
trap cleanup EXIT
bash "$lan" --tag "$tag" --rate 1gbit --net 78 up 3 >/dev/null
fail=0
for model in stories260K.gguf synth/synth-dense-Q4_K_M.gguf synth/synth-moe-Q8_0.gguf; do
  m="$shared/models/$model"
  # host 1 has no model file: its shard is streamed by the coordinator
  bash "$lan" --tag "$tag" exec 1 "$bin" worker --listen tcp://10.77.78.1:5000 -t 1 --cache-dir "$cache" --timeout 10000 &
  for i in 2 3; do
    bash "$lan" --tag "$tag" exec "$i" "$bin" worker --listen "tcp://10.77.78.$i:5000" -t 1 -m "$m" --timeout 10000 &
  done
  one=$("$bin" run -m "$m" -p "Once upon a time" -n 24 --greedy --json 2>/dev/null | grep -o '"tokens":\[[^]]*\]')
  many=$("$bin" coordinator -m "$m" -p "Once upon a time" -n 24 --greedy --json --speeds 2,1,1 --pp 1 --keep-all --timeout 10000 \
         --workers tcp://10.77.78.1:5000,tcp://10.77.78.2:5000,tcp://10.77.78.3:5000 2>/tmp/lan_coord.$$ |
         grep -o '"tokens":\[[^]]*\]' || true)
  if [ -n "$one" ] && [ "$one" = "$many" ]; then
    echo "lan: $model on 3 hosts: same tokens as one node: $many"
  else
    echo "lan: $model on 3 hosts: MISMATCH one=[$one] cluster=[$many]" >&2
    cat /tmp/lan_coord.$$ >&2
    fail=1
  fi
  # The same hosts as a 3-stage pipeline with prompt micro-batches of 3 tokens, every link also
  # 1 ms one way (meshlm's fault-injecting transport; the workers take the spec from the coordinator).
  one=$("$bin" run -m "$m" -p "Once upon a time" -n 24 --greedy --json -b 3 2>/dev/null | grep -o '"tokens":\[[^]]*\]')
  many=$(MESHLM_FAULTS="delay:link=*:ms=1" "$bin" coordinator -m "$m" -p "Once upon a time" -n 24 --greedy --json \
         --pp 3 --ubatch 3 --timeout 10000 --verbose \
         --workers tcp://10.77.78.1:5000,tcp://10.77.78.2:5000,tcp://10.77.78.3:5000 2>/tmp/lan_coord.$$ |
         grep -o '"tokens":\[[^]]*\]' || true)
  if [ -n "$one" ] && [ "$one" = "$many" ] && grep -q "plan pp3" /tmp/lan_coord.$$; then
    echo "lan: $model on 3 hosts as 3 pipeline stages over 1 ms links: same tokens as one node"
  else
    echo "lan: $model on 3 hosts as 3 stages: MISMATCH one=[$one] cluster=[$many]" >&2
    cat /tmp/lan_coord.$$ >&2
    fail=1
  fi
  rm -f /tmp/lan_coord.$$
  for ns in 1 2 3; do ip netns pids "meshlm-$tag-$ns" | xargs -r kill 2>/dev/null || true; done
  wait 2>/dev/null || true
done
[ "$fail" = 0 ] && echo "lan: 6 passed, 0 failed" || { echo "lan: failed" >&2; exit 1; }
