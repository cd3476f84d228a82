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
/** @type {Map<number, {img: any, name: string, storage: any, files: Object<string, any>}>} */
const images = new Map();
let nextImageId = 1;

function entry(id) {
  const e = images.get(id);
  if (!e) throw new Error(`no open image with id ${id}`);
  return e;
}

const ops = {
  async init(moduleUrl) {
    const mod = await import(moduleUrl);
    await mod.default();
    wasm = mod;
    return true;
  },

  open(name, storage, files) {
    const img = wasm.QcowImage.open(name, storage, files || {});
    const id = nextImageId++;
    images.set(id, { img, name, storage, files: files || {} });
    return id;
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
      e.img.free();
      images.delete(id);
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
  try {
    const fn = ops[op];
    if (!fn) throw new Error(`unknown operation ${op}`);
    if (op !== 'init' && !wasm) throw new Error('the wasm module is not initialised');
    const result = await fn(...(args || []), progress);
    const transfer = result instanceof Uint8Array ? [result.buffer] : [];
    self.postMessage({ id, ok: true, result }, transfer);
  } catch (err) {
    const message = err && err.message ? err.message : String(err);
    self.postMessage({ id, ok: false, error: message });
  }
};
