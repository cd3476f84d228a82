#!/usr/bin/env bash
# Runs our tool and qemu-img side by side on the same images and prints the
# ratios (one run, so the machine's noise hits both alike). Not part of the
# test suite: `scripts/bench.sh [SIZE_MIB]` (default 256).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-256}
command -v hyperfine >/dev/null || { apt-get install -y -qq hyperfine >/dev/null; }
cargo build --release -q -p qcowkit-std
q2=$PWD/target/release/qcow2
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"
head -c "$((size_mib << 20))" /dev/urandom > random.raw
python3 - "$size_mib" <<'PY'
import random, sys
random.seed(1)
words = [''.join(random.choice('abcdefghijklmnop') for _ in range(random.randint(2, 9))).encode() for _ in range(2000)]
out = bytearray(); n = int(sys.argv[1]) << 20
while len(out) < n:
    out += b' '.join(random.choice(words) for _ in range(4000)) + b'\n'
open('text.raw', 'wb').write(out[:n])
PY
qemu-img convert -f raw -O qcow2 random.raw plain.qcow2
qemu-img convert -c -f raw -O qcow2 text.raw zlib.qcow2
qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd text.raw zstd.qcow2
qemu-img create -q -f qcow2 empty.qcow2 1G
run() { hyperfine -N -w 1 -r "${RUNS:-5}" "$@" 2>&1 | grep -E 'Benchmark|Time \(mean|faster than'; }
echo "== convert -O raw (uncompressed, ${size_mib} MiB)"
run -p 'rm -f o.raw' "$q2 convert -O raw plain.qcow2 o.raw" "qemu-img convert -O raw plain.qcow2 o.raw"
echo "== convert -O raw (zlib clusters)"
run -p 'rm -f o.raw' "$q2 convert -O raw zlib.qcow2 o.raw" "qemu-img convert -O raw zlib.qcow2 o.raw"
echo "== convert -O raw (zstd clusters)"
run -p 'rm -f o.raw' "$q2 convert -O raw zstd.qcow2 o.raw" "qemu-img convert -O raw zstd.qcow2 o.raw"
echo "== convert -O qcow2 -c (zlib)"
run -p 'rm -f o.qcow2' "$q2 convert -f raw -O qcow2 -c text.raw o.qcow2" "qemu-img convert -f raw -O qcow2 -c text.raw o.qcow2"
echo "== bench: 50000 sequential 4 KiB writes into a new image"
run -p 'cp empty.qcow2 w.qcow2' "$q2 bench -q -w -c 50000 w.qcow2" "qemu-img bench -q -w -c 50000 w.qcow2"
echo "== bench: 200000 sequential 4 KiB reads"
run "$q2 bench -q -c 200000 plain.qcow2" "qemu-img bench -q -c 200000 plain.qcow2"
