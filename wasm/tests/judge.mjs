// qemu-img judges what the wasm package writes: raw disks converted to
// qcow2 with qemu-img's options, guest writes into images qemu-img made,
// new empty images, raw conversions, and the maintenance operations
// (repair, resize, snapshots) on images qemu-img made. Every image must
// pass `qemu-img check` and hold, per `qemu-img compare`, what it should.
// And what contents() reports of disks made by sgdisk, sfdisk and the
// mkfs tools is what sfdisk --json and blkid -p say (./disks.mjs). And
// encrypted images: LUKS images made by qemu-img read with their
// passphrases as qemu-img reads them (facts, wrong and missing passphrases,
// chains), and the LUKS images the package writes, creates and converts
// into, judged by qemu-img check, convert and qemu-io with the secret.
// Runs the built package (wasm/pkg, `wasm/build.sh`) in Node.
//
//   node wasm/tests/judge.mjs
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import {
  blkid, flagsOfAttrs, fsWords, gptTypeNames, makeFs, makeGptDisk, makeMbrDisk, mbrTypeId, PAGE_GPT, requireTool,
  sparseFile, toQcow2,
} from './disks.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const pkg = join(here, '..', 'pkg');
const wasm = await import(join(pkg, 'qcowkit_wasm.js'));
await wasm.default({ module_or_path: readFileSync(join(pkg, 'qcowkit_wasm_bg.wasm')) });
const { Passphrases, QcowImage, Qcow2Writer, convertRawToQcow2, createImageBytes, inspect } = wasm;

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
  }, { chunkSize: 1 << 20 });
  writeFileSync(path('c-ours.raw'), out);
  assert.equal(qemuStatus('compare', '-f', 'raw', '-F', 'qcow2', 'c-ours.raw', 'c.qcow2').code, 0);
});

// 5. Repairs of images qemu-img made, broken by qemu-io or by editing
// bytes: `qemu-img check` exits 0 after the package's repair, and the guest
// data is what qemu-img read before it.

/** The file's bytes with cluster `c`'s 16-bit refcount set to `value`. */
function setRefcount(bytes, c, value) {
  const table = Number(bytes.readBigUInt64BE(48));
  const block = Number(bytes.readBigUInt64BE(table) & ~511n);
  bytes.writeUInt16BE(value, block + 2 * c);
}

/** qemu-img check --output=json (any exit status) and its exit status. */
function qemuCheck(file, ...args) {
  const r = spawnSync('qemu-img', ['check', '--output=json', ...args, file], { cwd: tmp, encoding: 'utf8' });
  return { code: r.status, json: JSON.parse(r.stdout), stderr: r.stderr };
}

/** Repairs `file` through the package (openForRepair), in place. */
function packageRepair(file, mode) {
  const storage = memStorage(readFileSync(path(file)));
  const img = QcowImage.openForRepair(file, storage);
  const lines = [];
  try {
    const result = img.repair(mode, (line) => lines.push(line));
    return { result, lines };
  } finally {
    img.free();
    writeFileSync(path(file), storage.bytes());
  }
}

judged('repair leaks: clusters leaked by editing refcounts of a qemu-img image', () => {
  qemuImg('create', '-q', '-f', 'qcow2', 'leak.qcow2', '8M');
  qemuIo(path('leak.qcow2'), 'write -P 0x31 0 1M', 'write -c -P 0x32 2M 256k', 'write -P 0x33 5M 64k');
  const bytes = readFileSync(path('leak.qcow2'));
  // Clusters without COPIED flags: the header and the refcount table.
  setRefcount(bytes, 0, 2);
  const table = Number(bytes.readBigUInt64BE(48)) / 65536;
  setRefcount(bytes, table, 3);
  writeFileSync(path('leak.qcow2'), bytes);
  qemuImg('convert', '-O', 'raw', 'leak.qcow2', 'leak.raw');
  const before = qemuCheck('leak.qcow2');
  assert.equal(before.code, 3, 'qemu-img check: leaks only');
  assert.equal(before.json.leaks, 2);
  writeFileSync(path('leak-qemu.qcow2'), bytes);
  const theirs = qemuCheck('leak-qemu.qcow2', '-r', 'leaks');
  const { result, lines } = packageRepair('leak.qcow2', 'leaks');
  assert.equal(result.found.leaks, before.json.leaks);
  assert.equal(result['leaks-fixed'], theirs.json['leaks-fixed']);
  assert.equal(result.leaks, undefined);
  assert.equal(result.corruptions, undefined);
  assert.equal(result['image-end-offset'], theirs.json['image-end-offset']);
  assert.equal(result.rebuilt, false);
  assert.deepEqual(lines.filter((l) => l.startsWith('Repairing')),
    ['Repairing cluster 0 refcount=2 reference=1', `Repairing cluster ${table} refcount=3 reference=1`]);
  assertCheckClean('leak.qcow2');
  assertSame('leak.raw', 'leak.qcow2');
});

judged('repair all: a lazy-refcounts image whose qemu-io was killed (dirty)', () => {
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'dirty.qcow2', '8M');
  const r = spawnSync('qemu-io', ['-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0x5b 3M 192k', '-c', 'sigraise 9',
    path('dirty.qcow2')], { cwd: tmp, encoding: 'utf8' });
  assert.equal(r.signal, 'SIGKILL', 'qemu-io was killed');
  const info = JSON.parse(qemuImg('info', '--output=json', 'dirty.qcow2'));
  assert.equal(info['dirty-flag'], true);
  qemuImg('convert', '-O', 'raw', 'dirty.qcow2', 'dirty.raw');
  const before = qemuCheck('dirty.qcow2');
  assert.equal(before.code, 2, 'qemu-img check: corruptions');
  // The package's read-only check counts what qemu-img counts.
  const ro = QcowImage.open('dirty.qcow2', memStorage(readFileSync(path('dirty.qcow2'))), undefined);
  const ours = ro.check();
  ro.free();
  assert.equal(ours.corruptions, before.json.corruptions);
  assert.equal(ours.leaks, before.json.leaks);
  const { result } = packageRepair('dirty.qcow2', 'all');
  assert.ok(result['corruptions-fixed'] > 0, JSON.stringify(result));
  assert.equal(result.corruptions, undefined);
  assert.equal(result.leaks, undefined);
  assert.equal(result['check-errors'], 0);
  assertCheckClean('dirty.qcow2');
  assertSame('dirty.raw', 'dirty.qcow2');
  assert.equal(JSON.parse(qemuImg('info', '--output=json', 'dirty.qcow2'))['dirty-flag'], false);
});

judged('repair all: an image marked corrupt whose L2 table has refcount 0', () => {
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'corrupt.qcow2', '8M');
  qemuIo(path('corrupt.qcow2'), 'write -P 0x41 0 1M', 'write -z 2M 64k', 'write -P 0x42 7M 12k');
  qemuImg('snapshot', '-c', 'kept', 'corrupt.qcow2');
  qemuIo(path('corrupt.qcow2'), 'write -P 0x43 0 8k');
  qemuImg('convert', '-O', 'raw', 'corrupt.qcow2', 'corrupt.raw');
  qemuImg('convert', '-l', 'kept', '-O', 'raw', 'corrupt.qcow2', 'corrupt-kept.raw');
  const bytes = readFileSync(path('corrupt.qcow2'));
  const l1 = Number(bytes.readBigUInt64BE(40));
  const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  setRefcount(bytes, l2 / 4096, 0);
  bytes.writeBigUInt64BE(bytes.readBigUInt64BE(72) | 2n, 72); // the corrupt bit
  writeFileSync(path('corrupt.qcow2'), bytes);
  assert.equal(qemuCheck('corrupt.qcow2').code, 2);
  assert.throws(() => QcowImage.openWritable('corrupt.qcow2', memStorage(bytes), undefined), /corrupt/);
  // "leaks" cannot fix it (the structure must be rebuilt); nothing is written.
  assert.throws(() => packageRepair('corrupt.qcow2', 'leaks'), /"all"/);
  assert.deepEqual(readFileSync(path('corrupt.qcow2')), bytes);
  const { result, lines } = packageRepair('corrupt.qcow2', 'all');
  assert.equal(result.rebuilt, true);
  assert.ok(lines.includes('Rebuilding refcount structure'), lines.join('\n'));
  assert.equal(result.corruptions, undefined, JSON.stringify(result));
  assertCheckClean('corrupt.qcow2');
  assertSame('corrupt.raw', 'corrupt.qcow2');
  const info = JSON.parse(qemuImg('info', '--output=json', 'corrupt.qcow2'));
  assert.equal(info['format-specific'].data.corrupt, false);
  qemuImg('convert', '-l', 'kept', '-O', 'raw', 'corrupt.qcow2', 'corrupt-kept-after.raw');
  assert.deepEqual(readFileSync(path('corrupt-kept-after.raw')), readFileSync(path('corrupt-kept.raw')));
});

// 6. Resizing images qemu-img made: the size qemu-img info reports, clean,
// and the data below the new end kept (compared with qemu-img's raw copy
// cut or extended to the new size).

/** `file` resized through the package (openWritable), written back. */
function packageResize(file, size, options) {
  const storage = memStorage(readFileSync(path(file)));
  const img = QcowImage.openWritable(file, storage, undefined);
  try {
    return img.resize(size, options);
  } finally {
    img.free();
    writeFileSync(path(file), storage.bytes());
  }
}

/** qemu-img's raw copy of `file`, cut or extended (zeros) to `size`. */
function rawAt(file, size, out) {
  qemuImg('convert', '-O', 'raw', file, out);
  const data = readFileSync(path(out));
  const sized = Buffer.alloc(size);
  data.copy(sized, 0, 0, Math.min(size, data.length));
  writeFileSync(path(out), sized);
}

/** A size as resize() takes it (bytes, "10M", "+1G", "-5M") from `current`. */
function sizeFrom(size, current) {
  if (typeof size === 'number') return size;
  const m = /^([+-]?)(\d+)([KMG]?)$/.exec(size);
  const n = Number(m[2]) * 2 ** ({ '': 0, K: 10, M: 20, G: 30 }[m[3]]);
  return m[1] === '+' ? current + n : m[1] === '-' ? current - n : n;
}

const virtualSize = (file) => JSON.parse(qemuImg('info', '--output=json', file))['virtual-size'];

for (const { name, opts, grow, shrink, prealloc } of [
  { name: 'plain', opts: 'cluster_size=65536', grow: '+60M', shrink: '3M' },
  { name: 'small-clusters', opts: 'cluster_size=512', grow: 48 << 20, shrink: '-45M' }, // the L1 table grows
  { name: 'v2', opts: 'compat=0.10,cluster_size=16384', grow: '1G', shrink: 2 << 20 },
  { name: 'extl2', opts: 'extended_l2=on', grow: '+1M', shrink: '1536K' },
  { name: 'meta', opts: 'cluster_size=65536', grow: '16M', prealloc: 'metadata' },
  { name: 'falloc', opts: 'cluster_size=65536', grow: '+8M', prealloc: 'falloc' },
  { name: 'full', opts: 'cluster_size=4096', grow: '+2M', prealloc: 'full' },
]) {
  judged(`resize a qemu-img image (${opts}) to ${grow}${prealloc ? ` preallocation=${prealloc}` : ''}, then ${shrink ?? 'nothing'}`, () => {
    const file = `rs-${name}.qcow2`;
    qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, file, '6M');
    qemuIo(path(file), 'write -P 0x61 0 1M', 'write -c -P 0x62 1M 64k', 'write -P 0x63 2560k 4k',
      'write -z 3M 64k', 'write -P 0x64 5M 1M');
    const size0 = 6 << 20;
    const want = sizeFrom(grow, size0);
    const got = packageResize(file, grow, prealloc ? { preallocation: prealloc } : undefined);
    assert.equal(got, want);
    assert.equal(virtualSize(file), want);
    assertCheckClean(file);
    rawAt(file, want, `${file}.raw`);
    // qemu-img's raw copy of the original, extended with zeros.
    qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, `ref-${file}`, '6M');
    qemuIo(path(`ref-${file}`), 'write -P 0x61 0 1M', 'write -c -P 0x62 1M 64k', 'write -P 0x63 2560k 4k',
      'write -z 3M 64k', 'write -P 0x64 5M 1M');
    rawAt(`ref-${file}`, want, `ref-${file}.raw`);
    assertSame(`ref-${file}.raw`, file);
    if (prealloc) {
      const before = qemuCheck(`ref-${file}`).json['image-end-offset'];
      assert.ok(qemuCheck(file).json['image-end-offset'] > before, 'the grown range is preallocated');
    }
    if (!shrink) return;
    // Shrinking without shrink: true is refused and changes nothing.
    const unchanged = readFileSync(path(file));
    assert.throws(() => packageResize(file, shrink), (e) => e.code === 'invalid-argument' && /^Use the shrink: true option to perform a shrink operation\./.test(e.message));
    assert.deepEqual(readFileSync(path(file)), unchanged);
    const small = packageResize(file, shrink, { shrink: true });
    assert.equal(small, sizeFrom(shrink, want));
    assert.equal(virtualSize(file), small);
    assert.ok(small < 6 << 20, 'cut below the data written');
    assertCheckClean(file);
    rawAt(`ref-${file}`, small, `ref-${file}-small.raw`);
    assertSame(`ref-${file}-small.raw`, file);
  });
}

// 7. Snapshots: the package's list is qemu-img's, a snapshot it takes is
// listed by `qemu-img snapshot -l` and holds the disk as it was, and
// applying and deleting leave images qemu-img checks clean.

/** `qemu-img snapshot -l` as [{ id, name }]. */
function qemuSnapshots(file) {
  const out = qemuImg('snapshot', '-l', file);
  return out.split('\n').slice(2).filter((l) => l.trim())
    .map((l) => l.trim().split(/\s+/)).map(([id, name]) => ({ id, name }));
}

for (const { name, opts } of [
  { name: 'plain', opts: 'cluster_size=65536' },
  { name: 'small', opts: 'cluster_size=4096,refcount_bits=8' },
  { name: 'v2', opts: 'compat=0.10' },
  { name: 'extl2', opts: 'extended_l2=on,cluster_size=32768' },
]) {
  judged(`snapshots of a qemu-img image (${opts}): list, take, apply, delete`, () => {
    const file = `sn-${name}.qcow2`;
    qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, file, '8M');
    qemuIo(path(file), 'write -P 0x71 0 1M', 'write -c -P 0x72 2M 64k');
    qemuImg('snapshot', '-c', 'theirs', file);
    qemuImg('convert', '-O', 'raw', file, `${file}-theirs.raw`);
    qemuIo(path(file), 'write -P 0x73 512k 1M', 'write -z 2M 64k');
    qemuImg('convert', '-O', 'raw', file, `${file}-ours.raw`);

    const storage = memStorage(readFileSync(path(file)));
    let img = QcowImage.openWritable(file, storage, undefined);
    const info = JSON.parse(qemuImg('info', '--output=json', file));
    assert.deepEqual(img.snapshots(), info.snapshots);
    const t0 = Date.now();
    assert.equal(img.createSnapshot('ours'), '2');
    img.write(0, new Uint8Array(4096).fill(0x74)); // after the snapshot
    img.free();
    writeFileSync(path(file), storage.bytes());
    assertCheckClean(file);
    assert.deepEqual(qemuSnapshots(file), [{ id: '1', name: 'theirs' }, { id: '2', name: 'ours' }]);
    const listed = JSON.parse(qemuImg('info', '--output=json', file)).snapshots;
    const ours = listed.find((s) => s.name === 'ours');
    assert.ok(Math.abs(ours['date-sec'] * 1000 + ours['date-nsec'] / 1e6 - t0) < 5000, 'dated now');
    assert.equal(ours['vm-state-size'], 0);
    // The package's list equals qemu-img's, fields and order.
    img = QcowImage.open(file, memStorage(readFileSync(path(file))), undefined);
    assert.deepEqual(img.snapshots(), listed);
    img.free();
    // The snapshot holds the disk as it was when taken.
    qemuImg('convert', '-l', 'ours', '-O', 'raw', file, `${file}-ours-l.raw`);
    assert.deepEqual(readFileSync(path(`${file}-ours-l.raw`)), readFileSync(path(`${file}-ours.raw`)));
    writeFileSync(path(`${file}-q.qcow2`), readFileSync(path(file)));
    qemuImg('snapshot', '-a', 'ours', `${file}-q.qcow2`);
    assertSame(`${file}-ours.raw`, `${file}-q.qcow2`);

    // Applied and deleted through the package.
    const s2 = memStorage(readFileSync(path(file)));
    img = QcowImage.openWritable(file, s2, undefined);
    img.applySnapshot('theirs');
    img.deleteSnapshot('ours');
    assert.throws(() => img.deleteSnapshot('ours'), /snapshot not found/);
    img.free();
    writeFileSync(path(file), s2.bytes());
    assertCheckClean(file);
    assertSame(`${file}-theirs.raw`, file);
    assert.deepEqual(qemuSnapshots(file), [{ id: '1', name: 'theirs' }]);
  });
}

// 8. Conversions through the package's other converters: a qemu-img
// image (and its backing chain) into qcow2 with the options users pick
// (QcowImage.convertToQcow2), a raw disk written in steps through a
// Qcow2Writer (as the worker does), and an image copied to raw in steps
// (convertToRawStorage with ranges). Judged by qemu-img check and compare.

/** A qemu-img image with data, compressed data, zeros and a backing file. */
function chainForConversions() {
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', 'cv-base.qcow2', '24M');
  qemuIo(path('cv-base.qcow2'), 'write -P 0x81 0 3M', 'write -P 0x82 20M 1M');
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'cv-base.qcow2', '-F', 'qcow2', '-o', 'cluster_size=32768', 'cv-top.qcow2');
  qemuIo(path('cv-top.qcow2'), 'write -P 0x83 1M 512k', 'write -z 2M 64k', 'write -c -P 0x84 8M 1M',
    'write -P 0x85 23M 999k');
  qemuImg('convert', '-O', 'raw', 'cv-top.qcow2', 'cv-top.raw');
}
chainForConversions();
const openChain = () => QcowImage.open('cv-top.qcow2', memStorage(readFileSync(path('cv-top.qcow2'))),
  { 'cv-base.qcow2': memStorage(readFileSync(path('cv-base.qcow2'))) });

for (const [i, options] of [
  {},
  { compress: true },
  { compress: true, compression_type: 'zstd', cluster_size: 16384 },
  { cluster_size: 16384, extended_l2: true },
  { cluster_size: 2097152, extended_l2: true, compress: true, compression_type: 'zstd' },
  { compat: '0.10', cluster_size: 512 },
].entries()) {
  judged(`convertToQcow2 of a qemu-img chain ${JSON.stringify(options)}`, () => {
    const img = openChain();
    const target = memStorage();
    const seen = [];
    img.convertToQcow2(target, { ...options, onProgress: (done, total) => seen.push([done, total]) });
    img.free();
    const file = `cv-${i}.qcow2`;
    writeFileSync(path(file), target.bytes());
    assertCheckClean(file);
    assertSame('cv-top.raw', file);
    const info = JSON.parse(qemuImg('info', '--output=json', file));
    assert.equal(info['virtual-size'], 24 << 20);
    assert.equal(info['backing-filename'], undefined, 'standalone');
    assert.equal(info['cluster-size'], options.cluster_size ?? 65536);
    const d = info['format-specific'].data;
    if (options.compat !== '0.10') {
      assert.equal(d['compression-type'], options.compression_type ?? 'zlib');
      assert.equal(d['extended-l2'] ?? false, options.extended_l2 ?? false);
    }
    const map = JSON.parse(qemuImg('map', '--output=json', file));
    assert.equal(map.some((e) => e.compressed), !!options.compress, 'compressed clusters as asked');
    assert.deepEqual(seen[0], [0, 24 << 20]);
    assert.deepEqual(seen[seen.length - 1], [24 << 20, 24 << 20]);
    assert.ok(seen.every(([d], k) => k === 0 || d >= seen[k - 1][0]), 'progress never goes back');
  });
}

judged('Qcow2Writer: a raw disk written in pieces (as the worker does), zstd-compressed', () => {
  const target = memStorage();
  const w = new Qcow2Writer(target, { size: raw.length, compress: true, compression_type: 'zstd', cluster_size: 65536 });
  assert.equal(w.virtualSize, raw.length);
  assert.equal(w.clusterSize, 65536);
  // Pieces of 1.5 MiB (whole clusters), the last one shorter.
  for (let at = 0; at < raw.length; at += 1536 << 10) w.write(at, raw.subarray(at, Math.min(raw.length, at + (1536 << 10))));
  assert.throws(() => w.write(1000, new Uint8Array(65536)), (e) => e.code === 'invalid-argument' && /start on a cluster/.test(e.message));
  assert.throws(() => w.write(raw.length, new Uint8Array(65536)), (e) => e.code === 'out-of-bounds');
  w.finish();
  w.free();
  writeFileSync(path('writer.qcow2'), target.bytes());
  assertCheckClean('writer.qcow2');
  assertSame('src.raw', 'writer.qcow2');
  assert.ok(JSON.parse(qemuImg('map', '--output=json', 'writer.qcow2')).some((e) => e.compressed));
});

judged('Qcow2Writer.copyFrom: a chain copied in steps equals qemu-img convert', () => {
  const img = openChain();
  const target = memStorage();
  const w = new Qcow2Writer(target, { size: img.virtualSize(), cluster_size: 131072 });
  for (let at = 0; at < img.virtualSize(); at += 3 << 20) {
    w.copyFrom(img, { start: at, end: Math.min(img.virtualSize(), at + (3 << 20)) });
  }
  assert.throws(() => w.copyFrom(img, { start: 4096, end: 8192 }), (e) => e.code === 'invalid-argument');
  w.finish();
  w.free();
  img.free();
  writeFileSync(path('copied.qcow2'), target.bytes());
  assertCheckClean('copied.qcow2');
  assertSame('cv-top.raw', 'copied.qcow2');
});

judged('convertToRawStorage in steps (ranges) equals qemu-img convert -O raw', () => {
  const img = openChain();
  const out = memStorage();
  out.truncate(img.virtualSize());
  for (let at = 0; at < img.virtualSize(); at += 5 << 20) {
    img.convertToRawStorage(out, { start: at, end: Math.min(img.virtualSize(), at + (5 << 20)) });
  }
  img.free();
  writeFileSync(path('steps.raw'), out.bytes());
  assert.deepEqual(readFileSync(path('steps.raw')), readFileSync(path('cv-top.raw')));
});

judged('a throwing onProgress stops a conversion with its error code', () => {
  const img = openChain();
  const stop = () => {
    const e = new Error('stopped by the test');
    e.name = 'AbortError';
    throw e;
  };
  let n = 0;
  assert.throws(() => img.convertToQcow2(memStorage(), { onProgress: () => { if (++n > 2) stop(); } }),
    (e) => e.code === 'aborted' && e.name === 'AbortError' && /stopped by the test/.test(e.message));
  assert.throws(() => convertRawToQcow2(memStorage(raw), memStorage(), { onProgress: stop }),
    (e) => e.code === 'aborted');
  img.free();
});

// 9. The host-file layout (hostLayout) against qemu-img: the runs cover the
// file; the data clusters are where qemu-img map says guest data lies; the
// tables are where the header points; a leaked cluster is found.
judged('hostLayout of qemu-img images agrees with qemu-img map, check and the header', () => {
  for (const file of ['cv-top.qcow2', 'corrupt.qcow2', 'sn-plain.qcow2']) {
    const bytes = readFileSync(path(file));
    const img = QcowImage.open(file, memStorage(bytes), { 'cv-base.qcow2': memStorage(readFileSync(path('cv-base.qcow2'))) });
    const runs = img.hostLayout();
    img.free();
    let pos = 0;
    for (const r of runs) {
      assert.equal(r.start, pos, `${file}: runs are consecutive`);
      pos += r.len;
    }
    assert.equal(pos, bytes.length, `${file}: runs cover the file`);
    const at = (offset) => runs.find((r) => r.start <= offset && offset < r.start + r.len).kind;
    assert.equal(at(0), 'header');
    assert.equal(at(Number(bytes.readBigUInt64BE(40))), 'l1');
    assert.equal(at(Number(bytes.readBigUInt64BE(48))), 'refcount-table');
    // Every host offset qemu-img map reports holds data (or compressed data).
    const map = JSON.parse(qemuImg('map', '--output=json', '-f', 'qcow2', file))
      .filter((e) => e.data && e.depth === 0 && e.offset !== undefined);
    for (const e of map) assert.equal(at(e.offset), 'data', `${file}: guest ${e.start} at host ${e.offset}`);
    const cs = JSON.parse(qemuImg('info', '--output=json', file))['cluster-size'];
    const dataBytes = runs.filter((r) => r.kind === 'data').reduce((n, r) => n + r.len, 0);
    const hostClusters = new Set(map.flatMap((e) => Array.from({ length: Math.ceil(e.length / cs) }, (_, k) => Math.floor(e.offset / cs) + k)));
    // (Images with snapshots also hold data only snapshots read.)
    if (file === 'cv-top.qcow2') assert.equal(dataBytes, hostClusters.size * cs, `${file}: data clusters`);
    const check = qemuCheck(file).json;
    assert.equal(runs.some((r) => r.kind === 'leaked'), (check.leaks ?? 0) > 0, `${file}: leaks`);
  }
  // One leaked cluster: the file grown by a cluster whose refcount is 1.
  qemuImg('create', '-q', '-f', 'qcow2', 'hl-leak.qcow2', '4M');
  qemuIo(path('hl-leak.qcow2'), 'write -P 0x91 0 128k');
  const bytes = readFileSync(path('hl-leak.qcow2'));
  const grown = Buffer.concat([bytes, Buffer.alloc(65536)]);
  setRefcount(grown, bytes.length / 65536, 1);
  writeFileSync(path('hl-leak.qcow2'), grown);
  assert.equal(qemuCheck('hl-leak.qcow2').json.leaks, 1);
  const img = QcowImage.open('hl-leak.qcow2', memStorage(grown), undefined);
  const runs = img.hostLayout();
  img.free();
  assert.deepEqual(runs[runs.length - 1], { start: bytes.length, len: 65536, kind: 'leaked' });
  assert.equal(runs.filter((r) => r.kind === 'data').reduce((n, r) => n + r.len, 0), 128 << 10);
});

// 10. Error codes, and 64-bit values: exact numbers up to
// Number.MAX_SAFE_INTEGER, refused beyond it.
judged('errors carry stable codes', () => {
  const code = (fn) => {
    try {
      fn();
    } catch (e) {
      assert.ok(e instanceof Error, 'an Error');
      return e.code;
    }
    return 'no error';
  };
  assert.equal(code(() => QcowImage.open('x', memStorage(raw), undefined)), 'format');
  assert.equal(code(() => QcowImage.open('cv-top.qcow2', memStorage(readFileSync(path('cv-top.qcow2'))), {})), 'missing-backing');
  assert.equal(code(() => QcowImage.open('x', 42, undefined)), 'invalid-argument');
  const img = openChain();
  assert.equal(code(() => img.read(24 << 20, 1)), 'out-of-bounds');
  assert.equal(code(() => img.read(2 ** 53, 1)), 'invalid-argument');
  assert.equal(code(() => img.write(0, new Uint8Array(1))), 'read-only');
  assert.equal(code(() => img.allocation({ start: 0, end: 2 ** 60 })), 'invalid-argument');
  img.free();
  const w = QcowImage.openWritable('sn-plain.qcow2', memStorage(readFileSync(path('sn-plain.qcow2'))), undefined);
  assert.equal(code(() => w.deleteSnapshot('none')), 'not-found');
  assert.equal(code(() => w.applySnapshot('none')), 'not-found');
  assert.equal(code(() => w.resize('+1000')), 'invalid-argument');
  w.free();
  assert.equal(code(() => createImageBytes({ size: '1M', cluster_size: 3000 })), 'invalid-argument');
  assert.equal(code(() => createImageBytes({ size: '1M', no_such_option: 1 })), 'invalid-argument');
  assert.equal(code(() => QcowImage.openWritable('corrupt-x.qcow2', memStorage(corruptBytes()), undefined)), 'read-only');
  assert.equal(code(() => QcowImage.openForRepair('corrupt-x.qcow2', memStorage(corruptBytes())).repair('leaks')), 'corrupt');
  // An encrypted image (no passphrase given): it opens for its metadata;
  // reading its data, contents() included, needs the passphrase.
  qemuImg('create', '-q', '-f', 'qcow2', '--object', 'secret,id=s0,data=judge', '-o',
    'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', 'luks.qcow2', '1M');
  execFileSync('qemu-io', ['--object', 'secret,id=s0,data=judge', '--image-opts',
    'driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s0', '-c', 'write -P 0x33 0 64k'], { cwd: tmp });
  const luks = QcowImage.open('luks.qcow2', memStorage(readFileSync(path('luks.qcow2'))), undefined);
  assert.equal(luks.info().encrypted, true, 'info() shows the encryption');
  assert.equal(code(() => luks.read(0, 512)), 'passphrase-required');
  assert.equal(code(() => luks.contents()), 'passphrase-required');
  luks.free();
});

/** An image whose L2 table has refcount 0 and the corrupt bit set. */
function corruptBytes() {
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'corrupt-x.qcow2', '1M');
  qemuIo(path('corrupt-x.qcow2'), 'write -P 0x41 0 64k');
  const bytes = readFileSync(path('corrupt-x.qcow2'));
  const l1 = Number(bytes.readBigUInt64BE(40));
  setRefcount(bytes, Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n) / 4096, 0);
  bytes.writeBigUInt64BE(bytes.readBigUInt64BE(72) | 2n, 72);
  return bytes;
}

judged('64-bit values are exact below 2^53 and refused above it (never rounded)', () => {
  // A snapshot whose VM state size (version 3's 64-bit field) is 2^53 + 1:
  // info() and snapshots() refuse it.
  const bytes = readFileSync(path('sn-plain.qcow2'));
  const table = Number(bytes.readBigUInt64BE(64));
  const big = Buffer.from(bytes);
  big.writeBigUInt64BE(2n ** 53n + 1n, table + 40); // vm_state_size_large of the first entry
  const img = QcowImage.open('big.qcow2', memStorage(big), undefined);
  for (const f of [() => img.snapshots(), () => img.info()]) {
    assert.throws(f, (e) => e.code === 'unsupported' && /9007199254740993/.test(e.message)
      && /MAX_SAFE_INTEGER/.test(e.message) && /vm-state-size/.test(e.message));
  }
  img.free();
  // Just below the limit: exact.
  big.writeBigUInt64BE(2n ** 53n - 1n, table + 40);
  const ok = QcowImage.open('big.qcow2', memStorage(big), undefined);
  assert.equal(ok.snapshots()[0]['vm-state-size'], Number.MAX_SAFE_INTEGER);
  ok.free();
  // A 2^53 - 512 byte image: sizes and offsets are exact.
  const huge = createImageBytes({ size: String(2 ** 53 - 512), cluster_size: 2097152 });
  const h = QcowImage.openWritable('huge.qcow2', memStorage(huge), undefined);
  assert.equal(h.virtualSize(), 2 ** 53 - 512);
  h.write(2 ** 53 - 1024, new Uint8Array(512).fill(7));
  assert.deepEqual(h.read(2 ** 53 - 1024, 512), new Uint8Array(512).fill(7));
  assert.equal(h.info()['virtual-size'], 2 ** 53 - 512);
  const last = h.allocationMap({ start: 2 ** 53 - 2 ** 21 });
  assert.equal(last[last.length - 1].start + last[last.length - 1].length, 2 ** 53 - 512);
  h.free();
});

// 11. The Node example (wasm/examples/node-info.mjs) on a qemu-img chain.
judged('examples/node-info.mjs prints what qemu-img info says', () => {
  const example = join(here, '..', 'examples', 'node-info.mjs');
  const out = JSON.parse(execFileSync(process.execPath, [example, path('cv-top.qcow2'), '--json'], { encoding: 'utf8' }));
  const theirs = JSON.parse(qemuImg('info', '--output=json', 'cv-top.qcow2'));
  assert.equal(out.info['virtual-size'], theirs['virtual-size']);
  assert.equal(out.info['cluster-size'], theirs['cluster-size']);
  assert.equal(out.info['backing-filename'], theirs['backing-filename']);
  assert.deepEqual(out.chain, [path('cv-top.qcow2'), path('cv-base.qcow2')]);
  assert.equal(out.check['check-errors'], 0);
  const text = execFileSync(process.execPath, [example, path('cv-top.qcow2')], { encoding: 'utf8' });
  assert.match(text, new RegExp(`virtual size: ${theirs['virtual-size']} bytes`));
  const bad = spawnSync(process.execPath, [example, path('src.raw')], { encoding: 'utf8' });
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /not a qcow2 image.*\(code format\)/);
  void inspect;
});

// 12. What the guest disk holds (contents()) on disks made by the real
// tools, converted by qemu-img (4 KiB clusters: partitions span many L2
// tables), against sfdisk --json and blkid -p of the same bytes.
const contentsOf = (file) => {
  const img = QcowImage.open(file, memStorage(readFileSync(path(file))), undefined);
  try {
    return img.contents();
  } finally {
    img.free();
  }
};

/** Checks a partition's (or the disk's) `filesystem` against blkid -p of its bytes. */
function assertFsIsBlkids(raw, offset, len, fs, what) {
  const b = blkid(tmp, raw, offset, len);
  assert.ok(b.TYPE, `${what}: blkid finds a file system (${JSON.stringify(b)})`);
  assert.ok(fs, `${what}: a file system reported (blkid: ${JSON.stringify(b)})`);
  assert.equal(fs['blkid-type'], b.TYPE, `${what}: type`);
  assert.equal(fs.type, fsWords(b), `${what}: type in words`);
  assert.equal(fs.label, b.LABEL, `${what}: label`);
  assert.equal(fs.uuid, b.UUID, `${what}: UUID`);
  switch (b.TYPE) {
    case 'swap': case 'crypto_LUKS': assert.equal(String(fs.version), b.VERSION, `${what}: version`); break;
    case 'exfat': assert.ok(b.VERSION.startsWith(`${fs.version}.`), `${what}: exFAT version ${b.VERSION}`); break;
    case 'ext2': case 'ext3': case 'ext4': case 'btrfs':
      assert.equal(String(fs['block-size']), b.BLOCK_SIZE, `${what}: block size`);
      break;
    default:
  }
}

const ODD_TYPE = '12345678-9ABC-DEF0-1234-56789ABCDEF0';
const JUDGE_GPT = [
  ...PAGE_GPT,
  { size: 16, code: '0700', name: 'exchange', fs: { kind: 'exfat', label: 'EXF' } },
  { size: 300, code: '8300', name: 'xfs', fs: { kind: 'xfs', label: 'xfsvol' } },
  { size: 128, code: '8300', name: 'btrfs', fs: { kind: 'btrfs', label: 'btr' } },
  { size: 20, code: '8309', name: 'vault', fs: { kind: 'luks2', label: 'vault' } },
  { size: 1, code: ODD_TYPE, name: 'unknown type' },
];

judged('contents(): a GPT disk made by sgdisk with FAT32, ext4, swap, NTFS, exFAT, XFS, Btrfs and LUKS2, against sfdisk and blkid', () => {
  const table = makeGptDisk(tmp, 'gpt.raw', JUDGE_GPT);
  toQcow2(tmp, 'gpt.raw', 'gpt-4k.qcow2', 4096);
  toQcow2(tmp, 'gpt.raw', 'gpt-64k.qcow2', 65536);
  const c = contentsOf('gpt-4k.qcow2');
  assert.deepEqual(contentsOf('gpt-64k.qcow2'), c, 'the same whatever the cluster size');
  assert.deepEqual(c['partition-table'], { type: 'gpt', 'sector-size': table.sectorsize, 'disk-guid': table.id,
    header: 'primary' });
  assert.equal(c.error, undefined);
  assert.equal(c.filesystem, undefined, 'nothing at the start of the disk');
  const names = gptTypeNames(tmp);
  assert.equal(c.partitions.length, table.partitions.length);
  c.partitions.forEach((p, i) => {
    const t = table.partitions[i];
    const what = `partition ${p.number}`;
    assert.equal(`gpt.raw${p.number}`, t.node, what);
    assert.equal(p.start, t.start * 512, `${what}: start`);
    assert.equal(p.size, t.size * 512, `${what}: size`);
    assert.equal(p['type-id'], t.type, `${what}: type id`);
    assert.equal(p.type, names[t.type] ?? t.type, `${what}: type in words`);
    assert.equal(p.uuid, t.uuid, `${what}: GUID`);
    assert.equal(p.name, t.name ?? '', `${what}: name`);
    assert.deepEqual(p.flags ?? [], flagsOfAttrs(t.attrs, t.type), `${what}: flags`);
    assert.equal(p.logical, undefined);
    if (JUDGE_GPT[i].fs) {
      assertFsIsBlkids('gpt.raw', p.start, p.size, p.filesystem, what);
    } else {
      assert.equal(p.filesystem, undefined, `${what}: nothing`);
      assert.equal(blkid(tmp, 'gpt.raw', p.start, p.size).TYPE, undefined);
    }
  });
  assert.equal(c.partitions[8].type, ODD_TYPE, 'an unknown type is its GUID');
  assert.deepEqual(c.partitions[0].flags, ['required']);
  assert.deepEqual(c.partitions[3].flags, ['hidden', 'no automount']);
  // What only the file systems' own fields say.
  const fs = c.partitions.map((p) => p.filesystem || {});
  assert.equal(fs[0].type, 'FAT32');
  assert.ok(fs[1].features.includes('has_journal') && fs[1].features.includes('extent'), fs[1].features);
  assert.equal(fs[1].size, table.partitions[1].size * 512, 'the ext4 file system fills its partition');
  assert.equal(fs[2].size, table.partitions[2].size * 512, 'the swap area fills its partition');
  assert.equal(fs[5].type, 'XFS');
  assert.equal(fs[7].type, 'LUKS');
  assert.equal(`${fs[7].cipher}-${fs[7]['cipher-mode']}`, 'aes-xts-plain64');
});

judged('contents(): an MBR disk made by sfdisk with logical partitions, against sfdisk and blkid', () => {
  const table = makeMbrDisk(tmp, 'mbr.raw');
  toQcow2(tmp, 'mbr.raw', 'mbr.qcow2', 4096);
  const c = contentsOf('mbr.qcow2');
  assert.deepEqual(c['partition-table'], { type: 'mbr', 'sector-size': 512, 'disk-id': table.id });
  const words = { e: 'FAT16 (LBA)', 83: 'Linux', 5: 'Extended', 82: 'Linux swap', 7: 'NTFS/exFAT' };
  assert.deepEqual(c.partitions.map((p) => p.number), [1, 2, 3, 5, 6, 7]);
  c.partitions.forEach((p, i) => {
    const t = table.partitions[i];
    const what = `partition ${p.number}`;
    assert.equal(`mbr.raw${p.number}`, t.node, what);
    assert.equal(p.start, t.start * 512, `${what}: start`);
    assert.equal(p.size, t.size * 512, `${what}: size`);
    assert.equal(p['type-id'], mbrTypeId(t.type), `${what}: type id`);
    assert.equal(p.type, words[t.type], `${what}: type in words`);
    assert.equal(p.logical, p.number >= 5 ? true : undefined, `${what}: logical`);
    assert.deepEqual(p.flags ?? [], t.bootable ? ['bootable'] : [], `${what}: flags`);
    assert.equal(p.name, undefined);
    assert.equal(p.uuid, undefined);
    if (p.number === 3) {
      assert.equal(p.filesystem, undefined, 'the extended partition is a container, not probed');
    } else {
      assertFsIsBlkids('mbr.raw', p.start, p.size, p.filesystem, what);
    }
  });
});

judged('contents(): damaged GPT headers are reported in the object (backup used; both gone: error), not thrown', () => {
  const good = contentsOf('gpt-4k.qcow2');
  const raw = readFileSync(path('gpt.raw'));
  // Each damaged disk: what contents() says, and how many partitions sfdisk reads.
  const damaged = (name, patch) => {
    const d = Buffer.from(raw);
    patch(d);
    writeFileSync(path(`${name}.raw`), d);
    toQcow2(tmp, `${name}.raw`, `${name}.qcow2`, 4096);
    const r = spawnSync(requireTool('sfdisk'), ['--json', `${name}.raw`], { cwd: tmp, encoding: 'utf8' });
    rmSync(path(`${name}.raw`));
    const theirs = r.status === 0 ? JSON.parse(r.stdout).partitiontable.partitions.length : 0;
    return [contentsOf(`${name}.qcow2`), theirs];
  };
  const [noPrimary, sfdiskReads] = damaged('gpt-no-primary', (d) => d.fill(0, 512, 1024));
  assert.equal(noPrimary['partition-table'].header, 'backup');
  assert.match(noPrimary['partition-table']['primary-problem'], /^primary GPT header at LBA 1: Signature /);
  assert.deepEqual(noPrimary.partitions, good.partitions, 'the same partitions from the backup');
  assert.equal(sfdiskReads, good.partitions.length, 'sfdisk reads the same table from the backup');
  const last = raw.length - 512;
  const [noBackup] = damaged('gpt-no-backup', (d) => d.fill(0, last));
  assert.equal(noBackup['partition-table'].header, 'primary');
  assert.match(noBackup['partition-table']['backup-problem'], new RegExp(`^backup GPT header at LBA ${last / 512}: Signature`));
  const [none] = damaged('gpt-none', (d) => { d.fill(0, 512, 1024); d.fill(0, last); });
  assert.deepEqual(Object.keys(none), ['error']);
  assert.match(none.error, /^invalid partition table: primary GPT header at LBA 1: Signature/);
});

judged('contents(): a file system on the whole disk (mkfs.vfat, no partition table)', () => {
  sparseFile(tmp, 'whole.raw', 40 * 2 ** 20);
  makeFs(tmp, 'whole.raw', 0, 40 * 2 ** 20, { kind: 'vfat', bits: 32, label: 'WHOLEFAT', serial: 'CAFEF00D' });
  toQcow2(tmp, 'whole.raw', 'whole.qcow2', 4096);
  const c = contentsOf('whole.qcow2');
  assert.deepEqual(Object.keys(c), ['filesystem']);
  assertFsIsBlkids('whole.raw', 0, 40 * 2 ** 20, c.filesystem, 'whole disk');
  assert.equal(c.filesystem.uuid, 'CAFE-F00D');
});

// 11. Encrypted images. Made by qemu-img with several LUKS layouts (and
// the legacy AES method), written by qemu-io: read through the package
// with the passphrase as qemu-img reads them, facts as qemu-img info
// shows them, a wrong or missing passphrase refused with its code; the
// package's writes into them, and the LUKS images it creates and converts
// into, judged by qemu-img check and read back by qemu-img and qemu-io.
const secretArgs = (pass, id = 's0') => ['--object', `secret,id=${id},data=${pass}`];
const encOpts = (file, id = 's0', extra = '') => `driver=qcow2,file.filename=${file},encrypt.key-secret=${id}${extra}`;
/** qemu-io commands on encrypted `file`. */
const qemuIoEnc = (file, pass, ...cmds) => execFileSync('qemu-io',
  [...secretArgs(pass), '--image-opts', encOpts(file), ...cmds.flatMap((c) => ['-c', c])], { cwd: tmp, encoding: 'utf8' });
/** The guest bytes of encrypted `file` as qemu-img reads them (`extra`: more -o/--image-opts, more secrets). */
function qemuRaw(file, pass, { extra = '', secrets = [] } = {}) {
  const out = `${file}.qemu.raw`;
  rmSync(path(out), { force: true });
  execFileSync('qemu-img', ['convert', ...secretArgs(pass), ...secrets.flatMap(([id, p]) => secretArgs(p, id)),
    '--image-opts', encOpts(file, 's0', extra), '-O', 'raw', out], { cwd: tmp });
  const b = new Uint8Array(readFileSync(path(out)));
  rmSync(path(out));
  return b;
}
/** qemu-img check of encrypted `file` with its passphrase. */
function assertEncCheckClean(file, pass, extraSecrets = []) {
  const r = spawnSync('qemu-img', ['check', ...secretArgs(pass), ...extraSecrets.flatMap(([id, p]) => secretArgs(p, id)),
    '--image-opts', encOpts(file)], { cwd: tmp, encoding: 'utf8' });
  assert.equal(r.status, 0, `qemu-img check ${file}: ${r.stdout}${r.stderr}`);
}
const encryptOf = (info) => info['format-specific'].data.encrypt;
const qemuInfoEnc = (file) => encryptOf(JSON.parse(qemuImg('info', '--output=json', file)));
function codeOf(fn) {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof Error, 'an Error');
    return [e.code, e.message];
  }
  return ['no error', ''];
}
/** Asserts two byte arrays are equal, naming the first difference. */
function assertBytes(got, want, what) {
  assert.equal(got.length, want.length, `${what}: length`);
  for (let i = 0; i < want.length; i++) {
    if (got[i] !== want[i]) assert.fail(`${what}: first difference at byte ${i}: ${got[i]} != ${want[i]}`);
  }
}
const ENC_WRITES = ['write -P 0x5a 0 64k', 'write -P 0x11 70000 3000', 'write -P 0x22 1048064 1024',
  'write -z 2M 64k', 'write -P 0x33 3M 512k', 'write -P 0x44 4194304 4096'];
const layouts = [
  { name: 'default', o: '' },
  { name: 'aes-128-cbc-essiv-sha1', o: 'encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1' },
  { name: 'aes-192-xts-plain', o: 'encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512' },
  { name: 'aes-256-ctr-4k', o: 'encrypt.cipher-mode=ctr,cluster_size=4096' },
  { name: 'extl2-v3', o: 'extended_l2=on,cluster_size=65536' },
  { name: 'v2', o: 'compat=0.10,cluster_size=16384' },
];
for (const { name, o } of layouts) {
  judged(`LUKS image made by qemu-img (${name}): read with the passphrase, facts, wrong and missing passphrases`, () => {
    const file = `luks-${name}.qcow2`;
    const pass = `pass-${name}`;
    qemuImg('create', '-q', '-f', 'qcow2', ...secretArgs(pass), '-o',
      `encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10${o ? `,${o}` : ''}`, file, '5M');
    qemuIoEnc(file, pass, ...ENC_WRITES);
    const want = qemuRaw(file, pass);
    const bytes = readFileSync(path(file));
    // Without a passphrase: the facts, the check; the data needs it.
    const locked = QcowImage.open(file, memStorage(bytes), undefined);
    const info = locked.info();
    assert.equal(info.encrypted, true);
    assert.deepEqual(encryptOf(info), qemuInfoEnc(file), 'info() encrypt = qemu-img info encrypt');
    assert.equal(locked.check()['check-errors'], 0);
    assert.deepEqual(codeOf(() => locked.read(0, 512))[0], 'passphrase-required');
    assert.deepEqual(codeOf(() => locked.contents())[0], 'passphrase-required');
    assert.deepEqual(codeOf(() => locked.convertToRaw(() => {}))[0], 'passphrase-required');
    locked.free();
    // A wrong passphrase fails the open, as qemu-img says.
    const [c, m] = codeOf(() => QcowImage.open(file, memStorage(bytes), undefined, { passphrase: `${pass}!` }));
    assert.deepEqual([c, m], ['invalid-passphrase', 'Invalid password, cannot unlock any keyslot']);
    const q = spawnSync('qemu-io', [...secretArgs(`${pass}!`), '--image-opts', encOpts(file), '-c', 'read 0 512'],
      { cwd: tmp, encoding: 'utf8' });
    assert.notEqual(q.status, 0);
    assert.match(q.stderr, /Invalid password, cannot unlock any keyslot/);
    // The right one (a string, or its bytes): every guest byte as qemu-img reads it.
    const img = QcowImage.open(file, memStorage(bytes), undefined, { passphrase: pass });
    assertBytes(img.read(0, want.length), want, 'read()');
    const streamed = new Uint8Array(want.length);
    img.convertToRaw((at, b, len) => { if (b) streamed.set(b, at); }, { chunkSize: 65536 });
    assertBytes(streamed, want, 'convertToRaw()');
    // Unaligned reads across sectors and clusters.
    for (const [at, len] of [[69999, 3002], [1048063, 1026], [65535, 2], [4194303, 4098]]) {
      assertBytes(img.read(at, len), want.subarray(at, at + len), `read(${at}, ${len})`);
    }
    img.free();
    const keys = new Passphrases({ passphrase: new TextEncoder().encode(pass) });
    const again = keys.open(file, memStorage(bytes));
    assertBytes(again.read(3 << 20, 512 << 10), want.subarray(3 << 20, (3 << 20) + (512 << 10)), 'Passphrases.open()');
    again.free();
    keys.free();
  });
}

judged('legacy AES image made by qemu-img: read with the passphrase as qemu-img reads it', () => {
  const pass = 'a-longer-passphrase-than-16';
  qemuImg('create', '-q', '-f', 'qcow2', ...secretArgs(pass), '-o', 'encrypt.format=aes,encrypt.key-secret=s0',
    'aes.qcow2', '2M');
  qemuIoEnc('aes.qcow2', pass, 'write -P 0x5a 0 64k', 'write -P 0x11 70000 3000');
  const want = qemuRaw('aes.qcow2', pass);
  const bytes = readFileSync(path('aes.qcow2'));
  const locked = QcowImage.open('aes.qcow2', memStorage(bytes), undefined);
  assert.deepEqual(encryptOf(locked.info()), qemuInfoEnc('aes.qcow2'));
  assert.deepEqual(encryptOf(locked.info()), { format: 'aes' });
  assert.equal(codeOf(() => locked.read(0, 512))[0], 'passphrase-required');
  locked.free();
  const img = QcowImage.open('aes.qcow2', memStorage(bytes), undefined, { passphrase: pass });
  assertBytes(img.read(0, want.length), want, 'read()');
  img.free();
  // Writing it is refused (as the core refuses: convert it to LUKS).
  assert.equal(codeOf(() => QcowImage.openWritable('aes.qcow2', memStorage(bytes), undefined, { passphrase: pass }))[0],
    'unsupported');
});

judged('a LUKS chain made by qemu-img, a passphrase per layer (backingPassphrases)', () => {
  qemuImg('create', '-q', '-f', 'qcow2', ...secretArgs('base-pass'), '-o',
    'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', 'ebase.qcow2', '4M');
  qemuIoEnc('ebase.qcow2', 'base-pass', 'write -P 0x61 0 2M');
  qemuImg('create', '-q', '-f', 'qcow2', ...secretArgs('top-pass'), '-b', 'ebase.qcow2', '-F', 'qcow2', '-o',
    'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', 'etop.qcow2');
  execFileSync('qemu-io', [...secretArgs('top-pass'), ...secretArgs('base-pass', 's1'), '--image-opts',
    encOpts('etop.qcow2', 's0', ',backing.encrypt.key-secret=s1'), '-c', 'write -P 0x62 1M 64k'], { cwd: tmp });
  const want = qemuRaw('etop.qcow2', 'top-pass', { extra: ',backing.encrypt.key-secret=s1', secrets: [['s1', 'base-pass']] });
  const files = () => ({ 'ebase.qcow2': memStorage(readFileSync(path('ebase.qcow2'))) });
  const top = () => memStorage(readFileSync(path('etop.qcow2')));
  const img = QcowImage.open('etop.qcow2', top(), files(),
    { passphrase: 'top-pass', backingPassphrases: { 'ebase.qcow2': 'base-pass' } });
  assertBytes(img.read(0, want.length), want, 'chain read()');
  const chain = img.chain();
  assert.deepEqual(chain.map((i) => i.encrypted), [true, true]);
  assert.deepEqual(encryptOf(chain[1]), qemuInfoEnc('ebase.qcow2'));
  img.free();
  // Without the base's passphrase: the top's own clusters read, the base's name the base.
  const half = QcowImage.open('etop.qcow2', top(), files(), { passphrase: 'top-pass' });
  assertBytes(half.read(1 << 20, 65536), want.subarray(1 << 20, (1 << 20) + 65536), 'the top layer alone');
  const [c, m] = codeOf(() => half.read(0, 512));
  assert.equal(c, 'passphrase-required');
  assert.match(m, /ebase\.qcow2/);
  half.free();
  const [c2, m2] = codeOf(() => QcowImage.open('etop.qcow2', top(), files(),
    { passphrase: 'top-pass', backingPassphrases: { 'ebase.qcow2': 'top-pass' } }));
  assert.equal(c2, 'invalid-passphrase');
  assert.match(m2, /ebase\.qcow2.*Invalid password, cannot unlock any keyslot/);
});

judged('writes through the package into qemu-img LUKS images: qemu-img check clean, qemu-img reads them back', () => {
  for (const { name } of [layouts[0], layouts[1], layouts[3], layouts[4]]) {
    const file = `luks-${name}.qcow2`;
    const pass = `pass-${name}`;
    const model = qemuRaw(file, pass);
    const storage = memStorage(readFileSync(path(file)));
    const w = QcowImage.openWritable(file, storage, undefined, { passphrase: pass });
    for (const [at, len, fill] of [[100, 5000, 0xa1], [(2 << 20) + 512, 70000, 0xa2], [(4 << 20) + 8192, 1000, 0xa3],
      [(5 << 20) - 512, 512, 0xa4]]) {
      w.write(at, new Uint8Array(len).fill(fill));
      model.fill(fill, at, at + len);
    }
    w.flush();
    w.free();
    writeFileSync(path(file), storage.bytes());
    assertEncCheckClean(file, pass);
    assertBytes(qemuRaw(file, pass), model, `${name}: qemu-img reads the package's writes`);
  }
});

const encryptSets = [
  {},
  { cipherAlg: 'aes-128', cipherMode: 'cbc', ivgenAlg: 'essiv', ivgenHashAlg: 'sha256', hashAlg: 'sha1' },
  { cipherAlg: 'aes-192', ivgenAlg: 'plain', hashAlg: 'sha512' },
  { cipherMode: 'ctr', hashAlg: 'sha384' },
];
for (const [i, set] of encryptSets.entries()) {
  judged(`LUKS images created by the package (${JSON.stringify(set)}): qemu-img check, info and qemu-io`, () => {
    const pass = `created-${i}`;
    const file = `penc-${i}.qcow2`;
    const bytes = createImageBytes({ size: '3M', cluster_size: i === 3 ? 4096 : 65536,
      encrypt: { passphrase: pass, iterations: 1000, ...set } });
    writeFileSync(path(file), bytes);
    assertEncCheckClean(file, pass);
    const e = qemuInfoEnc(file);
    const mine = QcowImage.open(file, memStorage(bytes), undefined);
    assert.deepEqual(encryptOf(mine.info()), e, 'info() = qemu-img info');
    mine.free();
    assert.equal(e['cipher-alg'], set.cipherAlg ?? 'aes-256');
    assert.equal(e['cipher-mode'], set.cipherMode ?? 'xts');
    assert.equal(e['ivgen-alg'], set.ivgenAlg ?? 'plain64');
    assert.equal(e['ivgen-hash-alg'], set.ivgenAlg === 'essiv' ? set.ivgenHashAlg : undefined);
    assert.equal(e['hash-alg'], set.hashAlg ?? 'sha256');
    assert.equal(e.slots[0].iters, 1000);
    assert.equal(e['master-key-iters'], 1000);
    assert.deepEqual(e.slots.map((s) => s.active), [true, false, false, false, false, false, false, false]);
    // qemu-io writes into it, the package reads; the package writes, qemu-img reads.
    qemuIoEnc(file, pass, 'write -P 0x5a 0 64k', 'write -P 0x6b 1000000 5000');
    const want = qemuRaw(file, pass);
    const storage = memStorage(readFileSync(path(file)));
    const w = QcowImage.openWritable(file, storage, undefined, { passphrase: pass });
    assertBytes(w.read(0, want.length), want, 'the package reads what qemu-io wrote');
    w.write(2 << 20, new Uint8Array(70000).fill(0x7c));
    want.fill(0x7c, 2 << 20, (2 << 20) + 70000);
    w.flush();
    w.free();
    writeFileSync(path(file), storage.bytes());
    assertEncCheckClean(file, pass);
    assertBytes(qemuRaw(file, pass), want, 'qemu-img reads what the package wrote');
    const io = qemuIoEnc(file, pass, 'read -P 0x7c 2M 70000', 'read -P 0x5a 0 64k');
    assert.doesNotMatch(io, /verification failed/i, io);
    // A wrong passphrase is refused by qemu-img too.
    const q = spawnSync('qemu-img', ['check', ...secretArgs(`${pass}x`), '--image-opts', encOpts(file)], { cwd: tmp, encoding: 'utf8' });
    assert.notEqual(q.status, 0);
    assert.match(q.stderr, /Invalid password, cannot unlock any keyslot/);
  });
}

judged('conversions into LUKS images (convertRawToQcow2, convertToQcow2 of a LUKS chain, Qcow2Writer in steps, iterTime): qemu-img reads the same', () => {
  convertRawToQcow2(memStorage(raw), (() => { const t = memStorage(); globalThis.__t = t; return t; })(),
    { cluster_size: 16384, encrypt: { passphrase: 'conv', iterTime: 50 } });
  writeFileSync(path('conv-enc.qcow2'), globalThis.__t.bytes());
  delete globalThis.__t;
  assertEncCheckClean('conv-enc.qcow2', 'conv');
  assertBytes(qemuRaw('conv-enc.qcow2', 'conv'), raw, 'convertRawToQcow2 into LUKS');
  const e = qemuInfoEnc('conv-enc.qcow2');
  assert.ok(e.slots[0].iters >= 1000 && e['master-key-iters'] >= 1000, JSON.stringify(e));
  // The LUKS chain above, into one standalone LUKS image with another passphrase.
  const want = qemuRaw('etop.qcow2', 'top-pass', { extra: ',backing.encrypt.key-secret=s1', secrets: [['s1', 'base-pass']] });
  const chain = QcowImage.open('etop.qcow2', memStorage(readFileSync(path('etop.qcow2'))),
    { 'ebase.qcow2': memStorage(readFileSync(path('ebase.qcow2'))) },
    { passphrase: 'top-pass', backingPassphrases: { 'ebase.qcow2': 'base-pass' } });
  const t2 = memStorage();
  chain.convertToQcow2(t2, { encrypt: { passphrase: 'flat', iterations: 1000, cipherMode: 'cbc', ivgenAlg: 'essiv' } });
  writeFileSync(path('flat-enc.qcow2'), t2.bytes());
  assertEncCheckClean('flat-enc.qcow2', 'flat');
  assertBytes(qemuRaw('flat-enc.qcow2', 'flat'), want, 'convertToQcow2 of a LUKS chain into LUKS');
  assert.equal(JSON.parse(qemuImg('info', '--output=json', 'flat-enc.qcow2'))['backing-filename'], undefined);
  // Qcow2Writer in steps.
  const t3 = memStorage();
  const w = new Qcow2Writer(t3, { size: chain.virtualSize(), cluster_size: 4096, encrypt: { passphrase: 'steps', iterations: 1000 } });
  for (let at = 0; at < chain.virtualSize(); at += 1 << 20) {
    w.copyFrom(chain, { start: at, end: Math.min(chain.virtualSize(), at + (1 << 20)) });
  }
  w.finish();
  w.free();
  chain.free();
  writeFileSync(path('steps-enc.qcow2'), t3.bytes());
  assertEncCheckClean('steps-enc.qcow2', 'steps');
  assertBytes(qemuRaw('steps-enc.qcow2', 'steps'), want, 'Qcow2Writer into LUKS');
});

rmSync(tmp, { recursive: true, force: true });
if (process.exitCode) {
  console.error('judge: FAILED');
} else {
  console.log(`judge: ${cases} cases, every image passed qemu-img check and compare, contents() agreed with sfdisk and blkid`);
}
