#!/usr/bin/env bash
# Cross-compiles the kernel suites for aarch64 (cmake/aarch64-linux-gnu.cmake, MESHLM_KERNELS_ONLY) and
# runs them under qemu-user twice: on a CPU with the dot product (-cpu max: the neon-dotprod table is
# chosen) and on one without (cortex-a72: the neon table), each time checking the scalar, neon and
# (when present) neon-dotprod tables against the scalar oracle. Needs gcc-aarch64-linux-gnu,
# libc6-dev-arm64-cross, qemu-user and libcunit1-dev:arm64 (.ci/install-deps); exit 77 without them.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in aarch64-linux-gnu-gcc qemu-aarch64; do
  if ! command -v "$tool" >/dev/null; then
    echo "arm_test: $tool not found (Debian: gcc-aarch64-linux-gnu, qemu-user)" >&2
    exit 77
  fi
done
if [ ! -f /usr/lib/aarch64-linux-gnu/pkgconfig/cunit.pc ]; then
  echo "arm_test: CUnit for arm64 not found (dpkg --add-architecture arm64; apt-get install libcunit1-dev:arm64)" >&2
  exit 77
fi
build="${MESHLM_ARM_BUILD:-build-arm}"
cmake -S . -B "$build" -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DMESHLM_KERNELS_ONLY=ON \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)"
# the matmul suite's large shapes take over 15 minutes under emulation; matmul_bits covers its paths
suites='^(kernels|kernels_k|quant|matmul_bits)$'
for cpu in max:neon-dotprod cortex-a72:neon; do
  echo "== qemu-aarch64 -cpu ${cpu%%:*} (kernels_best must be ${cpu##*:})"
  (cd "$build" && QEMU_CPU="${cpu%%:*}" MESHLM_EXPECT_ISA="${cpu##*:}" ctest --output-on-failure -j2 -R "$suites")
done
echo "arm_test: all passed"
