// Prints what an image is, in Node: the package's QcowImage over storage
// objects made of fs.readSync, with its backing chain found next to it.
//
//   node wasm/examples/node-info.mjs IMAGE [--json]
//
// (In a project that installed the package, import from "qcowkit-wasm"
// and read "qcowkit-wasm/qcowkit_wasm_bg.wasm" the same way.)
import { closeSync, fstatSync, openSync, readFileSync, readSync } from 'node:fs';
import { dirname, join, resolve as resolvePath } from 'node:path';
import { fileURLToPath } from 'node:url';
import init, { QcowImage, inspect } from '../pkg/qcowkit_wasm.js';

const here = dirname(fileURLToPath(import.meta.url));
await init({ module_or_path: readFileSync(join(here, '..', 'pkg', 'qcowkit_wasm_bg.wasm')) });

/** A read-only storage object over an open file: synchronous positional reads. */
function fileStorage(path) {
  const fd = openSync(path, 'r');
  return {
    fd,
    read(offset, length) {
      const buf = new Uint8Array(length);
      let done = 0;
      while (done < length) {
        const n = readSync(fd, buf, done, length - done, offset + done);
        if (n === 0) break; // the end of the file: the rest reads as zeros
        done += n;
      }
      return buf;
    },
    size() {
      return fstatSync(fd).size;
    },
  };
}

const args = process.argv.slice(2);
const json = args.includes('--json');
const image = args.find((a) => !a.startsWith('--'));
if (!image) {
  console.error('usage: node node-info.mjs IMAGE [--json]');
  process.exit(2);
}

// The backing chain, as QEMU finds it: each name relative to the directory
// of the image naming it (absolute names as they are).
const storages = [];
const files = {};
try {
  let path = resolvePath(image);
  for (let depth = 0; depth < 64; depth++) {
    const s = fileStorage(path);
    storages.push(s);
    if (depth > 0) files[path] = s;
    const facts = inspect(path, s);
    const backing = facts['backing-filename'];
    if (!backing) break;
    path = resolvePath(dirname(path), backing);
  }

  const img = QcowImage.open(resolvePath(image), storages[0], files);
  try {
    const info = img.info();
    const allocation = img.allocation();
    const check = info.format === 'qcow2' ? img.check() : null;
    if (json) {
      console.log(JSON.stringify({ info, chain: img.chain().map((i) => i.filename), allocation, check }, null, 2));
    } else {
      const d = (info['format-specific'] || {}).data || {};
      console.log(`image: ${info.filename}`);
      console.log(`virtual size: ${info['virtual-size']} bytes`);
      console.log(`cluster size: ${info['cluster-size']} bytes`);
      console.log(`compat: ${d.compat}, compression: ${d['compression-type']}, extended L2: ${d['extended-l2'] ? 'on' : 'off'}`);
      console.log(`backing chain: ${img.chain().map((i) => i.filename).join(' -> ')}`);
      for (const [k, v] of Object.entries(allocation)) console.log(`  ${k}: ${v} bytes`);
      console.log(`check: ${check.corruptions ?? 0} corruptions, ${check.leaks ?? 0} leaked clusters`);
    }
  } finally {
    img.free();
  }
} catch (err) {
  // Errors carry a stable code besides the message.
  console.error(`node-info: ${err.message} (code ${err.code})`);
  process.exitCode = 1;
} finally {
  for (const s of storages) closeSync(s.fd);
}
