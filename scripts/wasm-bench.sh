#!/usr/bin/env bash
# Throughput (MiB/s of guest size) of the wasm package's converters in a
# dedicated worker of headless Chromium: File in, OPFS sync access handle
# out. Not part of the test suite.
#
#   scripts/wasm-bench.sh [--size-mib N] [--runs N] [--seed N] [--native]
#
# Builds wasm/pkg (wasm/build.sh) when it is missing or older than its
# sources, makes a deterministic mixed raw disk (per 64 KiB cluster: 60%
# random bytes, 10% text, 30% zeros) and qemu-img's plain, zlib- and
# zstd-compressed qcow2 copies of it in a temporary directory, then runs
# wasm/bench/throughput.mjs, which times the conversions, verifies every
# output and prints the table. --native adds `target/release/qcow2 convert`
# on the same images as a reference column.
#
# Environment: CHROMIUM (default /usr/bin/chromium), WASM_BENCH_TIMEOUT
# (seconds for the whole browser part, default 3600), TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

size_mib=256
runs=3
seed=1
native=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) size_mib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --native) native=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

need() { command -v "$1" >/dev/null 2>&1; }

# ---------- tools (installed only when missing, as in test-all.sh) ----------
if ! need qemu-img; then
  echo "== installing qemu-utils"
  apt-get update -qq && apt-get install -y -qq qemu-utils
fi
if ! need chromium; then
  echo "== installing chromium"
  apt-get update -qq && apt-get install -y -qq chromium
fi
if [ ! -d web-demo/node_modules/playwright-core ]; then
  echo "== installing playwright-core (web-demo's locked devDependency)"
  (cd web-demo && timeout 600 npm ci --no-audit --no-fund)
fi

# ---------- the wasm package: rebuilt when missing or stale ----------
wasm_out=wasm/pkg/qcowkit_wasm_bg.wasm
why=""
if [ ! -f "$wasm_out" ] || [ ! -f wasm/pkg/qcowkit_wasm.js ]; then
  why="wasm/pkg is missing"
else
  # Any source of the package newer than the built module.
  stale=$(find wasm/src wasm/js wasm/Cargo.toml wasm/Cargo.lock wasm/build.sh \
    core/src core/Cargo.toml options/src options/Cargo.toml \
    -newer "$wasm_out" -print -quit)
  [ -z "$stale" ] || why="$stale is newer than wasm/pkg"
fi
if [ -n "$why" ]; then
  echo "== building wasm/pkg ($why)"
  if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
  fi
  if [ "$(wasm-pack --version 2>/dev/null | awk '{print $2}')" != "0.15.1" ]; then
    echo "== installing wasm-pack 0.15.1"
    cargo install wasm-pack --version 0.15.1 --locked
  fi
  timeout 1800 bash wasm/build.sh
else
  echo "== wasm/pkg is up to date"
fi

native_args=()
if [ "$native" = 1 ]; then
  echo "== building the native CLI (cargo build --release -p qcowkit-std)"
  timeout 1800 cargo build --release -q -p qcowkit-std
  native_args=(--native "$root/target/release/qcow2")
fi

# ---------- images, in a temporary directory removed on exit ----------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/qcowkit-wasm-bench-XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "== making a ${size_mib} MiB mixed raw disk (seed ${seed}) in $tmp"
timeout 600 python3 - "$tmp/disk.raw" "$size_mib" "$seed" <<'EOF'
# Deterministic for a given seed: every byte comes from random.Random(seed).
import hashlib, random, sys
path, size_mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
         for _ in range(2000)]
text = b" ".join(rng.choice(words) for _ in range(30000))  # ~190 KB of "prose"
cluster = 65536
digest = hashlib.sha256()
with open(path, "wb") as f:
    for _ in range(size_mib * 1024 * 1024 // cluster):
        r = rng.random()
        if r < 0.6:
            block = rng.randbytes(cluster)          # incompressible
        elif r < 0.7:
            at = rng.randrange(len(text) - cluster)
            block = text[at:at + cluster]           # compresses well
        else:
            block = bytes(cluster)                  # zeros (left unallocated)
        digest.update(block)
        f.write(block)
print(f"   disk.raw sha256 {digest.hexdigest()}")
EOF

echo "== qemu-img: plain, zlib- and zstd-compressed qcow2 copies"
(
  cd "$tmp"
  timeout 600 qemu-img convert -f raw -O qcow2 disk.raw plain.qcow2
  timeout 600 qemu-img convert -c -f raw -O qcow2 disk.raw zlib.qcow2
  timeout 600 qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd disk.raw zstd.qcow2
  ls -l disk.raw plain.qcow2 zlib.qcow2 zstd.qcow2 | awk '{printf "   %-12s %6.1f MiB\n", $NF, $5 / 1048576}'
)

echo "== timing in headless Chromium"
timeout "${WASM_BENCH_TIMEOUT:-3600}" node wasm/bench/throughput.mjs \
  --dir "$tmp" --runs "$runs" "${native_args[@]}"
