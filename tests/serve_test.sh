#!/usr/bin/env bash
# meshlm serve end to end over real HTTP (curl): greedy answers equal `meshlm run --greedy`, streaming
# equals the whole answer, batched requests equal lone ones, chat, bad requests answered 4xx with a JSON
# error while the server goes on, the bearer key, a full queue (429), a client that leaves frees its
# sequence, a worker killed mid-request recovered with the same tokens, /metrics, and the status page in
# headless Chromium (when installed; CI installs it) against a 3-worker cluster, its screenshot kept.
# Usage: serve_test.sh MESHLM_BIN BUILD_DIR
set -uo pipefail
bin="$(realpath "${1:?usage: serve_test.sh MESHLM_BIN BUILD_DIR}")"
build="${2:-$(dirname "$bin")}"
NAME=serve
source "$(dirname "$0")/test_lib.sh"
m="$shared/models/stories260K.gguf"
command -v curl >/dev/null || { echo "serve: curl is needed" >&2; exit 1; }

# start NAME ARGS...: a server on a free port; sets $port (0 when it did not come up)
start() {
  local name=$1; shift
  rm -f "$dir/$name.port"
  "$bin" serve -m "$m" --port 0 --port-file "$dir/$name.port" -t 1 "$@" >"$dir/$name.log" 2>&1 &
  pids+=($!)
  srv_pid=$!
  port=0
  for _ in $(seq 300); do [ -s "$dir/$name.port" ] && { port=$(cat "$dir/$name.port"); break; }; sleep 0.05; done
}
post() { curl -s -m 60 -H 'Content-Type: application/json' "$@"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# --- one node
start one --parallel 4
[ "$port" != 0 ]; check "listening (single node)" $? "$(cat "$dir/one.log")"
u="http://127.0.0.1:$port"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$u/health")" = 200 ]; check "/health 200" $?
curl -s "$u/v1/models" | json "d['data'][0]['id']" | grep -qx stories260K.gguf; check "/v1/models names the model" $?

"$bin" run -m "$m" -p "Once upon a time" -n 40 --greedy -t 1 --json 2>/dev/null | json "d['tokens']" >"$dir/run.tok"
post "$u/v1/completions" -d '{"prompt":"Once upon a time","max_tokens":40,"temperature":0}' >"$dir/c.json"
json "d['meshlm']['tokens']" <"$dir/c.json" >"$dir/http.tok"
cmp -s "$dir/run.tok" "$dir/http.tok" && [ -s "$dir/run.tok" ]
check "greedy completion over HTTP = meshlm run --greedy (40 tokens)" $? "$(cat "$dir/run.tok" "$dir/http.tok")"
json "d['choices'][0]['finish_reason']+' '+str(d['usage']['completion_tokens'])" <"$dir/c.json" | grep -qx "length 40"
check "finish_reason length, usage 40 tokens" $?

post -N "$u/v1/completions" -d '{"prompt":"Once upon a time","max_tokens":40,"temperature":0,"stream":true}' >"$dir/s.txt"
python3 - "$dir/s.txt" "$dir/c.json" <<'PY'
import json, sys
ev = [l[6:] for l in open(sys.argv[1]).read().split('\n') if l.startswith('data: ')]
assert ev[-1] == '[DONE]', ev[-1]
chunks = [json.loads(e) for e in ev[:-1]]
text = ''.join(c['choices'][0]['text'] for c in chunks)
whole = json.load(open(sys.argv[2]))['choices'][0]['text']
assert text == whole, (text, whole)
assert chunks[-1]['choices'][0]['finish_reason'] == 'length'
assert all(c['object'] == 'text_completion' for c in chunks)
PY
check "streamed events end with [DONE] and add up to the whole answer" $?

# batched = alone: 6 prompts at once, each against its lone answer
prompts=("Once upon a time" "The little dog" "One day, Lily" "Tom had a red ball" "The sun was" "Mom said")
for i in "${!prompts[@]}"; do
  post "$u/v1/completions" -d "{\"prompt\":\"${prompts[$i]}\",\"max_tokens\":30,\"temperature\":0,\"ignore_eos\":true}" |
    json "d['meshlm']['tokens']" >"$dir/alone$i"
done
for i in "${!prompts[@]}"; do
  post "$u/v1/completions" -d "{\"prompt\":\"${prompts[$i]}\",\"max_tokens\":30,\"temperature\":0,\"ignore_eos\":true}" \
    >"$dir/many$i.json" &
done
wait_all() { for j in $(jobs -p); do case " ${pids[*]} " in *" $j "*) ;; *) wait "$j";; esac; done; }
wait_all
bad=0
for i in "${!prompts[@]}"; do json "d['meshlm']['tokens']" <"$dir/many$i.json" | cmp -s - "$dir/alone$i" || bad=$((bad + 1)); done
check "6 requests in flight together give each one's lone tokens" $bad "($bad differ)"
curl -s "$u/metrics" | grep -q '^meshlm_steps_total' ; check "/metrics in Prometheus text" $?

post "$u/v1/chat/completions" -d '{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Tell me a story"}],"max_tokens":16,"temperature":0}' >"$dir/chat.json"
json "d['object']+' '+d['choices'][0]['message']['role']+' '+str(d['usage']['completion_tokens']>0)" <"$dir/chat.json" |
  grep -qx "chat.completion assistant True"
check "chat completion answers as the assistant" $? "$(cat "$dir/chat.json")"
post -N "$u/v1/chat/completions" -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"stream":true,"temperature":0}' >"$dir/cs.txt"
python3 - "$dir/cs.txt" <<'PY'
import json, sys
ev = [l[6:] for l in open(sys.argv[1]).read().split('\n') if l.startswith('data: ')]
assert ev[-1] == '[DONE]'
c = [json.loads(e) for e in ev[:-1]]
assert c[0]['choices'][0]['delta']['role'] == 'assistant' and c[0]['object'] == 'chat.completion.chunk'
assert c[-1]['choices'][0]['finish_reason'] in ('stop', 'length')
PY
check "chat streaming: role first, chunks, [DONE]" $?

# bad requests: 4xx with a JSON error, and the server goes on
long=$(python3 -c "print(' '.join(['story time'] * 3000))")
badreq() { # CODE DESCRIPTION CURL-ARGS...
  local want=$1 what=$2; shift 2
  local got
  got=$(curl -s -m 20 -o "$dir/err.json" -w '%{http_code}' "$@")
  [ "$got" = "$want" ] && json "d['error']['message']" <"$dir/err.json" >/dev/null 2>&1
  check "$what: $want with a JSON error" $? "(got $got: $(head -c 300 "$dir/err.json"))"
}
badreq 400 "malformed JSON" "$u/v1/completions" -d '{"prompt": "x",'
badreq 404 "unknown model" "$u/v1/completions" -d '{"prompt":"x","model":"gpt-5"}'
badreq 400 "negative max_tokens" "$u/v1/completions" -d '{"prompt":"x","max_tokens":-5}'
badreq 400 "huge max_tokens" "$u/v1/completions" -d '{"prompt":"x","max_tokens":1000000000}'
badreq 400 "a prompt longer than the context" "$u/v1/completions" -d "{\"prompt\":\"$long\"}"
badreq 400 "messages missing" "$u/v1/chat/completions" -d '{"prompt":"x"}'
badreq 400 "a bad role" "$u/v1/chat/completions" -d '{"messages":[{"role":"wizard","content":"x"}]}'
badreq 405 "GET on a POST route" "$u/v1/completions"
badreq 404 "an unknown route" "$u/v1/nothing"
head -c 1100000 /dev/zero | tr '\0' 'a' >"$dir/big.txt"
badreq 413 "a body over 1 MiB" "$u/v1/completions" --data-binary "@$dir/big.txt"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$u/health")" = 200 ] &&
  post "$u/v1/completions" -d '{"prompt":"Once upon a time","max_tokens":40,"temperature":0}' | json "d['meshlm']['tokens']" |
  cmp -s - "$dir/run.tok"
check "after them the server still answers the same" $?
curl -s "$u/metrics" | awk '$1=="meshlm_http_errors_total"{exit !($2>=10)}'; check "/metrics counts the error answers" $?

# a bounded load: 32 clients at once (a queue of 64 holds them), every answer 200 with its 8 tokens
for i in $(seq 32); do
  curl -s -m 120 -o "$dir/load$i.json" -w '%{http_code}\n' "$u/v1/completions" \
    -d "{\"prompt\":\"Once upon a time $i\",\"max_tokens\":8,\"ignore_eos\":true,\"seed\":$i}" >"$dir/load$i.code" &
done
wait_all
ok=$(cat "$dir"/load*.code | grep -c '^200$')
toks=$(python3 -c 'import sys,json; print(sum(json.load(open(f))["usage"]["completion_tokens"] for f in sys.argv[1:]))' "$dir"/load*.json 2>/dev/null)
[ "$ok" = 32 ] && [ "$toks" = 256 ]; check "32 concurrent clients: 32 answers 200, 256 tokens" $? "($ok ok, $toks tokens)"

# --- the bearer key
start key --api-key s3cret
u="http://127.0.0.1:$port"
badreq 401 "no key" "$u/v1/models"
badreq 401 "a wrong key" -H 'Authorization: Bearer nope' "$u/v1/completions" -d '{"prompt":"x"}'
[ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer s3cret' "$u/v1/models")" = 200 ]
check "the right key: 200" $?
kill "$srv_pid"

# --- under mpirun: every rank computes, rank 0 serves
if command -v mpirun >/dev/null; then
  rm -f "$dir/mpi.port"
  timeout 300 mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 "$bin" serve --mpi -m "$m" --port 0 \
    --port-file "$dir/mpi.port" -t 1 >"$dir/mpi.log" 2>&1 &
  mpi_pid=$!
  for _ in $(seq 600); do [ -s "$dir/mpi.port" ] && break; sleep 0.05; done
  post "http://127.0.0.1:$(cat "$dir/mpi.port" 2>/dev/null || echo 1)/v1/completions" \
    -d '{"prompt":"Once upon a time","max_tokens":40,"temperature":0}' | json "d['meshlm']['tokens']" | cmp -s - "$dir/run.tok"
  check "serve --mpi on 2 ranks: greedy completion = meshlm run --greedy" $? "$(tail -5 "$dir/mpi.log")"
  kill -TERM "$mpi_pid"
  timeout 60 tail --pid="$mpi_pid" -f /dev/null
  ! kill -0 "$mpi_pid" 2>/dev/null; check "SIGTERM ends the mpirun job (every rank)" $?
fi

# --- workers found in a registry (a real redis-server, as CI starts on 6379)
if command -v redis-cli >/dev/null && redis-cli -p 6379 ping >/dev/null 2>&1; then
  url="redis://127.0.0.1:6379/0?prefix=mlserve$$"
  for i in 1 2; do
    "$bin" worker --listen "ipc://$dir/rw$i" -m "$m" --name "sw$i" --no-profile -t 1 --registry "$url" >"$dir/rw$i.log" 2>&1 &
    pids+=($!)
  done
  for _ in $(seq 50); do [ "$("$bin" nodes --registry "$url" --json 2>/dev/null | grep -o '"idle"' | wc -l)" = 2 ] && break; sleep 0.1; done
  start reg --registry "$url" --keep-all
  post "http://127.0.0.1:$port/v1/completions" -d '{"prompt":"Once upon a time","max_tokens":40,"temperature":0}' |
    json "d['meshlm']['tokens']" | cmp -s - "$dir/run.tok"
  check "serve --registry (2 workers found in Redis): greedy completion = meshlm run --greedy" $? "$(tail -5 "$dir/reg.log")"
  "$bin" nodes --registry "$url" --plan 2>&1 | grep -q "sw2"; check "the plan is published in the registry" $?
  kill "$srv_pid"
  redis-cli -p 6379 --scan --pattern "mlserve$$*" | xargs -r redis-cli -p 6379 del >/dev/null
fi

# --- a cluster of 3 local workers; each link message delayed 1 ms so requests last a while
export MESHLM_FAULTS="delay:link=*:ms=1"
start three --local 3 --parallel 1 --queue 1 --tp 3 --keep-all
unset MESHLM_FAULTS
[ "$port" != 0 ]; check "listening (3 local workers, tp3)" $? "$(cat "$dir/three.log")"
u="http://127.0.0.1:$port"
serve3=$srv_pid

if command -v chromium >/dev/null; then
  curl -s "$u/api/status" >/dev/null; sleep 1
  timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --virtual-time-budget=5000 \
    --dump-dom "$u/" >"$dir/dom.html" 2>"$dir/chromium.log"
  python3 - "$dir/dom.html" <<'PY'
import re, sys
d = open(sys.argv[1]).read()
assert 'data-ready="1"' in d, 'the script did not fill the page'
nodes = re.search(r'<table id="nodes">.*?</table>', d, re.S).group(0)
rows = re.findall(r'<tr data-node="([^"]+)">(.*?)</tr>', nodes, re.S)
assert len(rows) == 3, rows
assert all('computing' in r[1] for r in rows), rows
shards = re.search(r'<table id="shards">.*?</table>', d, re.S).group(0)
assert len(re.findall(r'<tr data-node=', shards)) == 3
assert re.search(r'<span id="layout">tp3</span>', d), 'layout'
PY
  check "status page in Chromium: 3 nodes computing, 3 shards, layout tp3" $? "$(head -c 600 "$dir/dom.html"; tail -3 "$dir/chromium.log")"
  timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --virtual-time-budget=5000 \
    --window-size=1100,900 --screenshot="$build/serve-status.png" "$u/" >/dev/null 2>&1
  [ -s "$build/serve-status.png" ]; check "screenshot kept: $build/serve-status.png" $?
else
  echo "serve: chromium not installed: the status page is not checked here (CI installs it)"
fi

# a full queue: one in flight, one waiting, the third refused with 429
for i in 1 2 3; do
  curl -s -m 60 -o "$dir/q$i.json" -w '%{http_code}\n' "$u/v1/completions" \
    -d '{"prompt":"Once upon a time","max_tokens":60,"temperature":0,"ignore_eos":true}' >"$dir/q$i.code" &
  sleep 0.2
done
wait_all
codes=$(cat "$dir"/q?.code | sort | tr '\n' ' ')
[ "$codes" = "200 200 429 " ]; check "--parallel 1 --queue 1: answers 200 200 429" $? "($codes)"

# a client that leaves frees its sequence
curl -s -N -m 1 "$u/v1/completions" -d '{"prompt":"Once upon a time","max_tokens":1500,"ignore_eos":true,"stream":true}' >/dev/null
ok=1
for _ in $(seq 50); do
  curl -s "$u/metrics" >"$dir/m.txt"
  if awk '$1=="meshlm_requests_cancelled_total"{c=$2} $1=="meshlm_sequences_active"{a=$2} END{exit !(c>=1 && a==0)}' "$dir/m.txt"; then ok=0; break; fi
  sleep 0.1
done
check "a client gone after 1 s: its sequence is freed (cancelled 1, active 0)" $ok "$(grep -E 'cancelled|active' "$dir/m.txt")"

# a worker killed mid-request: the answer is one node's
"$bin" run -m "$m" -p "Once upon a time" -n 120 --greedy --ignore-eos -t 1 --json 2>/dev/null | json "d['tokens']" >"$dir/run120.tok"
post "$u/v1/completions" -d '{"prompt":"Once upon a time","max_tokens":120,"temperature":0,"ignore_eos":true}' >"$dir/k.json" &
req=$!
sleep 1
victim=$(pgrep -P "$serve3" -f "meshlm worker" | head -1)
[ -n "$victim" ] && kill -9 "$victim"
wait "$req"
json "d['meshlm']['tokens']" <"$dir/k.json" | cmp -s - "$dir/run120.tok"
check "a worker killed (pid ${victim:-none}) while answering: the same 120 tokens as one node" $? "$(head -c 400 "$dir/k.json"; grep -E 'fault|recover' "$dir/three.log")"
curl -s "$u/api/status" | json "str(d['faults'])+' '+str(d['recovered'])+' '+d['nodes'][0]['state']" >"$dir/st.txt"
grep -q "^1 1" "$dir/st.txt"; check "/api/status: 1 fault, 1 recovered" $? "$(cat "$dir/st.txt")"
curl -s "$u/metrics" | awk '$1=="meshlm_recoveries_total"{exit !($2==1)}'; check "/metrics: meshlm_recoveries_total 1" $?

# a worker killed while no request runs: found by the idle pings and planned around before the next request
victim=$(pgrep -P "$serve3" -f "meshlm worker" | head -1)
[ -n "$victim" ] && kill -9 "$victim"
t0=$(date +%s%N)
found=1
for _ in $(seq 100); do
  if [ "$(curl -s "$u/api/status" | json "d['faults']")" = 2 ]; then found=0; break; fi
  sleep 0.05
done
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
check "a worker killed between requests: found and re-planned around without a request (${ms} ms)" $found
post "$u/v1/completions" -d '{"prompt":"Once upon a time","max_tokens":120,"temperature":0,"ignore_eos":true}' |
  json "d['meshlm']['tokens']" | cmp -s - "$dir/run120.tok"
check "the next request on the one worker left: the same 120 tokens" $?

# --- a MoE model with placed experts: attention on local-0, each expert on both workers
m="$shared/models/derived/stories260K-moe8x-top2-permuted.gguf"
start moe --local 2 --ep 2 --ep-replicas 2 --parallel 4
u="http://127.0.0.1:$port"
[ "$port" != 0 ] && grep -q "plan ep2" "$dir/moe.log"; check "listening (a MoE model, 2 local workers, ep2)" $? "$(tail -5 "$dir/moe.log")"
moe_bad=0
for i in 0 1 2; do
  "$bin" run -m "$m" -p "${prompts[$i]}" -n 24 --greedy --ignore-eos -t 1 --json 2>/dev/null | json "d['tokens']" >"$dir/moe_run$i"
  post "$u/v1/completions" -d "{\"prompt\":\"${prompts[$i]}\",\"max_tokens\":24,\"temperature\":0,\"ignore_eos\":true}" \
    >"$dir/moe$i.json" &
done
wait_all
for i in 0 1 2; do json "d['meshlm']['tokens']" <"$dir/moe$i.json" | cmp -s - "$dir/moe_run$i" || moe_bad=$((moe_bad + 1)); done
check "placed experts (--ep 2 --ep-replicas 2): 3 requests together = meshlm run --greedy each" $moe_bad "($moe_bad differ)"

finish
