// qemu-img judges what the wasm package writes: raw disks converted to
// qcow2 with qemu-img's options, guest writes into images qemu-img made,
// new empty images, and raw conversions. Every image must pass
// `qemu-img check` and hold, per `qemu-img compare`, what it should.
// Runs the built package (wasm/pkg, `wasm/build.sh`) in Node.
//
//   node wasm/tests/judge.mjs
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';

const here = dirname(fileURLToPath(import.meta.url));
const pkg = join(here, '..', 'pkg');
const wasm = await import(join(pkg, 'qcowkit_wasm.js'));
await wasm.default({ module_or_path: readFileSync(join(pkg, 'qcowkit_wasm_bg.wasm')) });
const { QcowImage, convertRawToQcow2, createImageBytes } = wasm;

const tmp = mkdtempSync(join(tmpdir(), 'qcowkit-judge-'));
const path = (name) => join(tmp, name);
const qemuImg = (...args) => execFileSync('qemu-img', args, { cwd: tmp, encoding: 'utf8' });
const qemuIo = (file, ...cmds) =>
  execFileSync('qemu-io', [...cmds.flatMap((c) => ['-c', c]), file], { cwd: tmp, encoding: 'utf8' });

/** A storage object over a growing byte array (the package's JS storage). */
function memStorage(initial) {
  let buf = initial ? new Uint8Array(initial) : new Uint8Array(0);
  return {
    read(offset, length) {
      const out = new Uint8Array(length);
      if (offset < buf.length) out.set(buf.subarray(offset, Math.min(buf.length, offset + length)));
      return out;
    },
    write(offset, bytes) {
      if (offset + bytes.length > buf.length) {
        const grown = new Uint8Array(offset + bytes.length);
        grown.set(buf);
        buf = grown;
      }
      buf.set(bytes, offset);
    },
    truncate(len) {
      const n = new Uint8Array(len);
      n.set(buf.subarray(0, Math.min(len, buf.length)));
      buf = n;
    },
    size() {
      return buf.length;
    },
    flush() {},
    bytes() {
      return buf;
    },
  };
}

/** Exit status and output of qemu-img (never throws). */
function qemuStatus(...args) {
  const r = spawnSync('qemu-img', args, { cwd: tmp, encoding: 'utf8' });
  return { code: r.status, out: `${r.stdout}${r.stderr}`.trim() };
}

function assertCheckClean(file) {
  const r = qemuStatus('check', '-f', 'qcow2', file);
  assert.equal(r.code, 0, `qemu-img check ${file}: ${r.out}`);
}

function assertSame(raw, image) {
  const r = qemuStatus('compare', '-f', 'raw', '-F', 'qcow2', raw, image);
  assert.equal(r.code, 0, `qemu-img compare ${raw} ${image}: ${r.out}`);
}

// A 6 MiB raw disk: random bytes, text, zeros, and clusters that are zero
// only in part (seeded generator; the seed is fixed so a failure repeats).
function rawDisk() {
  const n = 6 << 20;
  const out = new Uint8Array(n);
  let x = 0x9e3779b97f4a7c15n;
  const next = () => {
    x ^= x << 13n;
    x &= 0xffffffffffffffffn;
    x ^= x >> 7n;
    x ^= x << 17n;
    x &= 0xffffffffffffffffn;
    return Number(x & 0xffn);
  };
  for (let i = 0; i < (1 << 20); i++) out[i] = next();
  const text = new TextEncoder().encode('the quick brown fox jumps over the lazy dog, again and again. ');
  for (let i = 2 << 20; i < 3 << 20; i++) out[i] = text[i % text.length];
  // 3-4 MiB zeros; 4-5 MiB: 1 KiB of data every 64 KiB.
  for (let c = 4 << 20; c < 5 << 20; c += 65536) out.fill(0x5a, c + 3000, c + 4024);
  for (let i = (5 << 20) + 7; i < 6 << 20; i += 4096) out[i] = 1;
  return out;
}

let cases = 0;
function judged(name, fn) {
  try {
    fn();
    cases++;
  } catch (e) {
    console.error(`judge: ${name}: ${e.message}`);
    process.exitCode = 1;
  }
}

const raw = rawDisk();
writeFileSync(path('src.raw'), raw);

// 1. Raw disks converted to qcow2 with qemu-img's options.
const conversions = [
  {},
  { cluster_size: 4096 },
  { cluster_size: 512, refcount_bits: 1 },
  { cluster_size: 65536, extended_l2: true },
  { compat: '0.10', cluster_size: 16384 },
  { compress: true },
  { compress: true, compression_type: 'zstd' },
  { compress: true, cluster_size: 4096, refcount_bits: 2 },
  { compress: true, compression_type: 'zstd', extended_l2: true, cluster_size: 131072 },
];
for (const [i, options] of conversions.entries()) {
  judged(`convertRawToQcow2 ${JSON.stringify(options)}`, () => {
    const target = memStorage();
    convertRawToQcow2(memStorage(raw), target, options);
    const file = `conv-${i}.qcow2`;
    writeFileSync(path(file), target.bytes());
    assertCheckClean(file);
    assertSame('src.raw', file);
    const info = JSON.parse(qemuImg('info', '--output=json', file));
    assert.equal(info['virtual-size'], raw.length);
    assert.equal(info['cluster-size'], options.cluster_size ?? 65536);
    const data = info['format-specific'].data;
    assert.equal(data.compat, options.compat ?? '1.1');
    if (options.compat !== '0.10') {
      assert.equal(data['compression-type'], options.compression_type ?? 'zlib');
      assert.equal(data['refcount-bits'], options.refcount_bits ?? 16);
      assert.equal(data['extended-l2'] ?? false, options.extended_l2 ?? false);
    }
    if (options.compress) {
      const map = JSON.parse(qemuImg('map', '--output=json', file));
      assert.ok(map.some((e) => e.compressed), 'some clusters are compressed');
    }
  });
}

// 2. Guest writes into images qemu-img made, judged against a raw model.
const writeCases = [
  { name: 'plain', opts: 'cluster_size=65536' },
  { name: 'small', opts: 'cluster_size=4096,refcount_bits=1' },
  { name: 'extl2', opts: 'extended_l2=on,cluster_size=65536' },
  { name: 'v2', opts: 'compat=0.10,cluster_size=16384' },
];
for (const { name, opts } of writeCases) {
  judged(`write into a qemu-img image (${opts})`, () => {
    const file = `w-${name}.qcow2`;
    qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, file, '4M');
    qemuIo(path(file), 'write -P 0x11 0 1M', 'write -c -P 0x22 1M 64k', 'write -z 2M 256k');
    qemuImg('convert', '-f', 'qcow2', '-O', 'raw', file, `w-${name}.raw`);
    const model = new Uint8Array(readFileSync(path(`w-${name}.raw`)));
    const storage = memStorage(readFileSync(path(file)));
    const img = QcowImage.openWritable(file, storage, undefined);
    const writes = [
      [0, 512, 0xa1], // inside an allocated cluster
      [1000, 70000, 0xa2], // unaligned, across clusters
      [(1 << 20) + 100, 300, 0xa3], // into a compressed cluster
      [(2 << 20) + 4096, 8192, 0xa4], // into zero clusters
      [(3 << 20) + 65536 - 10, 20, 0xa5], // unallocated, across a boundary
      [(4 << 20) - 512, 512, 0xa6], // the last sector
    ];
    for (const [at, len, fill] of writes) {
      img.write(at, new Uint8Array(len).fill(fill));
      model.fill(fill, at, at + len);
    }
    img.flush();
    img.free();
    writeFileSync(path(file), storage.bytes());
    writeFileSync(path(`w-${name}-want.raw`), model);
    assertCheckClean(file);
    assertSame(`w-${name}-want.raw`, file);
  });
}

// 3. New empty images.
for (const [i, options] of [
  { size: '64M' },
  { size: 1 << 30, cluster_size: 2097152 },
  { size: '10M', preallocation: 'metadata', cluster_size: 4096 },
  { size: '1T', refcount_bits: 64, lazy_refcounts: true },
].entries()) {
  judged(`createImageBytes ${JSON.stringify(options)}`, () => {
    const file = `new-${i}.qcow2`;
    writeFileSync(path(file), createImageBytes(options));
    assertCheckClean(file);
    const info = JSON.parse(qemuImg('info', '--output=json', file));
    assert.equal(info.format, 'qcow2');
    const opts = Object.entries(options)
      .filter(([k]) => k !== 'size')
      .map(([k, v]) => `${k}=${v === true ? 'on' : v}`)
      .join(',');
    const ref = `ref-${i}.qcow2`;
    qemuImg('create', '-q', '-f', 'qcow2', ...(opts ? ['-o', opts] : []), ref, String(options.size));
    const theirs = JSON.parse(qemuImg('info', '--output=json', ref));
    assert.equal(info['virtual-size'], theirs['virtual-size']);
    assert.equal(info['cluster-size'], theirs['cluster-size']);
    assert.deepEqual(info['format-specific'], theirs['format-specific']);
    assert.equal(qemuStatus('compare', '-f', 'qcow2', '-F', 'qcow2', file, ref).code, 0);
  });
}

// 4. Raw conversions of qemu-img images, against qemu-img convert.
judged('convertToRaw of a compressed qemu-img image', () => {
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', 'src.raw', 'c.qcow2');
  const img = QcowImage.open('c.qcow2', memStorage(readFileSync(path('c.qcow2'))), undefined);
  const out = new Uint8Array(raw.length);
  img.convertToRaw((offset, bytes, len) => {
    if (bytes) out.set(bytes, offset);
    else assert.ok(len > 0);
  }, 1 << 20);
  writeFileSync(path('c-ours.raw'), out);
  assert.equal(qemuStatus('compare', '-f', 'raw', '-F', 'qcow2', 'c-ours.raw', 'c.qcow2').code, 0);
});

rmSync(tmp, { recursive: true, force: true });
if (process.exitCode) {
  console.error('judge: FAILED');
} else {
  console.log(`judge: ${cases} cases, every image passed qemu-img check and compare`);
}
