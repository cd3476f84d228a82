// End-to-end test of the demo page: serves dist/ on 127.0.0.1, drives
// Debian's Chromium with playwright-core, and compares what the page shows
// and downloads with qemu-img's answers for images made at test time.
//
//   cd web-demo && npm ci && npm run build && node tests/e2e.mjs
import { createServer } from 'node:http';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, existsSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, extname, join, normalize, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, '..', 'dist');
const tmp = mkdtempSync(join(tmpdir(), 'qcowkit-e2e-'));
const shots = join(tmp, 'screenshots');
execFileSync('mkdir', ['-p', shots]);

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

// Encrypted (LUKS): the core does not decrypt; the page must say so.
qemuImg('create', '-q', '-f', 'qcow2', '--object', 'secret,id=sec0,data=e2e-secret',
  '-o', 'encrypt.format=luks,encrypt.key-secret=sec0', path('encrypted.qcow2'), '16M');

// Malformed: a qcow2 magic with an impossible header (cluster_bits = 99).
const bad = Buffer.alloc(4096);
bad.write('QFI\xfb', 0, 'latin1');
bad.writeUInt32BE(3, 4); // version
bad.writeUInt32BE(99, 20); // cluster_bits
bad.writeBigUInt64BE(1n << 30n, 24); // size
bad.writeUInt32BE(104, 100); // header_length
writeFileSync(path('broken.qcow2'), bad);

// ---------- the browser ----------

const server = await serve(dist);
// E2E_BASE_URL runs the same checks against another server (e.g. python3 -m http.server).
const base = process.env.E2E_BASE_URL || `http://127.0.0.1:${server.address().port}/`;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ acceptDownloads: true });
const page = await context.newPage();
const pageErrors = [];
page.on('pageerror', (e) => pageErrors.push(e.message));
page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });

const text = (testid) => page.getByTestId(testid).innerText();

async function choose(files) {
  await page.evaluate(() => { delete document.getElementById('result').dataset.ready; });
  await page.setInputFiles('#file-input', files.map(path));
}

async function waitOpened() {
  await page.waitForFunction(() => document.getElementById('result').dataset.ready === 'true'
    || !document.getElementById('error').hidden);
  const err = await page.getByTestId('error');
  if (await err.isVisible()) throw new Error(`page shows an error: ${await err.innerText()}`);
}

async function convertAndCompare(image, label) {
  const [dl] = await Promise.all([page.waitForEvent('download', { timeout: 60_000 }),
    page.click('#convert-raw')]);
  const got = path(`${label}-page.raw`);
  await dl.saveAs(got);
  await page.waitForFunction(() => document.getElementById('convert-status').dataset.done === 'true');
  const want = path(`${label}-qemu.raw`);
  qemuImg('convert', '-O', 'raw', path(image), want);
  assert.equal(statSync(got).size, statSync(want).size, 'raw size');
  assert.equal(sha256(got), sha256(want), 'raw sha256');
  const bar = await page.$eval('#convert-progress', (b) => [b.value, b.max]);
  assert.equal(bar[0], bar[1], 'progress bar full');
}

let failed = false;
try {
  await check('page loads the wasm worker', async () => {
    await page.goto(base);
    await page.waitForFunction(() => document.body.dataset.ready === 'true'
      || !document.getElementById('error').hidden);
    assert.equal(await page.getByTestId('error').isVisible(), false);
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

  await check('an encrypted image shows the core error', async () => {
    await choose(['encrypted.qcow2']);
    const alert = page.getByRole('alert');
    await alert.waitFor({ state: 'visible' });
    const msg = await alert.innerText();
    assert.ok(msg.trim().length > 0, 'error message is not empty');
    console.log(`    error shown: ${msg.trim()}`);
    await page.screenshot({ path: join(shots, '3b-encrypted.png'), fullPage: true });
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

  assert.deepEqual(pageErrors, [], 'no errors in the page console');
} catch (err) {
  failed = true;
  console.error(`not ok - ${err.stack || err}`);
  if (pageErrors.length) console.error(`page errors:\n  ${pageErrors.join('\n  ')}`);
  await page.screenshot({ path: join(shots, 'failure.png'), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
  server.close();
  // Keep the screenshots and images, drop the large raw conversions.
  for (const f of readdirSync(tmp)) if (f.endsWith('.raw')) rmSync(join(tmp, f));
}
console.log(`screenshots: ${shots}`);
console.log(failed ? 'FAILED' : `all ${step} checks passed`);
process.exit(failed ? 1 : 0);
