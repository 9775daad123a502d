#!/usr/bin/env bash
# Runs CUnit suites with one kernel table forced (MESHLM_ISA) and checks that the process really chose it.
# Usage: isa_test.sh MESHLM_TESTS ISA SUITE...   (exit 77 = this CPU lacks the ISA)
set -euo pipefail
bin="$1"
isa="$2"
shift 2
case "$isa" in
  scalar) ;;
  avx2) grep -qw avx2 /proc/cpuinfo && grep -qw f16c /proc/cpuinfo && grep -qw fma /proc/cpuinfo || exit 77 ;;
  avx512) for f in avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16; do grep -qw "$f" /proc/cpuinfo || exit 77; done ;;
  *) echo "isa_test: unknown ISA $isa" >&2; exit 2 ;;
esac
# test_kernels' "best_table" asserts kernels_best() is MESHLM_EXPECT_ISA
MESHLM_ISA="$isa" MESHLM_EXPECT_ISA="$isa" exec "$bin" "$@"
