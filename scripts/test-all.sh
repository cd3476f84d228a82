#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what is
# missing (idempotently), then formatting, lints, the no_std firmware-target
# build of the core, and the whole test suite (unit, property, and the
# integration tests against the real qemu-img / qemu-io).
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }

# Tools the tests drive: qemu-img and qemu-io (qemu-utils).
if ! need qemu-img || ! need qemu-io; then
  echo "== installing qemu-utils"
  apt-get update -qq && apt-get install -y -qq qemu-utils
fi
# strace: tests count the syncs and O_DIRECT opens of the CLI's cache modes.
if ! need strace; then
  echo "== installing strace"
  apt-get update -qq && apt-get install -y -qq strace
fi
# Partition and file system tools: tests/tests/contents.rs makes disks with
# them and compares what we report with what they say (blkid, sfdisk --json,
# dumpe2fs, xfs_db, cryptsetup luksDump); scripts/test-firmware.sh uses
# mkfs.ext4, mkswap and blkid. libnbd's nbdinfo and nbdcopy are clients of
# the NBD server's tests (tests/tests/nbd*.rs), openssl makes their TLS
# certificates.
missing=""
for pair in sfdisk:fdisk fdisk:fdisk sgdisk:gdisk blkid:util-linux mkswap:util-linux \
            mkfs.ext4:e2fsprogs dumpe2fs:e2fsprogs mkfs.vfat:dosfstools mkfs.exfat:exfatprogs \
            mkfs.ntfs:ntfs-3g mkfs.xfs:xfsprogs xfs_db:xfsprogs mkfs.btrfs:btrfs-progs \
            genisoimage:genisoimage cryptsetup:cryptsetup-bin \
            nbdinfo:libnbd-bin nbdcopy:libnbd-bin openssl:openssl; do
  if ! need "${pair%%:*}" && [ ! -x "/usr/sbin/${pair%%:*}" ] && [ ! -x "/sbin/${pair%%:*}" ]; then
    case " $missing " in *" ${pair#*:} "*) ;; *) missing="$missing ${pair#*:}" ;; esac
  fi
done
if [ -n "$missing" ]; then
  echo "== installing$missing"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
# qemu-system-arm: the firmware's machine, and a QEMU machine whose drive
# is our NBD server (tests/tests/nbd.rs).
scripts/install-qemu-system-arm.sh
# Headless Chromium and its driver for the wasm tests in a browser worker.
if ! need chromium || ! need chromedriver; then
  echo "== installing chromium and chromium-driver"
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver
fi
# Bare-metal target for the no_std build of the core.
if ! rustup target list --installed | grep -qx thumbv7em-none-eabihf; then
  echo "== adding target thumbv7em-none-eabihf"
  rustup target add thumbv7em-none-eabihf
fi
# 32-bit: the core's tests and the hostile-image tests also run on i686.
if ! rustup target list --installed | grep -qx i686-unknown-linux-gnu; then
  echo "== adding target i686-unknown-linux-gnu"
  rustup target add i686-unknown-linux-gnu
fi
if ! echo 'int main(void){return 0;}' | gcc -m32 -x c - -o /dev/null 2>/dev/null; then
  echo "== installing gcc-multilib (32-bit C runtime for i686 tests)"
  apt-get update -qq && apt-get install -y -qq gcc-multilib
fi
if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "== adding target wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi
# wasm-bindgen's test runner, the exact version of the wasm-bindgen crate
# (see ../shared/toolchain.md: no --locked for this one).
if [ "$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}')" != "0.2.130" ]; then
  echo "== installing wasm-bindgen-cli 0.2.130"
  cargo install wasm-bindgen-cli --version 0.2.130
fi
if [ "$(wasm-pack --version 2>/dev/null | awk '{print $2}')" != "0.15.1" ]; then
  echo "== installing wasm-pack 0.15.1"
  cargo install wasm-pack --version 0.15.1 --locked
fi
# cmake: the qcow crate of the peer comparison (bench/qcow-reader) builds
# zlib-ng with it.
if ! need cmake; then
  echo "== installing cmake"
  apt-get update -qq && apt-get install -y -qq cmake
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install cargo-nextest --version 0.9.143 --locked
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== core builds for thumbv7em-none-eabihf (no_std + alloc)"
cargo build -p qcowkit-core --target thumbv7em-none-eabihf --release
cargo build -p qcowkit-core --target thumbv7em-none-eabihf --release --features embedded-io,serde
cargo build -p qcowkit-options --target thumbv7em-none-eabihf --release

echo "== tests (unit, property, integration against qemu-img/qemu-io)"
# Randomised tests take a new seed each run (printed here and by each test;
# set the variable to replay a run).
random_seed() { od -An -N8 -tu8 /dev/urandom | tr -d ' '; }
export CRASH_SEED=${CRASH_SEED:-$(random_seed)}
export HOSTILE_SEED=${HOSTILE_SEED:-$(random_seed)}
export FUZZ_SCRIPT_SEED=${FUZZ_SCRIPT_SEED:-$(random_seed)}
export QCOWKIT_SEED=${QCOWKIT_SEED:-$(random_seed)}
echo "seeds: CRASH_SEED=$CRASH_SEED HOSTILE_SEED=$HOSTILE_SEED FUZZ_SCRIPT_SEED=$FUZZ_SCRIPT_SEED QCOWKIT_SEED=$QCOWKIT_SEED"
cargo nextest run --workspace --no-fail-fast
echo "== 32-bit (i686): the core's tests, the hostile-image tests and the fuzz corpus"
cargo build -q -p qcowkit-std --bins --target i686-unknown-linux-gnu
cargo test -q -p qcowkit-core --target i686-unknown-linux-gnu
cargo test -q -p qcowkit-tests --target i686-unknown-linux-gnu --test hostile --test fuzz_replay

echo "== doc tests and rustdoc (warnings are errors)"
cargo test --workspace --doc
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p qcowkit-core -p qcowkit-options -p qcowkit-std

echo "== wasm bindings: fmt, clippy, tests in Node and in a Chromium worker (OPFS, Blob)"
(
  cd wasm
  cargo fmt -- --check
  cargo clippy --target wasm32-unknown-unknown --all-targets -- -D warnings
  # Bounded: a hung browser or Node fails the run instead of hanging it.
  CHROMEDRIVER=$(command -v chromedriver) \
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    timeout 1200 cargo test --target wasm32-unknown-unknown
)

echo "== firmware: fmt, clippy, and the Cortex-M4 program under qemu-system-arm on qemu-img images"
(
  cd firmware
  cargo fmt -- --check
  cargo clippy --release -- -D warnings
)
scripts/test-firmware.sh

echo "== wasm package: built (wasm/build.sh), and qemu-img judging what it writes (Node)"
bash wasm/build.sh
timeout 300 node wasm/tests/judge.mjs

echo "== web demo: build (npm ci && npm run build) and end-to-end tests in Chromium (Playwright)"
(
  cd web-demo
  npm ci --no-audit --no-fund
  npm run build
  timeout 600 node tests/e2e.mjs
)

echo "== benchmarks outside the default build (bench/, bench/qcow-reader/): fmt and clippy, so they keep building"
for m in bench/Cargo.toml bench/qcow-reader/Cargo.toml; do
  cargo fmt --manifest-path "$m" -- --check
  cargo clippy --manifest-path "$m" --all-targets -- -D warnings
done

echo "== all tests passed"
