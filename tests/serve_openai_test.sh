#!/usr/bin/env bash
# The official OpenAI client library (npm `openai`, installed here from the npm registry into the build
# folder) against `meshlm serve`. Exit 77 (skipped) when node/npm are missing or the registry is unreachable.
# Usage: serve_openai_test.sh MESHLM_BIN BUILD_DIR
set -uo pipefail
bin="$(realpath "${1:?usage: serve_openai_test.sh MESHLM_BIN BUILD_DIR}")"
build="$(realpath "${2:?}")"
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="${MESHLM_SHARED:-$here/../shared}"
m="$shared/models/stories260K.gguf"
command -v node >/dev/null && command -v npm >/dev/null || { echo "serve_openai: node and npm are needed" >&2; exit 77; }
npmdir="$build/npm-openai"
if [ ! -d "$npmdir/node_modules/openai" ]; then
  mkdir -p "$npmdir"
  (cd "$npmdir" && [ -f package.json ] || echo '{"name":"meshlm-openai-test","private":true,"type":"module"}' >package.json)
  if ! (cd "$npmdir" && timeout 300 npm install --no-audit --no-fund --silent openai@4 >"$npmdir/install.log" 2>&1); then
    echo "serve_openai: npm install openai failed (no registry?):" >&2; tail -5 "$npmdir/install.log" >&2
    exit 77
  fi
fi
dir="$(mktemp -d)"
cleanup() { [ -n "${srv:-}" ] && kill "$srv" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
"$bin" serve -m "$m" --port 0 --port-file "$dir/port" -t 1 --api-key k3y --parallel 2 >"$dir/serve.log" 2>&1 &
srv=$!
for _ in $(seq 300); do [ -s "$dir/port" ] && break; sleep 0.05; done
[ -s "$dir/port" ] || { echo "serve_openai: the server did not start: $(cat "$dir/serve.log")" >&2; exit 1; }
expected=$("$bin" run -m "$m" -p "Once upon a time" -n 40 --greedy -t 1 --json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["text"], end="")')
cp "$here/tests/openai_client_test.mjs" "$npmdir/"
node "$npmdir/openai_client_test.mjs" "http://127.0.0.1:$(cat "$dir/port")" k3y stories260K.gguf "$expected"
