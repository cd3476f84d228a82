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

/**
 * What a cluster of the image file holds (the wasm's hostLayout() kinds,
 * the core's HostUse names), in legend order, with how the page shows them.
 */
const HOST_KINDS = [
  { key: 'header', label: 'Header', color: '#111827' },
  { key: 'l1', label: 'L1 table', color: '#b45309' },
  { key: 'l2', label: 'L2 tables', color: '#f59e0b' },
  { key: 'refcount-table', label: 'Refcount table', color: '#be123c' },
  { key: 'refcount-block', label: 'Refcount blocks', color: '#fb7185' },
  { key: 'snapshot-table', label: 'Snapshot table', color: '#0f766e' },
  { key: 'snapshot-l1', label: 'Snapshot L1 tables', color: '#14b8a6' },
  { key: 'snapshot-l2', label: 'Snapshot-only L2 tables', color: '#99f6e4' },
  { key: 'bitmap', label: 'Bitmaps', color: '#65a30d' },
  { key: 'crypto-header', label: 'Encryption header', color: '#4b5563' },
  { key: 'data', label: 'Guest data', color: '#2a6fdb' },
  { key: 'compressed', label: 'Compressed guest data', color: '#9b3fd1' },
  { key: 'leaked', label: 'Leaked (refcount without a user)', color: '#dc2626' },
  { key: 'free', label: 'Free', color: '#e4e7eb' },
];
const KIND_INDEX = Object.fromEntries(HOST_KINDS.map((k, i) => [k.key, i]));

/** Bytes per guest sector row in the hex viewer, and per sector. */
const HEX_ROW = 16;
const SECTOR = 512;

let client = null;
/**
 * The image shown: `id` of its read-only view in the worker (null while
 * an operation changes the file), `name`, the chosen `top` File and the
 * `others` (its backing files), `copy`: the OPFS file name of the working
 * copy once one was made (the view shows it from then on), `modified`:
 * whether an operation changed the copy, `contents`: what the wasm's
 * contents() says the guest disk holds (partitions, file systems),
 * `keys`: the id of the passphrases stored in the worker (wasm memory)
 * once the user unlocked the image (the page never keeps a passphrase),
 * `unlocked`: the names of the encrypted images of the chain they unlock.
 * @type {{id: number|null, name: string, top: File, others: Object<string, File>,
 *   copy: string|null, modified: boolean, contents: object|null, keys: number|null,
 *   unlocked: Set<string>, allUnlocked: boolean, encrypted: boolean}|null}
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
  // (A File from OPFS is read from disk as it is saved: images larger than memory work.)
  const url = URL.createObjectURL(blob);
  const a = el('a', { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// ---------- assembling the backing chain ----------

const baseName = (p) => p.slice(p.lastIndexOf('/') + 1);
const dirOf = (p) => p.slice(0, p.lastIndexOf('/') + 1);

/** `p` without `.` components and with `dir/..` pairs removed. */
function normalize(p) {
  const out = [];
  for (const part of p.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..' && out.length && out[out.length - 1] !== '..') out.pop();
    else out.push(part);
  }
  return (p.startsWith('/') ? '/' : '') + out.join('/');
}

/**
 * What the wasm's inspect() says of a file without opening the files it
 * names (`format` "raw" for a file that is not a qcow2 image); null when
 * inspect() rejects it (a malformed header: opening it then shows the
 * core's message).
 */
async function inspectOrNull(file) {
  try {
    return await client.inspect(file.name, file);
  } catch {
    return null;
  }
}

/**
 * The file a backing name stored in the image at `parent` stands for, as
 * QEMU resolves it: relative to the directory of the naming image (or
 * absolute), else by its last path component. Returns `{ entry, tried }`.
 */
function resolveBacking(parent, name, entries) {
  const byPath = new Map(entries.map((e) => [e.path, e]));
  const tried = [];
  const wanted = name.startsWith('/') ? normalize(name) : normalize(dirOf(parent) + name);
  tried.push(wanted);
  if (byPath.has(wanted)) return { entry: byPath.get(wanted), tried };
  const base = baseName(name);
  tried.push(`any file named ${base}`);
  const entry = entries.find((e) => baseName(e.path) === base) || null;
  return { entry, tried };
}

/** An error with a code, shown as it is. */
function coded(code, message) {
  return Object.assign(new Error(message), { code });
}

/**
 * The image to show among the chosen files (`{ file, path }`, paths
 * relative to a dropped folder): the first qcow2 file that no other file
 * names as its backing file; its chain is followed through the files, and
 * a backing file that is not among them is named in the error. `others`
 * maps every other file's path (and, where free, its base name) to it,
 * for the wasm to resolve the names it reads the same way.
 */
async function assemble(entries) {
  const all = await Promise.all(entries.map((e) => inspectOrNull(e.file)));
  const infos = all.map((i) => (i && i.format === 'qcow2' ? i : null));
  const named = new Set();
  entries.forEach((e, k) => {
    const b = infos[k] && infos[k]['backing-filename'];
    if (b) {
      const r = resolveBacking(e.path, b, entries);
      if (r.entry) named.add(r.entry);
    }
  });
  // Candidates: qcow2 files no other file names. The top is the one with
  // the longest chain among the files (a folder may hold unrelated images).
  const depth = (i) => {
    let n = 0;
    for (let at = i; n < 64; n++) {
      const b = infos[at] && infos[at]['backing-filename'];
      const r = b ? resolveBacking(entries[at].path, b, entries) : null;
      if (!r || !r.entry) return n + (b ? 1 : 0);
      at = entries.indexOf(r.entry);
    }
    return n;
  };
  let k = -1;
  entries.forEach((e, i) => {
    if (infos[i] !== null && !named.has(e) && (k < 0 || depth(i) > depth(k))) k = i;
  });
  if (k < 0) {
    // No qcow2 image: a raw disk (or a malformed image, which then shows the core's error).
    return { top: entries[0], raw: !!all[0] && all[0].format === 'raw', others: {}, chain: [entries[0].path] };
  }
  const top = entries[k];
  // Follow the chain through the files: a missing link is named here.
  const chain = [top.path];
  for (let at = k, depth = 0; depth < 64; depth++) {
    const b = infos[at] && infos[at]['backing-filename'];
    if (!b) break;
    const r = resolveBacking(entries[at].path, b, entries);
    if (!r.entry) {
      throw coded('missing-backing', `Missing backing file "${b}", named by ${entries[at].path}: ` +
        `looked for ${r.tried.join(', then for ')}. Drop it together with the image (or drop their folder).`);
    }
    chain.push(r.entry.path);
    at = entries.indexOf(r.entry);
  }
  const others = {};
  for (const e of entries) if (e !== top) others[e.path] = e.file;
  for (const e of entries) {
    const b = baseName(e.path);
    if (e !== top && !(b in others)) others[b] = e.file;
  }
  return { top, raw: false, others, chain };
}

// ---------- rendering ----------

/** The encryption of info() in words, and whether the passphrase was given. */
function encryptionText(e, unlocked) {
  if (!e) return 'none';
  const cipher = e['cipher-alg'] ? ` (${[e['cipher-alg'], e['cipher-mode'], e['ivgen-alg']].filter(Boolean).join('-')})` : '';
  return `${e.format}${cipher}: ${unlocked ? 'unlocked' : 'locked, the guest data needs the passphrase (see Encryption)'}`;
}

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
    ['encryption', 'Encryption', encryptionText(d.encrypt, current.unlocked.has(current.name))],
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

// ---------- encryption ----------

/** The name of an image of the chain for the user: the top's, or a backing file's. */
const layerTitle = (info, depth) => (depth === 0 ? info.filename : `${info.filename} (backing file)`);

/**
 * The encryption facts of one image of the chain (its info()'s
 * `format-specific.data.encrypt`, read without the passphrase): a LUKS
 * header's algorithms, UUID and key slots with their iterations, or the
 * legacy AES method; and a passphrase field while the chain is not
 * wholly unlocked.
 */
function encryptedLayer(info, depth, askAll) {
  const e = ((info['format-specific'] || {}).data || {}).encrypt || { format: 'unknown' };
  const unlocked = current.unlocked.has(info.filename);
  const box = el('div', { class: 'encrypted-layer', 'data-testid': 'encrypted-layer', 'data-name': info.filename,
    'data-depth': String(depth), 'data-state': unlocked ? 'unlocked' : 'locked' });
  box.append(el('h4', {}, layerTitle(info, depth)));
  const dl = el('dl', {});
  const fact = (key, label, value) => dl.append(el('dt', {}, label), el('dd', { 'data-testid': `enc-${key}` }, value));
  if (e.format === 'luks') {
    fact('format', 'Format', 'LUKS version 1');
    fact('cipher-alg', 'Cipher', e['cipher-alg']);
    fact('cipher-mode', 'Cipher mode', e['cipher-mode']);
    fact('ivgen', 'IV generator', e['ivgen-hash-alg'] ? `${e['ivgen-alg']} (${e['ivgen-hash-alg']})` : e['ivgen-alg']);
    fact('hash-alg', 'Hash (PBKDF2, key split)', e['hash-alg']);
    fact('uuid', 'UUID', e.uuid);
    fact('master-key-iters', 'Master key digest iterations', String(e['master-key-iters']));
  } else if (e.format === 'aes') {
    fact('format', 'Format', 'the legacy qcow2 AES method (AES-128-CBC, no key check: a wrong passphrase reads as garbage)');
  } else {
    fact('format', 'Format', e.format);
  }
  box.append(dl);
  if (e.slots) {
    const t = el('table', { 'data-testid': 'key-slots' }, el('tr', {}, ...['Key slot', 'State', 'PBKDF2 iterations',
      'Key material at', 'Stripes'].map((h) => el('th', {}, h))));
    e.slots.forEach((slot, i) => {
      t.append(el('tr', { 'data-testid': 'key-slot', 'data-slot': String(i), 'data-active': String(slot.active),
        class: slot.active ? '' : 'inactive' },
      el('td', {}, String(i)), el('td', { 'data-testid': 'key-slot-state' }, slot.active ? 'active' : 'inactive'),
      el('td', { 'data-testid': 'key-slot-iters' }, slot.active ? String(slot.iters) : '—'),
      el('td', {}, `byte ${slot['key-offset']}`), el('td', {}, slot.active ? String(slot.stripes) : '—')));
    });
    box.append(t);
  }
  box.append(el('p', { 'data-testid': 'enc-state', class: unlocked ? 'unlocked' : 'locked' },
    unlocked ? 'Unlocked: its guest data is read with the passphrase given.'
      : 'Locked: its guest data cannot be read without the passphrase.'));
  if (askAll) {
    const inputId = `passphrase-${depth}`;
    box.append(el('p', {},
      el('label', { for: inputId }, `Passphrase of ${layerTitle(info, depth)}`),
      el('input', { id: inputId, type: 'password', autocomplete: 'off', 'data-testid': 'passphrase-input',
        'data-name': info.filename, 'data-depth': String(depth) })));
  }
  return box;
}

/** Shows the Encryption panel when an image of the chain is encrypted (else hides it). */
function renderEncryption(chain) {
  const panel = $('encryption-panel');
  const layers = chain.map((info, depth) => ({ info, depth })).filter(({ info }) => info.encrypted);
  current.encrypted = layers.length > 0;
  panel.hidden = layers.length === 0;
  if (!layers.length) {
    $('encryption-layers').replaceChildren();
    delete panel.dataset.state;
    return;
  }
  const all = layers.every(({ info }) => current.unlocked.has(info.filename));
  // Until every encrypted image is unlocked, each is asked for (the page keeps none of them).
  $('encryption-layers').replaceChildren(...layers.map(({ info, depth }) => encryptedLayer(info, depth, !all)));
  $('unlock-controls').hidden = all;
  // (While the form unlocks, it sets the outcome itself once every view is shown again.)
  if (panel.dataset.state !== 'busy') panel.dataset.state = all ? 'unlocked' : 'locked';
  current.allUnlocked = all;
}

/** The open options of the current image: the passphrases stored in the worker, if given. */
const keyOptions = () => (current.keys !== null ? { passphrases: current.keys } : undefined);

/** Forgets the passphrases of the current image in the worker (another image is opened). */
async function forgetKeys() {
  if (current && current.keys !== null) {
    const keys = current.keys;
    current.keys = null;
    current.unlocked = new Set();
    await client.forgetPassphrases(keys).catch(() => {});
  }
}

/**
 * The passphrase form: the values are taken out of the fields at once,
 * stored in the worker (wasm memory), and the image is opened with them
 * there. A wrong one shows the core's "Invalid password, cannot unlock any
 * keyslot" (naming the backing file when it is one) and the form stays for
 * another try; the right ones unlock every view (hex viewer, partitions,
 * conversions, maintenance). The panel's `data-state` ends as "unlocked",
 * "locked" (some images still locked) or "failed".
 */
function unlock(ev) {
  ev.preventDefault();
  if (!current || current.raw) return Promise.resolve();
  const status = $('unlock-status');
  let secrets = { backingPassphrases: {} };
  const names = new Set();
  for (const input of document.querySelectorAll('#encryption-layers input[type=password]')) {
    const value = input.value;
    input.value = '';
    if (!value) continue;
    if (input.dataset.depth === '0') secrets.passphrase = value;
    else secrets.backingPassphrases[input.dataset.name] = value;
    names.add(input.dataset.name);
  }
  if (!names.size) {
    status.textContent = 'Enter a passphrase.';
    status.className = 'bad';
    return Promise.resolve();
  }
  return serial(async () => {
    const panel = $('encryption-panel');
    panel.dataset.state = 'busy';
    $('unlock-button').disabled = true;
    status.className = '';
    status.textContent = 'Unlocking (in the worker)…';
    clearError();
    let keys = null;
    try {
      keys = await client.storePassphrases(secrets);
      secrets = null; // The worker has them; the page keeps no copy.
      const storage = current.copy ? { opfs: current.copy } : current.top;
      const id = await client.open(current.name, storage, current.others, { passphrases: keys });
      await closeView();
      await forgetKeys();
      current.keys = keys;
      current.unlocked = names;
      keys = null;
      status.textContent = '';
      await showImage(id);
      status.textContent = current.allUnlocked
        ? 'Unlocked: every view now reads the guest data.'
        : 'Unlocked in part: the images still locked need their passphrases.';
      status.className = 'ok';
      delete status.dataset.code;
      panel.dataset.state = current.allUnlocked ? 'unlocked' : 'locked';
    } catch (err) {
      secrets = null;
      if (keys !== null) await client.forgetPassphrases(keys).catch(() => {});
      if (current.id === null) {
        // (the view was closed: a failure after the image was opened)
        showError(err.message);
        await showImage().catch(() => {});
      }
      status.textContent = err.message;
      status.className = 'bad';
      status.dataset.code = err.code || '';
      panel.dataset.state = 'failed';
      $('encryption-layers').querySelector('input[type=password]')?.focus();
    } finally {
      $('unlock-button').disabled = false;
    }
  });
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

/**
 * Draws the host-file layout from the wasm's hostLayout() runs: each pixel
 * an equal share of the image file, coloured by what most of it holds
 * (any metadata before data, data before free space), with a legend of
 * bytes per kind and how fragmented the guest data is.
 */
function renderLayout(runs) {
  const canvas = $('layout-canvas');
  const ctx = canvas.getContext('2d');
  const size = runs.reduce((n, r) => n + r.len, 0);
  const pixels = canvas.width * canvas.height;
  const per = Math.max(size / pixels, 1);
  const used = Math.min(pixels, Math.ceil(size / per));
  const n = HOST_KINDS.length;
  const acc = new Float64Array(used * n);
  const totals = Object.fromEntries(HOST_KINDS.map((k) => [k.key, 0]));
  for (const r of runs) {
    const c = KIND_INDEX[r.kind];
    if (c === undefined) throw new Error(`unknown host cluster kind ${r.kind}`);
    totals[r.kind] += r.len;
    const end = r.start + r.len;
    const p0 = Math.floor(r.start / per);
    const p1 = Math.min(used - 1, Math.floor((end - 1) / per));
    for (let p = p0; p <= p1; p++) {
      const lo = Math.max(r.start, p * per);
      const hi = Math.min(end, (p + 1) * per);
      if (hi > lo) acc[p * n + c] += hi - lo;
    }
  }
  const rank = (c) => (HOST_KINDS[c].key === 'free' ? 0 : ['data', 'compressed', 'leaked'].includes(HOST_KINDS[c].key) ? 1 : 2);
  const rgb = HOST_KINDS.map((k) => [1, 3, 5].map((i) => parseInt(k.color.slice(i, i + 2), 16)));
  const img = ctx.createImageData(canvas.width, canvas.height);
  for (let p = 0; p < pixels; p++) {
    let color = [255, 255, 255];
    if (p < used) {
      let best = KIND_INDEX.free;
      for (let c = 0; c < n; c++) {
        const bytes = acc[p * n + c];
        if (!bytes) continue;
        if (rank(c) > rank(best) || (rank(c) === rank(best) && bytes > acc[p * n + best])) best = c;
      }
      color = rgb[best];
    }
    img.data.set([...color, 255], p * 4);
  }
  ctx.putImageData(img, 0, 0);
  // Fragmentation: the guest data's pieces in the file.
  const pieces = runs.filter((r) => r.kind === 'data' || r.kind === 'compressed');
  const dataBytes = pieces.reduce((n, r) => n + r.len, 0);
  const largest = pieces.reduce((m, r) => Math.max(m, r.len), 0);
  const stats = $('layout-stats');
  stats.dataset.fileBytes = String(size);
  stats.dataset.dataExtents = String(pieces.length);
  stats.dataset.runs = String(runs.length);
  stats.textContent = `File: ${sizeText(size)} in ${runs.length} runs. Each pixel: ${human(Math.ceil(per))} of the file. ` +
    `Guest data: ${human(dataBytes)} in ${pieces.length} ${pieces.length === 1 ? 'piece' : 'pieces'}` +
    (pieces.length ? ` (largest ${human(largest)}, average ${human(Math.round(dataBytes / pieces.length))})` : '') +
    `; free: ${human(totals.free)}; leaked: ${human(totals.leaked)}.`;
  const legend = $('layout-legend');
  legend.replaceChildren();
  for (const k of HOST_KINDS) {
    if (!totals[k.key] && !['header', 'data', 'free'].includes(k.key)) continue;
    legend.append(el('li', { 'data-testid': `layout-${k.key}`, 'data-bytes': String(totals[k.key]) },
      el('span', { class: 'swatch', style: `background:${k.color}` }), `${k.label}: ${human(totals[k.key])}`));
  }
}

// ---------- partitions and file systems ----------

/** MBR extended partition types (containers of the logical partitions, not probed). */
const EXTENDED = ['0x05', '0x0f', '0x85'];

/** One line about a file system (the wasm's `FilesystemInfo`) besides its label and UUID. */
function fsDetails(f) {
  const parts = [];
  if (f.version !== undefined && ['LUKS', 'qcow2', 'Linux swap', 'XFS'].includes(f.type)) parts.push(`version ${f.version}`);
  if (f.cipher) parts.push(`cipher ${f.cipher}${f['cipher-mode'] ? `-${f['cipher-mode']}` : ''}`);
  if (f.size !== undefined) parts.push(`${f.type === 'qcow2' ? 'virtual size' : 'size'} ${human(f.size)}`);
  if (f['block-size'] !== undefined) {
    const what = ['FAT12', 'FAT16', 'FAT32', 'exFAT', 'NTFS', 'qcow2'].includes(f.type) ? 'cluster'
      : f.type === 'Linux swap' ? 'page' : f.type === 'Btrfs' ? 'sector' : 'block';
    const bs = f['block-size'];
    parts.push(`${bs < 1024 ? `${bs}-byte` : human(bs)} ${what}s`);
  }
  return parts.join(' · ');
}

/**
 * A table row of one partition (or of the whole disk: `p` null) and the
 * file system found in it, with a button that shows its first sector in
 * the hex viewer.
 */
function contentsRow(p, fs, sectorSize) {
  const start = p ? p.start : 0;
  const row = el('tr', {
    'data-testid': 'partition',
    'data-number': p ? String(p.number) : 'disk',
    'data-start': String(start),
    'data-size': String(p ? p.size : current.size),
  });
  const sub = (text) => el('span', { class: 'sub' }, text);
  const cell = (testid, ...children) => el('td', { 'data-testid': testid }, ...children);
  if (p) {
    row.dataset.typeId = p['type-id'];
    if (p.logical) row.dataset.logical = 'true';
    const typeText = `${p.type}${p['type-id'].startsWith('0x') && p.type !== p['type-id'] ? ` (${p['type-id']})` : ''}`;
    row.append(
      cell('partition-number', String(p.number)),
      cell('partition-start', human(start), sub(`sector ${start / sectorSize}`)),
      el('td', { 'data-testid': 'partition-size', title: `${p.size} bytes` }, human(p.size)),
      el('td', { 'data-testid': 'partition-type', title: p['type-id'] }, typeText,
        ...(p.logical ? [sub('logical')] : [])),
      cell('partition-name', p.name || ''),
      cell('partition-flags', (p.flags || []).join(', ')),
    );
  } else {
    row.append(cell('partition-number', 'disk'), cell('partition-start', human(0), sub('sector 0')),
      el('td', { 'data-testid': 'partition-size', title: `${current.size} bytes` }, human(current.size)),
      cell('partition-type', 'whole disk'), cell('partition-name', ''), cell('partition-flags', ''));
  }
  if (fs) {
    row.dataset.fs = fs.type;
    const details = fsDetails(fs);
    const attrs = { 'data-testid': 'partition-fs' };
    if (fs.features) attrs.title = `features: ${fs.features.join(' ')}`;
    row.append(el('td', attrs, fs.type, ...(details ? [sub(details)] : [])));
  } else {
    const extended = p && EXTENDED.includes(p['type-id']);
    row.append(el('td', { 'data-testid': 'partition-fs', class: 'none' },
      extended ? 'extended: holds the logical partitions' : 'not recognised'));
  }
  row.append(
    cell('partition-label', fs && fs.label ? fs.label : ''),
    el('td', { 'data-testid': 'partition-uuid', class: 'id' }, fs && fs.uuid ? fs.uuid : ''),
    el('td', {}, el('button', {
      type: 'button', class: 'partition-jump', 'data-testid': 'partition-jump', 'data-start': String(start),
      title: `Show the first sector${p ? ` of partition ${p.number}` : ' of the disk'} in the hex viewer`,
    }, 'First sector')),
  );
  return row;
}

/**
 * Shows what the wasm's contents() says the guest disk holds: the
 * partition table (with the problems of a damaged one) and a table of the
 * partitions with their file systems, plus the whole disk's file system.
 */
function renderContents(c) {
  const panel = $('contents-panel');
  const summary = $('contents-summary');
  const notes = $('contents-notes');
  const t = c['partition-table'];
  const lines = [];
  summary.className = '';
  if (t && t.type === 'gpt') {
    panel.dataset.scheme = 'gpt';
    summary.textContent = `GPT partition table, ${t['sector-size']}-byte sectors, disk GUID ${t['disk-guid']}, ` +
      `read from the ${t.header} header.`;
    if (t['primary-problem']) lines.push(`The primary GPT header is damaged (${t['primary-problem']}): the partitions were read from the backup.`);
    if (t['backup-problem']) lines.push(`The backup GPT header is damaged (${t['backup-problem']}).`);
  } else if (t) {
    panel.dataset.scheme = 'mbr';
    summary.textContent = `MBR partition table, disk id ${t['disk-id']}.`;
  } else if (c.error) {
    panel.dataset.scheme = 'broken';
    summary.textContent = `The partition table cannot be read: ${c.error}`;
    summary.className = 'bad';
  } else {
    panel.dataset.scheme = 'none';
    summary.textContent = c.filesystem ? 'No partition table: a file system on the whole disk.'
      : 'No partition table or file system recognised.';
  }
  if (c['omitted-partitions']) lines.push(`${c['omitted-partitions']} more partitions are not shown.`);
  notes.replaceChildren(...lines.map((l) => el('li', { 'data-testid': 'contents-note' }, l)));
  notes.hidden = lines.length === 0;
  const parts = c.partitions || [];
  if (!parts.length && !c.filesystem) {
    $('contents-table').replaceChildren();
  } else {
    const ss = t ? t['sector-size'] : SECTOR;
    const table = el('table', {}, el('tr', {}, ...['#', 'Start', 'Size', 'Type', 'Name', 'Flags', 'File system',
      'Label', 'UUID / serial', ''].map((h) => el('th', {}, h))));
    if (c.filesystem) table.append(contentsRow(null, c.filesystem, ss));
    for (const p of parts) table.append(contentsRow(p, p.filesystem, ss));
    $('contents-table').replaceChildren(table);
  }
  panel.dataset.state = 'shown';
}

/** The partitions (not MBR extended ones) starting at guest offset `at`, for the hex viewer. */
function partitionsAt(at) {
  const c = current && current.contents;
  if (!c) return [];
  return (c.partitions || []).filter((p) => p.start === at && !EXTENDED.includes(p['type-id']));
}

function resetContents() {
  const panel = $('contents-panel');
  delete panel.dataset.state;
  delete panel.dataset.scheme;
  $('contents-summary').textContent = 'Reading the partition table…';
  $('contents-summary').className = '';
  $('contents-notes').hidden = true;
  $('contents-table').replaceChildren();
}

/** Shows the first sector of a partition (the button in its row) in the hex viewer. */
function jumpToPartition(ev) {
  const b = ev.target.closest('button.partition-jump');
  if (!b || !current || current.raw) return Promise.resolve();
  const start = Number(b.dataset.start);
  $('hex-offset').value = `0x${hex(start, 1)}`;
  return serial(async () => {
    await showSector(start);
    $('hex-panel').scrollIntoView({ block: 'nearest' });
  }).catch((err) => showError(err.message));
}

// ---------- hex viewer ----------

/** The hex viewer's sector: its guest offset (a multiple of 512). */
let hexAt = 0;

/**
 * A guest offset typed by the user: decimal bytes, 0x-prefixed hex, or a
 * number with a K, M, G or T suffix (binary units). Parsed with BigInt, so
 * no digit is lost; beyond Number.MAX_SAFE_INTEGER it is refused.
 */
function parseOffset(text) {
  const t = text.trim().replace(/_/g, '');
  let v;
  const m = /^(\d+)\s*([kmgt])(?:i?b)?$/i.exec(t);
  if (/^0x[0-9a-f]+$/i.test(t)) v = BigInt(t);
  else if (/^\d+$/.test(t)) v = BigInt(t);
  else if (m) v = BigInt(m[1]) << BigInt(10 * ' kmgt'.indexOf(m[2].toLowerCase()));
  else throw coded('invalid-argument', `"${text}" is not an offset: use bytes, 0x… (hex) or a K, M, G, T suffix`);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw coded('invalid-argument', `offset ${v} is beyond 2^53 - 1`);
  return Number(v);
}

const hex = (n, width) => n.toString(16).padStart(width, '0');

/** Shows the 512-byte guest sector at `offset` (rounded down to a sector). */
async function showSector(offset) {
  const size = current.size;
  const where = $('hex-where');
  const view = $('hex');
  if (offset >= size) {
    where.textContent = `Offset ${offset} (0x${hex(offset, 1)}) is beyond the end of the disk (${sizeText(size)}).`;
    where.className = 'bad';
    view.dataset.state = 'out-of-range';
    return;
  }
  const at = offset - (offset % SECTOR);
  const len = Math.min(SECTOR, size - at);
  const bytes = await client.read(current.id, at, len);
  const lines = [];
  for (let row = 0; row < bytes.length; row += HEX_ROW) {
    const part = bytes.subarray(row, row + HEX_ROW);
    const cells = Array.from(part, (b) => hex(b, 2));
    const ascii = Array.from(part, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : '.')).join('');
    lines.push(`${hex(at + row, 16)}  ${cells.slice(0, 8).join(' ')}  ${cells.slice(8).join(' ')}`.padEnd(68) + ` |${ascii}|`);
  }
  hexAt = at;
  view.textContent = lines.join('\n');
  view.dataset.offset = String(at);
  view.dataset.state = 'shown';
  where.className = '';
  where.textContent = `Sector ${Math.floor(at / SECTOR)} — guest bytes ${at} to ${at + len - 1} ` +
    `(0x${hex(at, 1)}–0x${hex(at + len - 1, 1)}) of ${sizeText(size)}.`;
  const starting = partitionsAt(at);
  if (starting.length) {
    where.textContent += ' The first sector of ' + starting.map((p) => `partition ${p.number} (${p.type}` +
      `${p.filesystem ? `, ${p.filesystem.type}` : ''})`).join(', ') + '.';
    view.dataset.partition = starting.map((p) => p.number).join(',');
  } else {
    delete view.dataset.partition;
  }
  $('hex-prev').disabled = at === 0;
  $('hex-next').disabled = at + SECTOR >= size;
}

function hexGo(ev) {
  ev.preventDefault();
  if (!current || current.raw) return Promise.resolve();
  let offset;
  try {
    offset = parseOffset($('hex-offset').value);
  } catch (err) {
    $('hex-where').textContent = err.message;
    $('hex-where').className = 'bad';
    $('hex').dataset.state = 'invalid';
    return Promise.resolve();
  }
  return serial(() => showSector(offset)).catch((err) => showError(err.message));
}

function hexStep(delta) {
  if (!current || current.raw) return Promise.resolve();
  return serial(() => {
    const next = Math.max(0, hexAt + delta * SECTOR);
    $('hex-offset').value = `0x${hex(next, 1)}`;
    return showSector(next);
  }).catch((err) => showError(err.message));
}

// ---------- actions ----------

/**
 * Opens the read-only view of the current image (the OPFS copy once one
 * was made, else the chosen file) and renders every view from it.
 */
async function showImage(opened = null) {
  const storage = current.copy ? { opfs: current.copy } : current.top;
  current.id = opened !== null ? opened : await client.open(current.name, storage, current.others, keyOptions());
  const id = current.id;
  const info = await client.info(id);
  current.size = info['virtual-size'];
  $('image-name').textContent = current.name;
  $('result').dataset.kind = 'qcow2';
  renderFacts(info);
  renderSnapshots(await client.snapshots(id));
  renderBitmaps(info);
  $('check').textContent = 'Checking…';
  delete $('check').dataset.status;
  $('result').hidden = false;
  const chain = await client.chain(id);
  renderChain(chain);
  renderEncryption(chain);
  renderMap(await client.allocationMap(id), await client.allocation(id), info['virtual-size']);
  try {
    renderLayout(await client.hostLayout(id));
  } catch (err) {
    // (e.g. a file of more clusters than the core draws): the other views still show.
    $('layout-stats').textContent = `No layout: ${err.message}`;
    $('layout-legend').replaceChildren();
  }
  current.contents = null;
  try {
    current.contents = await client.contents(id);
    renderContents(current.contents);
  } catch (err) {
    // (the storage failed, or a value beyond 2^53): the other views still show.
    $('contents-summary').textContent = `The partitions cannot be shown: ${err.message}${needsKey(err)}`;
    $('contents-summary').className = 'bad';
    $('contents-notes').hidden = true;
    $('contents-table').replaceChildren();
    $('contents-panel').dataset.state = 'failed';
  }
  try {
    await showSector(Math.min(hexAt, info['virtual-size'] - 1));
  } catch (err) {
    // (an encrypted image's data, a storage that failed): the other views still show.
    $('hex').textContent = '';
    $('hex').dataset.state = 'failed';
    $('hex-where').textContent = `The guest data cannot be read: ${err.message}${needsKey(err)}`;
    $('hex-where').className = 'bad';
  }
  renderCheck(await client.check(id));
  $('download-modified').hidden = !current.modified;
}

/** A hint for errors that a passphrase would cure. */
const needsKey = (err) => (err && err.code === 'passphrase-required' ? ' (enter it in the Encryption panel)' : '');

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

/**
 * Opens the chosen files: `entries` are `{ file, path }` (a dropped
 * folder's files carry their path inside it). A qcow2 image is shown with
 * every view; a raw disk alone gets its size and the conversion panel.
 */
function openEntries(entries) {
  if (!entries.length) return Promise.resolve();
  return serial(async () => {
    clearError();
    $('result').hidden = true;
    resetConvert();
    resetMaintenance();
    resetContents();
    if (current) {
      await closeView().catch(() => {});
      await forgetKeys();
      current = null;
    }
    $('encryption-panel').hidden = true;
    $('unlock-status').textContent = '';
    hexAt = 0;
    $('hex-offset').value = '0';
    $('status').textContent = `Opening ${entries.map((e) => e.path).join(', ')}…`;
    try {
      if (!client) throw new Error('the wasm module is not loaded');
      await removeCopies().catch(() => {});
      const { top, raw, others, chain } = await assemble(entries);
      current = { id: null, name: top.path, top: top.file, others, copy: null, modified: false, raw, size: 0,
        contents: null, keys: null, unlocked: new Set(), allUnlocked: false, encrypted: false };
      if (raw) {
        showRaw();
      } else {
        await showImage();
      }
      $('status').textContent = raw ? `Opened ${top.path} (a raw disk).` : `Opened ${chain.join(' → ')}.`;
      $('result').dataset.ready = 'true';
    } catch (err) {
      $('status').textContent = 'Could not open the image.';
      showError(err.message);
      $('error').dataset.code = err.code || '';
    }
  });
}

/** A raw disk: its size and the conversion to qcow2 (the other views need a qcow2 image). */
function showRaw() {
  const size = current.top.size;
  current.size = size;
  $('image-name').textContent = current.name;
  $('result').dataset.kind = 'raw';
  const dl = $('facts');
  dl.replaceChildren(
    el('dt', {}, 'Format'), el('dd', { 'data-testid': 'fact-format', id: 'fact-format' }, 'raw'),
    el('dt', {}, 'Virtual size'), el('dd', { 'data-testid': 'fact-virtual-size', id: 'fact-virtual-size' }, sizeText(size)));
  $('fact-virtual-size').dataset.bytes = String(size);
  $('convert-format').value = 'qcow2';
  updateConvertForm();
  $('result').hidden = false;
}

function openFiles(fileList) {
  const files = Array.from(fileList || []);
  return openEntries(files.map((f) => ({ file: f, path: f.webkitRelativePath || f.name })));
}

/**
 * The files of a drop: a dropped folder is walked (its files keep their
 * paths inside it), dropped files are taken as they are. The entries are
 * taken synchronously, as the drop's data is gone after the event.
 */
function dropEntries(dt) {
  const roots = Array.from(dt.items || [])
    .map((item) => (item.kind === 'file' && item.webkitGetAsEntry ? item.webkitGetAsEntry() : null))
    .filter(Boolean);
  const files = Array.from(dt.files || []);
  if (!roots.length) return Promise.resolve(files.map((f) => ({ file: f, path: f.name })));
  const out = [];
  const walk = async (entry) => {
    if (entry.isFile) {
      const file = await new Promise((res, rej) => entry.file(res, rej));
      out.push({ file, path: entry.fullPath.replace(/^\/+/, '') });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length) break;
        for (const e of batch) await walk(e);
      }
    }
  };
  return (async () => {
    for (const r of roots) await walk(r);
    return out;
  })();
}

// ---------- maintenance ----------

const MAINT_CONTROLS = ['check-button', 'repair-leaks', 'repair-all', 'resize-button', 'snapshot-button',
  'download-modified', 'convert-button'];

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
    : await client.openWritable(current.name, { opfs: copy }, current.others, keyOptions());
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

// ---------- conversion ----------

/** Prefix of the OPFS files conversions write (removed before the next one). */
const CONVERT_PREFIX = 'qcowkit-convert-';
/** The running conversion's AbortController. */
let converting = null;

function updateConvertForm() {
  const toQcow2 = $('convert-format').value === 'qcow2';
  $('convert-qcow2-options').hidden = !toQcow2;
  const raw = current && current.raw;
  $('convert-format').querySelector('option[value=raw]').disabled = !!raw;
}

function resetConvert() {
  const panel = $('convert-panel');
  delete panel.dataset.state;
  $('convert-status').textContent = '';
  $('convert-status').className = '';
  $('convert-progress').hidden = true;
  $('convert-progress').value = 0;
  $('convert-cancel').hidden = true;
  const link = $('convert-download');
  if (link.href && link.href.startsWith('blob:')) URL.revokeObjectURL(link.href);
  link.hidden = true;
  link.removeAttribute('href');
  delete $('convert-status').dataset.opfs;
}

/** The conversion options the form says (qemu-img's names). */
function convertOptions() {
  const compression = $('convert-compression').value;
  const options = {
    cluster_size: Number($('convert-cluster').value),
    extended_l2: $('convert-extended-l2').checked,
  };
  if (compression !== 'none') {
    options.compress = true;
    options.compression_type = compression;
  }
  return options;
}

/**
 * Converts the image shown (qcow2 with its chain, or a raw disk) into an
 * OPFS file in the worker, with a progress bar and a cancel button, and
 * offers the result for download. The panel's `data-state` ends as
 * "done", "cancelled" or "failed".
 */
function convert() {
  if (!current) return Promise.resolve();
  return serial(async () => {
    const panel = $('convert-panel');
    const bar = $('convert-progress');
    const status = $('convert-status');
    resetConvert();
    clearError();
    const format = current.raw ? 'qcow2' : $('convert-format').value;
    const stem = baseName(current.name).replace(/\.(qcow2?|img|raw)$/i, '');
    const outName = `${stem}${format === 'raw' ? '.raw' : '.qcow2'}`;
    const opfsName = `${CONVERT_PREFIX}${Date.now()}-${outName.replace(/[^\w.-]/g, '_')}`;
    const ac = new AbortController();
    converting = ac;
    panel.dataset.state = 'busy';
    $('convert-button').disabled = true;
    $('convert-cancel').hidden = false;
    bar.hidden = false;
    bar.value = 0;
    status.textContent = 'Converting…';
    const onProgress = (done, total) => {
      bar.max = total || 1;
      bar.value = done;
      bar.dataset.done = String(done);
      status.textContent = `${((done / (total || 1)) * 100).toFixed(0)} % (${human(done)} of ${human(total)})`;
    };
    try {
      const root = await navigator.storage.getDirectory();
      for await (const name of root.keys()) {
        if (name.startsWith(CONVERT_PREFIX)) await root.removeEntry(name).catch(() => {});
      }
      const opts = { signal: ac.signal, onProgress };
      const t0 = performance.now();
      let r;
      if (current.raw) {
        r = await client.convertRawToQcow2Opfs(current.top, opfsName, { ...opts, ...convertOptions() });
      } else {
        // The view (of the chosen file, or of the working copy once one was made).
        r = format === 'raw'
          ? await client.convertToRawOpfs(current.id, opfsName, opts)
          : await client.convertToQcow2Opfs(current.id, opfsName, { ...opts, ...convertOptions() });
      }
      const file = await (await root.getFileHandle(opfsName)).getFile();
      const link = $('convert-download');
      link.href = URL.createObjectURL(file);
      link.download = outName;
      link.textContent = `Download ${outName} (${sizeText(file.size)})`;
      link.hidden = false;
      status.textContent = `Done: ${outName}, ${sizeText(r.size)}, in ${((performance.now() - t0) / 1000).toFixed(1)} s.` +
        (current.encrypted ? ' It holds the guest data decrypted (as qemu-img convert without encrypt options).' : '');
      status.className = 'ok';
      status.dataset.opfs = opfsName;
      status.dataset.size = String(r.size);
      panel.dataset.state = 'done';
    } catch (err) {
      if (err.code === 'aborted') {
        status.textContent = `Cancelled: ${err.message}.`;
        panel.dataset.state = 'cancelled';
      } else {
        status.textContent = 'Conversion failed.';
        status.className = 'bad';
        showError(err.message);
        panel.dataset.state = 'failed';
      }
    } finally {
      converting = null;
      $('convert-button').disabled = false;
      $('convert-cancel').hidden = true;
    }
  });
}

function cancelConvert() {
  if (converting) converting.abort();
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
    dropEntries(e.dataTransfer).then(openEntries, (err) => showError(err.message));
  });
  // Dropping outside the zone must not navigate away.
  window.addEventListener('dragover', (e) => e.preventDefault());
  window.addEventListener('drop', (e) => e.preventDefault());
  $('file-input').addEventListener('change', (e) => openFiles(e.target.files));
  $('folder-input').addEventListener('change', (e) => openFiles(e.target.files));
  $('convert-button').addEventListener('click', convert);
  $('convert-cancel').addEventListener('click', cancelConvert);
  $('convert-format').addEventListener('change', updateConvertForm);
  $('hex-form').addEventListener('submit', hexGo);
  $('hex-prev').addEventListener('click', () => hexStep(-1));
  $('hex-next').addEventListener('click', () => hexStep(1));
  $('create-form').addEventListener('submit', createImage);
  $('check-button').addEventListener('click', recheck);
  $('repair-leaks').addEventListener('click', () => repair('leaks'));
  $('repair-all').addEventListener('click', () => repair('all'));
  $('resize-form').addEventListener('submit', resize);
  $('snapshot-form').addEventListener('submit', takeSnapshot);
  $('snapshots').addEventListener('click', snapshotAction);
  $('contents-table').addEventListener('click', jumpToPartition);
  $('download-modified').addEventListener('click', downloadModified);
  $('unlock-form').addEventListener('submit', unlock);
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
