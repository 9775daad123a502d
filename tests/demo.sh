#!/usr/bin/env bash
# The first thing to run: one generation on a small cluster of two local worker processes, each holding
# one pipeline stage of the model, with no download (a shared model when present, else gen-model writes one).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${MESHLM_BIN:-build/meshlm}"   # the tests point it at the build under test
shared="${MESHLM_SHARED:-$(cd .. && pwd)/shared}"
model="$shared/models/stories260K.gguf"
if [ ! -f "$model" ]; then
  model="$(dirname "$bin")/demo-tiny.gguf"   # beside the program, in the build folder
  [ -f "$model" ] || "$bin" gen-model "$model" --preset tiny --quant Q8_0 --seed 1
fi
echo "meshlm demo: $(basename "$model") split over 2 worker processes on this machine (--local 2 --pp 2)" >&2
exec "$bin" run -m "$model" -p "Once upon a time" -n 64 --seed 1 --local 2 --pp 2 --keep-all --show-plan "$@"
