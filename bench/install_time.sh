#!/usr/bin/env bash
# Time `make install` as a fresh machine runs it: a clean clone, a new venv, pip's cache off.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/illust2vec"
cd "$work/illust2vec"
start=$(date +%s)
PIP_NO_CACHE_DIR=1 make install >"$work/install.log" 2>&1 || { tail -20 "$work/install.log"; exit 1; }
end=$(date +%s)
echo "make install on a clean clone: $((end - start)) s"
