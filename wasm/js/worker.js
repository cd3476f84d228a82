/**
 * @file Dedicated module worker that hosts the qcowkit wasm module.
 *
 * Started by {@link ./client.js}; not meant to be used directly. The worker
 * receives `{ id, op, args }` messages and answers with
 * `{ id, ok: true, result }`, `{ id, ok: false, error }` or, while a long
 * operation runs, `{ id, progress: { done, total } }`.
 *
 * File/Blob storages are read synchronously with FileReaderSync and OPFS
 * sync access handles exist only in dedicated workers, which is why the
 * wasm runs here rather than on the main thread.
 */

/** @type {any} the imported wasm-bindgen module (namespace) */
let wasm = null;
/**
 * @type {Map<number, {img: any, name: string, storage: any, files: Object<string, any>,
 *   handle: FileSystemSyncAccessHandle|null}>}
 */
const images = new Map();
let nextImageId = 1;

function entry(id) {
  const e = images.get(id);
  if (!e) throw new Error(`no open image with id ${id}`);
  return e;
}

/** A file of the OPFS root directory (created when `create`). */
async function opfsFile(fileName, create = false) {
  const root = await navigator.storage.getDirectory();
  return root.getFileHandle(fileName, { create });
}

const isOpfs = (storage) =>
  storage !== null && typeof storage === 'object' && typeof storage.opfs === 'string';

/**
 * The storage the wasm takes for `storage`: `{ opfs: fileName }` becomes
 * the OPFS file as a File (read-only) or a sync access handle (`writable`,
 * returned as `handle` too, for `close` to release); anything else is
 * passed as it is.
 */
async function resolve(storage, writable) {
  if (!isOpfs(storage)) return { storage, handle: null };
  const fh = await opfsFile(storage.opfs);
  if (!writable) return { storage: await fh.getFile(), handle: null };
  const handle = await fh.createSyncAccessHandle();
  return { storage: handle, handle };
}

/** Opens an image with `how(storage)` and registers it; returns its id. */
async function register(name, storage, files, writable, how) {
  const r = await resolve(storage, writable);
  let img;
  try {
    img = how(r.storage);
  } catch (err) {
    if (r.handle) r.handle.close();
    throw err;
  }
  const id = nextImageId++;
  images.set(id, { img, name, storage, files: files || {}, handle: r.handle });
  return id;
}

const ops = {
  async init(moduleUrl) {
    const mod = await import(moduleUrl);
    await mod.default();
    wasm = mod;
    return true;
  },

  open(name, storage, files) {
    return register(name, storage, files, false, (s) => wasm.QcowImage.open(name, s, files || {}));
  },

  /** Opens an image for reading and writing (OPFS or bytes in memory). */
  openWritable(name, storage, files) {
    return register(name, storage, files, true,
      (s) => wasm.QcowImage.openWritable(name, s, files || {}));
  },

  /** Opens an image for repair (also corrupt or dirty ones; no backing file). */
  openForRepair(name, storage) {
    return register(name, storage, {}, true, (s) => wasm.QcowImage.openForRepair(name, s));
  },

  /**
   * inspect() of one file without opening the files it names: an info
   * object whose format is "raw" for a non-qcow2 file.
   */
  inspect(name, storage) {
    return wasm.inspect(name, storage);
  },

  close(id) {
    const e = images.get(id);
    if (e) {
      images.delete(id);
      try {
        e.img.free();
      } finally {
        if (e.handle) {
          try {
            e.handle.flush();
          } finally {
            e.handle.close();
          }
        }
      }
    }
    return true;
  },

  info(id) {
    return entry(id).img.info();
  },

  /** info() of the image and of each backing file below it, top first. */
  chain(id) {
    return entry(id).img.chain();
  },

  map(id) {
    return entry(id).img.map();
  },

  /** Bytes per allocation category (the core's definition). */
  allocation(id) {
    return entry(id).img.allocation();
  },

  /** The guest space as `{ start, length, category }` ranges. */
  allocationMap(id) {
    return entry(id).img.allocationMap();
  },

  check(id) {
    return entry(id).img.check();
  },

  read(id, offset, length) {
    return entry(id).img.read(offset, length);
  },

  /** Repairs (`mode`: "leaks" or "all"); problem lines go out as `{ id, line }`. */
  repair(id, mode, _progress, line) {
    return entry(id).img.repair(mode, (text) => line(text));
  },

  resize(id, size, options) {
    return entry(id).img.resize(size, options || undefined);
  },

  snapshots(id) {
    return entry(id).img.snapshots();
  },

  createSnapshot(id, name) {
    return entry(id).img.createSnapshot(name);
  },

  deleteSnapshot(id, name) {
    entry(id).img.deleteSnapshot(name);
    return true;
  },

  applySnapshot(id, idOrName) {
    entry(id).img.applySnapshot(idOrName);
    return true;
  },

  flush(id) {
    entry(id).img.flush();
    return true;
  },

  /**
   * Copies a File/Blob into the OPFS file `fileName` (created or replaced),
   * read with FileReaderSync and written through a sync access handle.
   */
  async copyToOpfs(blob, fileName, progress) {
    const handle = await (await opfsFile(fileName, true)).createSyncAccessHandle();
    try {
      handle.truncate(0);
      const total = blob.size;
      const reader = new FileReaderSync();
      const chunk = 4 << 20;
      progress(0, total);
      for (let at = 0; at < total; at += chunk) {
        const bytes = new Uint8Array(reader.readAsArrayBuffer(blob.slice(at, Math.min(total, at + chunk))));
        const n = handle.write(bytes, { at });
        if (n < bytes.length) throw new Error(`short write at ${at}`);
        progress(at + bytes.length, total);
      }
      handle.flush();
      return { fileName, size: total };
    } finally {
      handle.close();
    }
  },

  async convertToRawOpfs(id, fileName, _unused, progress) {
    const e = entry(id);
    const total = e.img.virtualSize();
    const root = await navigator.storage.getDirectory();
    const fh = await root.getFileHandle(fileName, { create: true });
    const handle = await fh.createSyncAccessHandle();
    try {
      handle.truncate(0);
      handle.truncate(total);
      let last = 0;
      progress(0, total);
      e.img.convertToRaw((offset, bytes, length) => {
        if (bytes) {
          const n = handle.write(bytes, { at: offset });
          if (n < bytes.length) throw new Error(`short write at ${offset}`);
        }
        const done = offset + length;
        const now = Date.now();
        if (now - last > 50 || done >= total) {
          last = now;
          progress(done, total);
        }
      }, 1 << 20);
      handle.flush();
    } finally {
      handle.close();
    }
    progress(total, total);
    return { fileName, size: total };
  },

  createImage(options) {
    return wasm.createImageBytes(options);
  },
};

self.onmessage = async (ev) => {
  const { id, op, args } = ev.data;
  const progress = (done, total) => self.postMessage({ id, progress: { done, total } });
  const line = (text) => self.postMessage({ id, line: text });
  try {
    const fn = ops[op];
    if (!fn) throw new Error(`unknown operation ${op}`);
    if (op !== 'init' && !wasm) throw new Error('the wasm module is not initialised');
    const result = await fn(...(args || []), progress, line);
    const transfer = result instanceof Uint8Array ? [result.buffer] : [];
    self.postMessage({ id, ok: true, result }, transfer);
  } catch (err) {
    const message = err && err.message ? err.message : String(err);
    self.postMessage({ id, ok: false, error: message });
  }
};
