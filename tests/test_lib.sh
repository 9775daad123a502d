# Shared by the shell tests: sourced after setting NAME (the test's name in its lines) and bin.
# Gives shared, dir (a temporary folder), pids (killed at exit), check DESCRIPTION STATUS [DETAIL].
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared="${MESHLM_SHARED:-$here/../shared}"
dir="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
pass=0 fail=0
check() { if [ "$2" = 0 ]; then echo "$NAME: $1"; pass=$((pass + 1)); else echo "$NAME: FAILED: $1 ${3:-}" >&2; fail=$((fail + 1)); fi; }
# The summary line and the exit status.
finish() { echo "$NAME: $pass passed, $fail failed"; [ "$fail" = 0 ]; }
