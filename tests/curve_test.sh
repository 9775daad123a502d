#!/usr/bin/env bash
# Authenticated nodes (CurveZMQ on the control link and the data plane): `meshlm keygen`, a worker that
# admits only the coordinator keys it lists, a coordinator that dials the worker with the worker's listed
# key. The admitted coordinator gets one node's tokens; a coordinator with an unknown key, one without
# CurveZMQ, and one that lists a wrong key for the worker are all refused within their deadline, and the
# worker logs the refusal with the stranger's key; the traffic is not in clear text on the wire. Then 3
# keyed workers in tensor-parallel and in pipeline layout give the same greedy tokens as 3 plain ones
# (and one node); tcpdump of their data ports shows CURVE handshakes and no plaintext ZMTP or meshlm
# envelope (which the plain workers' capture shows); a third process (curve_probe) presenting an
# unlisted key to a serving worker's data port is refused and the worker logs it, while a listed key
# is admitted.
# Usage: curve_test.sh MESHLM_BIN CURVE_PROBE_BIN
set -uo pipefail
bin="$(realpath "${1:?usage: curve_test.sh MESHLM_BIN CURVE_PROBE_BIN}")"
probe="$(realpath "${2:?usage: curve_test.sh MESHLM_BIN CURVE_PROBE_BIN}")"
NAME=curve
source "$(dirname "$0")/test_lib.sh"
m="$shared/models/stories260K.gguf"
cd "$dir"
for k in coord w1 stranger other; do "$bin" keygen "$k" >/dev/null 2>&1; done
[ "$(stat -c %a coord.key)" = 600 ] && [ "$(wc -c <coord.pub)" = 41 ]
check "keygen writes NAME.key (mode 600) and NAME.pub (a 40-character Z85 key)" $?
# N free ports P (control), each with P + 1 (data) free too, below the kernel's ephemeral range
# (32768-60999), which the other tests' outgoing connections draw their source ports from: a port
# bind(0) hands out can be taken by one of them before the worker binds it.
free_ports() {
  python3 - "$1" <<'PY'
import random, socket, sys
out = []
while len(out) < int(sys.argv[1]):
    p = random.randrange(20000, 32000)
    if any(abs(p - q) <= 1 for q in out):
        continue
    try:
        for q in (p, p + 1):
            t = socket.socket(); t.bind(("127.0.0.1", q)); t.close()
        out.append(p)
    except OSError:
        pass
print(" ".join(map(str, out)))
PY
}
port=$(free_ports 1)
ep="tcp://127.0.0.1:$port"
echo "coord.pub" >w1.peers                       # the worker admits the coordinator's key
echo "$(cat w1.pub) $ep" >coord.peers            # the coordinator dials the worker with its key
"$bin" worker --listen "$ep" -m "$m" --no-profile -t 1 --curve-key w1.key --curve-peers w1.peers >w1.log 2>&1 &
pids+=($!)
sleep 0.5
"$bin" run -m "$m" -p "Once upon a time" -n 24 --greedy -t 1 --json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])' >one.tok
"$bin" run -m "$m" -p "Once upon a time" -n 24 --greedy -t 1 --json --workers "$ep" --curve-key coord.key \
  --curve-peers coord.peers 2>run.err | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])' >many.tok
cmp -s one.tok many.tok && [ -s one.tok ]
check "the listed coordinator: one node's 24 tokens over the encrypted link" $? "$(cat run.err)"

echo "$(cat w1.pub) $ep" >stranger.peers
timeout 30 "$bin" run -m "$m" -p "Once upon a time" -n 4 --greedy -t 1 --workers "$ep" --curve-key stranger.key \
  --curve-peers stranger.peers --timeout 2000 >/dev/null 2>stranger.err
st=$?
[ "$st" != 0 ] && grep -q "CurveZMQ" stranger.err
check "a coordinator with an unlisted key is refused (exit $st, within its 2 s deadline)" $? "$(cat stranger.err)"
grep -q "refused a connection from 127.0.0.1: its key $(cat stranger.pub | sed 's/[][\.*^$/]/\\&/g') is not among" w1.log
check "the worker logs the refusal with the stranger's key" $? "$(cat w1.log)"

timeout 30 "$bin" run -m "$m" -p "Once upon a time" -n 4 --greedy -t 1 --workers "$ep" --timeout 2000 >/dev/null 2>plain.err
[ $? != 0 ]; check "a coordinator without CurveZMQ gets nothing from the worker" $? "$(cat plain.err)"

echo "$(cat other.pub) $ep" >wrong.peers # right coordinator key, wrong key for the worker: no impostor accepted
timeout 30 "$bin" run -m "$m" -p "Once upon a time" -n 4 --greedy -t 1 --workers "$ep" --curve-key coord.key \
  --curve-peers wrong.peers --timeout 2000 >/dev/null 2>wrong.err
[ $? != 0 ]; check "a coordinator expecting another worker key refuses this worker" $? "$(cat wrong.err)"

echo "nonsense" >bad.peers
"$bin" run -m "$m" -p x -n 1 --workers "$ep" --curve-key coord.key --curve-peers bad.peers >/dev/null 2>bad.err
[ $? = 2 ] && grep -q "bad.peers:1" bad.err; check "a malformed peers file is named with its line" $? "$(cat bad.err)"

# the wire: with tcpdump available, no prompt text or model name crosses in clear
if command -v tcpdump >/dev/null && [ "$(id -u)" = 0 ]; then
  timeout 20 tcpdump -i lo -w wire.pcap -U "tcp port $port" >/dev/null 2>&1 &
  td=$!
  sleep 1
  "$bin" run -m "$m" -p "Zebrafish quartet" -n 8 -t 1 --workers "$ep" --curve-key coord.key --curve-peers coord.peers \
    >/dev/null 2>&1
  sleep 0.5; kill "$td" 2>/dev/null; wait "$td" 2>/dev/null
  # on a plain link the HELLO's node id "coordinator" and the shard cache's "meshlm" travel in clear
  [ -s wire.pcap ] && ! grep -aq "coordinator" wire.pcap && ! grep -aq "meshlm" wire.pcap
  check "tcpdump of the link: none of the HELLO's text in clear" $?
fi

# --- the data plane: 3 workers with keys and 3 without, each on a port P (control) and P + 1 (data)
ports=($(free_ports 6))
: >dp.peers
keyed="" plain="" dports_keyed="" dports_plain=""
for i in 0 1 2; do
  "$bin" keygen "d$i" >/dev/null 2>&1
  kp=${ports[$i]} pp=${ports[$((i + 3))]}
  echo "$(cat "d$i.pub") tcp://127.0.0.1:$kp" >>dp.peers
  "$bin" worker --listen "tcp://127.0.0.1:$kp" -m "$m" --no-profile -t 1 --name "keyed$i" --curve-key "d$i.key" \
    --curve-peers w1.peers >"keyed$i.log" 2>&1 &
  pids+=($!)
  "$bin" worker --listen "tcp://127.0.0.1:$pp" -m "$m" --no-profile -t 1 --name "plain$i" >"plain$i.log" 2>&1 &
  pids+=($!)
  keyed+="${keyed:+,}tcp://127.0.0.1:$kp"; plain+="${plain:+,}tcp://127.0.0.1:$pp"
  dports_keyed+="${dports_keyed:+ or }tcp port $((kp + 1))"; dports_plain+="${dports_plain:+ or }tcp port $((pp + 1))"
done
sleep 0.5
curve=(--curve-key coord.key --curve-peers dp.peers)
gen() { # gen OUT LAYOUT... (extra args): greedy tokens of a run over the given workers into OUT
  local out=$1; shift
  timeout 120 "$bin" run -m "$m" -p "Once upon a time" -n 24 --greedy -t 1 --json --keep-all --verbose "$@" 2>"$out.err" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])' >"$out"
}
for lay in "tp:--tp 3 --pp 1" "pp:--pp 3 --tp 1"; do
  name=${lay%%:*} flags=${lay#*:}
  gen "$name.plain.tok" $flags --workers "$plain"
  gen "$name.keyed.tok" $flags --workers "$keyed" "${curve[@]}"
  [ -s "$name.keyed.tok" ] && cmp -s "$name.keyed.tok" "$name.plain.tok" && cmp -s "$name.keyed.tok" one.tok &&
    grep -q "meshlm: plan ${name}3:" "$name.keyed.tok.err" && grep -q "meshlm: plan ${name}3:" "$name.plain.tok.err"
  check "$name layout over 3 keyed workers: the plain workers' (and one node's) 24 tokens" $? \
    "$(cat "$name.keyed.tok.err" "$name.plain.tok.err")"
done

if command -v tcpdump >/dev/null && [ "$(id -u)" = 0 ]; then
  cap() { # cap PCAP FILTER RUN-ARGS...: a tensor-parallel run captured on lo
    local pcap=$1 filter=$2; shift 2
    timeout 60 tcpdump -i lo -w "$pcap" -U "$filter" >/dev/null 2>&1 &
    local td=$!
    sleep 1
    gen "$pcap.tok" --tp 3 --pp 1 "$@"
    sleep 0.5; kill "$td" 2>/dev/null; wait "$td" 2>/dev/null
  }
  cap keyed.pcap "$dports_keyed" --workers "$keyed" "${curve[@]}"
  cap plain.pcap "$dports_plain" --workers "$plain"
  # a plain ZMTP greeting names the NULL mechanism, and every meshlm data-plane message starts with the
  # "MLMZ" envelope; the CURVE greeting names CURVE and the rest is encrypted
  grep -aq "NULL" plain.pcap && grep -aq "MLMZ" plain.pcap
  check "control: the plain data plane's capture shows the NULL mechanism and the MLMZ envelopes" $?
  [ "$(stat -c %s keyed.pcap)" -gt 20000 ] && grep -aq "CURVE" keyed.pcap && ! grep -aq "NULL" keyed.pcap &&
    ! grep -aq "MLMZ" keyed.pcap && cmp -s keyed.pcap.tok one.tok
  check "tcpdump of the keyed data plane: CURVE handshakes, no NULL mechanism, no MLMZ envelope in clear" $? \
    "$(stat -c %s keyed.pcap)"
fi

# a third process knocks on a serving worker's data port: an unlisted key is refused and logged
rm -f serve.port
"$bin" serve -m "$m" --port 0 --port-file serve.port -t 1 --tp 3 --pp 1 --keep-all --workers "$keyed" "${curve[@]}" \
  >serve.log 2>&1 &
pids+=($!)
srv=$!
for _ in $(seq 300); do [ -s serve.port ] && break; sleep 0.05; done
for _ in $(seq 100); do grep -q "data plane rank" keyed0.log 2>/dev/null && break
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(cat serve.port 2>/dev/null)/health")" = 200 ] && break
  sleep 0.1; done
dp="tcp://127.0.0.1:$((ports[0] + 1))"
"$probe" stranger.key "$(cat d0.pub)" "$dp" >probe.out 2>&1
grep -qx refused probe.out
check "a third process with an unlisted key is refused at a worker's data port" $? "$(cat probe.out serve.log)"
grep -q "data plane rank [0-9]*: refused a connection from 127.0.0.1: its key $(sed 's/[][\.*^$/]/\\&/g' stranger.pub) is not among" keyed0.log
check "the worker logs the data-plane refusal with the stranger's address and key" $? "$(tail -5 keyed0.log)"
"$probe" coord.key "$(cat d0.pub)" "$dp" >probe2.out 2>&1
grep -qx admitted probe2.out
check "control: the coordinator's key (in the plan) is admitted at the same port" $? "$(cat probe2.out)"
"$probe" stranger.key "$(cat d1.pub)" "$dp" >probe3.out 2>&1
grep -qvx admitted probe3.out
check "a client expecting another server key gets no session" $? "$(cat probe3.out)"
post=$(curl -s -m 60 -H 'Content-Type: application/json' "http://127.0.0.1:$(cat serve.port)/v1/completions" \
  -d '{"prompt":"Once upon a time","max_tokens":24,"temperature":0}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["meshlm"]["tokens"])' 2>/dev/null)
[ -n "$post" ] && [ "$post" = "$(cat one.tok)" ]
check "the keyed cluster still serves one node's greedy tokens after the knocks" $? "$post"
kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null
finish
