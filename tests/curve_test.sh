#!/usr/bin/env bash
# Authenticated nodes (CurveZMQ on the control link): `meshlm keygen`, a worker that admits only the
# coordinator keys it lists, a coordinator that dials the worker with the worker's listed key. The
# admitted coordinator gets one node's tokens; a coordinator with an unknown key, one without CurveZMQ, and
# one that lists a wrong key for the worker are all refused within their deadline, and the worker logs
# the refusal with the stranger's key; the traffic is not in clear text on the wire.
# Usage: curve_test.sh MESHLM_BIN
set -uo pipefail
bin="$(realpath "${1:?usage: curve_test.sh MESHLM_BIN}")"
NAME=curve
source "$(dirname "$0")/test_lib.sh"
m="$shared/models/stories260K.gguf"
cd "$dir"
for k in coord w1 stranger other; do "$bin" keygen "$k" >/dev/null 2>&1; done
[ "$(stat -c %a coord.key)" = 600 ] && [ "$(wc -c <coord.pub)" = 41 ]
check "keygen writes NAME.key (mode 600) and NAME.pub (a 40-character Z85 key)" $?
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
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
finish
