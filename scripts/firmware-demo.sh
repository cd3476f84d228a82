#!/usr/bin/env bash
# Builds the Cortex-M4 firmware and runs it under qemu-system-arm (MPS2
# AN386) on IMAGE: it prints the partition table, the virtual size and the
# sha256 of the whole guest disk.
#   scripts/firmware-demo.sh [--small-heap] IMAGE
# Installs what it needs (qemu-system-arm from bookworm-backports, which
# keeps qemu-utils 10; the thumbv7em target).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
small=""
if [ "${1:-}" = "--small-heap" ]; then small=1; shift; fi
image=${1:?usage: scripts/firmware-demo.sh [--small-heap] IMAGE}

"$root/scripts/install-qemu-system-arm.sh"
if ! rustup target list --installed | grep -qx thumbv7em-none-eabihf; then
  rustup target add thumbv7em-none-eabihf >&2
fi

cd "$root/firmware"
if [ -n "$small" ]; then
  cargo build -q --release --features small-heap --target-dir target/small >&2
  elf=$root/firmware/target/small/thumbv7em-none-eabihf/release/qcowkit-firmware
else
  cargo build -q --release >&2
  elf=$root/firmware/target/thumbv7em-none-eabihf/release/qcowkit-firmware
fi
# Run next to the image so that relative backing file names resolve.
cd "$(dirname "$image")"
exec timeout 300 qemu-system-arm -cpu cortex-m4 -machine mps2-an386 -nographic \
  -semihosting-config "enable=on,target=native,arg=$(basename "$image")" -kernel "$elf"
