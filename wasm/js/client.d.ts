/**
 * Types of the worker client (`client.js`): the wasm module runs in a dedicated
 * module worker (`worker.js`) and every method returns a promise.
 */
import type {
  Allocation, AllocationRange, CheckResult, CreateOptions, ConvertOptions, DiskContents, ErrorCode,
  HostRun, ImageInfo, MapEntry, OpenOptions, RepairMode, RepairResult, ResizeOptions, SnapshotInfo,
} from "./qcowkit_wasm.js";

export type {
  AesEncryptInfo, DiskContents, EncryptInfo, EncryptOptions, ErrorCode, FilesystemInfo,
  FilesystemType, HashAlg, LuksEncryptInfo, OpenOptions, PartitionInfo, PartitionTableInfo,
  Passphrase, SlotInfo,
} from "./qcowkit_wasm.js";

/**
 * What the worker client takes as an image or file: a `Blob`/`File`, bytes (copied, or
 * handed over with `transfer: true`), or `{ opfs: fileName }`, a file of the origin private
 * file system's root directory (read as a `File`, or through a sync access handle by
 * `openWritable`/`openForRepair`).
 */
export type ClientStorage = Blob | Uint8Array | { opfs: string };

/** Backing and data files by name (resolved as `QcowImage.open` resolves them). */
export type ClientFiles = Record<string, ClientStorage>;

/** What every rejection is: an `Error` with a stable `code` (`"aborted"`: name `"AbortError"`). */
export interface ClientError extends Error {
  code: ErrorCode;
  /** A partial OPFS file a failed or cancelled operation could not remove. */
  remains?: string;
}

/** Cancellation: an aborted signal rejects the call with code `"aborted"`. */
export interface Cancellable {
  signal?: AbortSignal;
}

/** Long work: cancellation and progress (bytes done so far and the total). */
export interface LongWork extends Cancellable {
  onProgress?: (done: number, total: number) => void;
}

/** Hand `Uint8Array` buffers to the worker instead of copying them (they are detached). */
export interface Transfer {
  transfer?: boolean;
}

/**
 * How the worker client opens an encrypted image: the passphrases themselves (`passphrase`,
 * `backingPassphrases`, as `QcowImage.open`'s options; let go of in the worker once the wasm has
 * them), or `passphrases`, the id of passphrases stored with `storePassphrases` (not both). An
 * image opened with either is not opened again after a restart: its id then rejects with
 * `"not-found"`.
 */
export interface ClientOpenOptions extends Transfer, OpenOptions {
  passphrases?: number;
}

/** The OPFS file an operation wrote. */
export interface OpfsResult {
  fileName: string;
  /** Its length in bytes. */
  size: number;
}

export class QcowClient {
  private constructor();
  /**
   * Starts a worker and loads the wasm module in it (by default the `qcowkit_wasm.js` and
   * `worker.js` next to `client.js`).
   */
  static start(moduleUrl?: string | URL, workerUrl?: string | URL): Promise<QcowClient>;

  /**
   * Opens an image read-only; resolves to an image id. An encrypted image opens without its
   * passphrase for its metadata (data reads reject with `"passphrase-required"`); a wrong
   * passphrase rejects with `"invalid-passphrase"`.
   */
  open(name: string, storage: ClientStorage, files?: ClientFiles, options?: ClientOpenOptions): Promise<number>;
  /**
   * Opens an image for reading and writing (`{ opfs }` or bytes); the worker holds the OPFS file
   * until `close`. An encrypted image needs its passphrase.
   */
  openWritable(name: string, storage: ClientStorage, files?: ClientFiles,
    options?: ClientOpenOptions): Promise<number>;
  /**
   * Stores passphrases in the worker's wasm memory (this client keeps no copy; `transfer: true`
   * hands `Uint8Array` ones over, and the worker zeroes them); resolves to an id for the
   * `passphrases` option of `open`/`openWritable`. Lost when the worker is stopped or restarted.
   */
  storePassphrases(passphrases: OpenOptions, options?: Transfer): Promise<number>;
  /** Wipes stored passphrases (false when there were none under `id`). */
  forgetPassphrases(id: number): Promise<boolean>;
  /** Opens an image for `repair`, as `qemu-img check -r` does (also corrupt or dirty images). */
  openForRepair(name: string, storage: ClientStorage, options?: Transfer): Promise<number>;
  /** `info()` of one file without opening the files it names (`format: "raw"` for other files). */
  inspect(name: string, storage: ClientStorage, options?: Transfer): Promise<ImageInfo>;
  /** Releases an image (and the OPFS file it held). */
  close(id: number): Promise<boolean>;

  info(id: number): Promise<ImageInfo>;
  chain(id: number): Promise<ImageInfo[]>;
  /** `qemu-img map --output=json`, walked a page at a time (progress: guest bytes mapped). */
  map(id: number, options?: LongWork): Promise<MapEntry[]>;
  /** Bytes per allocation category, in steps. */
  allocation(id: number, options?: LongWork): Promise<Allocation>;
  /** The guest space as allocation ranges, in steps. */
  allocationMap(id: number, options?: LongWork): Promise<AllocationRange[]>;
  /** What each cluster of the image file holds (cancelling restarts the worker). */
  hostLayout(id: number, options?: Cancellable): Promise<HostRun[]>;
  /**
   * What the guest disk holds: partition table (MBR or GPT), partitions and the file system of
   * each and of the whole disk (`qcow2-info --json`'s "contents"); a broken table is reported in
   * `error`, not rejected (cancelling restarts the worker).
   */
  contents(id: number, options?: Cancellable): Promise<DiskContents>;
  /** `qemu-img check` (cancelling restarts the worker). */
  check(id: number, options?: Cancellable & { onProblem?: (line: string) => void }): Promise<CheckResult>;
  /**
   * `qemu-img check -r` (cancelling stops the worker mid-repair: the image is left as a crash
   * leaves it, at worst with leaked clusters; check it again).
   */
  repair(id: number, mode: RepairMode,
    options?: Cancellable & { onProblem?: (line: string) => void }): Promise<RepairResult>;
  resize(id: number, size: number | string, options?: ResizeOptions): Promise<number>;
  snapshots(id: number): Promise<SnapshotInfo[]>;
  createSnapshot(id: number, name: string): Promise<string>;
  deleteSnapshot(id: number, name: string): Promise<boolean>;
  applySnapshot(id: number, idOrName: string): Promise<boolean>;
  flush(id: number): Promise<boolean>;
  /** Guest bytes (the buffer is transferred from the worker, not copied). */
  read(id: number, offset: number, length: number): Promise<Uint8Array>;
  /** Writes guest bytes into an image opened writable. */
  write(id: number, offset: number, bytes: Uint8Array, options?: Transfer): Promise<void>;

  /** Copies a file into the OPFS file `fileName`; cancelled or failed, the file is removed. */
  copyToOpfs(source: ClientStorage, fileName: string, options?: LongWork & Transfer): Promise<OpfsResult>;
  /** The guest contents as a raw image in the OPFS file `fileName` (holes for zeros), in steps. */
  convertToRawOpfs(id: number, fileName: string, options?: LongWork): Promise<OpfsResult>;
  /** The guest contents as a new standalone qcow2 image in the OPFS file `fileName`, in steps. */
  convertToQcow2Opfs(id: number, fileName: string,
    options?: LongWork & Omit<ConvertOptions, "onProgress">): Promise<OpfsResult>;
  /** A raw disk as a new qcow2 image in the OPFS file `fileName` (read in 16 MiB pieces). */
  convertRawToQcow2Opfs(source: ClientStorage, fileName: string,
    options?: LongWork & Transfer & Omit<ConvertOptions, "onProgress">): Promise<OpfsResult>;
  /** Removes a file of the OPFS root directory (false when there was none). */
  removeOpfs(fileName: string): Promise<boolean>;
  /** A new empty qcow2 image in memory (LUKS-encrypted with `encrypt`). */
  createImage(options: CreateOptions): Promise<Uint8Array>;
  /** Stops the worker; calls in flight reject with code `"aborted"`. */
  terminate(): void;
}
