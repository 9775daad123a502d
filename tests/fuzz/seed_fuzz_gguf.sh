#!/usr/bin/env bash
# Seeds the GGUF fuzzer's corpus with the first 64 KiB of a few shared models.
set -euo pipefail
corpus="$1"
shared="${MESHLM_SHARED:-../shared}"
for f in stories260K.gguf llama-2-tiny-random.gguf derived/stories260K-Q4_0.gguf \
         synth/synth-dense-Q4_K_M.gguf vocab/ggml-vocab-gpt-2.gguf legacy/tinyllamas-stories-260k-f32.gguf; do
  [ -f "$shared/models/$f" ] && head -c 65536 "$shared/models/$f" > "$corpus/$(basename "$f")"
done
exit 0
