#!/usr/bin/env bash
# Installs qemu-system-arm when missing, from bookworm-backports with
# qemu-utils (plain bookworm's QEMU 7.2 would replace qemu-utils 10 and
# take qemu-img 10 away). Used by the firmware scripts and by the NBD
# tests, which attach our server to a QEMU machine as its drive.
set -euo pipefail
if ! command -v qemu-system-arm >/dev/null 2>&1; then
  echo "== installing qemu-system-arm (bookworm-backports, keeps qemu-img 10)" >&2
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
    > /etc/apt/sources.list.d/backports.sources
  apt-get update -qq && apt-get install -y -qq -t bookworm-backports qemu-utils qemu-system-arm >&2
fi
