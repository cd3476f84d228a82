#!/usr/bin/env bash
# Fuzzes the core with cargo-fuzz (nightly): every target in fuzz/ for
# SECONDS each (default 60), two at a time. The committed corpus
# (fuzz/corpus/TARGET/*.zst, replayed by tests/tests/fuzz_replay.rs) is
# unpacked into fuzz/work/TARGET, fuzzed, minimised (cargo fuzz cmin), and
# new inputs are packed back. Crashes land in fuzz/artifacts/TARGET: add
# each as a regression (fuzz/regressions/TARGET) with its fix. Not part of
# the test suite.
#   scripts/fuzz.sh [SECONDS]      (KEEP=N: committed inputs per target;
#                                   TARGETS="a b": only those; JOBS=1: one
#                                   target at a time instead of two)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --version 0.13.2 --locked
cargo +nightly fuzz build -O
read -r -a targets <<<"${TARGETS:-open_read open_check open_map open_write open_maintain}"
jobs=${JOBS:-2}
# Seeds: the core's qemu-img images (for open_write after a 64-byte script).
seeds() {
  for f in ../core/tests/data/*.qcow2.zst; do
    n=$(basename "$f" .qcow2.zst)
    for t in open_read open_check open_map open_maintain; do
      mkdir -p "corpus/$t"
      cp "$f" "corpus/$t/seed-$n.zst"
    done
    script=$n
    while [ ${#script} -lt 64 ]; do script+=$n; done
    { printf %s "${script:0:64}"; zstd -q -d -c "$f"; } \
      | zstd -q -19 -o "corpus/open_write/seed-$n.zst" -f
  done
}
seeds
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "corpus/$t"
  for z in corpus/"$t"/*.zst; do
    [ -e "$z" ] || continue
    out="work/$t/$(basename "$z" .zst)"
    [ -e "$out" ] || zstd -q -d "$z" -o "$out"
  done
done
run() {
  cargo +nightly fuzz run -O "$1" "work/$1" -- -max_total_time="$secs" \
    -rss_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E "stat::number_of_executed_units|ERROR|panicked|SUMMARY" | sed "s/^/$1: /"
}
for ((i = 0; i < ${#targets[@]}; i += jobs)); do
  run "${targets[i]}" &
  if [ "$jobs" -gt 1 ] && [ -n "${targets[i+1]:-}" ]; then run "${targets[i+1]}" & fi
  wait
done
for t in "${targets[@]}"; do
  cargo +nightly fuzz cmin -O "$t" "work/$t" >/dev/null 2>&1
  # Pack the minimised corpus (named by content, so reruns add nothing
  # twice); the committed one keeps the seeds and the KEEP smallest others.
  rm -rf "packed/$t" && mkdir -p "packed/$t"
  for f in work/"$t"/*; do
    zstd -q -19 "$f" -o "packed/$t/$(basename "$f").zst"
  done
  rm -f corpus/"$t"/*.zst
  # (No `ls | head` pipe: head closing early fails the pipeline.)
  mapfile -t smallest < <(ls -S -r packed/"$t")
  for f in "${smallest[@]:0:${KEEP:-150}}"; do cp "packed/$t/$f" "corpus/$t/"; done
done
seeds
for t in "${targets[@]}"; do
  echo "$t: $(ls work/"$t" | wc -l) inputs, $(ls corpus/"$t" | wc -l) committed ($(du -sh corpus/"$t" | cut -f1))"
done
