#!/usr/bin/env bash
# Speed and memory side by side with qemu-img on every row of issue 11's
# table (see scripts/bench.py). Not part of the test suite:
#   scripts/bench.sh [--size-mib N] [--runs N] [--only SUBSTRING]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time; }
exec python3 scripts/bench.py "$@"
