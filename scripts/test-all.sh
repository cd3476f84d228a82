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
# Bare-metal target for the no_std build of the core.
if ! rustup target list --installed | grep -qx thumbv7em-none-eabihf; then
  echo "== adding target thumbv7em-none-eabihf"
  rustup target add thumbv7em-none-eabihf
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
cargo build -p qcowkit-core --target thumbv7em-none-eabihf --release --features embedded-io

echo "== tests (unit, property, integration against qemu-img/qemu-io)"
cargo nextest run --workspace --no-fail-fast
echo "== doc tests"
cargo test --workspace --doc

echo "== all tests passed"
