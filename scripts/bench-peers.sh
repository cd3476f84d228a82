#!/usr/bin/env bash
# Library reads side by side with other Rust qcow2 crates (imago, qcow2-rs,
# qcow2-core): builds the bench/ workspace's `peers` binary in release,
# makes a raw disk of SIZE_MIB MiB (per 64 KiB cluster: 60% random bytes,
# 10% text, 30% zeros; deterministic from SEED), converts it with qemu-img
# to plain, zlib-compressed and zstd-compressed qcow2, reads each image in
# 1 MiB chunks with every reader (median of RUNS rounds, the readers taking
# turns) and prints the table. Checksums must agree with the raw disk's;
# a mismatch exits 1. Not part of the test suite.
#
#   scripts/bench-peers.sh                  # 256 MiB, 5 runs
#   SIZE_MIB=1024 RUNS=3 scripts/bench-peers.sh
#
# Environment: SIZE_MIB (256), RUNS (5), SEED (1), CHUNK_KIB (read size,
# 1024), JOBS (cargo -j, 1),
# BENCH_DIR (where the temporary directory goes; default $TMPDIR or /tmp),
# READERS (comma-separated subset of ours, ours-1t, core, imago, qcow2-rs,
# qcow2-core, qcow; passed to --readers; ours always runs).
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${SIZE_MIB:-256}
RUNS=${RUNS:-5}
SEED=${SEED:-1}
CHUNK_KIB=${CHUNK_KIB:-1024}
JOBS=${JOBS:-1}

command -v qemu-img >/dev/null || { echo "bench-peers: qemu-img is needed" >&2; exit 1; }
command -v python3 >/dev/null || { echo "bench-peers: python3 is needed" >&2; exit 1; }

# The qcow crate's zlib-ng is built with cmake.
if ! command -v cmake >/dev/null; then
  echo "== installing cmake"
  apt-get update -qq && apt-get install -y -qq cmake
fi

echo "== building bench/ and bench/qcow-reader/ (release, -j$JOBS)"
cargo build --release -q -j"$JOBS" --manifest-path bench/Cargo.toml --bin peers
cargo build --release -q -j"$JOBS" --manifest-path bench/qcow-reader/Cargo.toml
peers="${CARGO_TARGET_DIR:-bench/target}/release/peers"
QCOW_READER="$(pwd)/${CARGO_TARGET_DIR:-bench/qcow-reader/target}/release/qcowkit-bench-qcow-reader"
export QCOW_READER
for b in "$peers" "$QCOW_READER"; do
  [ -x "$b" ] || { echo "bench-peers: $b was not built" >&2; exit 1; }
done

work=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/qcowkit-peers.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== making a $SIZE_MIB MiB raw disk in $work (seed $SEED)"
python3 - "$work/disk.raw" "$SIZE_MIB" "$SEED" <<'EOF'
import random
import sys

path, size_mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(2, 9)))
         for _ in range(2000)]
text = b" ".join(rng.choice(words) for _ in range(20000))
cluster = 65536
counts = {"random": 0, "text": 0, "zero": 0}
with open(path, "wb") as f:
    for _ in range(size_mib * 1024 * 1024 // cluster):
        r = rng.random()
        if r < 0.6:
            f.write(rng.randbytes(cluster))
            counts["random"] += 1
        elif r < 0.7:
            at = rng.randrange(len(text) - cluster)
            f.write(text[at:at + cluster])
            counts["text"] += 1
        else:
            f.write(bytes(cluster))
            counts["zero"] += 1
print("   clusters: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
EOF

echo "== converting with $(qemu-img --version | head -1)"
(
    cd "$work"
    qemu-img convert -f raw -O qcow2 disk.raw plain.qcow2
    qemu-img convert -c -f raw -O qcow2 disk.raw zlib.qcow2
    qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd disk.raw zstd.qcow2
)

readers=()
[ -n "${READERS:-}" ] && readers=(--readers "$READERS")
"$peers" --runs "$RUNS" --chunk-kib "$CHUNK_KIB" --expect-raw "$work/disk.raw" "${readers[@]}" \
    "$work/plain.qcow2" "$work/zlib.qcow2" "$work/zstd.qcow2"
