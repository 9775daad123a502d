#!/usr/bin/env bash
# Seeds the tokenizer fuzzer's corpus with the llama.cpp tokenizer test strings.
set -euo pipefail
corpus="$1"
shared="${MESHLM_SHARED:-../shared}"
i=0
for f in "$shared"/models/vocab/*.inp; do
  [ -f "$f" ] || continue
  cp "$f" "$corpus/inp-$i"
  i=$((i + 1))
done
exit 0
