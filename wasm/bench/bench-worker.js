/**
 * @file Dedicated module worker of the wasm throughput benchmark.
 *
 * Messages `{ id, op, args }` from index.html are answered with
 * `{ id, ok: true, result }` or `{ id, ok: false, error }`. Each `toRaw` /
 * `toQcow2` call is ONE timed run: the driver (throughput.mjs) loops over
 * the runs so that it can flush the host's dirty pages between them.
 *
 * Only the conversion is timed (performance.now() around the wasm calls):
 * not loading the module, not getting or closing the OPFS handle, not the
 * verification that follows the last run.
 */

/** @type {any} the wasm-bindgen module */
let wasm = null;
/** @type {Map<string, File>} the files the driver chose, by name */
const files = new Map();

const OUT_RAW = 'bench-out.raw';
const OUT_QCOW2 = 'bench-out.qcow2';

function hex(buf) {
  return [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function file(name) {
  const f = files.get(name);
  if (!f) throw new Error(`no file ${name} was given to the page`);
  return f;
}

/** A new, empty OPFS file `name` and its sync access handle. */
async function freshOpfs(name) {
  const root = await navigator.storage.getDirectory();
  await removeOpfs(name);
  const fh = await root.getFileHandle(name, { create: true });
  return { fh, handle: await fh.createSyncAccessHandle() };
}

async function removeOpfs(name) {
  const root = await navigator.storage.getDirectory();
  try {
    await root.removeEntry(name);
  } catch (e) {
    if (e.name !== 'NotFoundError') throw e;
  }
}

/** SHA-256 (hex) of everything in an OPFS sync handle. */
async function hashHandle(handle) {
  const size = handle.getSize();
  const buf = new Uint8Array(size);
  for (let at = 0; at < size;) {
    const n = handle.read(buf.subarray(at), { at });
    if (n <= 0) throw new Error(`short read of the output at ${at} of ${size}`);
    at += n;
  }
  return hex(await crypto.subtle.digest('SHA-256', buf));
}

const ops = {
  /** Loads the module; returns the environment and the source's hash. */
  async init(moduleUrl, chosen) {
    const mod = await import(moduleUrl);
    await mod.default();
    wasm = mod;
    for (const f of chosen) files.set(f.name, f);
    const raw = file('disk.raw');
    const estimate = await navigator.storage.estimate();
    return {
      userAgent: navigator.userAgent,
      hardwareConcurrency: navigator.hardwareConcurrency,
      opfsQuota: estimate.quota,
      sourceSize: raw.size,
      sourceSha256: hex(await crypto.subtle.digest('SHA-256', await raw.arrayBuffer())),
    };
  },

  /**
   * qcow2 File -> raw OPFS file: QcowImage.open + convertToRawStorage
   * (which truncates, writes and flushes). With `verify`, also returns the
   * SHA-256 and size of what landed in OPFS.
   */
  async toRaw({ image, verify }) {
    const src = file(image);
    const { handle } = await freshOpfs(OUT_RAW);
    try {
      const t0 = performance.now();
      const img = wasm.QcowImage.open(image, src, {});
      let guestSize;
      try {
        guestSize = img.virtualSize();
        img.convertToRawStorage(handle);
      } finally {
        img.free();
      }
      const ms = performance.now() - t0;
      const result = { ms, guestSize, outSize: handle.getSize() };
      if (verify) result.sha256 = await hashHandle(handle);
      return result;
    } finally {
      handle.close();
      await removeOpfs(OUT_RAW);
    }
  },

  /**
   * raw File -> qcow2 OPFS file: convertRawToQcow2(source, target, options).
   * With `upload`, POSTs the image to the driver's server afterwards (for
   * qemu-img check / compare on the host).
   */
  async toQcow2({ options, upload }) {
    const src = file('disk.raw');
    const { fh, handle } = await freshOpfs(OUT_QCOW2);
    let result;
    try {
      const t0 = performance.now();
      wasm.convertRawToQcow2(src, handle, options);
      const ms = performance.now() - t0;
      result = { ms, guestSize: src.size, outSize: handle.getSize() };
    } finally {
      handle.close();
    }
    try {
      if (upload) {
        const res = await fetch(`upload/${encodeURIComponent(upload)}`, {
          method: 'POST',
          body: await fh.getFile(),
        });
        if (!res.ok) throw new Error(`upload of ${upload}: HTTP ${res.status}`);
      }
    } finally {
      await removeOpfs(OUT_QCOW2);
    }
    return result;
  },
};

self.onmessage = async ({ data }) => {
  const { id, op, args } = data;
  try {
    const fn = ops[op];
    if (!fn) throw new Error(`unknown operation ${op}`);
    if (op !== 'init' && !wasm) throw new Error('the wasm module is not initialised');
    self.postMessage({ id, ok: true, result: await fn(...(args || [])) });
  } catch (err) {
    self.postMessage({ id, ok: false, error: err && err.message ? err.message : String(err) });
  }
};
