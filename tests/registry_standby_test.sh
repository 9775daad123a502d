#!/usr/bin/env bash
# A standby found in the registry takes over: 2 workers and 1 standby join a real Redis
# (`meshlm worker --registry URL [--standby]`), `meshlm coordinator --registry URL` finds them, a
# worker is killed (-9) while the text streams, the standby replaces it, and the sampled text (same
# seed) equals one node's; the registry's published plan then names the standby. Exit 77 when no
# redis-server answers.
set -uo pipefail
bin="$(realpath "${1:?usage: registry_standby_test.sh MESHLM_BIN}")"
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="${MESHLM_SHARED:-$here/../shared}"
port="${MESHLM_REDIS_PORT:-6379}"
if ! command -v redis-cli >/dev/null || ! redis-cli -p "$port" ping >/dev/null 2>&1; then
  echo "registry standby test: no redis-server on 127.0.0.1:$port (CI starts one)" >&2
  exit 77
fi
m="$shared/models/stories260K.gguf"
dir="$(mktemp -d)"
url="redis://127.0.0.1:$port/0?prefix=mlstandby$$"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; redis-cli -p "$port" --scan --pattern "mlstandby$$*" | xargs -r redis-cli -p "$port" del >/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
pass=0 fail=0
check() { if [ "$2" = 0 ]; then echo "registry standby: $1"; pass=$((pass + 1)); else echo "registry standby: FAILED: $1 ${3:-}" >&2; fail=$((fail + 1)); fi; }

for i in 1 2 3; do
  role=(); [ "$i" = 3 ] && role=(--standby)
  "$bin" worker --listen "ipc://$dir/w$i" -m "$m" --name "rw$i" --no-profile -t 1 --registry "$url" "${role[@]}" \
    >"$dir/w$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 50); do [ "$("$bin" nodes --registry "$url" --json 2>/dev/null | grep -o '"idle"' | wc -l)" = 3 ] && break; sleep 0.1; done
"$bin" nodes --registry "$url" >"$dir/nodes.txt" 2>&1
grep -q 'rw3 *standby' "$dir/nodes.txt"
check "3 members joined, rw3 as a standby" $? "$(cat "$dir/nodes.txt")"

"$bin" run -m "$m" -p "Once upon a time" -n 400 --temp 0.9 --seed 7 -t 1 --ignore-eos >"$dir/one.txt" 2>/dev/null
"$bin" coordinator -m "$m" -p "Once upon a time" -n 400 --temp 0.9 --seed 7 -t 1 --ignore-eos --registry "$url" --pp 1 \
  --keep-all >"$dir/many.txt" 2>"$dir/coord.log" &
coord=$!
for _ in $(seq 200); do [ -s "$dir/many.txt" ] && break; sleep 0.01; done
kill -9 "${pids[0]}" # rw1 dies while the text streams
wait "$coord"
st=$?
cmp -s "$dir/one.txt" "$dir/many.txt"
check "rw1 killed mid-request: the run succeeds (exit $st) with one node's sampled text (--temp 0.9 --seed 7)" $(( st != 0 || $? != 0 )) \
  "$(cat "$dir/coord.log")"
grep -q "fault: worker rw1 lost" "$dir/coord.log" && grep -q "recovered: 2 node(s)" "$dir/coord.log"
check "the loss and the recovery are reported" $? "$(cat "$dir/coord.log")"
"$bin" nodes --registry "$url" --plan >"$dir/plan.txt" 2>&1
grep -q "rw3" "$dir/plan.txt" && ! grep -q "rw1" <(grep '^stage' "$dir/plan.txt")
check "the published plan names the standby rw3, not rw1" $? "$(cat "$dir/plan.txt")"

echo "registry standby: $pass passed, $fail failed"
[ "$fail" = 0 ]
