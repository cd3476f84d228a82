#!/usr/bin/env bash
# Builds the wasm package into wasm/pkg/ and adds the worker helper
# (js/worker.js, js/client.js) to it.
set -euo pipefail
cd "$(dirname "$0")"
wasm-pack build --target web --release "$@"
cp js/*.js pkg/
node -e '
const fs = require("fs");
const path = "pkg/package.json";
const pkg = JSON.parse(fs.readFileSync(path, "utf8"));
const extra = fs.readdirSync("js").filter((f) => f.endsWith(".js"));
pkg.files = Array.from(new Set([...(pkg.files || []), ...extra]));
fs.writeFileSync(path, JSON.stringify(pkg, null, 2) + "\n");
'
echo "wasm package with worker helper: $(pwd)/pkg"
