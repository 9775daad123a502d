#!/usr/bin/env bash
# The transport conformance table over MPI: `meshlm_tests transport` with MESHLM_TRANSPORT_MPI=1 on 3 ranks under mpirun (exit 77 = no mpirun).
set -uo pipefail
tests="$(realpath "${1:?usage: transport_mpi.sh MESHLM_TESTS_BIN}")"
if ! command -v mpirun >/dev/null; then
  echo "transport mpi: mpirun not found (Debian: openmpi-bin)" >&2
  exit 77
fi
# Open MPI refuses root without these; leak checks of an ASan build would report MPI's own allocations.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
n=3
MESHLM_TRANSPORT_MPI=1 timeout 300 mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$n" \
  "$tests" transport >"$log" 2>&1
rc=$?
cat "$log"
# every rank ran the table and found nothing wrong
ok=$(grep -c "^transport mpi rank [0-9]* of $n: [1-9][0-9]* checks, 0 failures" "$log")
if [ "$rc" = 0 ] && [ "$ok" = "$n" ]; then
  echo "transport mpi: the conformance table passed on $n ranks"
  exit 0
fi
echo "transport mpi: FAILED (mpirun exit $rc, $ok of $n ranks clean)" >&2
exit 1
