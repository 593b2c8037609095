#!/usr/bin/env bash
# Liger-Kernel for the benchmarks' baseline rows: its wheel (pure Python on Triton) unpacked into bench/vendor/
# (git-ignored), where bench/common.py looks for it. A GPU machine without network gets it from here: run this
# first, then carry bench/vendor along (the device tool's carry option). Usage: bash bench/fetch_liger.sh [VERSION]
set -euo pipefail
VERSION=${1:-0.8.5}
dest=$(cd "$(dirname "$0")" && pwd)/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "liger-kernel==$VERSION"
rm -rf "$dest"
mkdir -p "$dest"
python3 -m zipfile -e "$tmp"/liger_kernel-*.whl "$dest"
echo "liger-kernel $VERSION in $dest"
