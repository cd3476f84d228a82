#!/usr/bin/env bash
# Firmware test: images with a partition table, file systems and known
# content, made with qemu-img (plain, 4 KiB clusters so that the disk spans
# 12 L2 tables, extended L2, a backing chain, zstd-compressed), are read by
# the firmware under qemu-system-arm; its output must match what the host
# computes from `qemu-img convert -O raw` (the sha256 of the WHOLE disk) and
# what blkid says of the partitions. The plain image also runs with the
# firmware's heap capped at 16 KiB (frugal mode), an image whose primary GPT
# header is damaged is read through the backup, and a 2 TiB image whose L1
# table does not fit that heap must be refused with an error.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"

# A 24 MiB raw disk: GPT (protective MBR, headers, entries), Linux swap in
# partition 1, ext4 in partition 2, and some content.
python3 - <<'PY'
import struct, uuid, zlib
size = 24 << 20
d = bytearray(size)
# Protective MBR.
d[446 + 4] = 0xEE
struct.pack_into('<II', d, 446 + 8, 1, size // 512 - 1)
d[510:512] = b'\x55\xaa'
# Two GPT partitions.
entries = bytearray(128 * 128)
def entry(i, first, last, name, kind):
    e = bytearray(128)
    e[0:16] = uuid.UUID(kind).bytes_le       # type GUID
    e[16:32] = bytes([i + 1] * 16)           # unique GUID
    struct.pack_into('<QQ', e, 32, first, last)
    n = name.encode('utf-16-le')
    e[56:56 + len(n)] = n
    entries[i * 128:(i + 1) * 128] = e
entry(0, 2048, 10239, 'boot', '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F')   # Linux swap
entry(1, 10240, size // 512 - 34, 'root', '0FC63DAF-8483-4772-8E79-3D69D8477DE4')  # Linux filesystem
def header(my, alt, entries_lba):
    hdr = bytearray(92)
    struct.pack_into('<8sIIIIQQQQ16sQIII', hdr, 0, b'EFI PART', 0x10000, 92, 0, 0,
                     my, alt, 34, size // 512 - 34, bytes(range(16)), entries_lba, 128, 128,
                     zlib.crc32(entries))
    struct.pack_into('<I', hdr, 16, zlib.crc32(hdr))
    return hdr
last = size // 512 - 1
d[512:512 + 92] = header(1, last, 2)
d[1024:1024 + len(entries)] = entries
d[(last - 32) * 512:(last - 32) * 512 + len(entries)] = entries
d[last * 512:last * 512 + 92] = header(last, 1, last - 32)
open('disk.raw', 'wb').write(d)
PY
# The file systems, made by their tools.
truncate -s 4M swap.img
mkswap -q -L fw-swap -U 0b1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 swap.img >/dev/null 2>&1
dd if=swap.img of=disk.raw bs=1M seek=1 conv=notrunc status=none
mkfs.ext4 -q -F -L fw-root -E offset=$((10240 * 512)),nodiscard disk.raw $(((24 << 20) / 1024 - 5120 - 17))k
# Content spread over the disk (every 2 MiB L2 table of a 4 KiB-cluster
# image holds some), outside the file systems' superblocks.
python3 - <<'PY'
import random
random.seed(7)
with open('disk.raw', 'r+b') as f:
    for off in (2 << 20, 3 << 20, 9 << 20, 13 << 20, 17 << 20, 21 << 20, 23 << 20):
        f.seek(off)
        f.write(bytes(random.getrandbits(8) for _ in range(200000)))
    f.seek(700000)
    f.write(b'bootloader text ' * 3125)
PY
for want in 'TYPE=swap' 'LABEL=fw-swap'; do
  blkid -p -o export -O $((2048 * 512)) -S $((8192 * 512)) disk.raw | grep -qx "$want" || { echo "FAIL: blkid: no $want in partition 1"; exit 1; }
done
blkid -p -o export -O $((10240 * 512)) disk.raw | grep -qx 'LABEL=fw-root' || { echo "FAIL: blkid: no fw-root in partition 2"; exit 1; }
ext4_uuid=$(blkid -p -o export -O $((10240 * 512)) disk.raw | sed -n 's/^UUID=//p')

qemu-img convert -q -f raw -O qcow2 disk.raw plain.qcow2
qemu-img convert -q -f raw -O qcow2 -o cluster_size=4096 disk.raw small.qcow2
qemu-img convert -q -f raw -O qcow2 -o extended_l2=on,cluster_size=32k disk.raw extl2.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd disk.raw zstd.qcow2
mkdir -p chain
qemu-img convert -q -f raw -O qcow2 disk.raw chain/base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 chain/mid.qcow2
qemu-io -f qcow2 -c 'write -P 0x42 100k 300k' chain/mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 chain/top.qcow2
qemu-io -f qcow2 -c 'write -P 0x43 900k 100k' chain/top.qcow2 >/dev/null

# A copy whose primary GPT header is zeroed: read through the backup.
qemu-img create -q -f qcow2 -b plain.qcow2 -F qcow2 nogpt.qcow2
qemu-io -f qcow2 -c 'write -z 512 512' nogpt.qcow2 >/dev/null

fail=0
run() {
  local image=$1 header=$2; shift 2
  local expect_size expect_sha out want
  qemu-img convert -O raw "$image" ref.raw
  expect_size=$(stat -c %s ref.raw)
  expect_sha=$(sha256sum ref.raw | cut -d' ' -f1)
  if ! out=$(timeout 900 "$root/scripts/firmware-demo.sh" "$@" "$work/$image" 2>&1); then
    echo "FAIL $image $*: firmware exited non-zero:"; echo "$out"; fail=1; return
  fi
  for want in "virtual-size: $expect_size" "sha256-disk: $expect_sha" \
      "partition table: gpt, $header header, 512-byte sectors, disk guid 03020100-0504-0706-0809-0A0B0C0D0E0F" \
      "gpt partition 1: first 2048 last 10239 name boot type Linux swap" \
      "partition 1 filesystem: Linux swap version 1 label \"fw-swap\" uuid 0b1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 block-size 4096 size 4194304" \
      "gpt partition 2: first 10240 last $(((24 << 20) / 512 - 34)) name root type Linux filesystem" \
      "partition 2 filesystem: ext4 label \"fw-root\" uuid $ext4_uuid block-size 1024 size $((((24 << 20) / 1024 - 5120 - 17) * 1024))"; do
    if ! grep -q -F -- "$want" <<<"$out"; then
      echo "FAIL $image $*: no line starting \"$want\" in:"; echo "$out"; fail=1; return
    fi
  done
  echo "ok $image $* ($(stat -c %s ref.raw) bytes hashed, $header GPT header)"
}
run plain.qcow2 primary
run plain.qcow2 primary --small-heap
run small.qcow2 primary
run small.qcow2 primary --small-heap
run extl2.qcow2 primary
run zstd.qcow2 primary
run chain/top.qcow2 primary
run nogpt.qcow2 backup
# A malformed image: non-zero exit with the error printed.
head -c 104 plain.qcow2 > bad.qcow2; printf '\x00\x00\x00\x1f' | dd of=bad.qcow2 bs=1 seek=20 conv=notrunc 2>/dev/null
if out=$(timeout 900 "$root/scripts/firmware-demo.sh" "$work/bad.qcow2" 2>&1) || ! grep -q "error: .*cluster_bits 31" <<<"$out"; then
  echo "FAIL bad.qcow2: expected an error exit naming cluster_bits; got:"; echo "$out"; fail=1
else
  echo "ok bad.qcow2 refused: $(grep error <<<"$out")"
fi
# An image whose L1 table (32 KiB for 2 TiB) is larger than the small heap:
# an error naming the table, not an allocation abort.
qemu-img create -q -f qcow2 big.qcow2 2T
if out=$(timeout 900 "$root/scripts/firmware-demo.sh" --small-heap "$work/big.qcow2" 2>&1) \
   || ! grep -q "error: .*cannot allocate 32768 bytes for the L1 table" <<<"$out" \
   || grep -q "panic" <<<"$out"; then
  echo "FAIL big.qcow2 --small-heap: expected an error exit naming the L1 table; got:"; echo "$out"; fail=1
else
  echo "ok big.qcow2 --small-heap refused: $(grep error <<<"$out")"
fi
exit $fail
