#!/usr/bin/env bash
# Builds the wasm package into wasm/pkg/: the wasm-bindgen module, the
# worker helper (js/client.js, js/worker.js) with its types
# (js/client.d.ts), the README and LICENSE, and a package.json following
# npm's conventions (exports map, types, files, sideEffects).
set -euo pipefail
cd "$(dirname "$0")"
wasm-pack build --target web --release "$@"
cp js/*.js js/*.d.ts pkg/
cp ../LICENSE pkg/LICENSE
node -e '
const fs = require("fs");
const path = "pkg/package.json";
const pkg = JSON.parse(fs.readFileSync(path, "utf8"));
const extra = fs.readdirSync("js").filter((f) => f.endsWith(".js") || f.endsWith(".d.ts"));
// No public repository yet: no repository field (npm shows none rather than a wrong one).
delete pkg.repository;
pkg.license = "MIT";
pkg.type = "module";
pkg.main = "./qcowkit_wasm.js";
pkg.module = "./qcowkit_wasm.js";
pkg.types = "./qcowkit_wasm.d.ts";
pkg.exports = {
  ".": { types: "./qcowkit_wasm.d.ts", default: "./qcowkit_wasm.js" },
  "./client": { types: "./client.d.ts", default: "./client.js" },
  "./client.js": { types: "./client.d.ts", default: "./client.js" },
  "./worker.js": "./worker.js",
  "./qcowkit_wasm_bg.wasm": "./qcowkit_wasm_bg.wasm",
  "./package.json": "./package.json",
};
pkg.files = Array.from(new Set([...(pkg.files || []), ...extra, "README.md", "LICENSE"]));
// worker.js installs a message handler when loaded (as a worker); the rest is free of side effects.
pkg.sideEffects = ["./snippets/*", "./worker.js"];
pkg.engines = { node: ">=18" };
fs.writeFileSync(path, JSON.stringify(pkg, null, 2) + "\n");
'
echo "wasm package with worker helper: $(pwd)/pkg"
