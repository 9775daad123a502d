#!/usr/bin/env bash
# Integration test of `meshlm mpi` (the MPI transport itself is checked by ctest transport_mpi, the
# conformance table on 3 ranks):
# `meshlm mpi` on 1-4 ranks giving the same greedy tokens as `meshlm run` on one node.
set -uo pipefail
bin="$(realpath "${1:?usage: mpi_test.sh MESHLM_BIN}")"
here="$(cd "$(dirname "$0")/.." && pwd)"
shared="${MESHLM_SHARED:-$here/../shared}"
if ! command -v mpirun >/dev/null; then
  echo "mpi test: mpirun not found (Debian: openmpi-bin)" >&2
  exit 77
fi
if [ ! -d "$shared/models" ]; then
  echo "mpi test: $shared/models not found; set MESHLM_SHARED" >&2
  exit 1
fi
# Open MPI refuses root without these; local runs need no ssh. Leak checks of an ASan build would
# report MPI's own allocations, so they are off for the ranks.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
mpirun_() { timeout 300 mpirun --allow-run-as-root --oversubscribe --bind-to none "$@"; }
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
pass=0
fail=0

prompt="Once upon a time"
for model in stories260K.gguf synth/synth-dense-Q4_K_M.gguf synth/synth-moe-Q8_0.gguf; do
  m="$shared/models/$model"
  one=$("$bin" run -m "$m" -p "$prompt" -n 24 --greedy --json -t 1 2>/dev/null | grep -o '"tokens":\[[^]]*\]')
  for n in 1 2 3 4; do
    many=$(mpirun_ -np "$n" "$bin" mpi -m "$m" -p "$prompt" -n 24 --greedy --json -t 1 --timeout 20000 2>"$log" |
           grep -o '"tokens":\[[^]]*\]')
    if [ -n "$one" ] && [ "$one" = "$many" ]; then
      echo "mpi: $model on $n rank(s): same tokens as one node"
      pass=$((pass + 1))
    else
      echo "mpi: $model on $n rank(s): MISMATCH one=[$one] mpi=[$many]" >&2
      cat "$log" >&2
      fail=$((fail + 1))
    fi
  done
done

# Uneven speeds, and a failure on every rank (missing model) ends with non-zero status, no hang.
m="$shared/models/stories260K.gguf"
one=$("$bin" run -m "$m" -p "$prompt" -n 24 --greedy --json -t 1 2>/dev/null | grep -o '"tokens":\[[^]]*\]')
many=$(mpirun_ -np 3 "$bin" mpi -m "$m" -p "$prompt" -n 24 --greedy --json -t 1 --speeds 3,1,2 2>"$log" |
       grep -o '"tokens":\[[^]]*\]')
if [ -n "$one" ] && [ "$one" = "$many" ]; then
  echo "mpi: stories260K.gguf on 3 ranks with speeds 3,1,2: same tokens as one node"
  pass=$((pass + 1))
else
  echo "mpi: speeds 3,1,2: MISMATCH one=[$one] mpi=[$many]" >&2
  cat "$log" >&2
  fail=$((fail + 1))
fi
# Pipeline and hybrid layouts: 2 and 3 stages, and 2 stages x 2-rank tensor-parallel groups, with
# prompt micro-batches of 3 tokens. One node run with the same chunks (-b 3) gives the same tokens
# and the same logits, bit for bit (--logits files compared byte by byte).
dir="$(mktemp -d)"
for model in stories260K.gguf synth/synth-dense-Q4_K_M.gguf synth/synth-moe-Q8_0.gguf; do
  m="$shared/models/$model"
  one=$("$bin" run -m "$m" -p "$prompt" -n 16 --greedy --json -t 1 -b 3 --logits "$dir/one.f32" 2>/dev/null |
        grep -o '"tokens":\[[^]]*\]')
  for lay in "2 2" "3 3" "4 2"; do
    set -- $lay
    many=$(mpirun_ -np "$1" "$bin" mpi -m "$m" -p "$prompt" -n 16 --greedy --json -t 1 --pp "$2" --ubatch 3 \
           --timeout 20000 --logits "$dir/many.f32" 2>"$log" | grep -o '"tokens":\[[^]]*\]')
    if [ -n "$one" ] && [ "$one" = "$many" ] && cmp -s "$dir/one.f32" "$dir/many.f32"; then
      echo "mpi: $model on $1 rank(s) as $2 pipeline stages: same tokens and logits as one node"
      pass=$((pass + 1))
    else
      echo "mpi: $model on $1 rank(s) as $2 stages: MISMATCH one=[$one] mpi=[$many]" >&2
      cat "$log" >&2
      fail=$((fail + 1))
    fi
  done
done
rm -rf "$dir"

t0=$(date +%s)
if mpirun_ -np 2 "$bin" mpi -m /nonexistent.gguf -p "$prompt" -n 4 --timeout 5000 >"$log" 2>&1; then
  echo "mpi: a missing model file exited 0" >&2
  fail=$((fail + 1))
elif [ $(( $(date +%s) - t0 )) -gt 60 ]; then
  echo "mpi: a missing model file took more than 60 s to fail" >&2
  fail=$((fail + 1))
else
  echo "mpi: a missing model file fails the run (non-zero exit)"
  pass=$((pass + 1))
fi

# A frozen rank (SIGSTOP) makes the others miss a deadline: the job ends non-zero, it does not hang.
tag="frozen-$$"
m="$shared/models/synth/synth-dense-Q4_K_M.gguf"
# The victim is a rank: its command line starts with the binary's path (timeout and mpirun carry the
# same arguments after their own names). It is stopped once all three ranks run and have started.
stopped="$(mktemp)"
( victim=
  for _ in $(seq 1 150); do
    [ "$(pgrep -f "^$bin mpi -m .* -p $tag" | wc -l)" -ge 3 ] && { victim=$(pgrep -f "^$bin mpi -m .* -p $tag" | tail -1); break; }
    sleep 0.2
  done
  [ -n "$victim" ] || exit 0
  sleep 1
  kill -STOP "$victim" && date +%s >"$stopped"
  sleep 25
  kill -CONT "$victim" 2>/dev/null ) &
freezer=$!
# The other ranks must notice within 20 s of the stop (their deadline is 3 s) and fail the job. When
# it is seen is read off the log as it is written: Open MPI's mpirun has been seen to hang after the
# ranks' MPI_ABORT while a rank was stopped, so the end of mpirun is not the measure, and it is
# killed 10 s after the failure if it is still there.
timeout -k 5 90 mpirun --allow-run-as-root --oversubscribe --bind-to none -np 3 "$bin" mpi -m "$m" -p "$tag" -n 19000 -c 20000 --ignore-eos --greedy --json -t 1 --timeout 3000 \
   >"$log" 2>&1 &
job=$!
seen=
for _ in $(seq 1 900); do
  grep -q "deadline passed" "$log" 2>/dev/null && { seen=$(date +%s); break; }
  kill -0 "$job" 2>/dev/null || break
  sleep 0.1
done
for _ in $(seq 1 100); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
hung=0
if kill -0 "$job" 2>/dev/null; then
  hung=1
  pkill -KILL -P "$job" 2>/dev/null
  kill -KILL "$job" 2>/dev/null
fi
wait "$job"
rc=$?
pkill -KILL -f "^$bin mpi -m .* -p $tag" 2>/dev/null # a rank left behind (the stopped one)
if [ "$rc" = 0 ]; then
  echo "mpi: a frozen rank: the run exited 0" >&2
  fail=$((fail + 1))
elif [ ! -s "$stopped" ]; then
  echo "mpi: a frozen rank: no rank was found to stop" >&2
  fail=$((fail + 1))
elif [ -z "$seen" ] || [ $(( seen - $(cat "$stopped") )) -gt 20 ]; then
  echo "mpi: a frozen rank: no deadline failure within 20 s of the stop" >&2
  cat "$log" >&2
  fail=$((fail + 1))
else
  echo "mpi: a frozen rank: the others hit their deadline $(( seen - $(cat "$stopped") )) s after the stop and the run fails$([ "$hung" = 1 ] && echo " (mpirun itself hung after the ranks' MPI_ABORT and was killed)")"
  pass=$((pass + 1))
fi
kill "$freezer" 2>/dev/null
wait "$freezer" 2>/dev/null
rm -f "$stopped"

echo "mpi: $pass passed, $fail failed"
[ "$fail" = 0 ]
