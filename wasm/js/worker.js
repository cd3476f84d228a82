/**
 * @file Dedicated module worker that hosts the qcowkit wasm module.
 *
 * Started by {@link ./client.js}; not meant to be used directly. The worker
 * receives `{ id, op, args }` messages and answers with
 * `{ id, ok: true, result }` (Uint8Array results are transferred, not
 * copied), `{ id, ok: false, error: { message, code, name } }` or, while a
 * long operation runs, `{ id, progress: { done, total } }` and
 * `{ id, line }`. `{ op: "abort", target }` cancels the call `target`:
 * long operations run in steps and look for it between steps.
 *
 * File/Blob storages are read synchronously with FileReaderSync and OPFS
 * sync access handles exist only in dedicated workers, which is why the
 * wasm runs here rather than on the main thread.
 *
 * Passphrases: those given with an open are handed to the wasm and let go
 * of at once (bytes zeroed, references dropped); those the client stores
 * (`storePassphrases`) are kept only in the wasm memory, as a
 * `Passphrases` object, until `forgetPassphrases` wipes them.
 */

/** @type {any} the imported wasm-bindgen module (namespace) */
let wasm = null;
/**
 * Open images by the id the client gave them.
 * @type {Map<number, {img: any, handle: FileSystemSyncAccessHandle|null}>}
 */
const images = new Map();
/** Calls the client cancelled. */
const aborted = new Set();
/**
 * Stored passphrases by the id the client gave them: wasm `Passphrases`
 * objects (the secrets live in the wasm memory, wiped by `free()`).
 * @type {Map<number, any>}
 */
const keyrings = new Map();

const CODES = new Set(['invalid-argument', 'format', 'unsupported', 'corrupt', 'missing-backing',
  'missing-data-file', 'passphrase-required', 'invalid-passphrase', 'io', 'out-of-bounds', 'read-only', 'not-found', 'out-of-memory', 'busy',
  'aborted', 'internal']);

/** An Error with a code (the package's convention). */
function coded(code, message) {
  const e = new Error(message);
  e.code = code;
  if (code === 'aborted') e.name = 'AbortError';
  return e;
}

/** What crosses to the client for a failure: message, code, name. */
function errorOf(err) {
  const name = err && err.name;
  let code = err && err.code;
  if (typeof code !== 'string' || !CODES.has(code)) {
    code = {
      AbortError: 'aborted',
      NotFoundError: 'not-found',
      NoModificationAllowedError: 'busy',
      TypeError: 'invalid-argument',
      DataCloneError: 'invalid-argument',
      QuotaExceededError: 'io',
      NotReadableError: 'io',
      InvalidStateError: 'io',
    }[name] || 'internal';
  }
  const message = err && err.message ? err.message : String(err);
  const out = { message, code, name: code === 'aborted' ? 'AbortError' : 'Error' };
  if (err && typeof err.remains === 'string') out.remains = err.remains;
  return out;
}

function entry(id) {
  const e = images.get(id);
  if (!e) throw coded('not-found', `no open image with id ${id}`);
  return e;
}

/** A file of the OPFS root directory (created when `create`). */
async function opfsFile(fileName, create = false) {
  const root = await navigator.storage.getDirectory();
  return root.getFileHandle(fileName, { create });
}

/** Removes an OPFS file of the root directory; false when there was none. */
async function removeOpfs(fileName) {
  const root = await navigator.storage.getDirectory();
  try {
    await root.removeEntry(fileName);
    return true;
  } catch (err) {
    if (err && err.name === 'NotFoundError') return false;
    throw err;
  }
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

/** The files map with `{ opfs }` values read as Files. */
async function resolveFiles(files) {
  const out = {};
  for (const [k, v] of Object.entries(files || {})) out[k] = (await resolve(v, false)).storage;
  return out;
}

/**
 * Lets go of the passphrases in `options` once the wasm has them: bytes
 * are zeroed, every reference (strings too, which cannot be wiped) is
 * deleted from the message's objects.
 */
function wipe(options) {
  if (!options || typeof options !== 'object') return;
  const zero = (v) => { if (v instanceof Uint8Array) v.fill(0); };
  zero(options.passphrase);
  delete options.passphrase;
  const b = options.backingPassphrases;
  if (b instanceof Map) {
    b.forEach(zero);
    b.clear();
  } else if (b && typeof b === 'object') {
    for (const k of Object.keys(b)) {
      zero(b[k]);
      delete b[k];
    }
  }
  delete options.backingPassphrases;
}

/** Wipes the `encrypt.passphrase` of creation options once the wasm has it. */
function wipeEncrypt(options) {
  const e = options && options.encrypt;
  if (e && typeof e === 'object') wipe(e);
}

/**
 * How to open `name` (`writable` or not) with the open options the client
 * sent: `{ passphrases: keyId }` (stored passphrases) or `{ passphrase,
 * backingPassphrases }` (wiped once the wasm has them).
 */
function opener(name, writable, options) {
  const o = options || {};
  if (o.passphrases !== undefined && o.passphrases !== null) {
    if (o.passphrase !== undefined || o.backingPassphrases !== undefined) {
      wipe(o);
      throw coded('invalid-argument', 'give passphrases (stored ones) or passphrase/backingPassphrases, not both');
    }
    const keys = keyrings.get(o.passphrases);
    if (!keys) throw coded('not-found', `no stored passphrases with id ${o.passphrases}`);
    return (s, f) => (writable ? keys.openWritable(name, s, f) : keys.open(name, s, f));
  }
  const given = {};
  if (o.passphrase !== undefined) given.passphrase = o.passphrase;
  if (o.backingPassphrases !== undefined) given.backingPassphrases = o.backingPassphrases;
  return (s, f) => {
    try {
      return writable ? wasm.QcowImage.openWritable(name, s, f, given) : wasm.QcowImage.open(name, s, f, given);
    } finally {
      wipe(given);
      wipe(o);
    }
  };
}

/** Opens an image with `how(storage, files)` and registers it under `imageId`. */
async function register(imageId, storage, files, writable, how) {
  if (images.has(imageId)) throw coded('busy', `image id ${imageId} is in use`);
  const r = await resolve(storage, writable);
  let img;
  try {
    img = how(r.storage, await resolveFiles(files));
  } catch (err) {
    if (r.handle) r.handle.close();
    throw err;
  }
  images.set(imageId, { img, handle: r.handle });
  return imageId;
}

/** Lets queued messages (an abort) run: a task, without timer clamping. */
function yieldTask() {
  return new Promise((resolve) => {
    const ch = new MessageChannel();
    ch.port1.onmessage = () => {
      ch.port1.close();
      resolve();
    };
    ch.port2.postMessage(null);
  });
}

/** Throws an AbortError when the client cancelled call `id`. */
function checkAborted(id) {
  if (aborted.has(id)) throw coded('aborted', 'the operation was cancelled');
}

/**
 * Runs `step(start, end)` over `[0, total)` in steps of adaptive length
 * (aligned to `align`, about 50 ms each), reporting progress and yielding
 * between steps so that a cancellation is seen within one step.
 */
async function stepped(call, total, step, align = 2 << 20) {
  let len = 4 << 20;
  let pos = 0;
  let last = 0;
  call.progress(0, total);
  while (pos < total) {
    checkAborted(call.id);
    const end = Math.min(total, pos + len);
    const t0 = performance.now();
    await step(pos, end);
    const dt = performance.now() - t0;
    pos = end;
    if (dt < 25) len = Math.min(len * 2, 2 ** 40);
    else if (dt > 100) len = Math.max(align, Math.floor(len / 2 / align) * align);
    const now = performance.now();
    if (now - last > 50 || pos >= total) {
      last = now;
      call.progress(pos, total);
    }
    await yieldTask();
  }
  checkAborted(call.id);
}

/**
 * Writes into a new OPFS file `fileName` with `fill(handle)`; on failure
 * or cancellation the file is removed, so no half-written target is left.
 */
async function intoOpfs(fileName, fill) {
  const handle = await (await opfsFile(fileName, true)).createSyncAccessHandle();
  try {
    handle.truncate(0);
    await fill(handle);
    handle.flush();
    const size = handle.getSize();
    handle.close();
    return { fileName, size };
  } catch (err) {
    handle.close();
    const e = errorOf(err);
    try {
      await removeOpfs(fileName);
      e.message += ` (the partial OPFS file "${fileName}" was removed)`;
    } catch (why) {
      e.message += ` (the partial OPFS file "${fileName}" remains: ${errorOf(why).message})`;
      e.remains = fileName;
    }
    throw Object.assign(coded(e.code, e.message), e.remains ? { remains: e.remains } : {});
  }
}

/** Reads `[start, end)` of a Blob, Uint8Array or OPFS File asynchronously. */
async function readRange(source, start, end) {
  if (source instanceof Uint8Array) return source.subarray(start, end);
  return new Uint8Array(await source.slice(start, end).arrayBuffer());
}

const ops = {
  async init(call, moduleUrl) {
    const mod = await import(moduleUrl);
    await mod.default();
    wasm = mod;
    return true;
  },

  /** Opens an image read-only (`options`: passphrases, see `opener`). */
  open(call, imageId, name, storage, files, options) {
    return register(imageId, storage, files, false, opener(name, false, options));
  },

  /** Opens an image for reading and writing (OPFS or bytes in memory). */
  openWritable(call, imageId, name, storage, files, options) {
    return register(imageId, storage, files, true, opener(name, true, options));
  },

  /** Keeps passphrases in the wasm memory under `keyId` (the message's copies are let go of). */
  storePassphrases(call, keyId, options) {
    if (keyrings.has(keyId)) throw coded('busy', `passphrases id ${keyId} is in use`);
    try {
      keyrings.set(keyId, new wasm.Passphrases(options));
    } finally {
      wipe(options);
    }
    return keyId;
  },

  /** Wipes stored passphrases; false when there were none under `keyId`. */
  forgetPassphrases(call, keyId) {
    const keys = keyrings.get(keyId);
    if (!keys) return false;
    keyrings.delete(keyId);
    keys.free();
    return true;
  },

  /** Opens an image for repair (also corrupt or dirty ones; no backing file). */
  openForRepair(call, imageId, name, storage) {
    return register(imageId, storage, {}, true, (s) => wasm.QcowImage.openForRepair(name, s));
  },

  /** inspect() of one file without opening the files it names. */
  async inspect(call, name, storage) {
    return wasm.inspect(name, (await resolve(storage, false)).storage);
  },

  close(call, id) {
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

  info(call, id) {
    return entry(id).img.info();
  },

  chain(call, id) {
    return entry(id).img.chain();
  },

  /** The map, walked a page at a time (progress: guest bytes mapped). */
  async map(call, id) {
    const img = entry(id).img;
    const total = img.virtualSize();
    const out = [];
    let at = 0;
    let last = 0;
    call.progress(0, total);
    while (at !== null && at < total) {
      checkAborted(call.id);
      const page = entry(id).img.mapPage(at, 4096);
      for (const e of page.entries) out.push(e);
      at = page.next;
      const now = performance.now();
      if (now - last > 50) {
        last = now;
        call.progress(at === null ? total : at, total);
      }
      await yieldTask();
    }
    checkAborted(call.id);
    call.progress(total, total);
    return out;
  },

  /** Bytes per allocation category, summed over steps of the guest space. */
  async allocation(call, id) {
    const total = entry(id).img.virtualSize();
    const sums = { data: 0, compressed: 0, zero: 0, backing: 0, unallocated: 0 };
    await stepped(call, total, (start, end) => {
      const a = entry(id).img.allocation({ start, end });
      for (const k of Object.keys(a)) sums[k] = (sums[k] || 0) + a[k];
    });
    return sums;
  },

  /** The allocation ranges, walked in steps and joined. */
  async allocationMap(call, id) {
    const total = entry(id).img.virtualSize();
    const out = [];
    await stepped(call, total, (start, end) => {
      for (const r of entry(id).img.allocationMap({ start, end })) {
        const prev = out[out.length - 1];
        if (prev && prev.category === r.category && prev.start + prev.length === r.start) {
          prev.length += r.length;
        } else {
          out.push(r);
        }
      }
    });
    return out;
  },

  hostLayout(call, id) {
    return entry(id).img.hostLayout();
  },

  /** The partition table and file systems of the guest disk. */
  contents(call, id) {
    return entry(id).img.contents();
  },

  check(call, id) {
    return entry(id).img.check((text) => call.line(text));
  },

  read(call, id, offset, length) {
    return entry(id).img.read(offset, length);
  },

  write(call, id, offset, bytes) {
    entry(id).img.write(offset, bytes);
  },

  /** Repairs (`mode`: "leaks" or "all"); problem lines go out as `{ id, line }`. */
  repair(call, id, mode) {
    return entry(id).img.repair(mode, (text) => call.line(text));
  },

  resize(call, id, size, options) {
    return entry(id).img.resize(size, options || undefined);
  },

  snapshots(call, id) {
    return entry(id).img.snapshots();
  },

  createSnapshot(call, id, name) {
    return entry(id).img.createSnapshot(name);
  },

  deleteSnapshot(call, id, name) {
    entry(id).img.deleteSnapshot(name);
    return true;
  },

  applySnapshot(call, id, idOrName) {
    entry(id).img.applySnapshot(idOrName);
    return true;
  },

  flush(call, id) {
    entry(id).img.flush();
    return true;
  },

  /**
   * Copies a File/Blob/Uint8Array into the OPFS file `fileName` (created
   * or replaced), read asynchronously in pieces and written through a
   * sync access handle.
   */
  async copyToOpfs(call, source, fileName) {
    const src = (await resolve(source, false)).storage;
    const total = src instanceof Uint8Array ? src.length : src.size;
    return intoOpfs(fileName, async (handle) => {
      const piece = 16 << 20;
      let done = 0;
      call.progress(0, total);
      for (let at = 0; at < total; at += piece) {
        checkAborted(call.id);
        const bytes = await readRange(src, at, Math.min(total, at + piece));
        const n = handle.write(bytes, { at });
        if (n < bytes.length) throw coded('io', `short write at ${at}`);
        done = at + bytes.length;
        call.progress(done, total);
        await yieldTask();
      }
      checkAborted(call.id);
    });
  },

  /** The guest contents as a raw image in the OPFS file `fileName`, in steps. */
  async convertToRawOpfs(call, id, fileName) {
    const total = entry(id).img.virtualSize();
    return intoOpfs(fileName, async (handle) => {
      handle.truncate(total);
      await stepped(call, total, (start, end) => {
        entry(id).img.convertToRawStorage(handle, { start, end });
      });
    });
  },

  /** The guest contents as a new qcow2 image in the OPFS file `fileName`, in steps. */
  async convertToQcow2Opfs(call, id, fileName, options) {
    const total = entry(id).img.virtualSize();
    return intoOpfs(fileName, async (handle) => {
      let writer;
      try {
        writer = new wasm.Qcow2Writer(handle, { ...(options || {}), size: total });
      } finally {
        wipeEncrypt(options);
      }
      try {
        await stepped(call, total, (start, end) => {
          writer.copyFrom(entry(id).img, { start, end });
        });
        writer.finish();
      } finally {
        writer.free();
      }
    });
  },

  /**
   * A raw disk (File/Blob/Uint8Array/OPFS file) as a new qcow2 image in
   * the OPFS file `fileName`: read asynchronously in 16 MiB pieces and
   * handed to a Qcow2Writer.
   */
  async convertRawToQcow2Opfs(call, source, fileName, options) {
    const src = (await resolve(source, false)).storage;
    const total = src instanceof Uint8Array ? src.length : src.size;
    return intoOpfs(fileName, async (handle) => {
      let writer;
      try {
        writer = new wasm.Qcow2Writer(handle, { ...(options || {}), size: total });
      } finally {
        wipeEncrypt(options);
      }
      try {
        const piece = 16 << 20;
        let last = 0;
        call.progress(0, total);
        for (let at = 0; at < total; at += piece) {
          checkAborted(call.id);
          const end = Math.min(total, at + piece);
          writer.write(at, await readRange(src, at, end));
          const now = performance.now();
          if (now - last > 50 || end >= total) {
            last = now;
            call.progress(end, total);
          }
          await yieldTask();
        }
        checkAborted(call.id);
        writer.finish();
      } finally {
        writer.free();
      }
    });
  },

  createImage(call, options) {
    try {
      return wasm.createImageBytes(options);
    } finally {
      wipeEncrypt(options);
    }
  },

  removeOpfs(call, fileName) {
    return removeOpfs(fileName);
  },
};

self.onmessage = async (ev) => {
  const { id, op, args } = ev.data;
  if (op === 'abort') {
    aborted.add(args[0]);
    return;
  }
  const call = {
    id,
    progress: (done, total) => self.postMessage({ id, progress: { done, total } }),
    line: (text) => self.postMessage({ id, line: text }),
  };
  try {
    const fn = ops[op];
    if (!fn) throw coded('invalid-argument', `unknown operation ${op}`);
    if (op !== 'init' && !wasm) throw coded('internal', 'the wasm module is not initialised');
    checkAborted(id);
    const result = await fn(call, ...(args || []));
    const transfer = result instanceof Uint8Array ? [result.buffer] : [];
    self.postMessage({ id, ok: true, result }, transfer);
  } catch (err) {
    self.postMessage({ id, ok: false, error: errorOf(err) });
  } finally {
    aborted.delete(id);
    scrub(op, args || []);
  }
};

/** Whatever path a call took, the passphrases it carried are let go of when it ends. */
function scrub(op, args) {
  if (op === 'open' || op === 'openWritable') wipe(args[4]);
  else if (op === 'storePassphrases') wipe(args[1]);
  else if (op === 'createImage') wipeEncrypt(args[0]);
  else if (op === 'convertToQcow2Opfs' || op === 'convertRawToQcow2Opfs') wipeEncrypt(args[2]);
}
