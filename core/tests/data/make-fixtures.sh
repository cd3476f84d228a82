#!/usr/bin/env bash
# Makes the small qcow2 images the core's own tests read (core/tests/*.rs),
# with qemu-img/qemu-io, so that those tests run without qemu. Each image
# NAME.qcow2 is stored zstd-compressed as NAME.qcow2.zst next to
# NAME.raw.zst, its guest contents as `qemu-img convert -O raw` gives them.
# Rerun after changing it: scripts are deterministic (fixed patterns), so
# the outputs only change when this script or qemu-img does.
#   core/tests/data/make-fixtures.sh
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"
io() { local img=$1; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -f qcow2 "${a[@]}" "$img" >/dev/null; }

# v3, 512-byte clusters: data, an unaligned write, zeros, a discard.
qemu-img create -q -f qcow2 -o cluster_size=512 plain-512.qcow2 256K
io plain-512.qcow2 "write -P 0x11 0 4k" "write -P 0x22 10k 3k" "write -P 0x23 10500 100" \
   "write -z 100k 8k" "write -P 0x33 200k 20k" "discard 205k 4k"

# v2 (compat=0.10), 4 KiB clusters.
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k v2-4k.qcow2 1M
io v2-4k.qcow2 "write -P 0x41 0 12k" "write -P 0x42 300k 5000" "write -z 4k 4k"

# Extended L2, 16 KiB clusters (512-byte subclusters).
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k extl2-16k.qcow2 1M
io extl2-16k.qcow2 "write -P 0x44 0 2k" "write -P 0x45 5000 3000" "write -z 16k 16k" \
   "write -P 0x46 40k 40k" "write -z 50k 1k" "discard 72k 4k"

# Compressed clusters (zlib and zstd) from a raw disk with zero clusters.
python3 - <<'PY'
data = bytearray(512 * 1024)
for i in range(0, len(data), 4096):
    if (i // 4096) % 5 == 3:
        continue  # a zero cluster
    line = ("cluster %d says hello; " % (i // 4096)).encode()
    data[i:i + 4096] = (line * (4096 // len(line) + 1))[:4096]
data[-1000:] = bytes(range(256)) * 3 + bytes(232)
open("text.raw", "wb").write(data)
PY
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k text.raw zlib-4k.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k,compression_type=zstd text.raw zstd-4k.qcow2
io zlib-4k.qcow2 "write -P 0x47 8k 100"

# A backing chain: base <- top (relative name), top overrides and zeroes.
qemu-img create -q -f qcow2 -o cluster_size=4k base-4k.qcow2 1M
io base-4k.qcow2 "write -P 0x51 0 64k" "write -P 0x52 512k 64k"
qemu-img create -q -f qcow2 -o cluster_size=4k -b base-4k.qcow2 -F qcow2 top-4k.qcow2
io top-4k.qcow2 "write -P 0x61 4k 4k" "write -z 16k 8k" "write -P 0x62 514k 100"

# An internal snapshot, then changes (clusters shared with the snapshot).
qemu-img create -q -f qcow2 -o cluster_size=4k snap-4k.qcow2 1M
io snap-4k.qcow2 "write -P 0x71 0 64k"
qemu-img snapshot -c before snap-4k.qcow2
io snap-4k.qcow2 "write -P 0x72 8k 4k"

for img in plain-512 v2-4k extl2-16k zlib-4k zstd-4k base-4k top-4k snap-4k; do
  qemu-img check -q "$img.qcow2"
  qemu-img convert -q -O raw "$img.qcow2" "$img.raw"
  zstd -q -19 -f "$img.qcow2" -o "$out/$img.qcow2.zst"
  zstd -q -19 -f "$img.raw" -o "$out/$img.raw.zst"
done
ls -l "$out"
