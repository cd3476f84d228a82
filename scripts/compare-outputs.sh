#!/usr/bin/env bash
# Proves that the CLI output of two builds of our tools is byte-identical.
#
#   scripts/compare-outputs.sh OLD_BIN_DIR NEW_BIN_DIR
#   scripts/compare-outputs.sh --rev GITREV NEW_BIN_DIR
#
# Each BIN_DIR holds the `qcow2` and `qcow2-info` executables. With --rev,
# GITREV is checked out into a temporary git worktree and built there
# (`cargo build -q -p qcowkit-std`, CARGO_TARGET_DIR=/tmp/qcowkit-compare-target);
# its debug binaries are the OLD side. The worktree is removed at exit.
#
# A matrix of images is made with the real qemu-img / qemu-io in a scratch
# directory; every read-only command (info, map, check, qcow2-info, convert to
# raw, compare, dd) is run with both builds from that directory on relative
# image names; stdout, stderr, exit code (and the sha256 of any output file)
# are captured under OLD/ and NEW/ and diffed.
#
# Exit status: 0 all outputs identical, 1 some differ, 2 usage or setup error.
# Environment: KEEP_SCRATCH=1 keeps the scratch directory (its path is printed)
# so the captured outputs can be inspected; DIFF_LINES (default 60) limits
# how many lines of each differing diff are printed.
set -euo pipefail

prog=compare-outputs
usage() {
  echo "usage: $0 OLD_BIN_DIR NEW_BIN_DIR" >&2
  echo "       $0 --rev GITREV NEW_BIN_DIR" >&2
  exit 2
}
die() {
  echo "$prog: $*" >&2
  exit 2
}

SCRATCH=""
WORKTREE=""
REPO=""
cleanup() {
  if [ -n "$WORKTREE" ]; then
    git -C "$REPO" worktree remove --force "$WORKTREE" >/dev/null 2>&1 || true
    rm -rf "$WORKTREE"
    git -C "$REPO" worktree prune >/dev/null 2>&1 || true
  fi
  if [ -n "$SCRATCH" ]; then
    if [ "${KEEP_SCRATCH:-0}" = 1 ]; then
      echo "$prog: kept scratch directory $SCRATCH" >&2
    else
      rm -rf "$SCRATCH"
    fi
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- arguments

abs_bin_dir() {
  [ -d "$1" ] || die "not a directory: $1"
  local d
  d=$(cd "$1" && pwd)
  local t
  for t in qcow2 qcow2-info; do
    [ -x "$d/$t" ] || die "missing executable: $d/$t"
  done
  echo "$d"
}

if [ "${1:-}" = "--rev" ]; then
  [ $# -eq 3 ] || usage
  rev=$2
  NEW_BIN=$(abs_bin_dir "$3")
  REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel) ||
    die "not inside a git repository"
  git -C "$REPO" rev-parse --verify -q "$rev^{commit}" >/dev/null ||
    die "unknown git revision: $rev"
  WORKTREE=$(mktemp -d /tmp/qcowkit-compare-wt.XXXXXX)
  echo "$prog: checking out $rev into $WORKTREE" >&2
  git -C "$REPO" worktree add -q --detach "$WORKTREE" "$rev" ||
    die "git worktree add failed"
  echo "$prog: building $rev (CARGO_TARGET_DIR=/tmp/qcowkit-compare-target)" >&2
  (cd "$WORKTREE" && CARGO_TARGET_DIR=/tmp/qcowkit-compare-target cargo build -q -p qcowkit-std) ||
    die "cargo build of $rev failed"
  OLD_BIN=$(abs_bin_dir /tmp/qcowkit-compare-target/debug)
else
  [ $# -eq 2 ] || usage
  OLD_BIN=$(abs_bin_dir "$1")
  NEW_BIN=$(abs_bin_dir "$2")
fi

for t in qemu-img qemu-io sha256sum od dd diff timeout; do
  command -v "$t" >/dev/null 2>&1 || die "needs $t"
done

export LC_ALL=C
SCRATCH=$(mktemp -d /tmp/qcowkit-compare.XXXXXX)
IMG="$SCRATCH/img" # images; the commands run here, on relative names
RES="$SCRATCH/results"
mkdir -p "$IMG/_out" "$RES/OLD" "$RES/NEW" "$RES/diff" "$RES/cmd"
start=$SECONDS

# ---------------------------------------------------------------- helpers

# Runs a setup command quietly; on failure prints its output and stops.
quiet() {
  local log
  if ! log=$("$@" 2>&1); then
    echo "$prog: setup command failed: $*" >&2
    echo "$log" >&2
    exit 2
  fi
}
# qcreate NAME SIZE [qemu-img create args...]
qcreate() {
  local name=$1 size=$2
  shift 2
  quiet qemu-img create -q -f qcow2 "$@" "$name" "$size"
}
# qio IMAGE FORMAT 'cmd' 'cmd'... (qemu-io, discard passed down)
qio() {
  local img=$1 fmt=$2 a=()
  shift 2
  local c
  for c in "$@"; do a+=(-c "$c"); done
  quiet qemu-io -d unmap -f "$fmt" "${a[@]}" "$img"
}
# be FILE OFFSET LEN: big-endian unsigned value (LEN <= 7, or 8 if < 2^63).
be() {
  local hex
  hex=$(od -An -v -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n')
  [ -n "$hex" ] || die "cannot read $3 bytes at $2 of $1"
  echo $((16#$hex))
}
# put FILE OFFSET HEXBYTE...: overwrites bytes in place.
put() {
  local f=$1 off=$2 s=""
  shift 2
  local b
  for b in "$@"; do s+="\\x$b"; done
  # shellcheck disable=SC2059
  printf "$s" | dd of="$f" bs=1 seek="$off" conv=notrunc status=none
}
# set_incompat_bit FILE BIT: sets a bit (< 8) of the incompatible features
# (the 8-byte big-endian field at 72, so its low byte is at 79).
set_incompat_bit() {
  local v
  v=$(be "$1" 79 1)
  put "$1" 79 "$(printf %02x $((v | (1 << $2))))"
}
# refcount_entry_off FILE CLUSTER_INDEX: byte offset of the 16-bit refcount
# entry of a cluster (refcount_bits=16, cluster in the first refcount block).
refcount_entry_off() {
  local f=$1 idx=$2 cbits order rt rb
  cbits=$(be "$f" 20 4)
  order=$(be "$f" 96 4)
  [ "$order" = 4 ] || die "$f: expected refcount_bits=16"
  [ "$idx" -lt $(((1 << cbits) / 2)) ] || die "$f: cluster $idx not in the first refcount block"
  rt=$(be "$f" 48 8)
  rb=$(be "$f" "$rt" 8)
  [ "$rb" -gt 0 ] || die "$f: no first refcount block"
  echo $((rb + 2 * idx))
}
# first_data_offset FILE: host offset of the first data cluster (qemu-img map).
first_data_offset() {
  local o
  o=$(qemu-img map --output=json "$1" | grep '"data": true' | grep -o '"offset": [0-9]*' | head -n 1 | grep -o '[0-9]*$') || true
  [ -n "$o" ] || die "$1: no data cluster"
  echo "$o"
}
# expect_qemu_check FILE RC: sanity check of a deliberately damaged image.
expect_qemu_check() {
  local rc=0
  qemu-img check "$1" >/dev/null 2>&1 || rc=$?
  [ "$rc" = "$2" ] || die "$1: qemu-img check exits $rc, expected $2 (image patch did not work)"
}

# ---------------------------------------------------------------- images

cd "$IMG"
echo "$prog: creating images in $IMG" >&2

# A raw file with patterns, a compressible-but-not-trivial text region and
# holes: the source of the compressed images.
quiet qemu-img create -q -f raw pattern.raw 4M
qio pattern.raw raw 'write -P 0x5a 0 192k' 'write -P 0xa5 1M 64k' 'write -P 0x01 3M 4k'
seq 1 60000 >_seq.txt # ~330 KB of text, deterministic
quiet dd if=_seq.txt of=pattern.raw bs=64k seek=8 conv=notrunc status=none
rm -f _seq.txt

IMAGES=()
add() { IMAGES+=("$@"); }

# Versions and cluster sizes.
qcreate v2.qcow2 4M -o compat=0.10
qio v2.qcow2 qcow2 'write -P 0x11 0 64k' 'write -P 0x12 1M 100k' 'write -z 2M 64k'
add v2.qcow2
qcreate v3.qcow2 4M
qio v3.qcow2 qcow2 'write -P 0x11 0 128k' 'write -P 0x13 1000k 200k' 'write -z 2M 64k' 'discard 64k 64k' 'write -P 0x14 4032k 64k'
add v3.qcow2
qcreate c512.qcow2 2M -o cluster_size=512
qio c512.qcow2 qcow2 'write -P 0x21 0 1536' 'write -P 0x22 100k 10k' 'write -z 1M 4k' 'write -P 0x23 2047k 1k'
add c512.qcow2
qcreate c4k.qcow2 4M -o cluster_size=4k
qio c4k.qcow2 qcow2 'write -P 0x31 0 10k' 'write -P 0x32 1M 300k' 'write -z 3M 8k' 'discard 4k 4k'
add c4k.qcow2
qcreate c2m.qcow2 8M -o cluster_size=2M
qio c2m.qcow2 qcow2 'write -P 0x41 0 64k' 'write -P 0x42 5M 1M'
add c2m.qcow2

# Refcount widths.
qcreate rc1.qcow2 4M -o refcount_bits=1
qio rc1.qcow2 qcow2 'write -P 0x51 0 192k' 'write -P 0x52 2M 64k'
add rc1.qcow2
qcreate rc64.qcow2 4M -o refcount_bits=64
qio rc64.qcow2 qcow2 'write -P 0x53 64k 64k' 'write -P 0x54 3M 128k'
add rc64.qcow2

# Extended L2 entries (subclusters of 512 and 2k bytes): partial subcluster
# writes, zero writes and discards.
qcreate el2-16k.qcow2 4M -o extended_l2=on,cluster_size=16k
qio el2-16k.qcow2 qcow2 'write -P 0x11 0 1k' 'write -P 0x12 1536 100' 'write -P 0x13 16k 16k' \
  'write -z 20k 1k' 'write -P 0x14 64k 3000' 'discard 16k 512' 'write -z 1M 16k' 'write -P 0x15 2M 7k'
add el2-16k.qcow2
qcreate el2-64k.qcow2 4M -o extended_l2=on,cluster_size=64k
qio el2-64k.qcow2 qcow2 'write -P 0x21 0 2k' 'write -P 0x22 4k 6k' 'write -P 0x23 70000 1000' \
  'write -z 8k 2k' 'write -P 0x24 128k 64k' 'discard 130k 4k' 'write -z 1M 64k' 'write -z 2M 6k'
add el2-64k.qcow2

# Compression.
quiet qemu-img convert -c -O qcow2 pattern.raw zlib.qcow2
add zlib.qcow2
quiet qemu-img convert -c -O qcow2 -o compression_type=zstd pattern.raw zstd.qcow2
add zstd.qcow2

# A three-deep backing chain with relative names, and a raw backing file.
qcreate base.qcow2 4M
qio base.qcow2 qcow2 'write -P 0xa1 0 1M' 'write -P 0xa2 3M 512k'
qcreate mid.qcow2 4M -b base.qcow2 -F qcow2
qio mid.qcow2 qcow2 'write -P 0xb1 512k 1M' 'write -z 3M 64k'
qcreate top.qcow2 4M -b mid.qcow2 -F qcow2
qio top.qcow2 qcow2 'write -P 0xc1 1M 256k' 'write -z 0 64k' 'write -P 0xc2 3584k 32k'
add base.qcow2 mid.qcow2 top.qcow2
quiet qemu-img create -q -f raw backing.raw 2M
qio backing.raw raw 'write -P 0xd1 0 2M'
qcreate rawback.qcow2 4M -b backing.raw -F raw
qio rawback.qcow2 qcow2 'write -P 0xd2 64k 64k' 'write -z 1M 64k' 'write -P 0xd3 3M 64k'
add backing.raw rawback.qcow2

# External data files.
qcreate datafile.qcow2 4M -o data_file=datafile.raw
qio datafile.qcow2 qcow2 'write -P 0xe1 0 128k' 'write -P 0xe2 2M 64k' 'write -z 3M 64k'
add datafile.qcow2
qcreate datafile-raw.qcow2 4M -o data_file=datafile2.raw,data_file_raw=on
qio datafile-raw.qcow2 qcow2 'write -P 0xe3 64k 128k' 'write -P 0xe4 3M 64k'
add datafile-raw.qcow2

# Internal snapshots, with data changed after them.
qcreate snap.qcow2 4M
qio snap.qcow2 qcow2 'write -P 0xf1 0 1M'
quiet qemu-img snapshot -c snap1 snap.qcow2
qio snap.qcow2 qcow2 'write -P 0xf2 512k 64k' 'write -P 0xf3 2M 64k'
quiet qemu-img snapshot -c snap2 snap.qcow2
qio snap.qcow2 qcow2 'write -z 0 64k'
add snap.qcow2

# Persistent bitmaps: one enabled (written after it was added), one disabled.
qcreate bitmaps.qcow2 4M
quiet qemu-img bitmap --add bitmaps.qcow2 bm0
quiet qemu-img bitmap --add --disable -g 128k bitmaps.qcow2 bm1
qio bitmaps.qcow2 qcow2 'write -P 0x61 64k 64k' 'write -P 0x62 2M 128k'
add bitmaps.qcow2

# Preallocation, lazy refcounts.
qcreate prealloc-meta.qcow2 4M -o preallocation=metadata
qio prealloc-meta.qcow2 qcow2 'write -P 0x71 1M 64k'
add prealloc-meta.qcow2
qcreate prealloc-full.qcow2 4M -o preallocation=full
qio prealloc-full.qcow2 qcow2 'write -P 0x72 0 64k'
add prealloc-full.qcow2
qcreate lazy.qcow2 4M -o lazy_refcounts=on
qio lazy.qcow2 qcow2 'write -P 0x73 0 256k' 'write -z 1M 64k'
add lazy.qcow2

# Header flags: dirty (bit 0) and corrupt (bit 1).
qcreate dirty.qcow2 4M -o lazy_refcounts=on
qio dirty.qcow2 qcow2 'write -P 0x81 0 128k' 'write -P 0x82 2M 64k'
set_incompat_bit dirty.qcow2 0
add dirty.qcow2
qcreate corrupt.qcow2 4M
qio corrupt.qcow2 qcow2 'write -P 0x83 0 128k'
set_incompat_bit corrupt.qcow2 1
add corrupt.qcow2

# Refcount damage: a leak (the header cluster's refcount raised 1 -> 2) and
# an error (a used data cluster's refcount set to 0).
qcreate leak.qcow2 4M
qio leak.qcow2 qcow2 'write -P 0x91 0 128k' 'write -P 0x92 1M 64k'
ent=$(refcount_entry_off leak.qcow2 0)
put leak.qcow2 "$ent" 00 02
expect_qemu_check leak.qcow2 3
add leak.qcow2
qcreate refcount-error.qcow2 4M
qio refcount-error.qcow2 qcow2 'write -P 0x93 0 128k' 'write -P 0x94 1M 64k'
off=$(first_data_offset refcount-error.qcow2)
ent=$(refcount_entry_off refcount-error.qcow2 $((off >> 16)))
put refcount-error.qcow2 "$ent" 00 00
expect_qemu_check refcount-error.qcow2 2
add refcount-error.qcow2

# A raw image, and a 1G sparse one.
quiet qemu-img create -q -f raw plain.raw 2M
qio plain.raw raw 'write -P 0x99 0 64k' 'write -P 0x9a 1M 4k'
add plain.raw
qcreate big.qcow2 1G
qio big.qcow2 qcow2 'write -P 0xb9 0 64k' 'write -P 0xba 512M 128k' 'write -z 700M 64k' 'write -P 0xbb 1048512k 64k'
add big.qcow2

# References for compare.
quiet qemu-img convert -O raw top.qcow2 top-ref.raw

# ---------------------------------------------------------------- commands

NCMD=0
IDS=()

# run ID OUTFILE PROGRAM ARGS...: runs PROGRAM (qcow2 or qcow2-info) of both
# builds in $IMG; OUTFILE (or -) is a file the command writes, hashed after.
run() {
  local id=$1 outfile=$2 p=$3
  shift 3
  NCMD=$((NCMD + 1))
  IDS+=("$id")
  echo "$p $*" >"$RES/cmd/$id"
  local side bin dir rc
  for side in OLD NEW; do
    if [ "$side" = OLD ]; then bin=$OLD_BIN; else bin=$NEW_BIN; fi
    dir="$RES/$side"
    [ "$outfile" = - ] || rm -f "$outfile"
    rc=0
    timeout 120 "$bin/$p" "$@" >"$dir/$id.out" 2>"$dir/$id.err" </dev/null || rc=$?
    echo "$rc" >"$dir/$id.rc"
    if [ "$outfile" != - ]; then
      if [ -f "$outfile" ]; then
        echo "$(sha256sum <"$outfile" | cut -d' ' -f1) size=$(stat -c %s "$outfile")" >"$dir/$id.sha"
      else
        echo "(no output file)" >"$dir/$id.sha"
      fi
      rm -f "$outfile"
    fi
  done
}

echo "$prog: running commands on ${#IMAGES[@]} images" >&2
for im in "${IMAGES[@]}"; do
  k=${im//[^A-Za-z0-9._-]/_}
  run "$k.info" - qcow2 info "$im"
  run "$k.info-json" - qcow2 info --output=json "$im"
  run "$k.info-chain" - qcow2 info --backing-chain "$im"
  run "$k.info-chain-json" - qcow2 info --backing-chain --output=json "$im"
  run "$k.map" - qcow2 map "$im"
  run "$k.map-json" - qcow2 map --output=json "$im"
  run "$k.check" - qcow2 check "$im"
  run "$k.check-json" - qcow2 check --output=json "$im"
  run "$k.summary" - qcow2-info "$im"
  run "$k.summary-json" - qcow2-info --json "$im"
  run "$k.convert" _out/out.raw qcow2 convert -O raw "$im" _out/out.raw
  run "$k.dd" _out/dd.raw qcow2 dd "if=$im" of=_out/dd.raw bs=64k count=3 skip=1
done
run compare.top-vs-ref - qcow2 compare top.qcow2 top-ref.raw
run compare.mid-vs-top - qcow2 compare mid.qcow2 top.qcow2
run compare.zlib-vs-pattern - qcow2 compare zlib.qcow2 pattern.raw
run compare.zstd-vs-zlib - qcow2 compare zstd.qcow2 zlib.qcow2
run compare.v2-vs-v3 - qcow2 compare v2.qcow2 v3.qcow2
run compare.rawback-vs-backing - qcow2 compare rawback.qcow2 backing.raw
run summary.multi - qcow2-info top.qcow2 plain.raw snap.qcow2

# ---------------------------------------------------------------- diff

limit=${DIFF_LINES:-60}
ndiff=0
for id in "${IDS[@]}"; do
  d="$RES/diff/$id.diff"
  : >"$d"
  for ext in rc out err sha; do
    a="$RES/OLD/$id.$ext"
    b="$RES/NEW/$id.$ext"
    [ -e "$a" ] || [ -e "$b" ] || continue
    [ -e "$a" ] || a=/dev/null
    [ -e "$b" ] || b=/dev/null
    diff -u --label "OLD/$id.$ext" --label "NEW/$id.$ext" "$a" "$b" >>"$d" || true
  done
  if [ -s "$d" ]; then
    ndiff=$((ndiff + 1))
    n=$(wc -l <"$d")
    echo "=== $id differs: $(cat "$RES/cmd/$id")"
    head -n "$limit" "$d"
    [ "$n" -le "$limit" ] || echo "... ($((n - limit)) more lines)"
  fi
done

echo "$prog: ${#IMAGES[@]} images, $((SECONDS - start))s" >&2
echo "$prog: $NCMD commands, $ndiff differ"
[ "$ndiff" -eq 0 ]
