#!/usr/bin/env bash
# LAN emulation: N network namespaces (meshlm-<tag>-1..N) on veth pairs joined by a bridge, with
# optional per-link bandwidth shaping (tbf). Only its own namespaces and 10.77.<net>.0/24 are used.
#   cluster/lan.sh [--tag lan] [--rate 1gbit] [--net 77] up N   create; prints one address per host
#   cluster/lan.sh [--tag lan] exec I CMD...                    run CMD inside host I
#   cluster/lan.sh [--tag lan] down                             remove everything it created
# Latency and loss are not set here (this kernel has no netem): meshlm's fault-injecting transport
# adds them per link.
set -euo pipefail

tag=lan; rate=""; net=77
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) rate="$2"; shift 2 ;;
    --net) net="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    *) break ;;
  esac
done
cmd="${1:-}"; shift || true
br="mlb-$tag"

down() {
  for ns in $(ip netns list | awk '{print $1}' | grep "^meshlm-$tag-" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns"
  done
  for l in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^mlv-$tag-" || true); do
    ip link del "$l" 2>/dev/null || true
  done
  ip link del "$br" 2>/dev/null || true
}

case "$cmd" in
  up)
    n="${1:?usage: lan.sh up N}"
    down
    ip link add "$br" type bridge
    ip addr add "10.77.$net.254/24" dev "$br"
    ip link set "$br" up
    for i in $(seq 1 "$n"); do
      ns="meshlm-$tag-$i"
      ip netns add "$ns"
      ip link add "mlv-$tag-$i" type veth peer name "mlp-$tag-$i"
      ip link set "mlp-$tag-$i" netns "$ns"
      ip link set "mlv-$tag-$i" master "$br"
      ip link set "mlv-$tag-$i" up
      ip netns exec "$ns" ip addr add "10.77.$net.$i/24" dev "mlp-$tag-$i"
      ip netns exec "$ns" ip link set "mlp-$tag-$i" up
      ip netns exec "$ns" ip link set lo up
      if [ -n "$rate" ]; then # shape both directions of the host's link
        ip netns exec "$ns" tc qdisc add dev "mlp-$tag-$i" root tbf rate "$rate" burst 256kbit latency 100ms
        tc qdisc add dev "mlv-$tag-$i" root tbf rate "$rate" burst 256kbit latency 100ms
      fi
      echo "10.77.$net.$i"
    done
    ;;
  exec)
    host="${1:?usage: lan.sh exec I CMD...}"; shift
    exec ip netns exec "meshlm-$tag-$host" "$@" ;;
  down) down ;;
  *) echo "usage: lan.sh [--tag T] [--rate R] [--net K] up N | exec I CMD... | down" >&2; exit 2 ;;
esac
