// End-to-end test of the demo page: serves dist/ on 127.0.0.1, drives
// Debian's Chromium with playwright-core, and compares what the page shows
// and downloads with qemu-img's answers for images made at test time
// (including the images the maintenance panel repairs, resizes and
// snapshots, downloaded and judged by qemu-img check, info and snapshot -l).
//
//   cd web-demo && npm ci && npm run build && node tests/e2e.mjs
import { createServer } from 'node:http';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { linkSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, existsSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, extname, join, normalize, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import {
  blkid, flagsOfAttrs, fsWords, gptTypeNames, makeGptDisk, makeMbrDisk, mbrTypeId, PAGE_GPT, toQcow2,
} from '../../wasm/tests/disks.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, '..', 'dist');
const tmp = mkdtempSync(join(tmpdir(), 'qcowkit-e2e-'));
// Screenshots are the run's artifacts: web-demo/test-artifacts/ (git-ignored).
const shots = join(here, '..', 'test-artifacts');
rmSync(shots, { recursive: true, force: true });
mkdirSync(shots, { recursive: true });

if (!existsSync(join(dist, 'index.html'))) {
  console.error(`${dist} is missing: run "npm run build" in web-demo first`);
  process.exit(2);
}

// ---------- helpers ----------

const sh = (cmd, args) => execFileSync(cmd, args, { cwd: tmp, encoding: 'utf8' });
const qemuImg = (...args) => sh('qemu-img', args);
const qemuIo = (file, cmd) => sh('qemu-io', ['-c', cmd, file]);
const sha256 = (file) => createHash('sha256').update(readFileSync(file)).digest('hex');
const path = (name) => join(tmp, name);

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript',
  '.mjs': 'text/javascript',
  '.css': 'text/css',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
};

function serve(root) {
  const server = createServer((req, res) => {
    let p = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    if (p.endsWith('/')) p += 'index.html';
    const file = normalize(join(root, p));
    if (!file.startsWith(root + sep) || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': TYPES[extname(file)] || 'application/octet-stream' });
    res.end(readFileSync(file));
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

let step = 0;
async function check(name, fn) {
  const t0 = Date.now();
  await fn();
  console.log(`ok ${++step} - ${name} (${Date.now() - t0} ms)`);
}

// ---------- images ----------

// A v3 image with every interesting feature and all kinds of clusters.
qemuImg('create', '-q', '-f', 'qcow2', '-o',
  'cluster_size=32768,extended_l2=on,compression_type=zstd,lazy_refcounts=on', path('features.qcow2'), '256M');
qemuIo(path('features.qcow2'), 'write -P 0xab 0 1M');
qemuIo(path('features.qcow2'), 'write -z 4M 1M');
qemuIo(path('features.qcow2'), 'write -c -P 0x5c 8M 1M');
qemuIo(path('features.qcow2'), 'write -P 0x11 100M 64k');
qemuImg('snapshot', '-c', 'first', path('features.qcow2'));
qemuImg('bitmap', '--add', path('features.qcow2'), 'dirty0');

// A three-level backing chain: base <- mid <- top.
qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', path('base.qcow2'), '64M');
qemuIo(path('base.qcow2'), 'write -P 0x01 0 4M');
qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path('mid.qcow2'));
qemuIo(path('mid.qcow2'), 'write -P 0x02 1M 1M');
qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', path('top.qcow2'));
qemuIo(path('top.qcow2'), 'write -z 2M 512k');
qemuIo(path('top.qcow2'), 'write -P 0x03 3M 64k');

// Every allocation category in one image: base <- mixed, with data,
// compressed clusters, zero clusters (over backing data) and, elsewhere,
// guest space allocated nowhere.
qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path('mixed.qcow2'));
qemuIo(path('mixed.qcow2'), 'write -z 3M 1M');
qemuIo(path('mixed.qcow2'), 'write -P 0x21 8M 1M');
qemuIo(path('mixed.qcow2'), 'write -c -P 0x5c 16M 1M');
const MIXED_ALLOCATION = { data: 2 ** 20, compressed: 2 ** 20, zero: 2 ** 20, backing: 3 * 2 ** 20,
  unallocated: 64 * 2 ** 20 - 6 * 2 ** 20 };

// Not a qcow2 image at all.
writeFileSync(path('plain.raw'), Buffer.alloc(1 << 20, 0x42));

// A huge sparse image: the map must aggregate ranges into pixels.
qemuImg('create', '-q', '-f', 'qcow2', path('huge.qcow2'), '64T');
qemuIo(path('huge.qcow2'), 'write -P 0x7 0 64k');
qemuIo(path('huge.qcow2'), 'write -P 0x8 70368744112128 64k');

// Encrypted (LUKS), with data: the page shows the encryption header's
// facts without the passphrase, refuses a wrong one, and the right one
// unlocks every view. iter-time 50 ms (qemu-img's default, 2 s, would make
// each unlock in the page take seconds).
const ENC_PASS = 'e2e-secret';
const secretArgs = (pass, id = 'sec0') => ['--object', `secret,id=${id},data=${pass}`];
const encOpts = (file, extra = '') => `driver=qcow2,file.filename=${path(file)},encrypt.key-secret=sec0${extra}`;
const qemuIoEnc = (file, pass, ...cmds) => sh('qemu-io', [...secretArgs(pass), '--image-opts', encOpts(file),
  ...cmds.flatMap((c) => ['-c', c])]);
qemuImg('create', '-q', '-f', 'qcow2', ...secretArgs(ENC_PASS),
  '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=50', path('encrypted.qcow2'), '16M');
qemuIoEnc('encrypted.qcow2', ENC_PASS, 'write -P 0x5a 0 64k', 'write -P 0x21 1M 4k', 'write -P 0x7e 15M 512');
// A LUKS chain, a passphrase per image: ebase.qcow2 (aes-128-cbc-essiv,
// sha1) <- etop.qcow2 (the defaults).
qemuImg('create', '-q', '-f', 'qcow2', ...secretArgs('base-secret'), '-o',
  'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=20,encrypt.cipher-alg=aes-128,' +
  'encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1', path('ebase.qcow2'), '8M');
qemuIoEnc('ebase.qcow2', 'base-secret', 'write -P 0x62 0 2M');
qemuImg('create', '-q', '-f', 'qcow2', ...secretArgs('top-secret'), '-b', 'ebase.qcow2', '-F', 'qcow2', '-o',
  'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=20', path('etop.qcow2'));
sh('qemu-io', [...secretArgs('top-secret'), ...secretArgs('base-secret', 'sec1'), '--image-opts',
  encOpts('etop.qcow2', ',backing.encrypt.key-secret=sec1'), '-c', 'write -P 0x74 1M 64k']);
/** qemu-img convert -O raw of an encrypted image (`extra`: --image-opts; `secrets`: more [id, data]). */
function qemuRawEnc(file, pass, out, extra = '', secrets = []) {
  sh('qemu-img', ['convert', ...secretArgs(pass), ...secrets.flatMap(([id, p]) => secretArgs(p, id)),
    '--image-opts', encOpts(file, extra), '-O', 'raw', path(out)]);
}

// Malformed: a qcow2 magic with an impossible header (cluster_bits = 99).
const bad = Buffer.alloc(4096);
bad.write('QFI\xfb', 0, 'latin1');
bad.writeUInt32BE(3, 4); // version
bad.writeUInt32BE(99, 20); // cluster_bits
bad.writeBigUInt64BE(1n << 30n, 24); // size
bad.writeUInt32BE(104, 100); // header_length
writeFileSync(path('broken.qcow2'), bad);

// For the maintenance panel: an image with two leaked clusters (refcounts
// of the header and the refcount table raised by editing bytes), one left
// dirty by a qemu-io killed with lazy refcounts on (needs "Repair all"),
// and one with a qemu-img snapshot taken before more data was written.
function setRefcount(bytes, c, value) {
  const table = Number(bytes.readBigUInt64BE(48));
  const block = Number(bytes.readBigUInt64BE(table) & ~511n);
  bytes.writeUInt16BE(value, block + 2 * c);
}
qemuImg('create', '-q', '-f', 'qcow2', path('leaky.qcow2'), '16M');
qemuIo(path('leaky.qcow2'), 'write -P 0x51 0 2M');
qemuIo(path('leaky.qcow2'), 'write -c -P 0x52 4M 256k');
{
  const bytes = readFileSync(path('leaky.qcow2'));
  setRefcount(bytes, 0, 2);
  setRefcount(bytes, Number(bytes.readBigUInt64BE(48)) / 65536, 2);
  writeFileSync(path('leaky.qcow2'), bytes);
}
qemuImg('convert', '-O', 'raw', path('leaky.qcow2'), path('leaky-want.raw'));

qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', path('dirty.qcow2'), '16M');
{
  const r = spawnSync('qemu-io', ['-c', 'write -P 0x61 0 1M', '-c', 'write -P 0x62 8M 256k', '-c', 'sigraise 9',
    path('dirty.qcow2')], { encoding: 'utf8' });
  assert.equal(r.signal, 'SIGKILL', 'qemu-io was killed');
}
qemuImg('convert', '-O', 'raw', path('dirty.qcow2'), path('dirty-want.raw'));

qemuImg('create', '-q', '-f', 'qcow2', path('maint.qcow2'), '64M');
qemuIo(path('maint.qcow2'), 'write -P 0x71 0 1M');
qemuIo(path('maint.qcow2'), 'write -P 0x72 40M 1M');
qemuImg('snapshot', '-c', 'qsnap', path('maint.qcow2'));
qemuImg('convert', '-O', 'raw', path('maint.qcow2'), path('maint-qsnap.raw'));
qemuIo(path('maint.qcow2'), 'write -P 0x73 512k 1M');
qemuImg('convert', '-O', 'raw', path('maint.qcow2'), path('maint-now.raw'));
// The same image for the snapshot controls (choosing the same file again
// fires no change event).
writeFileSync(path('snapme.qcow2'), readFileSync(path('maint.qcow2')));


// For the host-file layout: a cluster past the data whose refcount is 1
// but that nothing uses (leaked).
qemuImg('create', '-q', '-f', 'qcow2', path('layout-leak.qcow2'), '16M');
qemuIo(path('layout-leak.qcow2'), 'write -P 0x41 0 192k');
{
  const bytes = readFileSync(path('layout-leak.qcow2'));
  const grown = Buffer.concat([bytes, Buffer.alloc(65536)]);
  setRefcount(grown, bytes.length / 65536, 1);
  writeFileSync(path('layout-leak.qcow2'), grown);
}

// A folder: vm/images/top.qcow2 -> ../bases/mid.qcow2 -> base.qcow2 (in
// bases/), with a decoy vm/other/base.qcow2 of other contents (a lookup
// by file name alone would take the wrong one).
for (const d of ['vm/images', 'vm/bases', 'vm/other']) mkdirSync(path(d), { recursive: true });
qemuImg('create', '-q', '-f', 'qcow2', path('vm/bases/base.qcow2'), '32M');
qemuIo(path('vm/bases/base.qcow2'), 'write -P 0x42 0 1M'); // 'B'
qemuImg('create', '-q', '-f', 'qcow2', path('vm/other/base.qcow2'), '32M');
qemuIo(path('vm/other/base.qcow2'), 'write -P 0x58 0 1M'); // 'X'
qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path('vm/bases/mid.qcow2'));
qemuIo(path('vm/bases/mid.qcow2'), 'write -P 0x4d 64k 64k'); // 'M'
qemuImg('create', '-q', '-f', 'qcow2', '-b', '../bases/mid.qcow2', '-F', 'qcow2', path('vm/images/top.qcow2'));
qemuIo(path('vm/images/top.qcow2'), 'write -P 0x54 128k 64k'); // 'T'
// The same without the base: the error names it.
mkdirSync(path('vm2/images'), { recursive: true });
mkdirSync(path('vm2/bases'), { recursive: true });
writeFileSync(path('vm2/images/top.qcow2'), readFileSync(path('vm/images/top.qcow2')));
writeFileSync(path('vm2/bases/mid.qcow2'), readFileSync(path('vm/bases/mid.qcow2')));
// An absolute backing name that exists nowhere here: found by its last component.
mkdirSync(path('abs'), { recursive: true });
writeFileSync(path('abs/top.qcow2'), readFileSync(path('vm/images/top.qcow2')));
qemuImg('rebase', '-u', '-b', '/srv/elsewhere/mid.qcow2', '-F', 'qcow2', path('abs/top.qcow2'));
writeFileSync(path('abs/mid.qcow2'), readFileSync(path('vm/bases/mid.qcow2')));
writeFileSync(path('abs/base.qcow2'), readFileSync(path('vm/bases/base.qcow2')));

// What the guest disk holds (the partitions panel): a GPT disk made by
// sgdisk with FAT32 (mkfs.vfat), ext4 with a label (mkfs.ext4), swap
// (mkswap) and NTFS (mkfs.ntfs) at the partition offsets, and an MBR disk
// made by sfdisk with logical partitions (FAT16, ext4, swap, ext2, NTFS),
// converted by qemu-img with 4 KiB clusters (an L2 table covers 2 MiB: the
// partitions span many). A missing tool fails here, naming its package.
const PARTS_GPT = makeGptDisk(tmp, 'parts-gpt.raw', PAGE_GPT);
toQcow2(tmp, 'parts-gpt.raw', 'parts-gpt.qcow2', 4096);
const PARTS_MBR = makeMbrDisk(tmp, 'parts-mbr.raw');
toQcow2(tmp, 'parts-mbr.raw', 'parts-mbr.qcow2', 4096);
// Both GPT headers gone: a table that cannot be read (shown in the panel).
{
  const d = readFileSync(path('parts-gpt.raw'));
  d.fill(0, 512, 1024);
  d.fill(0, d.length - 512);
  writeFileSync(path('parts-broken.raw'), d);
  toQcow2(tmp, 'parts-broken.raw', 'parts-broken.qcow2', 4096);
}

// Several GiB, sparse: 4 GiB + 64 MiB with data at 0, at 2 GiB, across the
// 4 GiB boundary and at the end (converted to raw and back in the page).
const BIG = 4160 * 2 ** 20;
qemuImg('create', '-q', '-f', 'qcow2', path('big.qcow2'), String(BIG));
qemuIo(path('big.qcow2'), 'write -P 0x11 0 1M');
qemuIo(path('big.qcow2'), 'write -P 0x22 2G 1M');
qemuIo(path('big.qcow2'), 'write -P 0x33 4095M 2M');
qemuIo(path('big.qcow2'), 'write -P 0x61 4096M 512'); // 'a' at exactly 4 GiB
qemuIo(path('big.qcow2'), 'write -P 0x44 4159M 1M');

// ---------- the browser ----------

const server = await serve(dist);
// E2E_BASE_URL runs the same checks against another server (e.g. python3 -m http.server).
const base = process.env.E2E_BASE_URL || `http://127.0.0.1:${server.address().port}/`;
// A profile on disk: OPFS files then live in files of it (sparse), not in
// memory as in an incognito context, so multi-GiB conversions fit.
const profile = join(tmp, 'profile');
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  acceptDownloads: true,
  viewport: { width: 1280, height: 900 },
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const browser = { close: () => context.close() };
const page = context.pages()[0] || await context.newPage();
const pageErrors = [];
page.on('pageerror', (e) => pageErrors.push(e.message));
page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });

const text = (testid) => page.getByTestId(testid).innerText();

async function choose(files) {
  await page.evaluate(() => { delete document.getElementById('result').dataset.ready; });
  await page.setInputFiles('#file-input', files.map(path));
}

/** Drops files on the drop zone (a real drop event with their bytes). */
async function dropFiles(files) {
  await page.evaluate(() => { delete document.getElementById('result').dataset.ready; });
  const data = files.map((f) => [f, readFileSync(path(f)).toString('base64')]);
  await page.evaluate((items) => {
    const dt = new DataTransfer();
    for (const [name, b64] of items) dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name));
    document.getElementById('drop-zone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
  }, data);
}

async function waitOpened() {
  await page.waitForFunction(() => document.getElementById('result').dataset.ready === 'true'
    || !document.getElementById('error').hidden);
  const err = await page.getByTestId('error');
  if (await err.isVisible()) throw new Error(`page shows an error: ${await err.innerText()}`);
}

/**
 * Runs the conversion panel with `options` (format, compression, cluster
 * size, extended L2) and waits for its outcome ("done", "cancelled",
 * "failed").
 */
async function runConversion({ format = 'qcow2', compression = 'none', cluster = '65536', extendedL2 = false } = {},
  during = null) {
  await page.selectOption('#convert-format', format);
  if (format === 'qcow2') {
    await page.selectOption('#convert-compression', compression);
    await page.selectOption('#convert-cluster', cluster);
    await page.setChecked('#convert-extended-l2', extendedL2);
  }
  await page.evaluate(() => { delete document.getElementById('convert-panel').dataset.state; });
  await page.click('#convert-button');
  await page.waitForFunction(() => document.getElementById('convert-panel').dataset.state);
  if (during) await during();
  await page.waitForFunction(() => document.getElementById('convert-panel').dataset.state !== 'busy',
    null, { timeout: 300_000 });
  return page.getByTestId('convert-panel').getAttribute('data-state');
}

/** Downloads the conversion's result (the panel's link); returns the saved path. */
async function downloadConverted(label) {
  const [dl] = await Promise.all([page.waitForEvent('download', { timeout: 120_000 }), page.click('#convert-download')]);
  const out = path(`${label}-page-${dl.suggestedFilename()}`);
  await dl.saveAs(out);
  return out;
}

async function convertAndCompare(image, label) {
  assert.equal(await runConversion({ format: 'raw' }), 'done');
  const got = await downloadConverted(label);
  const want = path(`${label}-qemu.raw`);
  qemuImg('convert', '-O', 'raw', path(image), want);
  assert.equal(statSync(got).size, statSync(want).size, 'raw size');
  assert.equal(sha256(got), sha256(want), 'raw sha256');
  const bar = await page.$eval('#convert-progress', (b) => [b.value, b.max]);
  assert.equal(bar[0], bar[1], 'progress bar full');
}

/** Runs `action` (a click on a maintenance control) and waits for its outcome. */
async function operate(action) {
  await page.evaluate(() => { delete document.getElementById('maintenance').dataset.state; });
  await action();
  await page.waitForFunction(() => ['done', 'failed'].includes(document.getElementById('maintenance').dataset.state));
  return page.getByTestId('maintenance').getAttribute('data-state');
}

/** Downloads the modified image; returns the saved file's path. */
async function downloadModified(label) {
  assert.equal(await page.getByTestId('download-modified').isVisible(), true, 'download offered');
  const [dl] = await Promise.all([page.waitForEvent('download'), page.click('#download-modified')]);
  const out = path(`${label}-page.qcow2`);
  await dl.saveAs(out);
  return { out, name: dl.suggestedFilename() };
}

/** qemu-img check of a file: exit status and output. */
function qemuCheck(file) {
  const r = spawnSync('qemu-img', ['check', file], { encoding: 'utf8' });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

function assertSameGuest(raw, image) {
  const r = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, image], { encoding: 'utf8' });
  assert.equal(r.status, 0, `qemu-img compare ${raw} ${image}: ${r.stdout}${r.stderr}`);
}

/** The one file of the browser profile `size` bytes long (an OPFS file, stored as it is). */
function findProfileFile(size) {
  const found = [];
  const walk = (dir) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile() && statSync(p).size === size) found.push(p);
    }
  };
  walk(profile);
  assert.equal(found.length, 1, `one file of ${size} bytes in the profile: ${found.join(', ')}`);
  return found[0];
}

/** The partitions panel's rows: their data attributes and the text of each cell. */
const partitionRows = () => page.$$eval('[data-testid=partition]', (rows) => rows.map((r) => {
  const cell = (k) => r.querySelector(`[data-testid=partition-${k}]`).innerText.replace(/\s*\n\s*/g, '');
  return {
    number: r.dataset.number, start: r.dataset.start, size: r.dataset.size, typeId: r.dataset.typeId,
    logical: r.dataset.logical, fs: r.dataset.fs,
    cells: Object.fromEntries(['start', 'type', 'name', 'flags', 'fs', 'label', 'uuid'].map((k) => [k, cell(k)])),
  };
}));

/** Clicks "First sector" of partition `number`; returns the hex viewer's rows once it shows its start. */
async function jumpTo(number) {
  const row = page.locator(`[data-testid=partition][data-number="${number}"]`);
  const start = await row.getAttribute('data-start');
  await page.evaluate(() => { delete document.getElementById('hex').dataset.offset; });
  await row.getByTestId('partition-jump').click();
  await page.waitForFunction((o) => document.getElementById('hex').dataset.offset === o, start);
  return (await text('hex')).split('\n');
}

const snapshotRows = () => page.$$eval('[data-testid=snapshot]', (rows) => rows.map((r) => ({ id: r.dataset.id, name: r.dataset.name })));

let failed = false;
try {
  await check('page loads the wasm worker', async () => {
    await page.goto(base);
    await page.waitForFunction(() => document.body.dataset.ready === 'true'
      || !document.getElementById('error').hidden);
    assert.equal(await page.getByTestId('error').isVisible(), false,
      await page.getByTestId('error').textContent());
  });

  await check('facts equal qemu-img info', async () => {
    await choose(['features.qcow2']);
    await waitOpened();
    const q = JSON.parse(qemuImg('info', '--output=json', path('features.qcow2')));
    const d = q['format-specific'].data;
    assert.equal(await page.getByTestId('fact-virtual-size').getAttribute('data-bytes'), String(q['virtual-size']));
    assert.match(await text('fact-virtual-size'), new RegExp(`\\(${q['virtual-size']} bytes\\)`));
    assert.match(await text('fact-virtual-size'), /256 MiB/);
    assert.equal(await page.getByTestId('fact-cluster-size').getAttribute('data-bytes'), String(q['cluster-size']));
    assert.match(await text('fact-version'), new RegExp(`compat ${d.compat.replace('.', '\\.')}`));
    assert.equal(await text('fact-compression-type'), d['compression-type']);
    assert.equal(await text('fact-extended-l2'), d['extended-l2'] ? 'on' : 'off');
    assert.equal(await text('fact-lazy-refcounts'), d['lazy-refcounts'] ? 'on' : 'off');
    assert.equal(await text('fact-refcount-bits'), `${d['refcount-bits']} bits`);
    const snaps = await page.getByTestId('snapshot').allInnerTexts();
    assert.equal(snaps.length, q.snapshots.length);
    assert.match(snaps[0], /first/);
    const bitmaps = await page.getByTestId('bitmap').allInnerTexts();
    assert.equal(bitmaps.length, d.bitmaps.length);
    assert.match(bitmaps[0], /dirty0/);
    await page.waitForFunction(() => document.getElementById('check').dataset.status);
    assert.equal(await page.getByTestId('check').getAttribute('data-status'), 'clean');
    // The map legend accounts for every kind of cluster written above.
    for (const k of ['data', 'compressed', 'zero', 'unallocated']) {
      const b = Number(await page.getByTestId(`legend-${k}`).getAttribute('data-bytes'));
      assert.ok(b > 0, `map has ${k} bytes`);
    }
    await page.screenshot({ path: join(shots, '1-features.png'), fullPage: true });
  });

  await check('convert to raw equals qemu-img convert (compressed zstd image)', async () => {
    await convertAndCompare('features.qcow2', 'features');
  });

  await check('backing chain chosen as several files shows the chain', async () => {
    await choose(['base.qcow2', 'top.qcow2', 'mid.qcow2']);
    await waitOpened();
    assert.equal(await text('image-name'), 'top.qcow2');
    const names = await page.$$eval('[data-testid=chain-item]', (li) => li.map((x) => x.dataset.name));
    assert.deepEqual(names, ['top.qcow2', 'mid.qcow2', 'base.qcow2']);
    assert.equal(await page.getByTestId('chain-missing').count(), 0);
    assert.equal(await text('fact-backing-file'), 'mid.qcow2');
    const fromBacking = Number(await page.getByTestId('legend-backing').getAttribute('data-bytes'));
    assert.ok(fromBacking > 0, 'map shows data from backing files');
    await page.screenshot({ path: join(shots, '2-chain.png'), fullPage: true });
  });

  await check('convert a backing chain to raw equals qemu-img convert', async () => {
    await convertAndCompare('top.qcow2', 'chain');
  });

  await check('the top image is chosen by the wasm inspect() (raw and malformed files are skipped)', async () => {
    await choose(['broken.qcow2', 'plain.raw', 'base.qcow2', 'mixed.qcow2']);
    await waitOpened();
    assert.equal(await text('image-name'), 'mixed.qcow2');
    const names = await page.$$eval('[data-testid=chain-item]', (li) => li.map((x) => x.dataset.name));
    assert.deepEqual(names, ['mixed.qcow2', 'base.qcow2']);
    // The client's inspect() RPC itself, on the files the page was given.
    const got = await page.evaluate(async () => {
      const { QcowClient } = await import(new URL('pkg/client.js', location.href).href);
      const q = await QcowClient.start(new URL('pkg/qcowkit_wasm.js', location.href));
      try {
        const files = Object.fromEntries(Array.from(document.getElementById('file-input').files)
          .map((f) => [f.name, f]));
        const broken = await q.inspect('broken.qcow2', files['broken.qcow2']).then(() => null, (e) => e.message);
        return {
          mixed: await q.inspect('mixed.qcow2', files['mixed.qcow2']),
          base: await q.inspect('base.qcow2', files['base.qcow2']),
          raw: await q.inspect('plain.raw', files['plain.raw']),
          broken,
        };
      } finally {
        q.terminate();
      }
    });
    assert.equal(got.mixed.format, 'qcow2');
    assert.equal(got.mixed['backing-filename'], 'base.qcow2');
    assert.equal(got.base.format, 'qcow2');
    assert.equal(got.base['backing-filename'], undefined);
    assert.equal(got.raw.format, 'raw');
    assert.equal(got.raw['virtual-size'], 1 << 20);
    assert.ok(got.broken && got.broken.length > 0, 'inspect() rejects a malformed header');
  });

  await check('allocation statistics equal the wasm allocation() (data, compressed, zero, backing)', async () => {
    await choose(['base.qcow2', 'mixed.qcow2']);
    await waitOpened();
    assert.equal(await text('image-name'), 'mixed.qcow2');
    const shown = {};
    for (const k of Object.keys(MIXED_ALLOCATION)) {
      shown[k] = Number(await page.getByTestId(`legend-${k}`).getAttribute('data-bytes'));
    }
    const wasm = await page.evaluate(async () => {
      const { QcowClient } = await import(new URL('pkg/client.js', location.href).href);
      const q = await QcowClient.start(new URL('pkg/qcowkit_wasm.js', location.href));
      try {
        const files = Object.fromEntries(Array.from(document.getElementById('file-input').files)
          .map((f) => [f.name, f]));
        const id = await q.open('mixed.qcow2', files['mixed.qcow2'], { 'base.qcow2': files['base.qcow2'] });
        return { allocation: await q.allocation(id), ranges: await q.allocationMap(id) };
      } finally {
        q.terminate();
      }
    });
    assert.deepEqual(shown, wasm.allocation, 'legend shows allocation()');
    // allocationMap() covers the guest space once, with the same totals.
    const sums = Object.fromEntries(Object.keys(MIXED_ALLOCATION).map((k) => [k, 0]));
    let pos = 0;
    for (const r of wasm.ranges) {
      assert.equal(r.start, pos, 'ranges are consecutive');
      sums[r.category] += r.length;
      pos += r.length;
    }
    assert.equal(pos, 64 * 2 ** 20, 'ranges cover the virtual size');
    assert.deepEqual(sums, wasm.allocation, 'allocationMap() totals equal allocation()');
    // What was written: the zero clusters over backing data count as zero.
    assert.deepEqual(wasm.allocation, MIXED_ALLOCATION);
    assert.match(await text('legend-compressed'), /1 MiB/);
    await page.screenshot({ path: join(shots, '2b-allocation.png'), fullPage: true });
  });

  await check('a 64 TiB image opens and its map is drawn', async () => {
    await choose(['huge.qcow2']);
    await waitOpened();
    assert.equal(await page.getByTestId('fact-virtual-size').getAttribute('data-bytes'), String(64 * 2 ** 40));
    assert.match(await text('fact-virtual-size'), /^64 TiB/);
    assert.equal(Number(await page.getByTestId('legend-data').getAttribute('data-bytes')), 2 * 65536);
    // The last pixel holds the data written at the very end.
    const last = await page.$eval('#map-canvas', (c) =>
      Array.from(c.getContext('2d').getImageData(c.width - 1, c.height - 1, 1, 1).data));
    assert.deepEqual(last, [0x2a, 0x6f, 0xdb, 255]);
    await page.waitForFunction(() => document.getElementById('check').dataset.status);
    assert.equal(await page.getByTestId('check').getAttribute('data-status'), 'clean');
  });

  await check('a malformed image shows the core error', async () => {
    await choose(['broken.qcow2']);
    const alert = page.getByRole('alert');
    await alert.waitFor({ state: 'visible' });
    const msg = await alert.innerText();
    assert.ok(msg.trim().length > 0, 'error message is not empty');
    assert.equal(await page.getByTestId('result').isVisible(), false);
    console.log(`    error shown: ${msg.trim()}`);
    await page.screenshot({ path: join(shots, '3-malformed.png'), fullPage: true });
  });

  await check('an encrypted image dropped: the LUKS facts before the passphrase, a wrong one refused, the right one unlocks every view', async () => {
    await dropFiles(['encrypted.qcow2']);
    await waitOpened();
    const q = JSON.parse(qemuImg('info', '--output=json', path('encrypted.qcow2')));
    const e = q['format-specific'].data.encrypt;
    assert.equal(await text('fact-encryption'),
      `luks (${e['cipher-alg']}-${e['cipher-mode']}-${e['ivgen-alg']}): locked, the guest data needs the passphrase (see Encryption)`);
    // Locked: metadata views work, the data says it needs the passphrase.
    assert.equal(await page.getByTestId('hex').getAttribute('data-state'), 'failed');
    assert.match(await text('hex-where'), /^The guest data cannot be read: image is encrypted with luks: a passphrase is required.*\(enter it in the Encryption panel\)$/);
    assert.equal(await page.getByTestId('contents-panel').getAttribute('data-state'), 'failed');
    assert.match(await text('contents-summary'), /^The partitions cannot be shown: image is encrypted with luks: a passphrase is required/);
    await page.waitForFunction(() => document.getElementById('check').dataset.status);
    assert.equal(await page.getByTestId('check').getAttribute('data-status'), 'clean', 'checked without the key');
    // The Encryption panel: qemu-img info's facts, by content.
    const panel = page.getByTestId('encryption-panel');
    assert.equal(await panel.isVisible(), true);
    assert.equal(await panel.getAttribute('data-state'), 'locked');
    const layer = page.getByTestId('encrypted-layer');
    assert.equal(await layer.count(), 1);
    assert.equal(await layer.getAttribute('data-name'), 'encrypted.qcow2');
    const enc = (k) => layer.getByTestId(`enc-${k}`).innerText();
    assert.equal(await enc('format'), 'LUKS version 1');
    assert.equal(await enc('cipher-alg'), e['cipher-alg']);
    assert.equal(await enc('cipher-mode'), e['cipher-mode']);
    assert.equal(await enc('ivgen'), e['ivgen-alg']);
    assert.equal(await enc('hash-alg'), e['hash-alg']);
    assert.equal(await enc('uuid'), e.uuid);
    assert.equal(await enc('master-key-iters'), String(e['master-key-iters']));
    const slots = await page.$$eval('[data-testid=key-slot]', (rows) => rows.map((r) => ({
      active: r.dataset.active === 'true',
      state: r.querySelector('[data-testid=key-slot-state]').innerText,
      iters: r.querySelector('[data-testid=key-slot-iters]').innerText,
    })));
    assert.deepEqual(slots, e.slots.map((s) => ({ active: s.active, state: s.active ? 'active' : 'inactive',
      iters: s.active ? String(s.iters) : '—' })));
    assert.equal(await enc('state'), 'Locked: its guest data cannot be read without the passphrase.');
    const input = layer.getByTestId('passphrase-input');
    assert.equal(await input.getAttribute('type'), 'password');
    await page.screenshot({ path: join(shots, '3b-encrypted-locked.png'), fullPage: true });
    // A wrong passphrase: the core's words, the form stays for another try; the field is emptied.
    const submit = async (values) => {
      await page.evaluate(() => { delete document.getElementById('encryption-panel').dataset.state; });
      for (const [name, v] of Object.entries(values)) {
        await page.fill(`[data-testid=passphrase-input][data-name="${name}"]`, v);
      }
      await page.click('#unlock-button');
      await page.waitForFunction(() => ['locked', 'unlocked', 'failed'].includes(
        document.getElementById('encryption-panel').dataset.state));
      return panel.getAttribute('data-state');
    };
    assert.equal(await submit({ 'encrypted.qcow2': 'not-the-secret' }), 'failed');
    assert.equal(await text('unlock-status'), 'Invalid password, cannot unlock any keyslot');
    assert.equal(await page.getByTestId('unlock-status').getAttribute('data-code'), 'invalid-passphrase');
    assert.equal(await input.inputValue(), '', 'the field does not keep the passphrase');
    assert.equal(await page.getByTestId('hex').getAttribute('data-state'), 'failed', 'still locked');
    await page.screenshot({ path: join(shots, '3c-encrypted-wrong.png'), fullPage: true });
    await panel.screenshot({ path: join(shots, '3c-encryption-panel-wrong.png') });
    // The right one: every view reads the guest data.
    assert.equal(await submit({ 'encrypted.qcow2': ENC_PASS }), 'unlocked');
    assert.equal(await text('unlock-status'), 'Unlocked: every view now reads the guest data.');
    assert.equal(await layer.getByTestId('enc-state').innerText(), 'Unlocked: its guest data is read with the passphrase given.');
    assert.equal(await page.getByTestId('passphrase-input').count(), 0, 'no passphrase field once unlocked');
    assert.equal(await page.evaluate((p) => document.documentElement.outerHTML.includes(p), ENC_PASS), false,
      'the passphrase is nowhere in the page');
    assert.match(await text('fact-encryption'), /: unlocked$/);
    assert.equal(await page.getByTestId('hex').getAttribute('data-state'), 'shown');
    const rows = (await text('hex')).split('\n');
    assert.equal(rows.length, 32);
    for (const [i, row] of rows.entries()) {
      assert.match(row, new RegExp(`^${(i * 16).toString(16).padStart(16, '0')}  (5a ){7}5a  (5a ){7}5a +\\|Z{16}\\|$`));
    }
    await page.fill('#hex-offset', '15M');
    await page.click('#hex-go');
    await page.waitForFunction(() => document.getElementById('hex').dataset.offset === String(15 * 2 ** 20));
    assert.match((await text('hex')).split('\n')[0], /^0000000000f00000  7e 7e 7e 7e 7e 7e 7e 7e  7e 7e 7e 7e 7e 7e 7e 7e +\|~{16}\|$/);
    assert.equal(await page.getByTestId('contents-panel').getAttribute('data-state'), 'shown');
    assert.equal(Number(await page.getByTestId('legend-data').getAttribute('data-bytes')), 64 * 1024 + 65536 + 65536);
    await page.screenshot({ path: join(shots, '3d-encrypted-unlocked.png'), fullPage: true });
    // Conversion to raw: qemu-img's bytes.
    assert.equal(await runConversion({ format: 'raw' }), 'done');
    const got = await downloadConverted('encrypted');
    qemuRawEnc('encrypted.qcow2', ENC_PASS, 'encrypted-qemu.raw');
    assert.equal(sha256(got), sha256(path('encrypted-qemu.raw')), 'raw conversion = qemu-img convert');
    // Maintenance with the stored passphrase: a resize of the copy, then a snapshot; the download
    // is still encrypted with the same key and qemu-img reads the same data.
    await page.fill('#resize-size', '+1M');
    assert.equal(await operate(() => page.click('#resize-button')), 'done', await text('maint-status'));
    assert.equal(await page.getByTestId('encryption-panel').getAttribute('data-state'), 'unlocked', 'still unlocked after the reopen');
    assert.equal(await page.getByTestId('hex').getAttribute('data-state'), 'shown');
    await page.fill('#snapshot-name', 'enc-snap');
    assert.equal(await operate(() => page.click('#snapshot-button')), 'done', await text('maint-status'));
    const { out } = await downloadModified('encrypted-maint');
    const info = JSON.parse(qemuImg('info', '--output=json', out));
    assert.equal(info['virtual-size'], 17 * 2 ** 20);
    assert.equal(info.encrypted, true);
    assert.deepEqual(info.snapshots.map((s) => s.name), ['enc-snap']);
    const checked = spawnSync('qemu-img', ['check', ...secretArgs(ENC_PASS), '--image-opts',
      `driver=qcow2,file.filename=${out},encrypt.key-secret=sec0`], { encoding: 'utf8' });
    assert.equal(checked.status, 0, `${checked.stdout}${checked.stderr}`);
    sh('qemu-img', ['convert', ...secretArgs(ENC_PASS), '--image-opts',
      `driver=qcow2,file.filename=${out},encrypt.key-secret=sec0`, '-O', 'raw', path('encrypted-maint.raw')]);
    const after = readFileSync(path('encrypted-maint.raw'));
    const before = readFileSync(path('encrypted-qemu.raw'));
    assert.equal(after.length, before.length + 2 ** 20);
    assert.ok(after.subarray(0, before.length).equals(before), 'the guest data is unchanged');
    await page.screenshot({ path: join(shots, '3e-encrypted-maintenance.png'), fullPage: true });
  });

  await check('an encrypted chain dropped: each image named with its facts and asked for; a wrong base key named; then every view reads', async () => {
    await dropFiles(['ebase.qcow2', 'etop.qcow2']);
    await waitOpened();
    const layers = await page.$$eval('[data-testid=encrypted-layer]', (ls) => ls.map((l) => ({
      name: l.dataset.name, title: l.querySelector('h4').innerText,
      cipher: l.querySelector('[data-testid=enc-cipher-alg]').innerText,
      mode: l.querySelector('[data-testid=enc-cipher-mode]').innerText,
      ivgen: l.querySelector('[data-testid=enc-ivgen]').innerText,
      hash: l.querySelector('[data-testid=enc-hash-alg]').innerText,
      uuid: l.querySelector('[data-testid=enc-uuid]').innerText,
      label: l.querySelector('label').innerText,
    })));
    const facts = (f) => {
      const e = JSON.parse(qemuImg('info', '--output=json', path(f)))['format-specific'].data.encrypt;
      return { cipher: e['cipher-alg'], mode: e['cipher-mode'],
        ivgen: e['ivgen-hash-alg'] ? `${e['ivgen-alg']} (${e['ivgen-hash-alg']})` : e['ivgen-alg'], hash: e['hash-alg'], uuid: e.uuid };
    };
    assert.deepEqual(layers, [
      { name: 'etop.qcow2', title: 'etop.qcow2', label: 'Passphrase of etop.qcow2', ...facts('etop.qcow2') },
      { name: 'ebase.qcow2', title: 'ebase.qcow2 (backing file)', label: 'Passphrase of ebase.qcow2 (backing file)',
        ...facts('ebase.qcow2') },
    ]);
    assert.equal(layers[1].ivgen, 'essiv (sha256)');
    const submit = async (values) => {
      await page.evaluate(() => { delete document.getElementById('encryption-panel').dataset.state; });
      for (const [name, v] of Object.entries(values)) {
        await page.fill(`[data-testid=passphrase-input][data-name="${name}"]`, v);
      }
      await page.click('#unlock-button');
      await page.waitForFunction(() => ['locked', 'unlocked', 'failed'].includes(
        document.getElementById('encryption-panel').dataset.state));
      return page.getByTestId('encryption-panel').getAttribute('data-state');
    };
    // The top's key right, the base's wrong: the base is named.
    assert.equal(await submit({ 'etop.qcow2': 'top-secret', 'ebase.qcow2': 'top-secret' }), 'failed');
    assert.equal(await text('unlock-status'), "backing file 'ebase.qcow2': Invalid password, cannot unlock any keyslot");
    // The top's only: the top unlocks, the base stays locked (its data says so).
    assert.equal(await submit({ 'etop.qcow2': 'top-secret' }), 'locked');
    const states = await page.$$eval('[data-testid=encrypted-layer]', (ls) => ls.map((l) => l.dataset.state));
    assert.deepEqual(states, ['unlocked', 'locked']);
    assert.equal(await page.getByTestId('hex').getAttribute('data-state'), 'failed');
    assert.match(await text('hex-where'), /backing file 'ebase\.qcow2': image is encrypted with luks: a passphrase is required/);
    // Both.
    assert.equal(await submit({ 'etop.qcow2': 'top-secret', 'ebase.qcow2': 'base-secret' }), 'unlocked');
    assert.match((await text('hex')).split('\n')[0], /^0000000000000000  62 62 62 62 62 62 62 62  62 62 62 62 62 62 62 62 +\|b{16}\|$/);
    await page.screenshot({ path: join(shots, '3f-encrypted-chain.png'), fullPage: true });
    await page.getByTestId('encryption-panel').screenshot({ path: join(shots, '3g-encryption-panel-chain.png') });
    assert.equal(await runConversion({ format: 'raw' }), 'done');
    const got = await downloadConverted('echain');
    qemuRawEnc('etop.qcow2', 'top-secret', 'echain-qemu.raw', ',backing.encrypt.key-secret=sec1', [['sec1', 'base-secret']]);
    assert.equal(sha256(got), sha256(path('echain-qemu.raw')), 'raw conversion of the chain = qemu-img convert');
  });

  await check('a missing backing file shows the core error', async () => {
    await choose(['top.qcow2']);
    const alert = page.getByRole('alert');
    await alert.waitFor({ state: 'visible' });
    assert.match(await alert.innerText(), /mid\.qcow2/);
  });

  await check('creating an image downloads one qemu-img check accepts', async () => {
    await page.fill('#create-size', '3G');
    await page.selectOption('#create-cluster', '262144');
    await page.check('#create-extended-l2');
    await page.selectOption('#create-compression', 'zstd');
    const [dl] = await Promise.all([page.waitForEvent('download'), page.click('#create-button')]);
    assert.equal(dl.suggestedFilename(), 'new.qcow2');
    const out = path('created.qcow2');
    await dl.saveAs(out);
    const r = spawnSync('qemu-img', ['check', out], { encoding: 'utf8' });
    assert.equal(r.status, 0, `qemu-img check: ${r.stdout}${r.stderr}`);
    const q = JSON.parse(qemuImg('info', '--output=json', out));
    const d = q['format-specific'].data;
    assert.equal(q['virtual-size'], 3 * 2 ** 30);
    assert.equal(q['cluster-size'], 262144);
    assert.equal(d['extended-l2'], true);
    assert.equal(d['compression-type'], 'zstd');
    await page.screenshot({ path: join(shots, '4-created.png'), fullPage: true });
  });

  await check('dropping a file on the drop zone opens it', async () => {
    const b64 = readFileSync(path('created.qcow2')).toString('base64');
    await page.evaluate(() => { delete document.getElementById('result').dataset.ready; });
    await page.evaluate((data) => {
      const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], 'dropped.qcow2'));
      document.getElementById('drop-zone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }, b64);
    await waitOpened();
    assert.equal(await text('image-name'), 'dropped.qcow2');
    assert.equal(await page.getByTestId('fact-virtual-size').getAttribute('data-bytes'), String(3 * 2 ** 30));
    assert.equal(await text('fact-extended-l2'), 'on');
  });

  await check('maintenance: Repair leaks frees the leaked clusters of a copy; the download passes qemu-img check', async () => {
    assert.equal(qemuCheck(path('leaky.qcow2')).code, 3, 'qemu-img finds leaks');
    await choose(['leaky.qcow2']);
    await waitOpened();
    assert.equal(await page.getByTestId('check').getAttribute('data-status'), 'leaks');
    assert.equal(await page.getByTestId('download-modified').isVisible(), false, 'nothing modified yet');
    assert.equal(await operate(() => page.click('#repair-leaks')), 'done');
    const status = await text('maint-status');
    assert.match(status, /fixed 2 leaked clusters and 0 corruptions/);
    assert.match(status, /left: 0 leaked clusters, 0 corruptions/);
    assert.match(await page.getByTestId('repair-log').textContent(), /Repairing cluster 0 refcount=2 reference=1/);
    // The views show the repaired copy.
    assert.equal(await page.getByTestId('check').getAttribute('data-status'), 'clean');
    assert.equal(await operate(() => page.click('#check-button')), 'done');
    assert.match(await text('maint-status'), /No errors were found on the image/);
    const { out, name } = await downloadModified('leaky');
    assert.equal(name, 'leaky.qcow2');
    const r = qemuCheck(out);
    assert.equal(r.code, 0, `qemu-img check: ${r.out}`);
    assertSameGuest(path('leaky-want.raw'), out);
    await page.screenshot({ path: join(shots, '5-repair-leaks.png'), fullPage: true });
  });

  await check('maintenance: a dirty image needs Repair all (Repair leaks says so); the download is clean, same data', async () => {
    assert.equal(qemuCheck(path('dirty.qcow2')).code, 2, 'qemu-img finds corruptions');
    await choose(['dirty.qcow2']);
    await waitOpened();
    assert.equal(await text('fact-dirty'), 'yes');
    assert.equal(await page.getByTestId('check').getAttribute('data-status'), 'corrupt');
    assert.equal(await operate(() => page.click('#repair-leaks')), 'failed');
    assert.match(await page.getByRole('alert').innerText(), /must be rebuilt.*"all"/);
    assert.equal(await operate(() => page.click('#repair-all')), 'done');
    assert.equal(await page.getByTestId('error').isVisible(), false);
    assert.match(await text('maint-status'), /refcount structure rebuilt.*left: 0 leaked clusters, 0 corruptions/);
    assert.equal(await page.getByTestId('check').getAttribute('data-status'), 'clean');
    assert.equal(await text('fact-dirty'), 'no');
    const { out } = await downloadModified('dirty');
    const r = qemuCheck(out);
    assert.equal(r.code, 0, `qemu-img check: ${r.out}`);
    assertSameGuest(path('dirty-want.raw'), out);
    assert.equal(JSON.parse(qemuImg('info', '--output=json', out))['dirty-flag'], false);
  });

  await check('maintenance: Resize grows, refuses to shrink unless allowed, shrinks; qemu-img info agrees', async () => {
    await choose(['maint.qcow2']);
    await waitOpened();
    await page.fill('#resize-size', '+64M');
    assert.equal(await operate(() => page.click('#resize-button')), 'done');
    assert.match(await text('maint-status'), /Resized to 128 MiB/);
    assert.equal(await page.getByTestId('fact-virtual-size').getAttribute('data-bytes'), String(128 * 2 ** 20));
    let { out } = await downloadModified('grown');
    assert.equal(JSON.parse(qemuImg('info', '--output=json', out))['virtual-size'], 128 * 2 ** 20);
    assert.equal(qemuCheck(out).code, 0, qemuCheck(out).out);
    assertSameGuest(path('maint-now.raw'), out); // the grown range reads as zeros
    // Shrinking without the checkbox is refused, and nothing changes.
    await page.fill('#resize-size', '32M');
    assert.equal(await operate(() => page.click('#resize-button')), 'failed');
    assert.match(await page.getByRole('alert').innerText(), /Tick "Allow shrinking" to perform a shrink operation/);
    assert.equal(await page.getByTestId('fact-virtual-size').getAttribute('data-bytes'), String(128 * 2 ** 20));
    await page.check('#resize-shrink');
    assert.equal(await operate(() => page.click('#resize-button')), 'done');
    assert.equal(await page.getByTestId('fact-virtual-size').getAttribute('data-bytes'), String(32 * 2 ** 20));
    ({ out } = await downloadModified('shrunk'));
    assert.equal(JSON.parse(qemuImg('info', '--output=json', out))['virtual-size'], 32 * 2 ** 20);
    assert.equal(qemuCheck(out).code, 0, qemuCheck(out).out);
    const want = readFileSync(path('maint-now.raw')).subarray(0, 32 * 2 ** 20);
    writeFileSync(path('maint-32m.raw'), want);
    assertSameGuest(path('maint-32m.raw'), out);
    await page.uncheck('#resize-shrink');
    await page.screenshot({ path: join(shots, '6-resize.png'), fullPage: true });
  });

  await check('maintenance: Take snapshot, Apply and Delete; qemu-img snapshot -l and check agree', async () => {
    await choose(['snapme.qcow2']);
    await waitOpened();
    assert.deepEqual(await snapshotRows(), [{ id: '1', name: 'qsnap' }]);
    await page.fill('#snapshot-name', 'from-the-page');
    assert.equal(await operate(() => page.click('#snapshot-button')), 'done');
    assert.match(await text('maint-status'), /Snapshot 2 "from-the-page" taken/);
    assert.deepEqual(await snapshotRows(), [{ id: '1', name: 'qsnap' }, { id: '2', name: 'from-the-page' }]);
    let { out } = await downloadModified('snap');
    assert.equal(qemuCheck(out).code, 0, qemuCheck(out).out);
    const listed = qemuImg('snapshot', '-l', out);
    assert.match(listed, /^1\s+qsnap\s/m);
    assert.match(listed, /^2\s+from-the-page\s/m);
    const q = JSON.parse(qemuImg('info', '--output=json', out)).snapshots;
    assert.deepEqual(await snapshotRows(), q.map((x) => ({ id: x.id, name: x.name })));
    // The page's row shows the date qemu-img reads.
    const date = new Date(q[1]['date-sec'] * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
    assert.match(await page.locator('[data-testid=snapshot][data-id="2"]').innerText(), new RegExp(date));
    qemuImg('convert', '-l', 'from-the-page', '-O', 'raw', out, path('snap-taken.raw'));
    assert.equal(sha256(path('snap-taken.raw')), sha256(path('maint-now.raw')), 'the snapshot holds the disk');
    // Apply the qemu-img snapshot, then delete the page's.
    assert.equal(await operate(() => page.click('[data-testid=snapshot][data-id="1"] [data-testid=snapshot-apply]')), 'done');
    assert.match(await text('maint-status'), /Reverted the disk to snapshot 1 "qsnap"/);
    assert.equal(await operate(() => page.click('[data-testid=snapshot][data-id="2"] [data-testid=snapshot-delete]')), 'done');
    assert.deepEqual(await snapshotRows(), [{ id: '1', name: 'qsnap' }]);
    ({ out } = await downloadModified('applied'));
    assert.equal(qemuCheck(out).code, 0, qemuCheck(out).out);
    assert.deepEqual(JSON.parse(qemuImg('info', '--output=json', out)).snapshots.map((x) => x.name), ['qsnap']);
    assertSameGuest(path('maint-qsnap.raw'), out);
    // The chosen file itself was never written.
    assert.equal(sha256(path('snapme.qcow2')), sha256(path('maint.qcow2')));
    await page.screenshot({ path: join(shots, '7-snapshots.png'), fullPage: true });
  });


  await check('hex viewer: sectors by offset, next and previous, with ASCII', async () => {
    await choose(['features.qcow2']);
    await waitOpened();
    // Opened at sector 0: the first MiB holds 0xab.
    let rows = (await text('hex')).split('\n');
    assert.equal(rows.length, 32, '512 bytes in rows of 16');
    assert.equal(rows[0], `0000000000000000  ${'ab '.repeat(8).trim()}  ${'ab '.repeat(8).trim()}`.padEnd(68) + ` |${'.'.repeat(16)}|`);
    await page.fill('#hex-offset', '8M');
    await page.click('#hex-go');
    await page.waitForFunction(() => document.getElementById('hex').dataset.offset === String(8 * 2 ** 20));
    rows = (await text('hex')).split('\n');
    assert.equal(rows[0], `0000000000800000  ${'5c '.repeat(8).trim()}  ${'5c '.repeat(8).trim()}`.padEnd(68) + ` |${'\\'.repeat(16)}|`);
    assert.match(rows[31], /^00000000008001f0 /);
    assert.match(await text('hex-where'), /Sector 16384 — guest bytes 8388608 to 8389119/);
    await page.click('#hex-next');
    await page.waitForFunction(() => document.getElementById('hex').dataset.offset === String(8 * 2 ** 20 + 512));
    await page.click('#hex-prev');
    await page.click('#hex-prev');
    await page.waitForFunction(() => document.getElementById('hex').dataset.offset === String(8 * 2 ** 20 - 512));
    assert.match((await text('hex')).split('\n')[0], /^00000000007ffe00  00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 +\|\.{16}\|$/);
    // An unaligned hex offset shows its sector; beyond the end is refused.
    await page.fill('#hex-offset', '0x6400123');
    await page.click('#hex-go');
    await page.waitForFunction(() => document.getElementById('hex').dataset.offset === String(100 * 2 ** 20));
    assert.match((await text('hex')).split('\n')[0], /^0000000006400000  11 11 11/);
    await page.fill('#hex-offset', '1T');
    await page.click('#hex-go');
    await page.waitForFunction(() => document.getElementById('hex').dataset.state === 'out-of-range');
    assert.match(await text('hex-where'), /beyond the end of the disk/);
    await page.screenshot({ path: join(shots, '8-hex.png'), fullPage: true });
  });

  await check('host file layout: header, tables, refcounts, data and free space where qemu-img says', async () => {
    // (features.qcow2 is still shown: choosing the same file again fires no change event.)
    assert.equal(await text('image-name'), 'features.qcow2');
    const file = readFileSync(path('features.qcow2'));
    const bytes = async (kind) => Number(await page.getByTestId(`layout-${kind}`).getAttribute('data-bytes'));
    const shown = Number(await page.getByTestId('layout-stats').getAttribute('data-file-bytes'));
    assert.equal(shown, file.length, 'the layout covers the file');
    assert.equal(await bytes('header'), 32768, 'one cluster of header');
    // The L1 and L2 tables (shared with the snapshot, so the active layer's),
    // refcount table, snapshot table, bitmaps and compressed clusters are there.
    for (const k of ['l1', 'l2', 'refcount-table', 'refcount-block', 'snapshot-table', 'snapshot-l1', 'bitmap', 'compressed']) {
      assert.ok(await bytes(k) > 0, `${k} shown`);
    }
    // Guest data: the host clusters qemu-img map names.
    const map = JSON.parse(qemuImg('map', '--output=json', path('features.qcow2')))
      .filter((e) => e.data && !e.compressed && e.offset !== undefined);
    const clusters = new Set(map.flatMap((e) => Array.from({ length: e.length / 32768 }, (_, k) => e.offset / 32768 + k)));
    assert.equal(await bytes('data'), clusters.size * 32768, 'data clusters as qemu-img map says');
    const extents = Number(await page.getByTestId('layout-stats').getAttribute('data-data-extents'));
    assert.ok(extents >= 2, 'data and compressed pieces counted');
    assert.match(await text('layout-stats'), new RegExp(`File: .*\\(${file.length} bytes\\) in \\d+ runs`));
    assert.equal(await page.getByTestId('layout-leaked').count(), 0, 'no leaks');
    // Next to the guest allocation map.
    assert.equal(await page.getByTestId('map-canvas').isVisible(), true);
    assert.equal(await page.getByTestId('layout-canvas').isVisible(), true);
    await page.screenshot({ path: join(shots, '9-layout.png'), fullPage: true });

    await choose(['layout-leak.qcow2']);
    await waitOpened();
    assert.equal(await bytes('leaked'), 65536, 'the leaked cluster');
    assert.equal(await bytes('data'), 3 * 65536);
    assert.equal(await bytes('l2'), 65536, 'one L2 table');
    assert.equal(await bytes('header'), 65536);
    assert.match(await text('layout-stats'), /leaked: 64 KiB/);
    // The last pixel of the file's picture is the leaked cluster's colour.
    const used = await page.$eval('#layout-canvas', (c) => {
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let last = 0;
      for (let p = 0; p < c.width * c.height; p++) if (d[p * 4] !== 255 || d[p * 4 + 1] !== 255) last = p;
      return Array.from(d.slice(last * 4, last * 4 + 4));
    });
    assert.deepEqual(used, [0xdc, 0x26, 0x26, 255]);
  });

  await check('partitions panel: a GPT disk made by sgdisk (FAT32, ext4, swap, NTFS) as sfdisk and blkid say; first sectors in the hex viewer', async () => {
    await choose(['parts-gpt.qcow2']);
    await waitOpened();
    await page.waitForFunction(() => document.getElementById('contents-panel').dataset.state === 'shown');
    assert.equal(await page.getByTestId('contents-panel').getAttribute('data-scheme'), 'gpt');
    assert.equal(await text('contents-summary'),
      `GPT partition table, 512-byte sectors, disk GUID ${PARTS_GPT.id}, read from the primary header.`);
    assert.equal(await page.getByTestId('contents-notes').isVisible(), false, 'no problems');
    const rows = await partitionRows();
    const names = gptTypeNames(tmp);
    assert.equal(rows.length, PARTS_GPT.partitions.length);
    rows.forEach((r, i) => {
      const t = PARTS_GPT.partitions[i];
      const what = `partition ${r.number}`;
      assert.equal(`parts-gpt.raw${r.number}`, t.node, what);
      assert.equal(r.start, String(t.start * 512), `${what}: start`);
      assert.match(r.cells.start, new RegExp(`sector ${t.start}$`), `${what}: start in sectors`);
      assert.equal(r.size, String(t.size * 512), `${what}: size`);
      assert.equal(r.typeId, t.type, `${what}: type GUID`);
      assert.equal(r.cells.type, names[t.type], `${what}: type in words`);
      assert.equal(r.cells.name, t.name, `${what}: name`);
      assert.equal(r.cells.flags, flagsOfAttrs(t.attrs, t.type).join(', '), `${what}: flags`);
      const b = blkid(tmp, 'parts-gpt.raw', t.start * 512, t.size * 512);
      assert.equal(r.fs, fsWords(b), `${what}: file system (blkid ${JSON.stringify(b)})`);
      assert.equal(r.cells.label, b.LABEL, `${what}: label`);
      assert.equal(r.cells.uuid, b.UUID, `${what}: UUID`);
    });
    assert.deepEqual(rows.map((r) => r.fs), ['FAT32', 'ext4', 'Linux swap', 'NTFS']);
    assert.equal(rows[0].cells.flags, 'required');
    assert.equal(rows[1].cells.label, 'rootfs');
    assert.equal(rows[3].cells.flags, 'hidden, no automount');
    await page.screenshot({ path: join(shots, '14-partitions-gpt.png'), fullPage: true });
    await page.getByTestId('contents-panel').screenshot({ path: join(shots, '14b-partitions-gpt-panel.png') });

    // "First sector": the FAT32 boot sector (OEM name, 0x55AA), the NTFS
    // boot sector, the ext4 superblock two sectors on.
    let hexRows = await jumpTo(1);
    assert.match(hexRows[0], /^0000000000100000  eb 58 90 6d 6b 66 73 2e  66 61 74 00 02 .*\|.X.mkfs.fat\.\.\./);
    assert.match(hexRows[31], /^00000000001001f0  (?:[0-9a-f]{2} ){8} (?:[0-9a-f]{2} ){6}55 aa +\|/);
    assert.match(await text('hex-where'), /The first sector of partition 1 \(EFI System, FAT32\)\.$/);
    assert.equal(await page.getByTestId('hex-offset').inputValue(), `0x${(PARTS_GPT.partitions[0].start * 512).toString(16)}`);
    await page.screenshot({ path: join(shots, '15-partition-first-sector.png'), fullPage: true });
    hexRows = await jumpTo(4);
    assert.match(hexRows[0], /\|.R.NTFS    /);
    assert.match(hexRows[31], / 55 aa +\|/);
    assert.match(await text('hex-where'), /partition 4 \(Microsoft basic data, NTFS\)/);
    await jumpTo(2);
    const ext4At = PARTS_GPT.partitions[1].start * 512;
    await page.click('#hex-next');
    await page.click('#hex-next');
    await page.waitForFunction((o) => document.getElementById('hex').dataset.offset === String(o), ext4At + 1024);
    hexRows = (await text('hex')).split('\n');
    assert.match(hexRows[3], /^[0-9a-f]{16}  (?:[0-9a-f]{2} ){8} 53 ef /, 'the ext4 magic at 0x438');
    assert.match(hexRows[7], /\|.{8}rootfs/, 'the label at 0x478');
    assert.equal(await page.getByTestId('hex').getAttribute('data-partition'), null, 'not a partition start');
  });

  await check('partitions panel: an MBR disk made by sfdisk with logical partitions; a table that cannot be read', async () => {
    await choose(['parts-mbr.qcow2']);
    await waitOpened();
    await page.waitForFunction(() => document.getElementById('contents-panel').dataset.state === 'shown');
    assert.equal(await text('contents-summary'), `MBR partition table, disk id ${PARTS_MBR.id}.`);
    const rows = await partitionRows();
    assert.deepEqual(rows.map((r) => r.number), ['1', '2', '3', '5', '6', '7']);
    const words = { e: 'FAT16 (LBA)', 83: 'Linux', 5: 'Extended', 82: 'Linux swap', 7: 'NTFS/exFAT' };
    rows.forEach((r, i) => {
      const t = PARTS_MBR.partitions[i];
      const what = `partition ${r.number}`;
      assert.equal(`parts-mbr.raw${r.number}`, t.node, what);
      assert.equal(r.start, String(t.start * 512), `${what}: start`);
      assert.match(r.cells.start, new RegExp(`sector ${t.start}$`), `${what}: start in sectors`);
      assert.equal(r.size, String(t.size * 512), `${what}: size`);
      assert.equal(r.typeId, mbrTypeId(t.type), `${what}: type id`);
      const logical = Number(r.number) >= 5;
      assert.equal(r.cells.type, `${words[t.type]} (${mbrTypeId(t.type)})${logical ? 'logical' : ''}`, `${what}: type`);
      assert.equal(r.logical, logical ? 'true' : undefined, `${what}: logical`);
      assert.equal(r.cells.flags, t.bootable ? 'bootable' : '', `${what}: flags`);
      assert.equal(r.cells.name, '');
      if (t.type === '5') {
        assert.equal(r.cells.fs, 'extended: holds the logical partitions');
        return;
      }
      const b = blkid(tmp, 'parts-mbr.raw', t.start * 512, t.size * 512);
      assert.equal(r.fs, fsWords(b), `${what}: file system (blkid ${JSON.stringify(b)})`);
      assert.equal(r.cells.label, b.LABEL, `${what}: label`);
      assert.equal(r.cells.uuid, b.UUID, `${what}: UUID`);
    });
    assert.equal(rows[0].cells.uuid, '0BAD-F00D');
    await page.screenshot({ path: join(shots, '16-partitions-mbr.png'), fullPage: true });
    await page.getByTestId('contents-panel').screenshot({ path: join(shots, '16b-partitions-mbr-panel.png') });
    let hexRows = await jumpTo(1);
    assert.match(hexRows[0], /\|.<.mkfs.fat\./);
    assert.match(hexRows[31], / 55 aa +\|/);
    hexRows = await jumpTo(5);
    assert.match(await text('hex-where'), /The first sector of partition 5 \(Linux swap, Linux swap\)\.$/);
    assert.equal(await page.getByTestId('hex').getAttribute('data-partition'), '5');

    // Both GPT headers gone: the panel says why; the other views still show.
    await choose(['parts-broken.qcow2']);
    await waitOpened();
    await page.waitForFunction(() => document.getElementById('contents-panel').dataset.state === 'shown');
    assert.equal(await page.getByTestId('contents-panel').getAttribute('data-scheme'), 'broken');
    assert.match(await text('contents-summary'),
      /^The partition table cannot be read: invalid partition table: primary GPT header at LBA 1: Signature /);
    assert.equal(await page.getByTestId('partition').count(), 0);
    assert.equal(await page.getByTestId('error').isVisible(), false, 'not an error of the page');
    await page.waitForFunction(() => document.getElementById('check').dataset.status);
    assert.equal(await page.getByTestId('check').getAttribute('data-status'), 'clean');
  });

  await check('convert qcow2 -> qcow2 with the options picked (zstd, 16 KiB clusters, extended L2): qemu-img check and compare', async () => {
    await choose(['base.qcow2', 'mid.qcow2', 'top.qcow2']);
    await waitOpened();
    assert.equal(await runConversion({ format: 'qcow2', compression: 'zstd', cluster: '16384', extendedL2: true }), 'done');
    const out = await downloadConverted('chain-zstd');
    assert.match(out, /top\.qcow2$/);
    assert.equal(qemuCheck(out).code, 0, qemuCheck(out).out);
    const r = spawnSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', path('top.qcow2'), out], { encoding: 'utf8' });
    assert.equal(r.status, 0, `qemu-img compare: ${r.stdout}${r.stderr}`);
    const q = JSON.parse(qemuImg('info', '--output=json', out));
    assert.equal(q['cluster-size'], 16384);
    assert.equal(q['backing-filename'], undefined, 'standalone');
    assert.equal(q['format-specific'].data['compression-type'], 'zstd');
    assert.equal(q['format-specific'].data['extended-l2'], true);
    assert.ok(JSON.parse(qemuImg('map', '--output=json', out)).some((e) => e.compressed), 'compressed clusters');
    const bar = await page.$eval('#convert-progress', (b) => [b.value, b.max]);
    assert.equal(bar[0], bar[1], 'progress bar full');
    // No compression, 4 KiB clusters: plain clusters.
    assert.equal(await runConversion({ format: 'qcow2', compression: 'none', cluster: '4096' }), 'done');
    const plain = await downloadConverted('chain-plain');
    assert.equal(qemuCheck(plain).code, 0);
    assert.equal(JSON.parse(qemuImg('info', '--output=json', plain))['cluster-size'], 4096);
    assert.ok(!JSON.parse(qemuImg('map', '--output=json', plain)).some((e) => e.compressed));
    assert.equal(spawnSync('qemu-img', ['compare', path('top.qcow2'), plain]).status, 0);
    await page.screenshot({ path: join(shots, '10-convert-qcow2.png'), fullPage: true });
  });

  await check('a folder: the chain is assembled by the names the images store, relative to their folders', async () => {
    await page.evaluate(() => { delete document.getElementById('result').dataset.ready; });
    await page.setInputFiles('#folder-input', path('vm'));
    await waitOpened();
    assert.equal(await text('image-name'), 'vm/images/top.qcow2');
    const names = await page.$$eval('[data-testid=chain-item]', (li) => li.map((x) => x.dataset.name));
    assert.deepEqual(names, ['vm/images/top.qcow2', 'vm/bases/mid.qcow2', 'vm/bases/base.qcow2']);
    // The guest reads the right base (B), not the decoy (X); mid's M and top's T above it.
    const rowAt = async (offset) => {
      await page.fill('#hex-offset', String(offset));
      await page.click('#hex-go');
      await page.waitForFunction((o) => document.getElementById('hex').dataset.offset === String(o), offset);
      return (await text('hex')).split('\n')[0];
    };
    assert.match(await rowAt(0), /\|B{16}\|$/);
    assert.match(await rowAt(65536), /\|M{16}\|$/);
    assert.match(await rowAt(131072), /\|T{16}\|$/);
    assert.match(await text('status'), /vm\/images\/top\.qcow2 → vm\/bases\/mid\.qcow2 → vm\/bases\/base\.qcow2/);
    await page.screenshot({ path: join(shots, '11-folder.png'), fullPage: true });

    // Without the base: the error names it and the image naming it.
    await page.setInputFiles('#folder-input', path('vm2'));
    const alert = page.getByRole('alert');
    await alert.waitFor({ state: 'visible' });
    const msg = await alert.innerText();
    assert.match(msg, /Missing backing file "base\.qcow2", named by vm2\/bases\/mid\.qcow2/);
    assert.match(msg, /looked for vm2\/bases\/base\.qcow2, then for any file named base\.qcow2/);
    assert.equal(await page.getByTestId('error').getAttribute('data-code'), 'missing-backing');

    // An absolute name found by its last path component.
    await choose(['abs/mid.qcow2', 'abs/top.qcow2', 'abs/base.qcow2']);
    await waitOpened();
    assert.equal(await text('image-name'), 'top.qcow2');
    assert.equal(await text('fact-backing-file'), '/srv/elsewhere/mid.qcow2');
    const chain = await page.$$eval('[data-testid=chain-item]', (li) => li.map((x) => x.dataset.name));
    assert.deepEqual(chain, ['top.qcow2', 'mid.qcow2', 'base.qcow2']);
  });

  await check('client API: error codes, AbortSignal (stepped and restarting), progress, transfers', async () => {
    const got = await page.evaluate(async () => {
      const { QcowClient } = await import(new URL('pkg/client.js', location.href).href);
      const q = await QcowClient.start(new URL('pkg/qcowkit_wasm.js', location.href));
      const files = Object.fromEntries(Array.from(document.getElementById('file-input').files).map((f) => [f.name, f]));
      const out = {};
      const fail = (p) => p.then(() => null, (e) => ({ code: e.code, name: e.name, message: e.message, isError: e instanceof Error }));
      try {
        out.format = await fail(q.open('x', new Uint8Array(4096)));
        out.missing = await fail(q.open('top.qcow2', files['top.qcow2']));
        const id = await q.open('top.qcow2', files['top.qcow2'], { 'mid.qcow2': files['mid.qcow2'], 'base.qcow2': files['base.qcow2'] });
        out.bounds = await fail(q.read(id, 2 ** 40, 1));
        out.readOnly = await fail(q.write(id, 0, new Uint8Array(1)));
        out.notFound = await fail(q.info(12345));
        // Progress of a map walk; an aborted signal before the call.
        const seen = [];
        out.mapEntries = (await q.map(id, { onProgress: (d, t) => seen.push([d, t]) })).length;
        out.mapProgress = seen[seen.length - 1];
        const ac0 = new AbortController();
        ac0.abort();
        out.pre = await fail(q.map(id, { signal: ac0.signal }));
        // Cancelled in the middle of a copy: rejected, the OPFS file removed.
        const big = new Uint8Array(64 << 20).fill(1);
        const ac = new AbortController();
        const copying = q.copyToOpfs(big, 'e2e-cancelled.bin', {
          signal: ac.signal, onProgress: (d) => { if (d > 0) ac.abort(); },
        });
        out.copy = await fail(copying);
        const root = await navigator.storage.getDirectory();
        out.leftover = await root.getFileHandle('e2e-cancelled.bin').then(() => true, () => false);
        // check() cancelled: the worker is restarted, the image opened again.
        const ac2 = new AbortController();
        const checking = q.check(id, { signal: ac2.signal });
        ac2.abort();
        out.check = await fail(checking);
        out.afterRestart = (await q.info(id))['virtual-size'];
        // Transfers: a written buffer handed over is detached; a read result arrives whole.
        const mem = await q.createImage({ size: '1M' });
        const w = await q.openWritable('m.qcow2', mem, {}, { transfer: true });
        out.memDetached = mem.byteLength === 0;
        const bytes = new Uint8Array(4096).fill(7);
        await q.write(w, 0, bytes, { transfer: true });
        out.writeDetached = bytes.byteLength === 0;
        out.readBack = Array.from((await q.read(w, 0, 4)));
      } finally {
        q.terminate();
      }
      return out;
    });
    assert.deepEqual(got.format && [got.format.code, got.format.isError], ['format', true]);
    assert.equal(got.missing.code, 'missing-backing');
    assert.match(got.missing.message, /mid\.qcow2/);
    assert.equal(got.bounds.code, 'out-of-bounds');
    assert.equal(got.readOnly.code, 'read-only');
    assert.equal(got.notFound.code, 'not-found');
    assert.ok(got.mapEntries > 0);
    assert.deepEqual(got.mapProgress, [32 * 2 ** 20, 32 * 2 ** 20]);
    assert.deepEqual([got.pre.code, got.pre.name], ['aborted', 'AbortError']);
    assert.deepEqual([got.copy.code, got.copy.name], ['aborted', 'AbortError']);
    assert.match(got.copy.message, /partial OPFS file "e2e-cancelled\.bin" was removed/);
    assert.equal(got.leftover, false, 'no half-written OPFS file');
    assert.deepEqual([got.check.code, got.check.name], ['aborted', 'AbortError']);
    assert.equal(got.afterRestart, 32 * 2 ** 20, 'the image works after the restart');
    assert.equal(got.memDetached, true);
    assert.equal(got.writeDetached, true);
    assert.deepEqual(got.readBack, [7, 7, 7, 7]);
  });

  await check('client API: passphrases given, stored and forgotten; their codes; transfers; restarts; encrypted creation', async () => {
    await choose(['encrypted.qcow2', 'ebase.qcow2', 'etop.qcow2']);
    await waitOpened();
    const got = await page.evaluate(async (pass) => {
      const { QcowClient } = await import(new URL('pkg/client.js', location.href).href);
      const q = await QcowClient.start(new URL('pkg/qcowkit_wasm.js', location.href));
      const files = Object.fromEntries(Array.from(document.getElementById('file-input').files).map((f) => [f.name, f]));
      const enc = files['encrypted.qcow2'];
      const chainFiles = { 'ebase.qcow2': files['ebase.qcow2'] };
      const out = {};
      const fail = (p) => p.then(() => null, (e) => ({ code: e.code, message: e.message }));
      try {
        // Without a passphrase: metadata; data reads need it.
        const locked = await q.open('encrypted.qcow2', enc);
        out.lockedInfo = (await q.info(locked)).encrypted;
        out.lockedRead = await fail(q.read(locked, 0, 512));
        out.lockedWritable = await fail(q.openWritable('encrypted.qcow2', await enc.arrayBuffer().then((b) => new Uint8Array(b))));
        out.wrong = await fail(q.open('encrypted.qcow2', enc, {}, { passphrase: 'nope-nope' }));
        // The passphrase as bytes, handed over (the worker zeroes them).
        const bytes = new TextEncoder().encode(pass);
        const open = await q.open('encrypted.qcow2', enc, {}, { passphrase: bytes, transfer: true });
        out.bytesDetached = bytes.byteLength === 0;
        out.read = Array.from(await q.read(open, 0, 4));
        // Stored passphrases, for a chain; used twice, then forgotten.
        const keys = await q.storePassphrases({ passphrase: 'top-secret', backingPassphrases: { 'ebase.qcow2': 'base-secret' } });
        const a = await q.open('etop.qcow2', files['etop.qcow2'], chainFiles, { passphrases: keys });
        const b = await q.open('etop.qcow2', files['etop.qcow2'], chainFiles, { passphrases: keys });
        out.chainReads = [Array.from(await q.read(a, 0, 2)), Array.from(await q.read(b, 1 << 20, 2))];
        out.forgot = [await q.forgetPassphrases(keys), await q.forgetPassphrases(keys)];
        out.afterForget = await fail(q.open('etop.qcow2', files['etop.qcow2'], chainFiles, { passphrases: keys }));
        out.stillOpen = Array.from(await q.read(a, 0, 1));
        out.both = await fail(q.open('encrypted.qcow2', enc, {}, { passphrases: a, passphrase: 'x' }));
        const wrongKeys = await q.storePassphrases({ passphrase: 'nope-nope' });
        out.wrongStored = await fail(q.open('encrypted.qcow2', enc, {}, { passphrases: wrongKeys }));
        // A restart (a cancelled check) reopens plain images only; stored passphrases are gone.
        const ac = new AbortController();
        const checking = q.check(open, { signal: ac.signal });
        ac.abort();
        out.check = (await fail(checking)).code;
        out.lostImage = await fail(q.info(open));
        out.plainBack = (await q.info(locked)).encrypted;
        out.lostKeys = await fail(q.open('encrypted.qcow2', enc, {}, { passphrases: wrongKeys }));
        out.forgetLost = await q.forgetPassphrases(wrongKeys);
        // Encrypted creation in the worker (its crypto.getRandomValues).
        const made = await q.createImage({ size: '1M', encrypt: { passphrase: 'made', iterations: 1000, cipherMode: 'cbc', ivgenAlg: 'essiv' } });
        const m = await q.openWritable('made.qcow2', made, {}, { passphrase: 'made' });
        await q.write(m, 4096, new Uint8Array(512).fill(9));
        out.made = Array.from(await q.read(m, 4096, 2));
        const e = (await q.info(m))['format-specific'].data.encrypt;
        out.madeFacts = [e['cipher-alg'], e['cipher-mode'], e['ivgen-alg'], e['ivgen-hash-alg'], e.slots[0].iters];
        out.madeWrong = await fail(q.open('made.qcow2', made, {}, { passphrase: 'Made' }));
      } finally {
        q.terminate();
      }
      return out;
    }, ENC_PASS);
    assert.equal(got.lockedInfo, true);
    assert.equal(got.lockedRead.code, 'passphrase-required');
    assert.equal(got.lockedWritable.code, 'passphrase-required');
    assert.deepEqual(got.wrong, { code: 'invalid-passphrase', message: 'Invalid password, cannot unlock any keyslot' });
    assert.equal(got.bytesDetached, true);
    assert.deepEqual(got.read, [0x5a, 0x5a, 0x5a, 0x5a]);
    assert.deepEqual(got.chainReads, [[0x62, 0x62], [0x74, 0x74]]);
    assert.deepEqual(got.forgot, [true, false]);
    assert.equal(got.afterForget.code, 'not-found');
    assert.deepEqual(got.stillOpen, [0x62], 'images opened with forgotten passphrases stay open');
    assert.equal(got.both.code, 'invalid-argument');
    assert.equal(got.wrongStored.code, 'invalid-passphrase');
    assert.equal(got.check, 'aborted');
    assert.equal(got.lostImage.code, 'not-found', 'an image opened with a passphrase is not reopened');
    assert.equal(got.plainBack, true, 'an image opened without one is');
    assert.equal(got.lostKeys.code, 'not-found');
    assert.match(got.lostKeys.message, /forgotten when the worker was restarted/);
    assert.equal(got.forgetLost, true);
    assert.deepEqual(got.made, [9, 9]);
    assert.deepEqual(got.madeFacts, ['aes-256', 'cbc', 'essiv', 'sha256', 1000]);
    assert.equal(got.madeWrong.code, 'invalid-passphrase');
    for (const v of Object.values(got)) {
      if (v && typeof v === 'object' && typeof v.message === 'string') {
        for (const p of [ENC_PASS, 'nope-nope', 'top-secret', 'base-secret', 'made']) {
          assert.ok(!v.message.includes(p), `no passphrase in "${v.message}"`);
        }
      }
    }
  });

  await check('a 4 GiB + 64 MiB sparse image: hex past 4 GiB, to raw and back through OPFS, cancel, responsive page', async () => {
    await choose(['big.qcow2']);
    await waitOpened();
    assert.equal(await page.getByTestId('fact-virtual-size').getAttribute('data-bytes'), String(BIG));
    // Exactly at 4 GiB, and the sector before it.
    await page.fill('#hex-offset', '0x100000000');
    await page.click('#hex-go');
    await page.waitForFunction(() => document.getElementById('hex').dataset.offset === String(2 ** 32));
    assert.match((await text('hex')).split('\n')[0], /^0000000100000000  61 61 61 61 61 61 61 61  61 61 61 61 61 61 61 61 +\|a{16}\|$/);
    assert.match(await text('hex-where'), /Sector 8388608 — guest bytes 4294967296 to 4294967807 \(0x100000000–0x1000001ff\)/);
    await page.click('#hex-prev');
    await page.waitForFunction(() => document.getElementById('hex').dataset.offset === String(2 ** 32 - 512));
    assert.match((await text('hex')).split('\n')[31], /^00000000fffffff0  33 33 33/);
    await page.click('#hex-next');
    await page.click('#hex-next');
    await page.waitForFunction(() => document.getElementById('hex').dataset.offset === String(2 ** 32 + 512));
    assert.match((await text('hex')).split('\n')[0], /^0000000100000200  33 33/);
    await page.screenshot({ path: join(shots, '12-big-hex.png'), fullPage: true });

    // To raw through OPFS; the result read from the profile's files and judged by qemu-img compare.
    assert.equal(await runConversion({ format: 'raw' }), 'done');
    assert.equal(await page.getByTestId('convert-status').getAttribute('data-size'), String(BIG));
    const opfsRaw = findProfileFile(BIG);
    const raw = path('big-page.raw');
    linkSync(opfsRaw, raw);
    assertSameGuest(raw, path('big.qcow2'));
    assert.ok(statSync(raw).blocks * 512 < 64 * 2 ** 20, 'the raw result is sparse');

    // Back: the raw file dropped, converted to qcow2 (zlib). First cancelled midway.
    await choose(['big-page.raw']);
    await waitOpened();
    assert.equal(await text('fact-format'), 'raw');
    assert.equal(await page.getByTestId('convert-format').inputValue(), 'qcow2');
    const state = await runConversion({ format: 'qcow2', compression: 'zlib' }, async () => {
      await page.waitForFunction(() => Number(document.getElementById('convert-progress').dataset.done || 0) >= 2 ** 28);
      await page.click('#convert-cancel');
    });
    assert.equal(state, 'cancelled');
    assert.match(await text('convert-status'), /Cancelled: .*was removed/);
    const leftovers = await page.evaluate(async () => {
      const names = [];
      for await (const n of (await navigator.storage.getDirectory()).keys()) if (n.startsWith('qcowkit-convert-')) names.push(n);
      return names;
    });
    assert.deepEqual(leftovers, [], 'no half-written OPFS target');
    // Then to the end, the page answering all along (rAF round trips while the worker converts).
    const samples = [];
    const final = await runConversion({ format: 'qcow2', compression: 'zlib' }, async () => {
      while (await page.getByTestId('convert-panel').getAttribute('data-state') === 'busy' && samples.length < 40) {
        const t0 = Date.now();
        const busy = await page.evaluate(() => new Promise((r) => requestAnimationFrame(() =>
          r(document.getElementById('convert-panel').dataset.state === 'busy'))));
        if (busy) samples.push(Date.now() - t0);
      }
    });
    assert.equal(final, 'done');
    assert.ok(samples.length >= 5, `sampled the page ${samples.length} times during the conversion`);
    const worst = Math.max(...samples);
    console.log(`    main thread during the conversion: ${samples.length} frames, worst round trip ${worst} ms`);
    assert.ok(worst < 1000, `the page answered within 1 s (worst ${worst} ms)`);
    const back = await downloadConverted('big-back');
    assert.equal(qemuCheck(back).code, 0, qemuCheck(back).out);
    assertSameGuest(raw, back);
    const r = spawnSync('qemu-img', ['compare', path('big.qcow2'), back], { encoding: 'utf8' });
    assert.equal(r.status, 0, `qemu-img compare: ${r.stdout}${r.stderr}`);
    assert.equal(JSON.parse(qemuImg('info', '--output=json', back))['virtual-size'], BIG);
    assert.ok(statSync(back).size < 32 * 2 ** 20, 'the qcow2 result holds the data only');
    await page.screenshot({ path: join(shots, '13-big-convert.png'), fullPage: true });
  });

  assert.deepEqual(pageErrors, [], 'no errors in the page console');
} catch (err) {
  failed = true;
  console.error(`not ok - ${err.stack || err}`);
  if (pageErrors.length) console.error(`page errors:\n  ${pageErrors.join('\n  ')}`);
  await page.screenshot({ path: join(shots, 'failure.png'), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
  server.close();
  // Keep the images, drop the large raw conversions and the profile.
  for (const f of readdirSync(tmp)) if (f.endsWith('.raw')) rmSync(join(tmp, f));
  rmSync(profile, { recursive: true, force: true });
}
console.log(`screenshots: ${shots}`);
console.log(failed ? 'FAILED' : `all ${step} checks passed`);
process.exit(failed ? 1 : 0);
