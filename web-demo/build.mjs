// Builds the static site into dist/: the page sources, the wasm package
// and the worker helper. Runs ../wasm/build.sh first if the package is missing.
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const wasmDir = join(here, '..', 'wasm');
const pkg = join(wasmDir, 'pkg');
const dist = join(here, 'dist');
const needed = ['qcowkit_wasm.js', 'qcowkit_wasm_bg.wasm'];

if (!needed.every((f) => existsSync(join(pkg, f)))) {
  console.log('wasm package missing: running wasm/build.sh');
  const r = spawnSync('bash', [join(wasmDir, 'build.sh')], { stdio: 'inherit' });
  if (r.status !== 0) {
    console.error('wasm/build.sh failed');
    process.exit(r.status || 1);
  }
}

rmSync(dist, { recursive: true, force: true });
mkdirSync(join(dist, 'pkg'), { recursive: true });
cpSync(join(here, 'src'), dist, { recursive: true });
for (const f of needed) cpSync(join(pkg, f), join(dist, 'pkg', f));
// The helper comes from its sources, so edits show up without a wasm rebuild.
for (const f of readdirSync(join(wasmDir, 'js')).filter((n) => n.endsWith('.js'))) {
  cpSync(join(wasmDir, 'js', f), join(dist, 'pkg', f));
}
console.log(`built ${dist}`);
