#!/usr/bin/env bash
# Bytes per token on the storage link: `meshlm run` with --kv-device storage:EP against a `meshlm kvstore`
# at contexts of about N tokens (a prompt of N tokens, then -n generated), beside the host device.
# usage: tests/bench/kvstore_bench.sh MESHLM MODEL.gguf [N ...]   (default N: 1024 4096)
# Prints one markdown row per context: prompt tokens, link KiB/token, what shipping the KV would move,
# kvstore ms/token (measured), flash ms/token (modelled at --internal-bw 2000 MB/s), and both devices'
# decode tokens/s (this machine's; noisy when other jobs share it); the tokens must be the same.
set -euo pipefail
bin="$1"; model="$2"; shift 2
ctxs=("$@"); [ ${#ctxs[@]} -gt 0 ] || ctxs=(1024 4096)
gen=${GEN:-16}
threads=${THREADS:-1}
work=$(mktemp -d)
trap 'kill $kv 2>/dev/null; wait $kv 2>/dev/null; rm -rf "$work"' EXIT
"$bin" kvstore --listen "ipc://$work/kv.sock" --dir "$work/kv" --internal-bw 2000 2>"$work/kv.log" & kv=$!
echo "| context (prompt tokens) | link KiB/token | shipping the KV, MiB/token | kvstore ms/token (measured) | flash ms/token (modelled, 2000 MB/s) | decode t/s storage | decode t/s host | same tokens |"
echo "|---|---|---|---|---|---|---|---|"
for n in "${ctxs[@]}"; do
    # " a" is one token each in llama's vocabulary: the prompt is BOS + n - 1 of them
    prompt=$(printf 'a%.0s ' $(seq 1 $((n - 1))))
    c=$((n + gen + 8))
    before=$(wc -l <"$work/kv.log")
    "$bin" run -m "$model" -p "$prompt" -n "$gen" -c "$c" -t "$threads" --kv-device "storage:ipc://$work/kv.sock" \
        >"$work/out.s" 2>"$work/err.s"
    "$bin" run -m "$model" -p "$prompt" -n "$gen" -c "$c" -t "$threads" >"$work/out.h" 2>"$work/err.h"
    sleep 0.2
    line=$(tail -n +"$((before + 1))" "$work/kv.log" | grep 'decode tokens' | tail -1)
    np=$(grep -o 'prompt [0-9]* tokens' "$work/err.s" | awk '{print $2}')
    ts=$(grep -o 'generation [0-9]* tokens in [0-9.]* ms ([0-9.]* tokens/s)' "$work/err.s" | sed 's/.*(\([0-9.]*\) tokens.*/\1/')
    th=$(grep -o 'generation [0-9]* tokens in [0-9.]* ms ([0-9.]* tokens/s)' "$work/err.h" | sed 's/.*(\([0-9.]*\) tokens.*/\1/')
    link=$(sed 's/.*link \([0-9.]*\) KiB.*/\1/' <<<"$line")
    ship=$(sed 's/.*against \([0-9.]*\) MiB.*/\1/' <<<"$line")
    kms=$(sed 's/.*kvstore \([0-9.]*\) ms.*/\1/' <<<"$line")
    fms=$(sed 's/.*flash reads \([0-9.]*\) ms.*/\1/' <<<"$line")
    same=no; cmp -s "$work/out.s" "$work/out.h" && same=yes
    echo "| ~$n ($np) | $link | $ship | $kms | $fms | $ts | $th | $same |"
done
