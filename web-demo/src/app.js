// The qcowkit demo page: inspects, checks, repairs, resizes, snapshots and
// converts qcow2 images with the wasm module running in a worker (see
// pkg/client.js). A dropped file is read-only: changes are made to a copy
// in the origin private file system (OPFS), offered for download.
import { QcowClient } from './pkg/client.js';

const $ = (id) => document.getElementById(id);

/**
 * The wasm's allocation categories (allocationMap()/allocation() keys), in
 * legend order, with how the page shows them.
 */
const CATEGORIES = [
  { key: 'data', label: 'Data', color: '#2a6fdb' },
  { key: 'compressed', label: 'Compressed data', color: '#9b3fd1' },
  { key: 'zero', label: 'Zero clusters', color: '#e8b400' },
  { key: 'backing', label: 'From a backing file', color: '#2f9e44' },
  { key: 'unallocated', label: 'Unallocated (reads as zero)', color: '#e4e7eb' },
];
const CAT_INDEX = Object.fromEntries(CATEGORIES.map((c, i) => [c.key, i]));

let client = null;
/**
 * The image shown: `id` of its read-only view in the worker (null while
 * an operation changes the file), `name`, the chosen `top` File and the
 * `others` (its backing files), `copy`: the OPFS file name of the working
 * copy once one was made (the view shows it from then on), `modified`:
 * whether an operation changed the copy.
 * @type {{id: number|null, name: string, top: File, others: Object<string, File>,
 *   copy: string|null, modified: boolean}|null}
 */
let current = null;

/** Prefix of the OPFS working copies (removed when another image is opened). */
const COPY_PREFIX = 'qcowkit-edit-';

/** Runs the page's worker calls one after another (opening, operations, downloads). */
let queue = Promise.resolve();
function serial(fn) {
  const run = queue.then(fn);
  queue = run.catch(() => {});
  return run;
}

// ---------- formatting ----------

function human(bytes) {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let v = Number(bytes);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  if (i === 0) return `${v} bytes`;
  return `${Number.isInteger(v) ? v : v.toFixed(2)} ${units[i]}`;
}

const sizeText = (bytes) => `${human(bytes)} (${Number(bytes)} bytes)`;
const onOff = (b) => (b ? 'on' : 'off');

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function showError(message) {
  const box = $('error');
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  const box = $('error');
  box.textContent = '';
  box.hidden = true;
}

function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = el('a', { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// ---------- choosing the top image ----------

/**
 * What the wasm's inspect() says of a file without opening the files it
 * names; null when the file is not a qcow2 image or inspect() rejects it
 * (a malformed header: opening it then shows the core's message).
 */
async function inspectOrNull(file) {
  try {
    const info = await client.inspect(file.name, file);
    return info.format === 'qcow2' ? info : null;
  } catch {
    return null;
  }
}

/**
 * The top image: the first qcow2 file that no other file names as its
 * backing file (by name or basename); else the first file.
 */
async function chooseTop(files) {
  const infos = await Promise.all(files.map(inspectOrNull));
  const named = new Set();
  infos.forEach((info) => {
    const b = info && info['backing-filename'];
    if (b) { named.add(b); named.add(b.split('/').pop()); }
  });
  const i = files.findIndex((f, k) => infos[k] !== null && !named.has(f.name));
  return files[i >= 0 ? i : 0];
}

// ---------- rendering ----------

function renderFacts(info) {
  const d = (info['format-specific'] || {}).data || {};
  const facts = [
    ['virtual-size', 'Virtual size', sizeText(info['virtual-size'])],
    ['format', 'Format', info.format],
    ['version', 'Format version', d.compat === '0.10' ? '2 (compat 0.10)' : d.compat === '1.1' ? '3 (compat 1.1)' : String(d.compat)],
    ['cluster-size', 'Cluster size', sizeText(info['cluster-size'])],
    ['compression-type', 'Compression type', d['compression-type'] || 'zlib'],
    ['extended-l2', 'Extended L2 entries (subclusters)', onOff(d['extended-l2'])],
    ['lazy-refcounts', 'Lazy refcounts', onOff(d['lazy-refcounts'])],
    ['refcount-bits', 'Refcount width', `${d['refcount-bits']} bits`],
    ['data-file', 'External data file', d['data-file'] ? `${d['data-file']}${d['data-file-raw'] ? ' (raw)' : ''}` : 'none'],
    ['corrupt', 'Marked corrupt', d.corrupt ? 'yes' : 'no'],
    ['dirty', 'Dirty (needs repair after crash)', info['dirty-flag'] ? 'yes' : 'no'],
    ['backing-file', 'Backing file', info['backing-filename'] || 'none'],
    ['file-size', 'File size', sizeText(info['actual-size'])],
  ];
  if (info['backing-filename-format']) {
    facts.push(['backing-format', 'Backing file format', info['backing-filename-format']]);
  }
  const dl = $('facts');
  dl.replaceChildren();
  for (const [key, label, value] of facts) {
    dl.append(el('dt', {}, label), el('dd', { 'data-testid': `fact-${key}`, id: `fact-${key}` }, value));
  }
  $('fact-virtual-size').dataset.bytes = String(info['virtual-size']);
  $('fact-cluster-size').dataset.bytes = String(info['cluster-size']);
}

function renderChain(chain) {
  const ol = $('chain');
  ol.replaceChildren();
  chain.forEach((info, depth) => {
    const parts = [`${info.filename}`, `${info.format}`, human(info['virtual-size'])];
    const li = el('li', { 'data-testid': 'chain-item', 'data-depth': String(depth), 'data-name': info.filename },
      parts.join(' — '));
    ol.append(li);
  });
  const last = chain[chain.length - 1];
  if (last && last['backing-filename']) {
    ol.append(el('li', { 'data-testid': 'chain-missing', class: 'bad' },
      `${last['backing-filename']} (not supplied)`));
  }
}

/** The snapshot list (the wasm's snapshots()), with Apply and Delete buttons. */
function renderSnapshots(snaps) {
  const box = $('snapshots');
  if (!snaps.length) { box.replaceChildren(el('p', { 'data-testid': 'no-snapshots' }, 'none')); return; }
  const t = el('table', {}, el('tr', {}, el('th', {}, 'ID'), el('th', {}, 'Name'), el('th', {}, 'VM state'),
    el('th', {}, 'Date'), el('th', {}, 'VM clock'), el('th', {}, 'Instructions'), el('th', {}, '')));
  for (const s of snaps) {
    const date = new Date(s['date-sec'] * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
    const clock = s['vm-clock-sec'] + s['vm-clock-nsec'] / 1e9;
    const actions = el('td', {},
      el('button', { type: 'button', class: 'snapshot-action', 'data-testid': 'snapshot-apply', 'data-action': 'apply',
        'data-id': s.id, 'data-name': s.name, title: 'Revert the disk to this snapshot (qemu-img snapshot -a)' }, 'Apply'),
      ' ',
      el('button', { type: 'button', class: 'snapshot-action', 'data-testid': 'snapshot-delete', 'data-action': 'delete',
        'data-id': s.id, 'data-name': s.name, title: 'Delete this snapshot (qemu-img snapshot -d)' }, 'Delete'));
    t.append(el('tr', { 'data-testid': 'snapshot', 'data-id': s.id, 'data-name': s.name },
      el('td', {}, s.id), el('td', {}, s.name),
      el('td', {}, human(s['vm-state-size'])), el('td', {}, date), el('td', {}, `${clock.toFixed(3)} s`),
      el('td', {}, s.icount === undefined ? '' : String(s.icount)), actions));
  }
  box.replaceChildren(t);
}

function renderBitmaps(info) {
  const box = $('bitmaps');
  const bms = ((info['format-specific'] || {}).data || {}).bitmaps || [];
  if (!bms.length) { box.replaceChildren(el('p', {}, 'none')); return; }
  const ul = el('ul');
  for (const b of bms) {
    ul.append(el('li', { 'data-testid': 'bitmap' },
      `${b.name}: granularity ${human(b.granularity)}, flags: ${b.flags.length ? b.flags.join(', ') : 'none'}`));
  }
  box.replaceChildren(ul);
}

function renderCheck(r) {
  const p = $('check');
  const corrupt = r.corruptions || 0;
  const leaks = r.leaks || 0;
  const errors = r['check-errors'] || 0;
  let text;
  let status;
  if (corrupt || errors) {
    status = 'corrupt';
    text = `${corrupt} corruption(s), ${leaks} leaked cluster(s), ${errors} check error(s).`;
  } else if (leaks) {
    status = 'leaks';
    text = `${leaks} leaked cluster(s): wasted space, no data at risk.`;
  } else {
    status = 'clean';
    text = 'No errors were found on the image.';
  }
  // Counters that are 0 are left out of the report (as in qemu-img's).
  const n = (key) => r[key] || 0;
  const total = n('total-clusters');
  if (total) {
    text += ` ${n('allocated-clusters')}/${total} clusters allocated, ${n('fragmented-clusters')} fragmented, ` +
      `${n('compressed-clusters')} compressed. Image end offset: ${n('image-end-offset')}.`;
  }
  p.textContent = text;
  p.dataset.status = status;
  p.className = status === 'clean' ? 'ok' : 'bad';
}

/**
 * Draws the allocation map from the wasm's allocationMap() ranges, each
 * pixel standing for an equal share of the guest space (row-major). A
 * pixel takes the colour of the allocated category covering most of it, or
 * "unallocated" if nothing in it is allocated. The legend shows the wasm's
 * allocation() totals.
 */
function renderMap(ranges, allocation, size) {
  const canvas = $('map-canvas');
  const ctx = canvas.getContext('2d');
  const pixels = canvas.width * canvas.height;
  const per = Math.max(size / pixels, 1);
  const used = Math.min(pixels, Math.ceil(size / per));
  const n = CATEGORIES.length;
  const acc = new Float64Array(used * n);
  for (const r of ranges) {
    const c = CAT_INDEX[r.category];
    if (c === undefined) throw new Error(`unknown allocation category ${r.category}`);
    const end = r.start + r.length;
    const p0 = Math.floor(r.start / per);
    const p1 = Math.min(used - 1, Math.floor((end - 1) / per));
    for (let p = p0; p <= p1; p++) {
      const lo = Math.max(r.start, p * per);
      const hi = Math.min(end, (p + 1) * per);
      if (hi > lo) acc[p * n + c] += hi - lo;
    }
  }
  const img = ctx.createImageData(canvas.width, canvas.height);
  const rgb = CATEGORIES.map((c) => [1, 3, 5].map((i) => parseInt(c.color.slice(i, i + 2), 16)));
  const unalloc = CAT_INDEX.unallocated;
  for (let p = 0; p < pixels; p++) {
    let color = [255, 255, 255];
    if (p < used) {
      let best = unalloc;
      let bestBytes = 0;
      for (let c = 0; c < n; c++) {
        if (c !== unalloc && acc[p * n + c] > bestBytes) { best = c; bestBytes = acc[p * n + c]; }
      }
      color = rgb[best];
    }
    img.data.set([...color, 255], p * 4);
  }
  ctx.putImageData(img, 0, 0);
  $('map-scale').textContent = `Each pixel: ${human(Math.ceil(per))} of guest space; ${ranges.length} allocation ranges.`;
  const legend = $('legend');
  legend.replaceChildren();
  for (const c of CATEGORIES) {
    const bytes = allocation[c.key] || 0;
    const sw = el('span', { class: 'swatch', style: `background:${c.color}` });
    legend.append(el('li', { 'data-testid': `legend-${c.key}`, 'data-bytes': String(bytes) },
      sw, `${c.label}: ${human(bytes)}`));
  }
}

// ---------- actions ----------

/**
 * Opens the read-only view of the current image (the OPFS copy once one
 * was made, else the chosen file) and renders every view from it.
 */
async function showImage() {
  const storage = current.copy ? { opfs: current.copy } : current.top;
  current.id = await client.open(current.name, storage, current.others);
  const id = current.id;
  const info = await client.info(id);
  $('image-name').textContent = current.name;
  renderFacts(info);
  renderSnapshots(await client.snapshots(id));
  renderBitmaps(info);
  $('check').textContent = 'Checking…';
  delete $('check').dataset.status;
  $('result').hidden = false;
  renderChain(await client.chain(id));
  renderMap(await client.allocationMap(id), await client.allocation(id), info['virtual-size']);
  renderCheck(await client.check(id));
  $('download-modified').hidden = !current.modified;
}

/** Releases the current view (its file is about to change or be replaced). */
async function closeView() {
  if (current && current.id !== null) {
    const id = current.id;
    current.id = null;
    await client.close(id);
  }
}

/** Removes the working copies left in OPFS by earlier images. */
async function removeCopies() {
  const root = await navigator.storage.getDirectory();
  for await (const name of root.keys()) {
    if (name.startsWith(COPY_PREFIX)) await root.removeEntry(name).catch(() => {});
  }
}

function resetMaintenance() {
  const panel = $('maintenance');
  delete panel.dataset.state;
  $('maint-status').textContent = '';
  $('maint-status').className = '';
  $('repair-log').textContent = '';
  $('repair-log-box').hidden = true;
  $('download-modified').hidden = true;
}

function openFiles(fileList) {
  const files = Array.from(fileList || []);
  if (!files.length) return Promise.resolve();
  return serial(async () => {
    clearError();
    $('result').hidden = true;
    $('convert-status').textContent = '';
    $('convert-progress').hidden = true;
    resetMaintenance();
    if (current) {
      await closeView().catch(() => {});
      current = null;
    }
    $('status').textContent = `Opening ${files.map((f) => f.name).join(', ')}…`;
    try {
      if (!client) throw new Error('the wasm module is not loaded');
      await removeCopies().catch(() => {});
      const top = await chooseTop(files);
      const others = {};
      for (const f of files) if (f !== top) others[f.name] = f;
      current = { id: null, name: top.name, top, others, copy: null, modified: false };
      await showImage();
      $('status').textContent = `Opened ${top.name}.`;
      $('result').dataset.ready = 'true';
    } catch (err) {
      $('status').textContent = 'Could not open the image.';
      showError(`${err.message}`);
    }
  });
}

// ---------- maintenance ----------

const MAINT_CONTROLS = ['check-button', 'repair-leaks', 'repair-all', 'resize-button', 'snapshot-button',
  'download-modified', 'convert-raw'];

function setBusy(busy) {
  for (const id of MAINT_CONTROLS) $(id).disabled = busy;
  for (const b of document.querySelectorAll('.snapshot-action')) b.disabled = busy;
}

/** Makes the OPFS working copy of the chosen file (once per image). */
async function ensureCopy(status) {
  if (current.copy) return;
  const name = `${COPY_PREFIX}${Date.now()}-${current.name.replace(/[^\w.-]/g, '_')}`;
  await client.copyToOpfs(current.top, name, (done, total) => {
    status.textContent = `Copying ${current.name} to the browser's private storage: ` +
      `${((done / (total || 1)) * 100).toFixed(0)} %`;
  });
  current.copy = name;
}

/**
 * Runs one operation on the working copy: the copy is made first if
 * needed, the view is closed while `run(copyName)` changes the file, then
 * every view is rendered again from the copy. `run` resolves to the text
 * to show. The panel's `data-state` ends as "done" or "failed".
 */
function maintain(label, run) {
  if (!current) return Promise.resolve();
  return serial(async () => {
    const panel = $('maintenance');
    const status = $('maint-status');
    setBusy(true);
    clearError();
    panel.dataset.state = 'busy';
    status.className = '';
    status.textContent = `${label}…`;
    let message = '';
    let failure = null;
    try {
      await ensureCopy(status);
      status.textContent = `${label}…`;
      await closeView();
      message = await run(current.copy);
      current.modified = true;
    } catch (err) {
      failure = err;
    }
    try {
      if (current.id === null) await showImage();
    } catch (err) {
      failure = failure || err;
    }
    if (failure) {
      status.textContent = `${label} failed: ${failure.message}`;
      status.className = 'bad';
      showError(failure.message);
      panel.dataset.state = 'failed';
    } else {
      status.textContent = message;
      status.className = 'ok';
      panel.dataset.state = 'done';
    }
    $('download-modified').hidden = !current.modified;
    setBusy(false);
  });
}

/** Opens the working copy with `open` ("openWritable"/"openForRepair"), runs `fn(id)`, closes it. */
async function withCopy(open, copy, fn) {
  const id = open === 'openForRepair'
    ? await client.openForRepair(current.name, { opfs: copy })
    : await client.openWritable(current.name, { opfs: copy }, current.others);
  try {
    return await fn(id);
  } finally {
    await client.close(id);
  }
}

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

/** What a repair did, in words (the numbers of the wasm's RepairResult). */
function repairText(mode, r) {
  const n = (key) => r[key] || 0;
  const found = r.found || {};
  if (!found.leaks && !found.corruptions && !n('leaks-fixed') && !n('corruptions-fixed')) {
    return `Repair ${mode}: nothing to repair, no errors were found on the image.`;
  }
  let text = `Repair ${mode}: fixed ${plural(n('leaks-fixed'), 'leaked cluster', 'leaked clusters')} and ` +
    `${plural(n('corruptions-fixed'), 'corruption', 'corruptions')}`;
  if (r.rebuilt) text += ' (refcount structure rebuilt)';
  text += `; left: ${plural(n('leaks'), 'leaked cluster', 'leaked clusters')}, ` +
    `${plural(n('corruptions'), 'corruption', 'corruptions')}.`;
  return text;
}

function repair(mode) {
  const lines = [];
  let more = 0;
  return maintain(`Repair ${mode}`, (copy) => withCopy('openForRepair', copy, async (id) => {
    const log = $('repair-log');
    const r = await client.repair(id, mode, (line) => {
      if (lines.length < 1000) lines.push(line); else more++;
    });
    log.textContent = lines.join('\n') + (more ? `\n… and ${more} more lines` : '');
    $('repair-log-box').hidden = lines.length === 0;
    return repairText(mode, r);
  }));
}

function recheck() {
  if (!current) return Promise.resolve();
  return serial(async () => {
    const panel = $('maintenance');
    panel.dataset.state = 'busy';
    $('check').textContent = 'Checking…';
    delete $('check').dataset.status;
    try {
      renderCheck(await client.check(current.id));
      $('maint-status').textContent = `Checked ${current.modified ? 'the modified image' : current.name}: ` +
        $('check').textContent;
      $('maint-status').className = $('check').className;
      panel.dataset.state = 'done';
    } catch (err) {
      showError(err.message);
      panel.dataset.state = 'failed';
    }
  });
}

function resize(ev) {
  ev.preventDefault();
  const text = $('resize-size').value.trim();
  const size = /^\d+$/.test(text) ? Number(text) : text;
  const shrink = $('resize-shrink').checked;
  return maintain('Resize', (copy) => withCopy('openWritable', copy, async (id) => {
    let n;
    try {
      n = await client.resize(id, size, { shrink });
    } catch (err) {
      // The wasm names its option; the page has a checkbox for it.
      if (/^Use the shrink: true option/.test(err.message)) {
        throw new Error('Tick "Allow shrinking" to perform a shrink operation: shrinking deletes all ' +
          'data beyond the new end of the disk. Before doing so, make sure there is no important data there.');
      }
      throw err;
    }
    return `Resized to ${sizeText(n)}.`;
  }));
}

function takeSnapshot(ev) {
  ev.preventDefault();
  const name = $('snapshot-name').value;
  return maintain('Take snapshot', (copy) => withCopy('openWritable', copy, async (id) => {
    const sid = await client.createSnapshot(id, name);
    $('snapshot-name').value = '';
    return `Snapshot ${sid} "${name}" taken.`;
  }));
}

function snapshotAction(ev) {
  const b = ev.target.closest('button.snapshot-action');
  if (!b) return;
  const { action, id: sid, name } = b.dataset;
  if (action === 'apply') {
    maintain('Apply snapshot', (copy) => withCopy('openWritable', copy, async (id) => {
      await client.applySnapshot(id, sid);
      return `Reverted the disk to snapshot ${sid} "${name}".`;
    }));
  } else if (action === 'delete') {
    maintain('Delete snapshot', (copy) => withCopy('openWritable', copy, async (id) => {
      await client.deleteSnapshot(id, name);
      return `Deleted snapshot ${sid} "${name}".`;
    }));
  }
}

function downloadModified() {
  if (!current || !current.copy) return Promise.resolve();
  return serial(async () => {
    const root = await navigator.storage.getDirectory();
    const file = await (await root.getFileHandle(current.copy)).getFile();
    download(file, current.name);
  });
}

function convertRaw() {
  if (!current) return Promise.resolve();
  return serial(convertCurrent);
}

async function convertCurrent() {
  const button = $('convert-raw');
  const bar = $('convert-progress');
  const status = $('convert-status');
  button.disabled = true;
  bar.hidden = false;
  bar.value = 0;
  status.textContent = 'Converting…';
  delete status.dataset.done;
  const rawName = current.name.replace(/\.(qcow2?|img)$/i, '') + '.raw';
  const opfsName = `qcowkit-convert-${Date.now()}.raw`;
  try {
    const root = await navigator.storage.getDirectory();
    for await (const name of root.keys()) {
      if (name.startsWith('qcowkit-convert-')) await root.removeEntry(name).catch(() => {});
    }
    await client.convertToRawOpfs(current.id, opfsName, (done, total) => {
      bar.max = total || 1;
      bar.value = done;
      status.textContent = `${((done / (total || 1)) * 100).toFixed(0)} % (${human(done)} of ${human(total)})`;
    });
    const file = await (await root.getFileHandle(opfsName)).getFile();
    download(file, rawName);
    status.textContent = `Done: ${rawName}, ${sizeText(file.size)}.`;
    status.dataset.done = 'true';
  } catch (err) {
    status.textContent = 'Conversion failed.';
    showError(err.message);
  } finally {
    button.disabled = false;
  }
}

async function createImage(ev) {
  ev.preventDefault();
  const status = $('create-status');
  delete status.dataset.done;
  clearError();
  const options = {
    size: $('create-size').value.trim(),
    cluster_size: Number($('create-cluster').value),
    extended_l2: $('create-extended-l2').checked,
    compression_type: $('create-compression').value,
  };
  try {
    const bytes = await client.createImage(options);
    download(new Blob([bytes], { type: 'application/octet-stream' }), 'new.qcow2');
    status.textContent = `Created new.qcow2 (${sizeText(bytes.length)} file).`;
    status.dataset.done = 'true';
  } catch (err) {
    status.textContent = 'Creation failed.';
    showError(err.message);
  }
}

// ---------- wiring ----------

function wire() {
  const zone = $('drop-zone');
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    openFiles(e.dataTransfer.files);
  });
  // Dropping outside the zone must not navigate away.
  window.addEventListener('dragover', (e) => e.preventDefault());
  window.addEventListener('drop', (e) => e.preventDefault());
  $('file-input').addEventListener('change', (e) => openFiles(e.target.files));
  $('convert-raw').addEventListener('click', convertRaw);
  $('create-form').addEventListener('submit', createImage);
  $('check-button').addEventListener('click', recheck);
  $('repair-leaks').addEventListener('click', () => repair('leaks'));
  $('repair-all').addEventListener('click', () => repair('all'));
  $('resize-form').addEventListener('submit', resize);
  $('snapshot-form').addEventListener('submit', takeSnapshot);
  $('snapshots').addEventListener('click', snapshotAction);
  $('download-modified').addEventListener('click', downloadModified);
}

async function main() {
  wire();
  try {
    client = await QcowClient.start(new URL('./pkg/qcowkit_wasm.js', import.meta.url));
    $('status').textContent = 'Ready. Choose or drop an image.';
    document.body.dataset.ready = 'true';
  } catch (err) {
    $('status').textContent = 'The wasm module failed to load.';
    showError(`The wasm module failed to load: ${err.message}`);
  }
}

main();
