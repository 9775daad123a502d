#!/usr/bin/env bash
# Integration test: `meshlm mpi` across 3 emulated LAN hosts from an MPI hostfile (network namespaces
# from cluster/lan.sh; mpirun "ssh"es into them with cluster/mpi-netns-rsh) gives one node's tokens,
# in tensor-parallel and 3-stage pipeline layouts. Needs root, iproute2 and mpirun (else exit 77).
set -uo pipefail
bin="$(realpath "${1:?usage: mpi_lan_test.sh MESHLM_BIN}")"
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="${MESHLM_SHARED:-$here/../shared}"
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v mpirun >/dev/null; then
  echo "mpi lan test: needs root, iproute2 and mpirun (Debian: openmpi-bin); not available here" >&2
  exit 77
fi
m="$shared/models/stories260K.gguf"
if [ ! -f "$m" ]; then
  echo "mpi lan test: $m not found; set MESHLM_SHARED" >&2
  exit 1
fi
n=3
net=79
export MESHLM_LAN_TAG="mpi$$"
lan="$here/cluster/lan.sh"
dir="$(mktemp -d)"
cleanup() { bash "$lan" --tag "$MESHLM_LAN_TAG" down >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
if ! bash "$lan" --tag "$MESHLM_LAN_TAG" --net "$net" up "$n" >"$dir/hosts.txt" 2>"$dir/log"; then
  echo "mpi lan test: cannot create network namespaces here:" >&2
  cat "$dir/log" >&2
  exit 77
fi
# One slot per host, so rank r runs on host r+1; no rank runs in the root namespace (not listed).
sed 's/$/ slots=1/' "$dir/hosts.txt" >"$dir/hostfile"

# Open MPI refuses root without these. Daemons and ranks talk over the bridge only (TCP, no shared
# memory between "machines"); the agent launches every daemon from mpirun (no tree spawn).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
mpirun_() { # NP ARGS...
  local np="$1"; shift
  timeout 60 mpirun --allow-run-as-root --bind-to none --hostfile "$dir/hostfile" -np "$np" \
    --mca plm_rsh_agent "$here/cluster/mpi-netns-rsh" --mca plm_rsh_no_tree_spawn 1 \
    --mca oob_tcp_if_include "10.77.$net.0/24" --mca btl_tcp_if_include "10.77.$net.0/24" \
    --mca btl tcp,self "$@"
}
# Each rank first records the namespace it runs in (the exec keeps the pid, so it is meshlm's).
in_ns() { echo "ip netns identify \$\$ >$dir/ns.\$OMPI_COMM_WORLD_RANK; exec \"\$@\""; }
# Bytes each host sent into the bridge (rx of the bridge-side veth).
sent() { for i in $(seq 1 "$n"); do cat "/sys/class/net/mlv-$MESHLM_LAN_TAG-$i/statistics/rx_bytes"; done; }
pass=0
fail=0
check() { # NAME CONDITION-STATUS [DETAIL]: count and report one check
  if [ "$2" = 0 ]; then echo "mpi lan: $1"; pass=$((pass + 1))
  else echo "mpi lan: $1: FAIL ${3:-}" >&2; cat "$dir/log" >&2; fail=$((fail + 1)); fi
}

prompt="Once upon a time"
tok() { grep -o '"tokens":\[[^]]*\]'; }
one=$("$bin" run -m "$m" -p "$prompt" -n 16 --greedy --json -t 1 2>/dev/null | tok)
rm -f "$dir"/ns.*
before=$(sent)
run_tp() {
  mpirun_ "$n" sh -c "$(in_ns)" sh "$bin" mpi -m "$m" -p "$prompt" -n 16 --greedy --json -t 1 --timeout 20000 \
    2>"$dir/log" | tok
}
many=$(run_tp)
# Open MPI's launch through the namespaces has hung once in CI before any rank started (no rank wrote
# its namespace, nothing of meshlm ran): that launch is tried once more, and said so.
if [ -z "$many" ] && ! ls "$dir"/ns.* >/dev/null 2>&1; then
  echo "mpi lan: mpirun started no rank within its 60 s (a launch hang, before meshlm); once more" >&2
  before=$(sent)
  many=$(run_tp)
fi
after=$(sent)
[ -n "$one" ] && [ "$one" = "$many" ]
check "stories260K.gguf on $n hosts from a hostfile: same tokens as one node: $many" $? "one=[$one] mpi=[$many]"

# Each rank ran in its own host's namespace, and every host sent its share over the bridge.
where=""
for r in $(seq 0 $((n - 1))); do where="$where $(cat "$dir/ns.$r" 2>/dev/null)"; done
want=""
for i in $(seq 1 "$n"); do want="$want meshlm-$MESHLM_LAN_TAG-$i"; done
[ "$where" = "$want" ]
check "ranks 0..$((n - 1)) ran in namespaces:$where" $? "(expected$want)"
bytes=$(paste -d' ' <(echo "$before") <(echo "$after") | awk '{printf " %d", $2 - $1}')
[ -z "$(echo "$bytes" | tr ' ' '\n' | awk 'NF && $1 < 10000')" ]
check "bytes each host sent over the bridge during the run:$bytes" $?

# Pipeline: 3 stages, one per host, prompt micro-batches of 3 tokens; one node with the same chunks
# (-b 3) gives the same tokens and logits, bit for bit.
one=$("$bin" run -m "$m" -p "$prompt" -n 16 --greedy --json -t 1 -b 3 --logits "$dir/one.f32" 2>/dev/null | tok)
run_pp() {
  rm -f "$dir"/ns.*
  mpirun_ "$n" sh -c "$(in_ns)" sh "$bin" mpi -m "$m" -p "$prompt" -n 16 --greedy --json -t 1 --pp 3 --ubatch 3 \
    --timeout 20000 --logits "$dir/many.f32" 2>"$dir/log" | tok
}
many=$(run_pp)
if [ -z "$many" ] && ! ls "$dir"/ns.* >/dev/null 2>&1; then # the launch hang above: once more
  echo "mpi lan: mpirun started no rank within its 60 s (a launch hang, before meshlm); once more" >&2
  many=$(run_pp)
fi
[ -n "$one" ] && [ "$one" = "$many" ] && cmp -s "$dir/one.f32" "$dir/many.f32"
check "stories260K.gguf as $n pipeline stages on $n hosts: same tokens and logits as one node" $? \
      "one=[$one] mpi=[$many]"

# A host that is not up: mpirun fails promptly with the agent's message, no hang.
echo "10.77.$net.$((n + 1)) slots=1" >>"$dir/hostfile"
t0=$(date +%s)
mpirun_ $((n + 1)) "$bin" mpi -m "$m" -p "$prompt" -n 1 --timeout 5000 >"$dir/log" 2>&1
st=$?
[ "$st" != 0 ] && [ $(( $(date +%s) - t0 )) -le 30 ] && grep -q "mpi-netns-rsh: no namespace" "$dir/log"
check "a hostfile entry with no host behind it fails the launch (exit $st)" $?

echo "mpi lan: $pass passed, $fail failed"
[ "$fail" = 0 ]
