/**
 * @file Promise-based client for the qcowkit wasm module running in a
 * dedicated module worker.
 *
 * ```js
 * import { QcowClient } from './client.js';
 * const q = await QcowClient.start(new URL('./qcowkit_wasm.js', import.meta.url));
 * console.log(await q.inspect(file.name, file));  // without opening backing files
 * const id = await q.open(file.name, file, { 'base.qcow2': baseFile });
 * console.log(await q.info(id));
 * console.log(await q.allocation(id));              // bytes per allocation category
 *
 * // Maintenance works on a writable copy in the origin private file system:
 * await q.copyToOpfs(file, 'work.qcow2');
 * const w = await q.openForRepair(file.name, { opfs: 'work.qcow2' });
 * console.log(await q.repair(w, 'all', (line) => console.log(line)));
 * await q.close(w);                                  // releases the OPFS file
 * ```
 *
 * Every method returns a promise; failures reject with an `Error` whose
 * message is the core's message.
 */

/**
 * A handle on one worker running the wasm module.
 */
export class QcowClient {
  /** @param {Worker} worker a started worker running worker.js */
  constructor(worker) {
    /** @private */ this.worker = worker;
    /** @private */ this.pending = new Map();
    /** @private */ this.seq = 1;
    worker.onmessage = (ev) => this._onMessage(ev.data);
    worker.onerror = (ev) => {
      const err = new Error(ev.message || 'the qcowkit worker failed');
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
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
    const client = new QcowClient(new Worker(wurl, { type: 'module' }));
    await client._call('init', [mod]);
    return client;
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
    if (msg.ok) p.resolve(msg.result);
    else p.reject(new Error(msg.error));
  }

  /** @private */
  _call(op, args, onProgress, transfer, onLine) {
    const id = this.seq++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, onProgress, onLine });
      this.worker.postMessage({ id, op, args }, transfer || []);
    });
  }

  /**
   * Opens an image read-only.
   * @param {string} name the image's file name (used for messages and backing lookups)
   * @param {Blob|File|Uint8Array|{opfs: string}} storage the image's contents; `{ opfs: fileName }`
   *   names a file of the OPFS root directory, read as a File (no lock is held)
   * @param {Object<string, Blob|File|Uint8Array>} [files] backing/data files by name
   *   (looked up by exact name, then by basename)
   * @returns {Promise<number>} an image id for the other methods
   */
  open(name, storage, files) {
    return this._call('open', [name, storage, files || {}]);
  }

  /**
   * Opens an image for reading and writing: `resize`, the snapshot methods
   * and `repair` then work on it. A File/Blob is read-only, so the image is
   * usually a file of the origin private file system, given as
   * `{ opfs: fileName }` (see {@link QcowClient#copyToOpfs}); the worker
   * holds a sync access handle on it until {@link QcowClient#close}.
   * Rejects for an image marked corrupt (use {@link QcowClient#openForRepair}).
   * @param {string} name the image's file name (used for messages and backing lookups)
   * @param {{opfs: string}|Uint8Array} storage the image (bytes in memory are a private copy)
   * @param {Object<string, Blob|File|Uint8Array>} [files] backing/data files by name
   * @returns {Promise<number>} an image id
   */
  openWritable(name, storage, files) {
    return this._call('openWritable', [name, storage, files || {}]);
  }

  /**
   * Opens an image for {@link QcowClient#repair}, as `qemu-img check -r`
   * does: also an image marked corrupt or dirty. No backing or data file
   * is opened (only the image's own metadata is read and fixed), and the
   * guest disk cannot be changed through this id (reopen with
   * {@link QcowClient#openWritable}). Held until {@link QcowClient#close}.
   * @param {string} name the image's file name
   * @param {{opfs: string}|Uint8Array} storage the image
   * @returns {Promise<number>} an image id
   */
  openForRepair(name, storage) {
    return this._call('openForRepair', [name, storage]);
  }

  /**
   * Copies a File/Blob into the file `fileName` of the OPFS root directory
   * (created or replaced), for opening it writable as `{ opfs: fileName }`.
   * @param {Blob|File} blob the contents
   * @param {string} fileName name of the OPFS file
   * @param {(done: number, total: number) => void} [onProgress] bytes copied so far
   * @returns {Promise<{fileName: string, size: number}>}
   */
  copyToOpfs(blob, fileName, onProgress) {
    return this._call('copyToOpfs', [blob, fileName], onProgress);
  }

  /**
   * The facts of one file, as `qemu-img info --output=json` prints them,
   * without opening any file it names (backing or data files): `format` is
   * `"raw"` when the file is not a qcow2 image, and a qcow2 image's backing
   * file name is in `"backing-filename"` (absent when it has none). For
   * telling which of several files is the top of a backing chain.
   * Rejects with the core's message for a malformed qcow2 header.
   * @param {string} name the file's name
   * @param {Blob|File|Uint8Array} storage the file's contents
   * @returns {Promise<object>} an `ImageInfo` object
   */
  inspect(name, storage) {
    return this._call('inspect', [name, storage]);
  }

  /**
   * Releases an opened image (and the OPFS file it held, flushed).
   * @param {number} id
   * @returns {Promise<boolean>}
   */
  close(id) {
    return this._call('close', [id]);
  }

  /**
   * The image's facts, as `qemu-img info --output=json` prints them.
   * @param {number} id
   * @returns {Promise<object>}
   */
  info(id) {
    return this._call('info', [id]);
  }

  /**
   * The info of the image and of each backing file below it (top first),
   * as far as the supplied files reach.
   * @param {number} id
   * @returns {Promise<object[]>}
   */
  chain(id) {
    return this._call('chain', [id]);
  }

  /**
   * The allocation map, as `qemu-img map --output=json` prints it: entries
   * `{ start, length, depth, present, zero, data, compressed, offset? }`.
   * @param {number} id
   * @returns {Promise<object[]>}
   */
  map(id) {
    return this._call('map', [id]);
  }

  /**
   * Bytes of the guest disk in each allocation category, as the core
   * defines them: from a backing file; else compressed; else data (also a
   * range flagged zero over preallocated data); else zero clusters the
   * image records; else unallocated.
   * @param {number} id
   * @returns {Promise<{data: number, compressed: number, zero: number, backing: number, unallocated: number}>}
   */
  allocation(id) {
    return this._call('allocation', [id]);
  }

  /**
   * The guest space as consecutive ranges of one allocation category each
   * (the categories of {@link QcowClient#allocation}), in guest order.
   * @param {number} id
   * @returns {Promise<{start: number, length: number,
   *   category: 'data'|'compressed'|'zero'|'backing'|'unallocated'}[]>}
   */
  allocationMap(id) {
    return this._call('allocationMap', [id]);
  }

  /**
   * A read-only consistency check, as `qemu-img check --output=json` prints it.
   * @param {number} id
   * @returns {Promise<object>}
   */
  check(id) {
    return this._call('check', [id]);
  }

  /**
   * Repairs the image, as `qemu-img check -r leaks|all --output=json`:
   * resolves to the check after the repair (`"leaks-fixed"`,
   * `"corruptions-fixed"`: what was fixed; `leaks`, `corruptions`: what is
   * left), with `found` (the check before) and `rebuilt` (whether the
   * refcount structure was rebuilt). `"leaks"` rejects when the refcount
   * structure must be rebuilt. Guest data is never changed.
   * @param {number} id an image opened with openForRepair or openWritable
   * @param {'leaks'|'all'} mode what to fix
   * @param {(line: string) => void} [onProblem] each problem and repair line, as
   *   `qemu-img check -r` prints them
   * @returns {Promise<object>} a `RepairResult`
   */
  repair(id, mode, onProblem) {
    return this._call('repair', [id, mode], undefined, undefined, onProblem);
  }

  /**
   * Changes the guest disk's size (`qemu-img resize`); resolves to the new
   * size in bytes. Shrinking is refused unless `options.shrink` is true.
   * @param {number} id an image opened with openWritable
   * @param {number|string} size bytes, or e.g. `"10G"`, `"+1G"`, `"-512M"`
   * @param {{shrink?: boolean, preallocation?: 'off'|'metadata'|'falloc'|'full'}} [options]
   * @returns {Promise<number>}
   */
  resize(id, size, options) {
    return this._call('resize', [id, size, options || null]);
  }

  /**
   * The internal snapshots, as `qemu-img snapshot -l` lists them:
   * `{ id, name, "vm-state-size", "date-sec", "date-nsec", "vm-clock-sec",
   * "vm-clock-nsec", icount? }` each.
   * @param {number} id
   * @returns {Promise<object[]>}
   */
  snapshots(id) {
    return this._call('snapshots', [id]);
  }

  /**
   * Takes an internal snapshot named `name`, dated now (`qemu-img snapshot -c`).
   * @param {number} id an image opened with openWritable
   * @param {string} name
   * @returns {Promise<string>} the new snapshot's ID
   */
  createSnapshot(id, name) {
    return this._call('createSnapshot', [id, name]);
  }

  /**
   * Deletes the snapshot named `name` (`qemu-img snapshot -d`); rejects when there is none.
   * @param {number} id an image opened with openWritable
   * @param {string} name
   * @returns {Promise<boolean>}
   */
  deleteSnapshot(id, name) {
    return this._call('deleteSnapshot', [id, name]);
  }

  /**
   * Reverts the disk to the snapshot with this ID or name (`qemu-img snapshot -a`).
   * @param {number} id an image opened with openWritable
   * @param {string} idOrName
   * @returns {Promise<boolean>}
   */
  applySnapshot(id, idOrName) {
    return this._call('applySnapshot', [id, idOrName]);
  }

  /**
   * Makes what was written durable.
   * @param {number} id
   * @returns {Promise<boolean>}
   */
  flush(id) {
    return this._call('flush', [id]);
  }

  /**
   * Reads guest bytes.
   * @param {number} id
   * @param {number} offset guest offset in bytes
   * @param {number} length number of bytes
   * @returns {Promise<Uint8Array>}
   */
  read(id, offset, length) {
    return this._call('read', [id, offset, length]);
  }

  /**
   * Writes the guest contents as a raw image into the OPFS file `fileName`
   * (created or replaced), through a sync access handle in the worker.
   * Zero ranges are left as holes.
   * @param {number} id
   * @param {string} fileName name of the file in the OPFS root directory
   * @param {(done: number, total: number) => void} [onProgress] called with bytes done so far
   * @returns {Promise<{fileName: string, size: number}>}
   */
  convertToRawOpfs(id, fileName, onProgress) {
    return this._call('convertToRawOpfs', [id, fileName, null], onProgress);
  }

  /**
   * Creates a new empty qcow2 image in memory.
   * @param {object} options qemu-img creation options, e.g.
   *   `{ size: '1G', cluster_size: 65536, extended_l2: true, compression_type: 'zstd' }`
   * @returns {Promise<Uint8Array>} the image's bytes
   */
  createImage(options) {
    return this._call('createImage', [options]);
  }

  /** Stops the worker; pending calls reject. */
  terminate() {
    this.worker.terminate();
    const err = new Error('the qcowkit worker was stopped');
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }
}
