#!/usr/bin/env bash
# Seeds the wire-decoder fuzzer's corpus ($1) with valid messages written by the fuzz_msg binary itself
# (it sits next to the corpus directory: build-fuzz/corpus-fuzz_msg -> build-fuzz/fuzz_msg).
set -euo pipefail
corpus="$1"
bin="${2:-$(dirname "$corpus")/fuzz_msg}"
[ -x "$bin" ] || exit 0
MESHLM_FUZZ_MSG_SEEDS="$corpus" "$bin" -runs=0 "$corpus" >/dev/null 2>&1 || true
exit 0
