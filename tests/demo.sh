#!/usr/bin/env bash
# One generation with no download: a shared model when present, else a model written by gen-model.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${MESHLM_SHARED:-$(cd .. && pwd)/shared}"
model="$shared/models/stories260K.gguf"
if [ ! -f "$model" ]; then
  model=build/demo-tiny.gguf
  [ -f "$model" ] || build/meshlm gen-model "$model" --preset tiny --quant Q8_0 --seed 1
fi
exec build/meshlm run -m "$model" -p "Once upon a time" -n 64 --seed 1 "$@"
