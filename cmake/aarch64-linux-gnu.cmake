# CMake toolchain: cross-compile for 64-bit Arm Linux with Debian's gcc-aarch64-linux-gnu; ctest runs the
# programs under qemu-user (QEMU_CPU=max | cortex-a72 | ... picks the emulated CPU).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
# headers and libraries of the target: the cross libc (libc6-dev-arm64-cross) and multiarch arm64
# packages (e.g. libcunit1-dev:arm64 in /usr/lib/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu /usr/lib/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
# pkg-config answers for arm64 (.pc files of the :arm64 packages), never for the build machine
set(ENV{PKG_CONFIG_LIBDIR} /usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig)
set(ENV{PKG_CONFIG_SYSROOT_DIR} /)
# ctest runs the programs under qemu-user: the loader and libc from the cross libc, the arm64
# multiarch libraries (libcunit) from /usr/lib/aarch64-linux-gnu
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/lib/aarch64-linux-gnu)
