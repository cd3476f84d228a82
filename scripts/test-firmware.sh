#!/usr/bin/env bash
# Firmware test: images with a partition table and known content, made with
# qemu-img (plain, extended L2, a backing chain, zstd-compressed), are read by
# the firmware under qemu-system-arm; its output must match what the host
# computes from `qemu-img convert -O raw`. The plain image also runs with the
# firmware's heap capped at 16 KiB (frugal mode), and a 2 TiB image whose L1
# table does not fit that heap must be refused with an error.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$work"

# A 16 MiB raw disk: GPT (protective MBR, header, entries) and some content.
python3 - <<'PY'
import struct, zlib, random
size = 16 << 20
d = bytearray(size)
# Protective MBR.
d[446 + 4] = 0xEE
struct.pack_into('<II', d, 446 + 8, 1, size // 512 - 1)
d[510:512] = b'\x55\xaa'
# Two GPT partitions.
entries = bytearray(128 * 128)
def entry(i, first, last, name):
    e = bytearray(128)
    e[0:16] = bytes(range(1, 17))            # type GUID (any non-zero)
    e[16:32] = bytes([i + 1] * 16)           # unique GUID
    struct.pack_into('<QQ', e, 32, first, last)
    n = name.encode('utf-16-le')
    e[56:56 + len(n)] = n
    entries[i * 128:(i + 1) * 128] = e
entry(0, 2048, 10239, 'boot')
entry(1, 10240, size // 512 - 34, 'root')
hdr = bytearray(92)
struct.pack_into('<8sIIIIQQQQ16sQIII', hdr, 0, b'EFI PART', 0x10000, 92, 0, 0,
                 1, size // 512 - 1, 34, size // 512 - 34, bytes(16), 2, 128, 128,
                 zlib.crc32(entries))
struct.pack_into('<I', hdr, 16, zlib.crc32(hdr))
d[512:512 + 92] = hdr
d[1024:1024 + len(entries)] = entries
random.seed(7)
for off in (1 << 20, 3 << 20, 9 << 20):
    d[off:off + 200000] = bytes(random.getrandbits(8) for _ in range(200000))
d[700000:750000] = b'bootloader text ' * 3125
open('disk.raw', 'wb').write(d)
PY

qemu-img convert -q -f raw -O qcow2 disk.raw plain.qcow2
qemu-img convert -q -f raw -O qcow2 -o extended_l2=on,cluster_size=32k disk.raw extl2.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd disk.raw zstd.qcow2
mkdir -p chain
qemu-img convert -q -f raw -O qcow2 disk.raw chain/base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 chain/mid.qcow2
qemu-io -f qcow2 -c 'write -P 0x42 100k 300k' chain/mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 chain/top.qcow2
qemu-io -f qcow2 -c 'write -P 0x43 900k 200k' chain/top.qcow2 >/dev/null

fail=0
run() {
  local image=$1; shift
  local expect_size expect_sha out
  qemu-img convert -O raw "$image" ref.raw
  expect_size=$(stat -c %s ref.raw)
  expect_sha=$(head -c 1048576 ref.raw | sha256sum | cut -d' ' -f1)
  if ! out=$(timeout 900 "$root/scripts/firmware-demo.sh" "$@" "$work/$image" 2>&1); then
    echo "FAIL $image $*: firmware exited non-zero:"; echo "$out"; fail=1; return
  fi
  if ! grep -qx "virtual-size: $expect_size" <<<"$out" \
     || ! grep -qx "sha256-first-mib: $expect_sha" <<<"$out" \
     || ! grep -q "gpt partition 2: first 10240" <<<"$out"; then
    echo "FAIL $image $*: expected size $expect_size, sha $expect_sha and the GPT; got:"; echo "$out"; fail=1; return
  fi
  echo "ok $image $*"
}
run plain.qcow2
run plain.qcow2 --small-heap
run extl2.qcow2
run zstd.qcow2
run chain/top.qcow2
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
