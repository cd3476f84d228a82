/**
 * @file Promise-based client for the qcowkit wasm module running in a
 * dedicated module worker (types: client.d.ts).
 *
 * ```js
 * import { QcowClient } from 'qcowkit-wasm/client';
 * const q = await QcowClient.start();
 * console.log(await q.inspect(file.name, file));  // without opening backing files
 * const id = await q.open(file.name, file, { 'base.qcow2': baseFile });
 * console.log(await q.info(id));
 *
 * // Long work: progress, and cancellation with an AbortSignal.
 * const ac = new AbortController();
 * await q.convertToRawOpfs(id, 'disk.raw', { signal: ac.signal,
 *   onProgress: (done, total) => console.log(done / total) });
 * ```
 *
 * Every method returns a promise; failures reject with an `Error` whose
 * `code` is one of the package's `ErrorCode`s (`"aborted"`, with the name
 * `AbortError`, when cancelled).
 *
 * Encrypted images: `open(name, file, files, { passphrase })`, or
 * passphrases stored in the worker's wasm memory once and used by id
 * (the page then keeps no copy):
 *
 * ```js
 * const keys = await q.storePassphrases({ passphrase: input.value });
 * input.value = '';
 * const id = await q.open(file.name, file, {}, { passphrases: keys });   // "invalid-passphrase" if wrong
 * await q.forgetPassphrases(keys);                                      // wiped
 * ```
 */

const CODES = new Set(['invalid-argument', 'format', 'unsupported', 'corrupt', 'missing-backing',
  'missing-data-file', 'passphrase-required', 'invalid-passphrase', 'io', 'out-of-bounds', 'read-only', 'not-found', 'out-of-memory', 'busy',
  'aborted', 'internal']);

/** An Error with a code (and `AbortError` as the name of `"aborted"`). */
function coded(code, message, extra) {
  const e = new Error(message);
  e.code = CODES.has(code) ? code : 'internal';
  if (e.code === 'aborted') e.name = 'AbortError';
  return Object.assign(e, extra || {});
}

/** The AbortError of a cancelled call. */
function abortError(signal, what) {
  const r = signal && signal.reason;
  const why = r instanceof Error && r.name !== 'AbortError' ? `: ${r.message}` : '';
  return coded('aborted', `${what} was cancelled${why}`);
}

/** Options given as a bare callback (older signatures) become `{ [key]: fn }`. */
const opts = (o, key) => (typeof o === 'function' ? { [key]: o } : o || {});

/** Calls whose work the worker does in steps: cancelled there, between steps. */
const STEPPED = new Set(['map', 'allocation', 'allocationMap', 'copyToOpfs', 'convertToRawOpfs',
  'convertToQcow2Opfs', 'convertRawToQcow2Opfs']);

/** The Uint8Array buffers among `values`, to transfer (each once). */
function buffers(...values) {
  const out = new Set();
  for (const v of values) {
    if (v instanceof Uint8Array) out.add(v.buffer);
    else if (v && typeof v === 'object' && !(v instanceof Blob)) {
      const xs = v instanceof Map ? [...v.values()] : Object.values(v);
      for (const x of xs) if (x instanceof Uint8Array) out.add(x.buffer);
    }
  }
  return [...out];
}

/**
 * The open options to send: the passphrases given (`passphrase`,
 * `backingPassphrases`) or the id of stored ones (`passphrases`); null
 * when there are none.
 */
function keysOf(options) {
  const o = options || {};
  const out = {};
  for (const k of ['passphrase', 'backingPassphrases', 'passphrases']) {
    if (o[k] !== undefined && o[k] !== null) out[k] = o[k];
  }
  return Object.keys(out).length ? out : null;
}

const isMemory = (s) => s instanceof Uint8Array;

/**
 * A handle on one worker running the wasm module.
 */
export class QcowClient {
  /**
   * Use {@link QcowClient.start}.
   * @param {string} moduleUrl the wasm-bindgen module's URL
   * @param {URL} workerUrl worker.js's URL
   */
  constructor(moduleUrl, workerUrl) {
    /** @private */ this.moduleUrl = moduleUrl;
    /** @private */ this.workerUrl = workerUrl;
    /** @private */ this.pending = new Map();
    /** @private */ this.seq = 1;
    /** @private images by id: how to open them again after a restart */
    this.opened = new Map();
    /** @private ids lost in a restart */
    this.lost = new Set();
    /** @private */ this.nextImage = 1;
    /** @private ids of passphrases stored in the worker */
    this.keyrings = new Set();
    /** @private ids of stored passphrases lost in a restart */
    this.lostKeys = new Set();
    /** @private */ this.nextKeys = 1;
    /** @private */ this.ready = Promise.resolve();
    /** @private */ this.worker = null;
  }

  /**
   * Starts a worker and loads the wasm module in it.
   * @param {string|URL} [moduleUrl] URL of the wasm-bindgen JS module
   *   (`qcowkit_wasm.js` of the package); defaults to the one next to this file.
   * @param {string|URL} [workerUrl] URL of worker.js; defaults to the one next to this file.
   * @returns {Promise<QcowClient>}
   */
  static async start(moduleUrl, workerUrl) {
    const mod = new URL(moduleUrl || './qcowkit_wasm.js', import.meta.url).href;
    const wurl = new URL(workerUrl || './worker.js', import.meta.url);
    const client = new QcowClient(mod, wurl);
    client._spawn();
    await client._call('init', [mod]);
    return client;
  }

  /** @private */
  _spawn() {
    const worker = new Worker(this.workerUrl, { type: 'module' });
    worker.onmessage = (ev) => this._onMessage(ev.data);
    worker.onerror = (ev) => {
      const err = coded('internal', ev.message || 'the qcowkit worker failed');
      for (const p of this.pending.values()) p.fail(err);
      this.pending.clear();
    };
    this.worker = worker;
  }

  /** @private */
  _onMessage(msg) {
    const p = this.pending.get(msg.id);
    if (!p) return;
    if (msg.progress) {
      if (p.onProgress) p.onProgress(msg.progress.done, msg.progress.total);
      return;
    }
    if (typeof msg.line === 'string') {
      if (p.onLine) p.onLine(msg.line);
      return;
    }
    this.pending.delete(msg.id);
    if (msg.ok) p.done(msg.result);
    else {
      const { message, code, name, ...extra } = msg.error;
      const e = coded(code, message, extra);
      if (name === 'AbortError') e.name = name;
      p.fail(e);
    }
  }

  /**
   * Posts one call. `signal` cancels it: calls the worker runs in steps
   * are cancelled there (within one step); the others (check, repair,
   * hostLayout, contents) stop when the worker is stopped and started again.
   * @private
   */
  _call(op, args, { onProgress, onLine, signal, transfer } = {}) {
    if (signal && signal.aborted) return Promise.reject(abortError(signal, op));
    const id = this.seq++;
    return new Promise((resolve, reject) => {
      let unlisten = () => {};
      const p = {
        op,
        onProgress,
        onLine,
        done: (v) => { unlisten(); resolve(v); },
        fail: (e) => { unlisten(); reject(e); },
      };
      this.pending.set(id, p);
      if (signal) {
        const onAbort = () => {
          if (this.pending.get(id) !== p) return;
          if (STEPPED.has(op)) {
            this.worker.postMessage({ op: 'abort', args: [id] });
          } else {
            this.pending.delete(id);
            p.fail(abortError(signal, op));
            this._restart(op);
          }
        };
        signal.addEventListener('abort', onAbort, { once: true });
        unlisten = () => signal.removeEventListener('abort', onAbort);
      }
      this.ready.then(() => {
        if (this.pending.get(id) === p) this.worker.postMessage({ id, op, args }, transfer || []);
      });
    });
  }

  /**
   * Stops the worker in the middle of `op` (cancelled), starts a new one
   * and opens the images again (those that can be: not images in memory
   * opened writable or handed over with `transfer`). Other calls in
   * flight reject with code "aborted".
   * @private
   */
  _restart(op) {
    this.worker.terminate();
    const err = coded('aborted', `interrupted: the worker was restarted to cancel ${op}`);
    for (const p of this.pending.values()) p.fail(err);
    this.pending.clear();
    const images = [...this.opened.entries()];
    // Stored passphrases lived in the stopped worker's memory only.
    for (const k of this.keyrings) this.lostKeys.add(k);
    this.keyrings.clear();
    this.ready = (async () => {
      this._spawn();
      await this._send('init', [this.moduleUrl]).catch(() => {});
      for (const [id, rec] of images) {
        if (!rec.restorable) {
          this.opened.delete(id);
          this.lost.add(id);
          continue;
        }
        // The stopped worker's OPFS locks are released shortly after it ends.
        let ok = false;
        for (let i = 0; i < 100 && !ok; i++) {
          try {
            await this._send(rec.op, rec.args);
            ok = true;
          } catch (e) {
            if (e.code !== 'busy') break;
            await new Promise((r) => setTimeout(r, 50));
          }
        }
        if (!ok) {
          this.opened.delete(id);
          this.lost.add(id);
        }
      }
    })();
  }

  /** A call posted now, not waiting for `ready` (for restarts). @private */
  _send(op, args) {
    const id = this.seq++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { op, done: resolve, fail: reject });
      this.worker.postMessage({ id, op, args });
    });
  }

  /** The id, or a rejection when the image was lost in a restart. @private */
  _image(id) {
    if (this.lost.has(id)) {
      throw coded('not-found', `image ${id} was closed when the worker was restarted to cancel a call; open it again`);
    }
    return id;
  }

  /** Calls `op` on image `id`. @private */
  _on(op, id, args = [], options) {
    try {
      this._image(id);
    } catch (e) {
      return Promise.reject(e);
    }
    return this._call(op, [id, ...args], options);
  }

  /**
   * Opens an image under a new id, remembered for restarts (not one
   * opened with passphrases: they are not kept here). @private
   */
  async _open(op, name, storage, files, options) {
    const o = options || {};
    const keys = op === 'openForRepair' ? null : keysOf(o);
    if (keys && keys.passphrases !== undefined && this.lostKeys.has(keys.passphrases)) {
      throw coded('not-found', `passphrases ${keys.passphrases} were forgotten when the worker was restarted to cancel a call; store them again`);
    }
    const id = this.nextImage++;
    const args = op === 'openForRepair' ? [id, name, storage] : [id, name, storage, files || {}];
    if (keys) args.push(keys);
    const transfer = o.transfer
      ? buffers(storage, files, keys && keys.passphrase, keys && keys.backingPassphrases) : [];
    await this._call(op, args, { transfer });
    const restorable = !keys && !o.transfer && !(op !== 'open' && isMemory(storage));
    this.opened.set(id, restorable ? { op, args, restorable } : { op, args: null, restorable });
    return id;
  }

  /**
   * Opens an image read-only.
   * @param {string} name the image's file name (for messages and backing lookups)
   * @param {Blob|File|Uint8Array|{opfs: string}} storage the image's contents; `{ opfs: fileName }`
   *   names a file of the OPFS root directory, read as a File (no lock is held)
   * @param {Object<string, Blob|File|Uint8Array|{opfs: string}>} [files] backing/data files by name
   * @param {{transfer?: boolean, passphrase?: string|Uint8Array,
   *   backingPassphrases?: Object<string, string|Uint8Array>, passphrases?: number}} [options]
   *   `transfer`: hand Uint8Array buffers over instead of copying (passphrase bytes too: the worker
   *   zeroes them); `passphrase`/`backingPassphrases`: unlock an encrypted image and its encrypted
   *   backing files (a wrong one rejects with "invalid-passphrase"; without, an encrypted image opens
   *   for its metadata and its data reads reject with "passphrase-required"); `passphrases`: the id of
   *   passphrases stored with `storePassphrases` instead. An image opened with passphrases is not
   *   opened again after a restart (its id rejects with "not-found").
   * @returns {Promise<number>} an image id for the other methods
   */
  open(name, storage, files, options) {
    return this._open('open', name, storage, files, options);
  }

  /**
   * Opens an image for reading and writing: `write`, `resize`, the snapshot
   * methods and `repair` then work on it. Usually a file of the origin
   * private file system, given as `{ opfs: fileName }` (see copyToOpfs);
   * the worker holds a sync access handle on it until close. An encrypted
   * image needs its passphrase (`options` as `open`'s).
   * @returns {Promise<number>} an image id
   */
  openWritable(name, storage, files, options) {
    return this._open('openWritable', name, storage, files, options);
  }

  /**
   * Stores passphrases (`{ passphrase, backingPassphrases }`) in the
   * worker's wasm memory, for opening encrypted images several times
   * without keeping them in the page: `open(..., { passphrases: id })`.
   * This client keeps no copy (`transfer: true` hands Uint8Array
   * passphrases over; the worker zeroes them). They are wiped by
   * `forgetPassphrases` (and lost when the worker is stopped or restarted).
   * @returns {Promise<number>} an id for the `passphrases` option
   */
  async storePassphrases(passphrases, options = {}) {
    const p = passphrases || {};
    const keys = {};
    if (p.passphrase !== undefined) keys.passphrase = p.passphrase;
    if (p.backingPassphrases !== undefined) keys.backingPassphrases = p.backingPassphrases;
    const id = this.nextKeys++;
    const transfer = options.transfer ? buffers(keys.passphrase, keys.backingPassphrases) : [];
    await this._call('storePassphrases', [id, keys], { transfer });
    this.keyrings.add(id);
    return id;
  }

  /**
   * Wipes stored passphrases (images opened with them stay open).
   * @returns {Promise<boolean>} false when there were none under `id`
   */
  async forgetPassphrases(id) {
    this.keyrings.delete(id);
    if (this.lostKeys.delete(id)) return true;
    return this._call('forgetPassphrases', [id]);
  }

  /**
   * Opens an image for repair, as `qemu-img check -r` does: also one marked
   * corrupt or dirty; no backing or data file is opened.
   * @returns {Promise<number>} an image id
   */
  openForRepair(name, storage, options) {
    return this._open('openForRepair', name, storage, undefined, options);
  }

  /**
   * The facts of one file without opening any file it names: `format` is
   * `"raw"` for a non-qcow2 file.
   * @returns {Promise<object>} an `ImageInfo`
   */
  inspect(name, storage, options = {}) {
    return this._call('inspect', [name, storage], { transfer: options.transfer ? buffers(storage) : [] });
  }

  /**
   * Releases an opened image (and the OPFS file it held, flushed).
   * @param {number} id
   * @returns {Promise<boolean>}
   */
  async close(id) {
    this.opened.delete(id);
    if (this.lost.delete(id)) return true;
    return this._call('close', [id]);
  }

  /** `qemu-img info --output=json` of the image. */
  info(id) {
    return this._on('info', id);
  }

  /** The info of the image and of each backing file below it (top first). */
  chain(id) {
    return this._on('chain', id);
  }

  /** `qemu-img map --output=json`, walked in pages (progress: guest bytes). */
  map(id, options = {}) {
    return this._on('map', id, [], options);
  }

  /** Bytes of the guest disk per allocation category (in steps). */
  allocation(id, options = {}) {
    return this._on('allocation', id, [], options);
  }

  /** The guest space as `{ start, length, category }` ranges (in steps). */
  allocationMap(id, options = {}) {
    return this._on('allocationMap', id, [], options);
  }

  /** What each cluster of the image file holds: `{ start, len, kind }` runs. */
  hostLayout(id, options = {}) {
    return this._on('hostLayout', id, [], options);
  }

  /**
   * What the guest disk holds: the partition table (MBR or GPT) and the
   * file system of each partition and of the whole disk, with the keys of
   * `qcow2-info --json`'s "contents"; a broken table is reported in its
   * `error`. Cancelling restarts the worker (see the README).
   */
  contents(id, options = {}) {
    return this._on('contents', id, [], options);
  }

  /**
   * `qemu-img check --output=json` as an object; `onProblem` gets each
   * problem line. Cancelling restarts the worker (see the README).
   */
  check(id, options) {
    const o = opts(options, 'onProblem');
    return this._on('check', id, [], { signal: o.signal, onLine: o.onProblem });
  }

  /**
   * Repairs the image (`qemu-img check -r leaks|all`); `onProblem` gets each
   * problem and `Repairing` line. Cancelling stops the worker mid-repair
   * (the image is then as a crash leaves it: at worst leaked clusters).
   */
  repair(id, mode, options) {
    const o = opts(options, 'onProblem');
    return this._on('repair', id, [mode], { signal: o.signal, onLine: o.onProblem });
  }

  /** `qemu-img resize`; resolves to the new size in bytes. */
  resize(id, size, options) {
    return this._on('resize', id, [size, options || null]);
  }

  /** The internal snapshots, as `qemu-img snapshot -l` lists them. */
  snapshots(id) {
    return this._on('snapshots', id);
  }

  /** Takes a snapshot (`qemu-img snapshot -c`); resolves to its ID. */
  createSnapshot(id, name) {
    return this._on('createSnapshot', id, [name]);
  }

  /** Deletes a snapshot by name (`qemu-img snapshot -d`). */
  deleteSnapshot(id, name) {
    return this._on('deleteSnapshot', id, [name]);
  }

  /** Reverts the disk to a snapshot by ID or name (`qemu-img snapshot -a`). */
  applySnapshot(id, idOrName) {
    return this._on('applySnapshot', id, [idOrName]);
  }

  /** Makes what was written durable. */
  flush(id) {
    return this._on('flush', id);
  }

  /** Reads guest bytes (the result's buffer is transferred, not copied). */
  read(id, offset, length) {
    return this._on('read', id, [offset, length]);
  }

  /** Writes guest bytes (`transfer: true` hands the buffer over instead of copying it). */
  write(id, offset, bytes, options = {}) {
    return this._on('write', id, [offset, bytes], { transfer: options.transfer ? buffers(bytes) : [] });
  }

  /**
   * Copies a File/Blob/Uint8Array (or an OPFS file) into the OPFS file
   * `fileName` (created or replaced). Cancelled or failed: the file is removed.
   */
  copyToOpfs(source, fileName, options) {
    const o = opts(options, 'onProgress');
    return this._call('copyToOpfs', [source, fileName], { ...o, transfer: o.transfer ? buffers(source) : [] });
  }

  /**
   * The guest contents as a raw image in the OPFS file `fileName`, in
   * steps; zero ranges are holes. Cancelled or failed: the file is removed.
   */
  convertToRawOpfs(id, fileName, options) {
    return this._on('convertToRawOpfs', id, [fileName], opts(options, 'onProgress'));
  }

  /**
   * The guest contents as a new standalone qcow2 image in the OPFS file
   * `fileName` (qemu-img's creation options, `compress`), in steps.
   */
  convertToQcow2Opfs(id, fileName, options = {}) {
    const { signal, onProgress, ...create } = options;
    return this._on('convertToQcow2Opfs', id, [fileName, create], { signal, onProgress });
  }

  /** A raw disk (File/Blob/Uint8Array/OPFS file) as a new qcow2 image in the OPFS file `fileName`. */
  convertRawToQcow2Opfs(source, fileName, options = {}) {
    const { signal, onProgress, transfer, ...create } = options;
    return this._call('convertRawToQcow2Opfs', [source, fileName, create],
      { signal, onProgress, transfer: transfer ? buffers(source) : [] });
  }

  /** Removes a file of the OPFS root directory; resolves to false when there was none. */
  removeOpfs(fileName) {
    return this._call('removeOpfs', [fileName]);
  }

  /** A new empty qcow2 image in memory (its bytes, transferred). */
  createImage(options) {
    return this._call('createImage', [options]);
  }

  /** Stops the worker; pending calls reject with code "aborted". */
  terminate() {
    this.worker.terminate();
    const err = coded('aborted', 'the qcowkit worker was stopped');
    for (const p of this.pending.values()) p.fail(err);
    this.pending.clear();
  }
}
