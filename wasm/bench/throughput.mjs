// Times the wasm package's converters in a dedicated worker of headless
// Chromium and prints MiB/s of guest (virtual) size, the median of N runs.
// Usually run by scripts/wasm-bench.sh, which builds wasm/pkg and makes the
// images; by hand:
//
//   node wasm/bench/throughput.mjs --dir DIR [--runs 3] [--native target/release/qcow2]
//
// DIR must hold disk.raw and qemu-img's plain.qcow2, zlib.qcow2 and
// zstd.qcow2 copies of it. Serves index.html, bench-worker.js and wasm/pkg
// on 127.0.0.1, drives Chromium (CHROMIUM, default /usr/bin/chromium) with
// web-demo's playwright-core, gives the page the images as Files (a file
// input, so disk-backed Files like a user's), and has the worker convert
// them into OPFS sync access handles. Verifies every output: raw ones by
// SHA-256 in the page against the source's (and against Node's hash of
// disk.raw), qcow2 ones copied out to DIR and judged by `qemu-img check`
// and `qemu-img compare`. Exits nonzero on any failure.
import { createServer } from 'node:http';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { createRequire } from 'node:module';
import { dirname, extname, join, normalize, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..');
const pkgDir = join(repo, 'wasm', 'pkg');
// playwright-core is web-demo's (locked) dev dependency; no second copy.
const { chromium } = createRequire(join(repo, 'web-demo', 'package.json'))('playwright-core');

const { values: opt } = parseArgs({
  options: {
    dir: { type: 'string' },
    runs: { type: 'string', default: '3' },
    native: { type: 'string' },
    'run-timeout': { type: 'string', default: '600' }, // seconds, per run
  },
});
if (!opt.dir) throw new Error('--dir DIR is required (see the header of this file)');
const dir = resolve(opt.dir);
const runs = Number(opt.runs);
const runTimeoutMs = Number(opt['run-timeout']) * 1000;
if (!(runs >= 1)) throw new Error('--runs must be at least 1');
const MiB = 1024 * 1024;

// ---------- the cases ----------

/** qcow2 -> raw for qemu-img's three images; raw -> qcow2 three ways. */
const CASES = [
  ...['plain', 'zlib', 'zstd'].map((kind) => ({
    label: `qcow2 (${kind === 'plain' ? 'uncompressed' : `${kind} clusters`}) -> raw`,
    kind: 'toRaw',
    image: `${kind}.qcow2`,
    native: ['convert', '-O', 'raw', `${kind}.qcow2`, 'native-out.raw'],
  })),
  {
    label: 'raw -> qcow2',
    kind: 'toQcow2',
    options: {},
    compressionType: 'zlib',
    native: ['convert', '-f', 'raw', '-O', 'qcow2', 'disk.raw', 'native-out.qcow2'],
  },
  {
    label: 'raw -> qcow2, compressed (zlib)',
    kind: 'toQcow2',
    options: { compress: true },
    compressionType: 'zlib',
    native: ['convert', '-c', '-f', 'raw', '-O', 'qcow2', 'disk.raw', 'native-out.qcow2'],
  },
  {
    label: 'raw -> qcow2, compressed (zstd)',
    kind: 'toQcow2',
    options: { compress: true, compression_type: 'zstd' },
    compressionType: 'zstd',
    native: ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', 'disk.raw',
      'native-out.qcow2'],
  },
];

// ---------- helpers ----------

for (const f of ['disk.raw', 'plain.qcow2', 'zlib.qcow2', 'zstd.qcow2']) {
  if (!existsSync(join(dir, f))) throw new Error(`${join(dir, f)} is missing`);
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

async function sha256File(path) {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk);
  return h.digest('hex');
}

/** Runs a command in DIR; throws with its output when it exits nonzero. */
function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: dir, encoding: 'utf8', timeout: 600_000 });
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.error || `exit ${r.status}`}): ${r.stdout}${r.stderr}`);
  }
  return r.stdout;
}

/** A qcow2 output must pass `qemu-img check`, hold disk.raw's contents and
 * use the expected compression type. */
function judgeQcow2(file, compressionType) {
  run('qemu-img', ['check', '-q', file]);
  run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', 'disk.raw', file]);
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', file]));
  const got = info['format-specific']?.data?.['compression-type'];
  if (got !== compressionType) throw new Error(`${file}: compression type ${got}, expected ${compressionType}`);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Dirty pages of the previous run must not be written back during the next.
const syncDisks = () => execFileSync('sync');

// ---------- the server: static files on 127.0.0.1, and uploads into DIR ----------

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.wasm': 'application/wasm' };

function serve() {
  const server = createServer(async (req, res) => {
    try {
      const p = decodeURIComponent(new URL(req.url, 'http://x').pathname);
      const up = p.match(/^\/upload\/([a-z0-9][a-z0-9.-]*)$/);
      if (req.method === 'POST' && up) {
        await pipeline(req, createWriteStream(join(dir, up[1])));
        res.writeHead(200).end('ok');
        return;
      }
      const [base, rel] = p.startsWith('/pkg/') ? [pkgDir, p.slice(5)] : [here, p === '/' ? 'index.html' : p];
      const file = normalize(join(base, rel));
      if (req.method !== 'GET' || !file.startsWith(base + sep) || !existsSync(file) || !statSync(file).isFile()) {
        res.writeHead(404).end('not found');
        return;
      }
      res.writeHead(200, { 'content-type': TYPES[extname(file)] || 'application/octet-stream' });
      res.end(readFileSync(file));
    } catch (e) {
      res.writeHead(500).end(String(e));
    }
  });
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok(server)));
}

// ---------- the benchmark ----------

const server = await serve();
const url = `http://127.0.0.1:${server.address().port}/`;
// A persistent profile in DIR: OPFS on disk with a disk-sized quota (an
// incognito context keeps OPFS in memory).
const profile = join(dir, 'chromium-profile');
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const pageErrors = [];
let failed = false;
try {
  const page = context.pages()[0] || await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.ready === 'true', null, { timeout: 30_000 });
  await page.setInputFiles('#files', ['disk.raw', 'plain.qcow2', 'zlib.qcow2', 'zstd.qcow2'].map((f) => join(dir, f)));
  const env = await withTimeout(page.evaluate(() => window.bench.init()), 120_000, 'init');

  const sourceSha256 = await sha256File(join(dir, 'disk.raw'));
  if (env.sourceSha256 !== sourceSha256) {
    throw new Error(`the page hashes disk.raw as ${env.sourceSha256}, Node as ${sourceSha256}`);
  }
  // The user agent string is reduced (156.0.0.0); the browser knows its build.
  const cdp = await context.newCDPSession(page);
  const chromiumVersion = (await cdp.send('Browser.getVersion')).product.replace(/^\D*/, '');
  await cdp.detach();
  console.log(`   Chromium ${chromiumVersion}; ${env.hardwareConcurrency} cores seen by the page; ` +
    `OPFS quota ${(env.opfsQuota / 2 ** 30).toFixed(1)} GiB`);
  console.log(`   wasm/pkg/qcowkit_wasm_bg.wasm: ${statSync(join(pkgDir, 'qcowkit_wasm_bg.wasm')).size} bytes, ` +
    `built ${statSync(join(pkgDir, 'qcowkit_wasm_bg.wasm')).mtime.toISOString()}`);

  const rows = [];
  for (const c of CASES) {
    // ----- wasm in Chromium -----
    const times = [];
    let last;
    for (let i = 0; i < runs; i++) {
      const final = i === runs - 1;
      const arg = c.kind === 'toRaw'
        ? { kind: c.kind, image: c.image, verify: final }
        : { kind: c.kind, options: c.options, upload: final ? 'wasm-out.qcow2' : undefined };
      syncDisks();
      last = await withTimeout(page.evaluate((a) => window.bench.run(a), arg), runTimeoutMs,
        `${c.label}, run ${i + 1}`);
      times.push(last.ms / 1000);
    }
    // Verify the last run's output.
    if (c.kind === 'toRaw') {
      if (last.guestSize !== env.sourceSize || last.outSize !== env.sourceSize) {
        throw new Error(`${c.label}: guest ${last.guestSize} / output ${last.outSize} bytes, raw disk ${env.sourceSize}`);
      }
      if (last.sha256 !== sourceSha256) throw new Error(`${c.label}: output sha256 ${last.sha256}, source ${sourceSha256}`);
    } else {
      if (statSync(join(dir, 'wasm-out.qcow2')).size !== last.outSize) {
        throw new Error(`${c.label}: the uploaded copy is not the whole output`);
      }
      judgeQcow2('wasm-out.qcow2', c.compressionType);
      rmSync(join(dir, 'wasm-out.qcow2'));
    }
    const row = { label: c.label, guest: last.guestSize, out: last.outSize, times };

    // ----- the native CLI on the same files, as a reference -----
    if (opt.native) {
      const out = c.native[c.native.length - 1];
      row.native = [];
      for (let i = 0; i < runs; i++) {
        rmSync(join(dir, out), { force: true });
        syncDisks();
        const t0 = process.hrtime.bigint();
        run(opt.native, c.native);
        row.native.push(Number(process.hrtime.bigint() - t0) / 1e9);
      }
      if (c.kind === 'toRaw') {
        if ((await sha256File(join(dir, out))) !== sourceSha256) throw new Error(`native ${c.label}: wrong output`);
      } else {
        judgeQcow2(out, c.compressionType);
      }
      rmSync(join(dir, out));
    }
    rows.push(row);
    const mibs = (ts) => (row.guest / MiB / median(ts)).toFixed(1);
    console.log(`   ${c.label}: wasm ${times.map((t) => t.toFixed(2)).join(' / ')} s (${mibs(times)} MiB/s)` +
      (row.native ? `; native ${row.native.map((t) => t.toFixed(2)).join(' / ')} s (${mibs(row.native)} MiB/s)` : '') +
      '; verified');
  }

  if (pageErrors.length) throw new Error(`the page reported errors:\n${pageErrors.join('\n')}`);

  // ---------- the table (Markdown, for the README) ----------
  console.log('');
  console.log(`wasm converters in a dedicated worker of headless Chromium ${chromiumVersion}: source a File, ` +
    'target an OPFS sync access handle.');
  console.log(`MiB/s of guest size; median of ${runs} runs${opt.native ? '; native = target/release/qcow2 convert on the same files' : ''}.`);
  console.log('');
  const head = ['conversion', 'guest MiB', 'output MiB', 'wasm s', 'wasm MiB/s'];
  if (opt.native) head.push('native s', 'native MiB/s');
  const lines = rows.map((r) => {
    const cells = [r.label, (r.guest / MiB).toFixed(0), (r.out / MiB).toFixed(1),
      median(r.times).toFixed(2), (r.guest / MiB / median(r.times)).toFixed(1)];
    if (r.native) cells.push(median(r.native).toFixed(2), (r.guest / MiB / median(r.native)).toFixed(1));
    return cells;
  });
  const width = head.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i].length)));
  const fmt = (cells) => `| ${cells.map((c, i) => (i ? c.padStart(width[i]) : c.padEnd(width[i]))).join(' | ')} |`;
  console.log(fmt(head));
  console.log(`|${width.map((w, i) => (i ? `${'-'.repeat(w + 1)}:` : '-'.repeat(w + 2))).join('|')}|`);
  for (const l of lines) console.log(fmt(l));
  console.log('');
  console.log('every output verified: raw by SHA-256 against the source; qcow2 by qemu-img check, ' +
    'qemu-img compare with the raw disk, and its compression type');
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.stack || e}`);
  if (pageErrors.length) console.error(`page errors:\n${pageErrors.join('\n')}`);
} finally {
  await context.close().catch(() => {});
  server.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
