#!/usr/bin/env bash
# Builds the wasm package into wasm/pkg/: the wasm-bindgen module, the
# worker helper (js/client.js, js/worker.js) with its types
# (js/client.d.ts), the README and LICENSE, and a package.json following
# npm's conventions (exports map, types, files, sideEffects).
set -euo pipefail
cd "$(dirname "$0")"
wasm-pack build --target web --release "$@"
# The module's function names (its "name" section, about 40 KiB gzipped) are
# for debuggers only: dropped from the package unless KEEP_NAMES=1 (the
# package must stay within 250 KiB gzipped; wasm-opt, which would also drop
# them, is off: see Cargo.toml).
if [ "${KEEP_NAMES:-0}" != 1 ]; then
  node -e '
const fs = require("fs");
const path = "pkg/qcowkit_wasm_bg.wasm";
const b = fs.readFileSync(path);
const leb = (at) => { let v = 0, s = 0, x; do { x = b[at++]; v += (x & 0x7f) * 2 ** s; s += 7; } while (x & 0x80); return [v, at]; };
const kept = [b.subarray(0, 8)];
for (let at = 8; at < b.length;) {
  const [size, body] = leb(at + 1);
  const end = body + size;
  let drop = false;
  if (b[at] === 0) {
    const [n, name] = leb(body);
    drop = b.toString("utf8", name, name + n) === "name";
  }
  if (!drop) kept.push(b.subarray(at, end));
  at = end;
}
fs.writeFileSync(path, Buffer.concat(kept));
'
fi
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
