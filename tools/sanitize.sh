#!/usr/bin/env bash
# Builds csrc/ with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# NCFAST_SANITIZE) and runs the C++-path tests against that build. Any report fails the run.
# Usage: tools/sanitize.sh [extra pytest args]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${NCFAST_SANITIZE_DIR:-$(mktemp -d)}"
mkdir -p "$work"
cmake -S "$repo" -B "$work/build" -DNCFAST_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python)" >"$work/configure.log"
cmake --build "$work/build" -j 2 >"$work/build.log"

# A package tree with the sanitized extension beside the sources.
rm -rf "$work/pkg" && mkdir -p "$work/pkg"
cp -r "$repo/ncfast" "$work/pkg/ncfast"
cp -r "$repo/triton_kernels" "$work/pkg/ncfast/triton_kernels"
cp "$work"/build/_C*.so "$work/pkg/ncfast/"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export TRITON_INTERPRET=0
cd "$repo"
python tools/sanitized_pytest.py "$work/pkg" "$@"
