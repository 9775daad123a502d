#!/usr/bin/env bash
# The whole test suite: release build + ctest, ASan/UBSan build + ctest, and a bounded fuzz run.
# Needs the Debian packages from .ci/install-deps. MESHLM_SHARED points at shared/ (default ../shared).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)
export MESHLM_SHARED="${MESHLM_SHARED:-$(cd .. && pwd)/shared}"
if [ ! -d "$MESHLM_SHARED/models" ]; then
  echo "run_tests: $MESHLM_SHARED/models not found; set MESHLM_SHARED to the shared/ folder" >&2
  exit 1
fi
fuzz_seconds="${MESHLM_FUZZ_SECONDS:-30}"

echo "== release build"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
echo "== release tests"
(cd build && ctest --output-on-failure -j1)

echo "== AddressSanitizer + UndefinedBehaviorSanitizer build"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DMESHLM_SANITIZE=ON -DCMAKE_C_FLAGS="-O1" >/dev/null
cmake --build build-asan -j"$jobs"
echo "== sanitizer tests"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j1)

if [ "$fuzz_seconds" -gt 0 ] && command -v clang >/dev/null; then
  echo "== libFuzzer targets (${fuzz_seconds}s each)"
  CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMESHLM_FUZZ=ON -DMESHLM_TESTS=OFF >/dev/null
  cmake --build build-fuzz -j"$jobs"
  for f in build-fuzz/fuzz_*; do
    [ -x "$f" ] || continue
    name=$(basename "$f")
    corpus="build-fuzz/corpus-$name"
    mkdir -p "$corpus"
    if [ -x "tests/fuzz/seed_$name.sh" ]; then bash "tests/fuzz/seed_$name.sh" "$corpus"; fi
    "$f" -max_total_time="$fuzz_seconds" -max_len=65536 -timeout=10 -print_final_stats=1 "$corpus" 2>&1 | tail -n 12
  done
fi
echo "run_tests: all passed"
