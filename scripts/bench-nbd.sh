#!/usr/bin/env bash
# Our NBD server (qcow2 serve) side by side with qemu-nbd, the same clients
# on the same images (see scripts/bench-nbd.py). Not part of the test suite:
#   scripts/bench-nbd.sh [--size-mib N] [--runs N] [--only SUBSTRING]
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
[ -x /usr/bin/time ] || missing+=(time)
{ command -v nbdcopy && command -v nbdinfo; } >/dev/null || missing+=(libnbd-bin)
command -v openssl >/dev/null || missing+=(openssl)
command -v qemu-nbd >/dev/null || missing+=(qemu-utils)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi
exec python3 scripts/bench-nbd.py "$@"
