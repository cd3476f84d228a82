//! Hostile images, in the spirit of QEMU's iotest 080.
//!
//! Every image starts as a valid one made by qemu-img at test time; single
//! fields are then patched to values the format (or QEMU's limits) forbid.
//! Refusals must be errors naming the field and its value; reads and writes
//! through corrupt metadata must fail with errors naming the structure and
//! value, or succeed and leave an image no worse than it was (judged by
//! `qemu-img check` and by reading back with qemu-io); nothing may panic,
//! hang or take unbounded memory. Every case runs on a thread of its own
//! under a watchdog, with its heap growth measured by the counting
//! allocator below ([`bounded`]); every program runs under a time bound
//! ([`run_bounded`]), ours also under an address-space limit.
//!
//! What QEMU does with the same bytes is recorded next to each expectation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qcowkit_core::{BlockRead, BlockWrite, Error, Image, MemError, OpenOptions, WritableImage};
use qcowkit_std::{Disk, DiskOptions};
use qcowkit_tests::{
    announce_seed, bin, env_seed, get16, get32, get64, output_text, put16, put32, put64,
    qemu_compressed, qemu_create, qemu_image, qemu_img, qemu_overlay, set_bits64, stderr_of,
    stdout_of, Rng, Scratch, XorShift64,
};

// Header field offsets (big-endian).
const MAGIC: usize = 0;
const VERSION: usize = 4;
const BACKING_FILE_OFFSET: usize = 8;
const BACKING_FILE_SIZE: usize = 16;
const CLUSTER_BITS: usize = 20;
const SIZE: usize = 24;
const CRYPT_METHOD: usize = 32;
const L1_SIZE: usize = 36;
const L1_TABLE_OFFSET: usize = 40;
const REFCOUNT_TABLE_OFFSET: usize = 48;
const REFCOUNT_TABLE_CLUSTERS: usize = 56;
const NB_SNAPSHOTS: usize = 60;
const SNAPSHOTS_OFFSET: usize = 64;
const INCOMPATIBLE_FEATURES: usize = 72;
const AUTOCLEAR_FEATURES: usize = 88;
const REFCOUNT_ORDER: usize = 96;
const HEADER_LENGTH: usize = 100;
const COMPRESSION_TYPE: usize = 104;

// Header extension types.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;

// Feature bits.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

// Table entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

// ---------------------------------------------------------------------------
// Bounds: memory (a counting allocator with limits) and time (a watchdog).

const MIB: usize = 1 << 20;

/// Largest heap growth one case may reach. What an image may make the
/// library hold is bounded by QEMU's limits, which the core enforces: an L1
/// table of at most 32 MiB (QCOW_MAX_L1_SIZE; while it is decoded, its raw
/// bytes too: 64 MiB for a moment), a refcount table of at most 8 MiB
/// (QCOW_MAX_REFTABLE_SIZE), and caches of the L2 tables and refcount
/// blocks a case touches (a few dozen tables of at most 2 MiB; QEMU's caps,
/// 32 and 8 MiB, are never reached). The snapshot table and the bitmap
/// directory (64 MiB at most each) are read only as far as the file holds
/// them, and the files here are about 1 MiB. A case adds its own buffers:
/// reads of at most 4 MiB and the write path's storage, at most
/// [`STORAGE_CAP`] (a vector's capacity, twice that). That is about 100
/// MiB at the worst moment; 128 MiB is the budget, and any table sized by
/// a hostile field instead of by those limits goes past it.
const HEAP_BUDGET: usize = 128 * MIB;

/// A single allocation above this is refused (the allocator returns null):
/// nothing the format allows needs one, so asking for it is a bug. Code
/// that uses `try_reserve` then gets an error, and the case fails naming
/// the request; anything else aborts the process after the allocator has
/// written the case's name to stderr.
const ALLOC_LIMIT: usize = 1 << 30;

/// Live heap one case thread may hold before its allocations are refused
/// (many allocations below [`ALLOC_LIMIT`] each must not exhaust memory
/// either; the case then fails or the process aborts, as above).
const LIVE_LIMIT: usize = 1 << 30;

/// Longest time one case (an open, reads, a write script, a check) may take
/// before the watchdog fails it as hung. Cases take milliseconds; the
/// slowest legitimate one, a mutated image with the largest L1 table QEMU
/// allows (32 MiB) opened, read, written and checked in a debug build,
/// takes about 2.5 s. The bound leaves room for a loaded machine, so that
/// it fails only what does not finish.
const CASE_BOUND: Duration = Duration::from_secs(20);

/// Longest time one run of a program (ours, qemu-img, qemu-io) may take
/// before it is killed and the test fails.
const PROGRAM_BOUND: Duration = Duration::from_secs(30);

/// Address space of one run of our CLI (`ulimit -v`, in KiB). It has no
/// counting allocator, so the kernel bounds it: 2 GiB is far above what
/// the CLI with its threads maps, and far below a table sized by a hostile
/// field.
const CLI_ADDRESS_SPACE_KIB: u64 = 2 << 20;

/// Largest file the in-memory storage of the write path holds: a write
/// script allocates at most a few clusters (L2 tables, refcount blocks,
/// data) of at most 2 MiB each beyond the end of an image of about 1 MiB;
/// 16 MiB holds that.
const STORAGE_CAP: u64 = 16 << 20;

thread_local! {
    /// Heap bytes allocated minus freed by this thread. Each case runs on a
    /// thread of its own, so this is the case's heap growth. Memory moved in
    /// and freed there would lower it: cases take their inputs as `Arc`s
    /// that the caller outlives, and copy them.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// Highest value of `LIVE` so far.
    static PEAK: Cell<isize> = const { Cell::new(0) };
    /// Largest request refused on this thread (0: none).
    static REFUSED: Cell<usize> = const { Cell::new(0) };
    /// Name of the case running on this thread, for the refusal message (a
    /// fixed buffer: the allocator must not allocate).
    static CASE_NAME: Cell<([u8; 160], usize)> = const { Cell::new(([0; 160], 0)) };
}

/// The global allocator of this test binary: the system allocator, counting
/// each thread's live and peak heap and refusing absurd requests.
struct Bounded;

/// Whether a request for `size` bytes that grows this thread's heap by
/// `growth` bytes may be served; records and reports a refusal.
fn admit(size: usize, growth: usize) -> bool {
    let live = LIVE.with(Cell::get);
    let after = live.saturating_add(isize::try_from(growth).unwrap_or(isize::MAX));
    if size <= ALLOC_LIMIT && after <= LIVE_LIMIT as isize {
        return true;
    }
    REFUSED.with(|r| r.set(r.get().max(size)));
    refusal_message(size, live);
    false
}

/// Counts `delta` bytes more (or fewer) on this thread.
fn count(delta: isize) {
    let live = LIVE.with(|l| {
        let v = l.get().saturating_add(delta);
        l.set(v);
        v
    });
    PEAK.with(|p| p.set(p.get().max(live)));
}

/// Writes, without allocating, which case asked for how much to stderr
/// (file descriptor 2, unbuffered): if the caller cannot take the refusal,
/// the process aborts next, and this names the case.
fn refusal_message(size: usize, live: isize) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    struct Buf {
        bytes: [u8; 400],
        len: usize,
    }
    impl Buf {
        fn text(&mut self, t: &[u8]) {
            for &c in t {
                if self.len < self.bytes.len() {
                    self.bytes[self.len] = c;
                    self.len += 1;
                }
            }
        }
        fn number(&mut self, mut v: u64) {
            let mut digits = [0u8; 20];
            let mut n = 0;
            loop {
                digits[n] = b'0' + (v % 10) as u8;
                n += 1;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            digits[..n].reverse();
            self.text(&digits[..n]);
        }
    }
    let (name, len) = CASE_NAME.with(Cell::get);
    let mut out = Buf {
        bytes: [0; 400],
        len: 0,
    };
    out.text(b"hostile: case `");
    out.text(&name[..len]);
    out.text(b"`: allocation of ");
    out.number(size as u64);
    out.text(b" bytes refused (live heap ");
    out.number(live.max(0) as u64);
    out.text(b" bytes; limits: 1 GiB per allocation, 1 GiB live)\n");
    // SAFETY: file descriptor 2 stays open for the life of the process, and
    // `ManuallyDrop` keeps this `File` from closing it.
    let mut stderr = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(2) });
    let _ = stderr.write_all(&out.bytes[..out.len]);
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged, or returns null, which `GlobalAlloc` allows (an
// allocation failure). The bookkeeping uses only constant-initialised
// thread locals without destructors and never allocates or unwinds.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size(), layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size(), layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size, new_size.saturating_sub(layout.size())) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System` with `layout`; same contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Bounded = Bounded;

/// The largest heap growth of any case so far in this process, and its case.
static LARGEST: Mutex<(usize, String)> = Mutex::new((0, String::new()));

/// Prints the largest heap growth of a case seen in this process (shown with
/// `--no-capture`, or when the test fails).
fn print_largest_peak(test: &str) {
    let l = LARGEST.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "{test}: largest heap growth of a case in this process {:.2} MiB ({}), budget {} MiB",
        l.0 as f64 / MIB as f64,
        l.1,
        HEAP_BUDGET / MIB
    );
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

/// Runs case `case` on a thread of its own under the watchdog and the heap
/// budget, and returns what `f` returned. Fails the test, naming the case,
/// when `f` panics, runs longer than [`CASE_BOUND`] (the hung thread is
/// left behind; the test's process ends with the failure), grows the heap
/// by more than [`HEAP_BUDGET`], or asked the allocator for more than it
/// serves.
fn bounded<T: Send + 'static>(case: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let mut name = ([0u8; 160], 0);
    let mut n = case.len().min(name.0.len());
    while !case.is_char_boundary(n) {
        n -= 1;
    }
    name.0[..n].copy_from_slice(&case.as_bytes()[..n]);
    name.1 = n;
    std::thread::Builder::new()
        .name(case[..n].to_string())
        .spawn(move || {
            CASE_NAME.with(|c| c.set(name));
            let r = catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_text(&*p));
            let peak = PEAK.with(Cell::get).max(0) as usize;
            let refused = REFUSED.with(Cell::get);
            let _ = tx.send((r, peak, refused));
        })
        .expect("start a case thread");
    let (r, peak, refused) = match rx.recv_timeout(CASE_BOUND) {
        Ok(done) => done,
        Err(RecvTimeoutError::Timeout) => {
            panic!("{case}: still running after {CASE_BOUND:?}: hung")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("{case}: its thread ended without a result"),
    };
    {
        let mut l = LARGEST.lock().unwrap_or_else(|p| p.into_inner());
        if peak > l.0 {
            *l = (peak, case.to_string());
        }
    }
    assert!(
        refused == 0,
        "{case}: asked the allocator for {refused} bytes, refused (limits: {} MiB per allocation, {} MiB live)",
        ALLOC_LIMIT / MIB,
        LIVE_LIMIT / MIB
    );
    assert!(
        peak <= HEAP_BUDGET,
        "{case}: grew the heap by {peak} bytes, over the budget of {} MiB",
        HEAP_BUDGET / MIB
    );
    r.unwrap_or_else(|p| panic!("{case}: panicked: {p}"))
}

/// Runs `prog ARGS` in `cwd` for case `case`; kills it and fails the test,
/// naming the case, when it runs longer than [`PROGRAM_BOUND`].
fn run_bounded(case: &str, cwd: &Path, prog: &str, args: &[&str]) -> Output {
    let child = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{case}: cannot run {prog}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PROGRAM_BOUND) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{case}: waiting for {prog}: {e}")),
        Err(_) => {
            // The child this function started, by its id.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!(
                "{case}: `{prog} {}` still running after {PROGRAM_BOUND:?}: killed",
                args.join(" ")
            )
        }
    }
}

/// Runs our `qcow2 ARGS` in `cwd` for case `case`, bounded in time
/// ([`run_bounded`]) and address space ([`CLI_ADDRESS_SPACE_KIB`]).
fn ours(case: &str, cwd: &Path, args: &[&str]) -> Output {
    let qcow2 = bin("qcow2");
    let limit = format!("ulimit -v {CLI_ADDRESS_SPACE_KIB} && exec \"$0\" \"$@\"");
    let mut sh = vec!["-c", limit.as_str(), qcow2.to_str().expect("utf-8 path")];
    sh.extend_from_slice(args);
    run_bounded(case, cwd, "sh", &sh)
}

/// Exit code of a finished program (-1 when killed by a signal).
fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Asserts that our CLI run `out` failed cleanly: exit 1, stderr starting
/// `qcow2: ` and containing every string of `want`.
fn assert_cli_error(case: &str, out: &Output, want: &[&str]) {
    let err = stderr_of(out);
    assert!(
        code(out) == 1 && err.starts_with("qcow2: ") && want.iter().all(|w| err.contains(w)),
        "{case}: exit {} with stderr {err:?}; want exit 1 and {want:?}",
        code(out)
    );
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap()
}

/// The fields of a (valid) image's header the tests navigate with.
#[derive(Debug, Clone, Copy)]
struct Geom {
    cluster_bits: u32,
    cluster_size: u64,
    size: u64,
    header_length: usize,
    l1_offset: u64,
    l1_size: u32,
    rt_offset: u64,
    snapshots_offset: u64,
}

impl Geom {
    fn of(b: &[u8]) -> Geom {
        let cluster_bits = get32(b, CLUSTER_BITS);
        Geom {
            cluster_bits,
            cluster_size: 1 << cluster_bits,
            size: get64(b, SIZE),
            header_length: get32(b, HEADER_LENGTH) as usize,
            l1_offset: get64(b, L1_TABLE_OFFSET),
            l1_size: get32(b, L1_SIZE),
            rt_offset: get64(b, REFCOUNT_TABLE_OFFSET),
            snapshots_offset: get64(b, SNAPSHOTS_OFFSET),
        }
    }

    /// File offset of L1 entry `i`.
    fn l1_entry(&self, i: usize) -> usize {
        to_usize(self.l1_offset) + 8 * i
    }

    /// Host offset of the L2 table L1 entry `i` points at.
    fn l2_table(&self, b: &[u8], i: usize) -> usize {
        to_usize(get64(b, self.l1_entry(i)) & OFFSET_MASK)
    }

    /// Host offset of the first refcount block.
    fn refcount_block(&self, b: &[u8]) -> usize {
        to_usize(get64(b, to_usize(self.rt_offset)) & OFFSET_MASK)
    }

    /// File offset of the 16-bit refcount of the cluster at `host`.
    fn refcount_of(&self, b: &[u8], host: u64) -> usize {
        self.refcount_block(b) + 2 * to_usize(host >> self.cluster_bits)
    }
}

/// The header extensions of `b`, in order (without the end marker).
fn extensions(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let g = Geom::of(b);
    let mut out = Vec::new();
    let mut off = g.header_length;
    while off + 8 <= to_usize(g.cluster_size) {
        let kind = get32(b, off);
        let len = get32(b, off + 4) as usize;
        if kind == 0 {
            break;
        }
        out.push((kind, b[off + 8..off + 8 + len].to_vec()));
        off += 8 + len.div_ceil(8) * 8;
    }
    out
}

/// Rewrites the extension area of `b` (which must have no backing file
/// name) to hold `exts`, followed by the end marker.
fn set_extensions(b: &mut [u8], exts: &[(u32, Vec<u8>)]) {
    let start = Geom::of(b).header_length;
    b[start..4096].fill(0);
    let mut off = start;
    for (kind, data) in exts {
        put32(b, off, *kind);
        put32(b, off + 4, data.len() as u32);
        b[off + 8..off + 8 + data.len()].copy_from_slice(data);
        off += 8 + data.len().div_ceil(8) * 8;
    }
    assert!(off + 8 <= 4096, "extensions do not fit");
}

/// Appends an extension after the existing ones.
fn add_extension(b: &mut [u8], kind: u32, data: Vec<u8>) {
    let mut exts = extensions(b);
    exts.push((kind, data));
    set_extensions(b, &exts);
}

/// A feature name table entry.
fn feature_entry(kind: u8, bit: u8, name: &str) -> Vec<u8> {
    let mut e = vec![0u8; 48];
    e[0] = kind;
    e[1] = bit;
    e[2..2 + name.len()].copy_from_slice(name.as_bytes());
    e
}

/// The data of a bitmaps extension.
fn bitmaps_ext(nb_bitmaps: u32, reserved: u32, dir_size: u64, dir_offset: u64) -> Vec<u8> {
    let mut d = vec![0u8; 24];
    put32(&mut d, 0, nb_bitmaps);
    put32(&mut d, 4, reserved);
    put64(&mut d, 8, dir_size);
    put64(&mut d, 16, dir_offset);
    d
}

/// A 1 MiB image with 64 KiB clusters, 128 KiB of data at offset 0 (two
/// data clusters in one L2 table).
fn plain_image(d: &Path) -> Vec<u8> {
    qemu_image(d, "plain.qcow2", "", "1M", &["write -P 0x5a 0 128k"])
}

/// The plain image with one internal snapshot.
fn snapshot_image(d: &Path) -> Vec<u8> {
    std::fs::copy(d.join("plain.qcow2"), d.join("snap.qcow2")).unwrap();
    qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]);
    std::fs::read(d.join("snap.qcow2")).unwrap()
}

/// A 1 MiB image with extended L2 entries and 64 KiB of data at offset 0.
fn extl2_image(d: &Path) -> Vec<u8> {
    qemu_image(
        d,
        "extl2.qcow2",
        "extended_l2=on",
        "1M",
        &["write -P 0x11 0 64k"],
    )
}

/// Compressible but not trivial guest data.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
        .collect()
}

/// A 256 KiB image whose clusters are all compressed with `ctype`.
fn compressed_image(d: &Path, ctype: &str) -> (Vec<u8>, Vec<u8>) {
    let raw = pattern(256 * 1024);
    std::fs::write(d.join("src.raw"), &raw).unwrap();
    let name = format!("c-{ctype}.qcow2");
    qemu_compressed(d, "src.raw", &name, &format!("compression_type={ctype}"));
    (std::fs::read(d.join(&name)).unwrap(), raw)
}

/// Host offset and maximum length of the compressed data of an L2 entry.
fn compressed_extent(entry: u64, cluster_bits: u32) -> (usize, usize) {
    let shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (to_usize(offset), to_usize(sectors * 512 - (offset & 511)))
}

// ---------------------------------------------------------------------------
// The write path and QEMU's judgement.

/// The storage of the in-memory write path: a `Vec<u8>` that, like a disk
/// of [`STORAGE_CAP`] bytes, refuses to grow past it (an I/O error, without
/// allocating). A plain `Vec` would try to grow to wherever a hostile
/// pointer says (1 TiB), which the allocator refuses; a file would become
/// sparse there, as QEMU makes it.
#[derive(Debug)]
struct Capped {
    bytes: Vec<u8>,
    cap: u64,
}

impl Capped {
    /// `bytes`, growing up to [`STORAGE_CAP`].
    fn new(bytes: Vec<u8>) -> Capped {
        Capped {
            bytes,
            cap: STORAGE_CAP,
        }
    }

    /// `bytes` on a full disk: it cannot grow at all.
    fn full(bytes: Vec<u8>) -> Capped {
        let cap = bytes.len() as u64;
        Capped { bytes, cap }
    }

    fn fits(&self, offset: u64, len: usize) -> Result<(), MemError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.cap => Ok(()),
            _ => Err(MemError { offset, len }),
        }
    }
}

impl BlockRead for Capped {
    type Error = MemError;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.bytes.read_at(offset, buf)
    }
    fn len(&mut self) -> Result<u64, MemError> {
        Ok(self.bytes.len() as u64)
    }
}

impl BlockWrite for Capped {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemError> {
        self.fits(offset, buf.len())?;
        self.bytes.write_at(offset, buf)
    }
    fn set_len(&mut self, len: u64) -> Result<(), MemError> {
        self.fits(len, 0)?;
        BlockWrite::set_len(&mut self.bytes, len)
    }
    fn flush(&mut self) -> Result<(), MemError> {
        Ok(())
    }
}

/// The error an access of `len` bytes at `offset` past [`STORAGE_CAP`] gets.
fn past_cap(offset: u64, len: usize) -> String {
    format!("i/o error: {}", MemError { offset, len })
}

/// One operation of the write script.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write { at: u64, len: usize, byte: u8 },
    Zeroes { at: u64, len: u64 },
    Discard { at: u64, len: u64 },
    Flush,
}

impl Op {
    fn run<R: BlockWrite>(self, w: &mut WritableImage<R>) -> Result<(), Error<R::Error>> {
        match self {
            Op::Write { at, len, byte } => w.write_at(at, &vec![byte; len]),
            Op::Zeroes { at, len } => w.write_zeroes(at, len),
            Op::Discard { at, len } => w.discard(at, len),
            Op::Flush => w.flush(),
        }
    }

    /// The qemu-io command that reads back what the operation did.
    fn readback(self) -> Option<String> {
        match self {
            Op::Write { at, len, byte } => Some(format!("read -P {byte:#x} {at} {len}")),
            Op::Zeroes { at, len } | Op::Discard { at, len } => {
                Some(format!("read -P 0 {at} {len}"))
            }
            Op::Flush => None,
        }
    }
}

/// The write script of the crafted cases, for an image with clusters of
/// `cs` bytes and at least 4 of them: a write in place (guest cluster 0 is
/// allocated in the base images), a partial write of a new cluster, zeroes
/// over a whole cluster, a discard of a whole cluster, and a flush.
fn script(cs: u64) -> [Op; 5] {
    [
        Op::Write {
            at: 0,
            len: 4096,
            byte: 0xa5,
        },
        Op::Write {
            at: 3 * cs + 512,
            len: 1024,
            byte: 0xa6,
        },
        Op::Zeroes { at: cs, len: cs },
        Op::Discard {
            at: 2 * cs,
            len: cs,
        },
        Op::Flush,
    ]
}

/// What the write script did to an image opened for writing in memory.
#[derive(Debug)]
struct Written {
    ops: [Op; 5],
    /// Per operation: done, or the error's text.
    results: Vec<Result<(), String>>,
    /// The image refused further writes after an overlap.
    corrupt: bool,
    /// The storage afterwards.
    bytes: Vec<u8>,
}

/// Opens `bytes` for writing in memory ([`Capped`]) and runs the write
/// script, going on after failed operations; Err is the open's error.
fn write_script(bytes: &[u8]) -> Result<Written, String> {
    let mut w = WritableImage::open(Capped::new(bytes.to_vec()), &OpenOptions::default())
        .map_err(|e| e.to_string())?;
    let ops = script(w.cluster_size());
    let results = ops
        .iter()
        .map(|op| op.run(&mut w).map_err(|e| e.to_string()))
        .collect();
    Ok(Written {
        ops,
        results,
        corrupt: w.is_corrupt(),
        bytes: w.into_inner().bytes,
    })
}

/// What one operation must do: succeed, or fail with an error containing
/// every string.
type Expect = Result<(), Vec<String>>;

fn fails(words: &[&str]) -> Expect {
    Err(words.iter().map(|w| w.to_string()).collect())
}

/// The write script of case `case` on `bytes`, bounded; asserts that every
/// operation did what `want` says, and returns what it wrote.
fn expect_script(case: &str, bytes: &Arc<Vec<u8>>, want: &[Expect; 5]) -> Written {
    let b = Arc::clone(bytes);
    let w = bounded(case, move || write_script(&b))
        .unwrap_or_else(|e| panic!("{case}: opening for writing failed: {e}"));
    for ((op, got), want) in w.ops.iter().zip(&w.results).zip(want) {
        match (got, want) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(words)) if words.iter().all(|x| e.contains(x.as_str())) => {}
            _ => panic!("{case}: {op:?} gave {got:?}, want {want:?}"),
        }
    }
    w
}

/// The problems `qemu-img check` reports on `file` in `d`: its exit code
/// and its problem lines ("ERROR ...", "Leaked ...").
fn qemu_problems(case: &str, d: &Path, file: &str) -> (i32, Vec<String>) {
    let out = run_bounded(case, d, "qemu-img", &["check", "-f", "qcow2", file]);
    let lines = output_text(&out)
        .lines()
        .filter(|l| l.starts_with("ERROR") || l.starts_with("Leaked"))
        .map(str::to_string)
        .collect();
    (code(&out), lines)
}

/// Writes what the script left as `file` in `d`, and asserts that qemu-io
/// reads back what every successful operation wrote and that `qemu-img
/// check` then reports exactly `problems` with exit code `exit`.
fn judge_with_qemu(case: &str, d: &Path, w: &Written, exit: i32, problems: &[&str]) {
    let file = format!("{case}.qcow2");
    std::fs::write(d.join(&file), &w.bytes).unwrap();
    let reads: Vec<String> = w
        .ops
        .iter()
        .zip(&w.results)
        .filter(|(_, r)| r.is_ok())
        .filter_map(|(op, _)| op.readback())
        .collect();
    if !reads.is_empty() {
        let mut args = vec!["-r", "-f", "qcow2"];
        for r in &reads {
            args.extend(["-c", r.as_str()]);
        }
        args.push(&file);
        let out = run_bounded(case, d, "qemu-io", &args);
        let text = output_text(&out);
        assert!(
            code(&out) == 0 && !text.contains("fail") && !text.contains("rror"),
            "{case}: qemu-io does not read back what was written ({reads:?}): {text}"
        );
    }
    let (got_exit, got) = qemu_problems(case, d, &file);
    assert!(
        got_exit == exit && got == problems,
        "{case}: after the writes qemu-img check exits {got_exit} with {got:#?}; want {exit} with {problems:#?}"
    );
}

/// Runs `qemu-io ARGS FILE` (read-write) on a copy of `bytes` named `file`
/// in `d`: QEMU's outcome on the same bytes. Returns its output text and
/// whether QEMU marked the image corrupt.
fn qemu_writes(case: &str, d: &Path, file: &str, bytes: &[u8], cmds: &[&str]) -> (String, bool) {
    std::fs::write(d.join(file), bytes).unwrap();
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    let out = run_bounded(case, d, "qemu-io", &args);
    // The header only: QEMU may have made the file sparse up to far away.
    let mut header = [0u8; 80];
    let mut f = std::fs::File::open(d.join(file)).unwrap();
    let corrupt = std::io::Read::read_exact(&mut f, &mut header).is_ok()
        && get64(&header, INCOMPATIBLE_FEATURES) & INCOMPAT_CORRUPT != 0;
    (output_text(&out), corrupt)
}

/// Opens `file` read-only with qemu-io and reads its first sector: a full
/// open, unlike `qemu-img info`, which skips some checks (no I/O mode).
fn qemu_open_ro(case: &str, d: &Path, file: &str) -> Output {
    run_bounded(
        case,
        d,
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read 0 512", file],
    )
}

/// Opens `file` for writing with qemu-io and writes its first sector.
fn qemu_open_rw(case: &str, d: &Path, file: &str) -> Output {
    run_bounded(
        case,
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xa5 0 512", file],
    )
}

/// `qcow2 bench -w` writing 4 KiB of 0xa5 at offset 0 of `file` once (our
/// CLI's write path).
fn bench_write(case: &str, d: &Path, file: &str) -> Output {
    ours(
        case,
        d,
        &[
            "bench",
            "-q",
            "-w",
            "-f",
            "qcow2",
            "-c",
            "1",
            "-s",
            "4k",
            "--pattern",
            "165",
            file,
        ],
    )
}

// ---------------------------------------------------------------------------
// Header validation: one row per rule.

type Patch = Box<dyn Fn(&mut Vec<u8>)>;

struct Row {
    name: &'static str,
    snapshot_base: bool,
    patch: Patch,
    want: Vec<String>,
}

fn row(name: &'static str, patch: impl Fn(&mut Vec<u8>) + 'static, want: &[&str]) -> Row {
    Row {
        name,
        snapshot_base: false,
        patch: Box::new(patch),
        want: want.iter().map(|s| s.to_string()).collect(),
    }
}

impl Row {
    fn on_snapshot_image(mut self) -> Row {
        self.snapshot_base = true;
        self
    }
}

fn rows(g: Geom, snap: Geom) -> Vec<Row> {
    let cs = g.cluster_size;
    let hl = g.header_length;
    let rt_limit_clusters = (8 * 1024 * 1024 / cs) as u32 + 1;
    vec![
        row(
            "bad-magic",
            |b| put32(b, MAGIC, 0x5146_49fa),
            &["not a qcow2 image", "magic 0x514649fa"],
        ),
        row(
            "version-1",
            |b| put32(b, VERSION, 1),
            &["unsupported qcow2 version 1"],
        ),
        row(
            "version-4",
            |b| put32(b, VERSION, 4),
            &["unsupported qcow2 version 4"],
        ),
        row(
            "cluster-bits-8",
            |b| put32(b, CLUSTER_BITS, 8),
            &["invalid cluster_bits 8", "512 bytes"],
        ),
        row(
            "cluster-bits-22",
            |b| put32(b, CLUSTER_BITS, 22),
            &["invalid cluster_bits 22", "2 MiB"],
        ),
        row(
            "header-length-100",
            |b| put32(b, HEADER_LENGTH, 100),
            &["invalid header_length 100", "at least 104"],
        ),
        row(
            "header-length-past-cluster",
            move |b| put32(b, HEADER_LENGTH, cs as u32 + 8),
            &[
                &format!("invalid header_length {}", cs + 8),
                "exceeds the cluster size",
            ],
        ),
        row(
            "refcount-order-7",
            |b| put32(b, REFCOUNT_ORDER, 7),
            &["invalid refcount_order 7", "64 bits"],
        ),
        row(
            "unknown-incompatible-bit-unnamed",
            |b| set_bits64(b, INCOMPATIBLE_FEATURES, 1 << 20),
            &["unsupported incompatible features 0x100000"],
        ),
        row(
            "unknown-incompatible-bits-named",
            |b| {
                set_bits64(b, INCOMPATIBLE_FEATURES, (1 << 20) | (1 << 33));
                let mut exts = extensions(b);
                let table = exts
                    .iter_mut()
                    .find(|(k, _)| *k == EXT_FEATURE_TABLE)
                    .expect("qemu-img writes a feature name table");
                table
                    .1
                    .extend(feature_entry(0, 20, "hostile future feature"));
                set_extensions(b, &exts);
            },
            &[
                "unsupported incompatible features 0x200100000",
                "hostile future feature",
            ],
        ),
        row(
            "compression-type-2",
            |b| b[COMPRESSION_TYPE] = 2,
            &["invalid compression_type 2", "unknown compression type"],
        ),
        row(
            "compression-bit-with-zlib",
            |b| set_bits64(b, INCOMPATIBLE_FEATURES, INCOMPAT_COMPRESSION),
            &["invalid compression_type 0", "bit is set"],
        ),
        row(
            "zstd-without-compression-bit",
            |b| b[COMPRESSION_TYPE] = 1,
            &[
                "invalid compression_type 1",
                "without the compression type bit",
            ],
        ),
        row(
            "extended-l2-with-8k-clusters",
            |b| {
                set_bits64(b, INCOMPATIBLE_FEATURES, INCOMPAT_EXTL2);
                put32(b, CLUSTER_BITS, 13);
            },
            &["invalid cluster_bits 13", "extended L2"],
        ),
        row(
            "data-file-raw-without-data-file",
            |b| set_bits64(b, AUTOCLEAR_FEATURES, AUTOCLEAR_DATA_FILE_RAW),
            &["invalid autoclear_features 2", "data-file-raw"],
        ),
        row(
            "backing-file-size-1024",
            |b| {
                put64(b, BACKING_FILE_OFFSET, 0x1000);
                put32(b, BACKING_FILE_SIZE, 1024);
                b[0x1000..0x1400].fill(b'a');
            },
            &["invalid backing_file_size 1024", "1023"],
        ),
        row(
            "backing-name-past-first-cluster",
            move |b| {
                put64(b, BACKING_FILE_OFFSET, cs - 4);
                put32(b, BACKING_FILE_SIZE, 10);
            },
            &[
                &format!("invalid backing_file_offset {}", cs - 4),
                "first cluster",
            ],
        ),
        row(
            "backing-name-offset-huge",
            |b| {
                put64(b, BACKING_FILE_OFFSET, 1 << 40);
                put32(b, BACKING_FILE_SIZE, 4);
            },
            &["invalid backing_file_offset 1099511627776", "first cluster"],
        ),
        row(
            "l1-size-over-32mib",
            |b| put32(b, L1_SIZE, 4 * 1024 * 1024 + 1),
            &["invalid l1_size 4194305", "too large"],
        ),
        row(
            "l1-size-too-small-for-size",
            |b| put64(b, SIZE, 1 << 40),
            &[
                &format!("invalid l1_size {}", g.l1_size),
                "too small for the virtual size",
            ],
        ),
        row(
            "size-too-big",
            |b| put64(b, SIZE, 1 << 62),
            &["invalid size 4611686018427387904", "too big"],
        ),
        row(
            "size-u64-max",
            |b| put64(b, SIZE, u64::MAX),
            &["invalid size 18446744073709551615", "too big"],
        ),
        row(
            "l1-size-zero",
            |b| put32(b, L1_SIZE, 0),
            &["invalid l1_size 0", "too small for the virtual size"],
        ),
        row(
            "l1-offset-unaligned",
            move |b| put64(b, L1_TABLE_OFFSET, g.l1_offset + 512),
            &[
                &format!("invalid l1_table_offset {}", g.l1_offset + 512),
                "not aligned",
            ],
        ),
        row(
            "l1-past-i64-max",
            |b| {
                put64(b, L1_TABLE_OFFSET, 0x7fff_ffff_ffff_0000);
                put32(b, L1_SIZE, 0x1_0000);
            },
            &[
                "invalid l1_table_offset 9223372036854710272",
                "past the largest file offset",
            ],
        ),
        row(
            "refcount-table-over-8mib",
            move |b| put32(b, REFCOUNT_TABLE_CLUSTERS, rt_limit_clusters),
            &[
                &format!("invalid refcount_table_clusters {rt_limit_clusters}"),
                "8 MiB",
            ],
        ),
        row(
            "refcount-table-clusters-0",
            |b| put32(b, REFCOUNT_TABLE_CLUSTERS, 0),
            &["invalid refcount_table_clusters 0"],
        ),
        row(
            "refcount-table-clusters-u32-max",
            |b| put32(b, REFCOUNT_TABLE_CLUSTERS, u32::MAX),
            &["invalid refcount_table_clusters 4294967295"],
        ),
        row(
            "refcount-table-offset-unaligned",
            move |b| put64(b, REFCOUNT_TABLE_OFFSET, g.rt_offset + 8),
            &[
                &format!("invalid refcount_table_offset {}", g.rt_offset + 8),
                "not aligned",
            ],
        ),
        row(
            "nb-snapshots-65537",
            |b| put32(b, NB_SNAPSHOTS, 65537),
            &["invalid nb_snapshots 65537", "65536"],
        ),
        row(
            "snapshots-offset-unaligned",
            |b| {
                put32(b, NB_SNAPSHOTS, 1);
                put64(b, SNAPSHOTS_OFFSET, 0x5_0008);
            },
            &["invalid snapshots_offset 327688", "not aligned"],
        ),
        row(
            "snapshot-extra-data-1025",
            move |b| put32(b, to_usize(snap.snapshots_offset) + 36, 1025),
            &["invalid snapshot extra_data_size 1025", "1024"],
        )
        .on_snapshot_image(),
        row(
            "extension-longer-than-header-area",
            move |b| {
                set_extensions(b, &[]);
                put32(b, hl, 0x1234_5678);
                put32(b, hl + 4, cs as u32);
            },
            &[
                &format!("invalid header extension length {cs}"),
                "too large",
            ],
        ),
        row(
            "backing-format-extension-16-bytes",
            |b| add_extension(b, EXT_BACKING_FORMAT, b"qcow2qcow2qcow2q".to_vec()),
            &["invalid backing format extension length 16"],
        ),
        row(
            "bitmaps-extension-length-16",
            |b| add_extension(b, EXT_BITMAPS, vec![0; 16]),
            &["invalid bitmaps extension length 16", "24"],
        ),
        row(
            "bitmaps-extension-reserved-nonzero",
            |b| {
                set_bits64(b, AUTOCLEAR_FEATURES, AUTOCLEAR_BITMAPS);
                add_extension(b, EXT_BITMAPS, bitmaps_ext(1, 7, 64, 0x5_0000));
            },
            &["invalid bitmaps extension reserved field 7", "zero"],
        ),
        row(
            "bitmaps-extension-zero-bitmaps",
            |b| {
                set_bits64(b, AUTOCLEAR_FEATURES, AUTOCLEAR_BITMAPS);
                add_extension(b, EXT_BITMAPS, bitmaps_ext(0, 0, 0, 0x5_0000));
            },
            &["invalid nb_bitmaps 0"],
        ),
        row(
            "bitmap-directory-unaligned",
            |b| {
                set_bits64(b, AUTOCLEAR_FEATURES, AUTOCLEAR_BITMAPS);
                add_extension(b, EXT_BITMAPS, bitmaps_ext(1, 0, 64, 0x5_0008));
            },
            &["invalid bitmap_directory_offset 327688", "not aligned"],
        ),
        row(
            "crypto-extension-length-8",
            |b| add_extension(b, EXT_CRYPTO, vec![0; 8]),
            &["invalid encryption header extension length 8", "16"],
        ),
        // (crypt_method 1, the legacy AES method, has nothing to check
        // before a passphrase: the image opens for its metadata.)
        row(
            "crypt-method-luks",
            |b| put32(b, CRYPT_METHOD, 2),
            &["Missing CRYPTO header for crypt method 2"],
        ),
        row(
            "crypt-method-3",
            |b| put32(b, CRYPT_METHOD, 3),
            &["invalid crypt_method 3", "encryption method"],
        ),
    ]
}

/// Opens `bytes` for reading and for writing (in memory), bounded: the two
/// outcomes, Ok or the error's text.
fn open_both(case: &str, bytes: &Arc<Vec<u8>>) -> (Result<(), String>, Result<(), String>) {
    let b = Arc::clone(bytes);
    bounded(case, move || {
        let ro = Image::open(b.to_vec(), &OpenOptions::default())
            .map(|_| ())
            .map_err(|e| e.to_string());
        let rw = WritableImage::open(Capped::new(b.to_vec()), &OpenOptions::default())
            .map(|_| ())
            .map_err(|e| e.to_string());
        (ro, rw)
    })
}

#[test]
fn hostile_headers_are_refused_naming_field_and_value() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let snap = snapshot_image(d);
    let g = Geom::of(&plain);
    let sg = Geom::of(&snap);
    assert_eq!(get32(&snap, NB_SNAPSHOTS), 1);
    for (name, b) in [("plain base", &plain), ("snapshot base", &snap)] {
        let both = open_both(name, &Arc::new(b.clone()));
        assert_eq!(both, (Ok(()), Ok(())), "{name}");
    }

    let mut failures = Vec::new();
    for r in rows(g, sg) {
        let mut bytes = if r.snapshot_base {
            snap.clone()
        } else {
            plain.clone()
        };
        (r.patch)(&mut bytes);
        let file = format!("{}.qcow2", r.name);
        std::fs::write(s.path(&file), &bytes).unwrap();

        // Refused for reading, naming the field and value, and for writing
        // with the same error.
        let bytes = Arc::new(bytes);
        let (ro, rw) = open_both(r.name, &bytes);
        let msg = match ro {
            Err(m) => m,
            Ok(()) => {
                failures.push(format!("{}: Image::open accepted the image", r.name));
                continue;
            }
        };
        for w in &r.want {
            if !msg.contains(w.as_str()) {
                failures.push(format!("{}: message {msg:?} lacks {w:?}", r.name));
            }
        }
        if rw.as_ref() != Err(&msg) {
            failures.push(format!(
                "{}: WritableImage::open gave {rw:?}, not the read-only open's {msg:?}",
                r.name
            ));
        }

        // The CLI reports the same message on stderr and exits 1, reading
        // (`info`) and writing (`bench -w`, which leaves the file as it was).
        let info = ours(r.name, d, &["info", "-f", "qcow2", &file]);
        let bench = bench_write(r.name, d, &file);
        for (what, out, prefix) in [
            ("info", &info, "qcow2: Could not open".to_string()),
            (
                "bench -w",
                &bench,
                format!("qcow2: bench: Could not open '{file}': "),
            ),
        ] {
            let err = stderr_of(out);
            if code(out) != 1 || !err.starts_with(&prefix) || !err.contains(&msg) {
                failures.push(format!(
                    "{}: `qcow2 {what}` exited {} with stderr {err:?} (want 1, {prefix:?} and {msg:?})",
                    r.name,
                    code(out)
                ));
            }
        }
        if std::fs::read(s.path(&file)).unwrap() != *bytes {
            failures.push(format!("{}: `qcow2 bench -w` changed the file", r.name));
        }

        // QEMU refuses to open it too, for reading and for writing.
        for (mode, q) in [
            ("read-only", qemu_open_ro(r.name, d, &file)),
            ("read-write", qemu_open_rw(r.name, d, &file)),
        ] {
            if q.status.success() || !output_text(&q).contains("can't open device") {
                failures.push(format!(
                    "{}: qemu-io opens it {mode} ({}) but we refuse it with {msg:?}",
                    r.name,
                    output_text(&q).trim()
                ));
            }
        }
    }
    print_largest_peak("hostile headers");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Every operation of the write script succeeds.
fn all_ok() -> [Expect; 5] {
    std::array::from_fn(|_| Ok(()))
}

/// QEMU ignores a bitmaps extension whose autoclear bit is clear (it was
/// left behind by a program without bitmap support) after checking only its
/// length: such an image must open, for reading and for writing, and take
/// writes that leave it clean.
#[test]
fn stale_bitmaps_extension_is_ignored_like_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    for (name, ext) in [
        ("stale-zero-bitmaps", bitmaps_ext(0, 0, 0, 0)),
        ("stale-reserved", bitmaps_ext(1, 7, 64, 0x5_0008)),
    ] {
        let mut b = plain.clone();
        add_extension(&mut b, EXT_BITMAPS, ext);
        let file = format!("{name}.qcow2");
        std::fs::write(s.path(&file), &b).unwrap();
        let q = qemu_open_ro(name, d, &file);
        assert!(q.status.success(), "{name}: qemu-io refuses it: {q:?}");
        let b = Arc::new(b);
        assert_eq!(open_both(name, &b), (Ok(()), Ok(())), "{name}");

        // Writes succeed and leave a clean image that reads back.
        let w = expect_script(&format!("{name} (in memory)"), &b, &all_ok());
        assert!(!w.corrupt, "{name}");
        judge_with_qemu(&format!("{name}-written"), d, &w, 0, &[]);
        // So through the CLI, as through qemu-io.
        let out = bench_write(name, d, &file);
        assert_eq!(code(&out), 0, "{name}: {}", output_text(&out));
        assert_eq!(qemu_problems(name, d, &file), (0, vec![]), "{name}");
        let (text, corrupt) = qemu_writes(
            name,
            d,
            &format!("{name}-qemu.qcow2"),
            &b,
            &["write -P 0xa5 0 4k"],
        );
        assert!(
            !text.contains("failed") && !corrupt,
            "{name}: qemu-io: {text}"
        );
    }
    print_largest_peak("stale bitmaps");
}

#[test]
fn luks_images_without_a_passphrase_open_for_metadata_only() {
    let s = Scratch::new();
    let d = s.dir();
    let secret = "secret,id=sec0,data=abc";
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            secret,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "x.qcow2",
            "1M",
        ],
    );
    qcowkit_tests::ok_in(
        d,
        "qemu-io",
        &[
            "--object",
            secret,
            "--image-opts",
            "driver=qcow2,file.filename=x.qcow2,encrypt.key-secret=sec0",
            "-c",
            "write -P 7 0 64k",
        ],
    );
    let bytes = Arc::new(std::fs::read(s.path("x.qcow2")).unwrap());
    assert_eq!(get32(&bytes, CRYPT_METHOD), 2);
    let b = Arc::clone(&bytes);
    let (read, rw) = bounded("luks", move || {
        let mut img = Image::open(b.to_vec(), &OpenOptions::default()).expect("metadata opens");
        let read = img.read_at(0, &mut [0u8; 512]).map_err(|e| {
            (
                matches!(e, Error::Encrypted { method: "luks" }),
                e.to_string(),
            )
        });
        let rw = WritableImage::open(Capped::new(b.to_vec()), &OpenOptions::default())
            .map(|_| ())
            .map_err(|e| e.to_string());
        (read, rw)
    });
    let want = "image is encrypted with luks: a passphrase is required to open it";
    assert_eq!(read, Err((true, want.to_string())));
    assert_eq!(rw, Err(want.to_string()));

    let out = ours("luks", d, &["convert", "-O", "raw", "x.qcow2", "x.raw"]);
    assert_cli_error("luks convert", &out, &[want]);
    let out = bench_write("luks", d, "x.qcow2");
    assert_cli_error("luks bench -w", &out, &["Could not open 'x.qcow2'", want]);
    assert!(
        std::fs::read(s.path("x.qcow2")).unwrap() == *bytes,
        "bench -w changed the file"
    );
    print_largest_peak("luks");
}

// ---------------------------------------------------------------------------
// Reading and writing through corrupt metadata.

/// Opens `bytes` (which must open) and reads `len` bytes at `offset`,
/// expecting an error whose message contains every string of `want`.
fn expect_read_error(case: &str, bytes: &Arc<Vec<u8>>, offset: u64, len: usize, want: &[&str]) {
    let b = Arc::clone(bytes);
    let r = bounded(case, move || {
        let mut img = Image::open(b.to_vec(), &OpenOptions::default())
            .unwrap_or_else(|e| panic!("open failed: {e}"));
        let mut buf = vec![0u8; len];
        img.read_at(offset, &mut buf).map_err(|e| e.to_string())
    });
    let err = r.expect_err("a read through corrupt metadata succeeded");
    for w in want {
        assert!(err.contains(w), "{case}: error {err:?} lacks {w:?}");
    }
}

/// The write path of an image whose guest cluster 0 is reached through a
/// corrupt pointer: the write script in memory does what `want` says (the
/// writes through the pointer are refused naming it, as reads are), the
/// writes elsewhere succeed, and `qemu-img check` then reports `after`, or
/// (None) what it reported before: the refused writes changed nothing. `qcow2 bench -w`
/// (a write of guest cluster 0) fails with `words` and leaves the file
/// unchanged.
///
/// QEMU fails the same write with EIO too, but treats it as a fatal
/// corruption event: it marks the image corrupt (refusing every later
/// write, "No medium found"). We refuse the accesses through the bad
/// pointer only and do not set the corrupt bit (the overlap guard sets it
/// when a write would land on metadata).
fn corrupt_pointer_writes(
    case: &str,
    d: &Path,
    bytes: &Arc<Vec<u8>>,
    want: &[Expect; 5],
    words: &[&str],
    after: Option<&[&str]>,
) {
    let file = format!("{case}.orig.qcow2");
    std::fs::write(d.join(&file), bytes.as_slice()).unwrap();
    let (exit, before) = qemu_problems(case, d, &file);
    assert_eq!(
        exit, 2,
        "{case}: qemu-img check flags the image: {before:?}"
    );

    let w = expect_script(case, bytes, want);
    assert!(!w.corrupt, "{case}: marked corrupt");
    assert_eq!(
        get64(&w.bytes, INCOMPATIBLE_FEATURES),
        get64(bytes, INCOMPATIBLE_FEATURES),
        "{case}: feature bits"
    );
    if w.results[..4].iter().all(Result::is_err) {
        assert!(
            w.bytes == **bytes,
            "{case}: refused writes changed the image"
        );
    }
    let before: Vec<&str> = before.iter().map(String::as_str).collect();
    judge_with_qemu(
        &format!("{case}-written"),
        d,
        &w,
        exit,
        after.unwrap_or(&before),
    );

    let out = bench_write(case, d, &file);
    assert_cli_error(case, &out, words);
    assert!(
        std::fs::read(d.join(&file)).unwrap() == **bytes,
        "{case}: `qcow2 bench -w` changed the file"
    );

    let (text, corrupt) = qemu_writes(
        case,
        d,
        &format!("{case}.qemu.qcow2"),
        bytes,
        &["write -P 0xa5 0 4k"],
    );
    assert!(
        text.contains("write failed: Input/output error")
            && text.contains("Marking image as corrupt")
            && corrupt,
        "{case}: qemu-io: {text}"
    );
}

#[test]
fn unaligned_l2_table_is_a_read_and_write_error() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let g = Geom::of(&plain);
    let l2 = g.l2_table(&plain, 0) as u64;
    let mut b = plain.clone();
    put64(&mut b, g.l1_entry(0), COPIED | (l2 + 512));
    let b = Arc::new(b);
    let value = format!("{:#x}", l2 + 512);
    let words = ["unaligned L2 table", value.as_str()];
    expect_read_error("unaligned L2 table", &b, 0, 512, &words);
    // One L2 table maps the whole 1 MiB disk: every write goes through it.
    let refused = fails(&words);
    corrupt_pointer_writes(
        "unaligned-l2",
        d,
        &b,
        &[
            refused.clone(),
            refused.clone(),
            refused.clone(),
            refused,
            Ok(()),
        ],
        &words,
        None,
    );
    print_largest_peak("unaligned L2");
}

#[test]
fn unaligned_data_cluster_is_a_read_and_write_error() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let g = Geom::of(&plain);
    let l2 = g.l2_table(&plain, 0);
    let data = get64(&plain, l2) & OFFSET_MASK;
    let mut b = plain.clone();
    put64(&mut b, l2, COPIED | (data + 512));
    let b = Arc::new(b);
    let value = format!("{:#x}", data + 512);
    let words = ["not aligned", value.as_str()];
    expect_read_error("unaligned data cluster", &b, 0, 512, &words);
    // qemu-img check counts the unaligned entry as a reference to the 64
    // KiB from 0x50200, which reaches into cluster 6 (guest cluster 1's
    // data): "cluster 6 refcount=1 reference=2" before. Zeroing guest
    // cluster 1 frees cluster 6, rightly; only the bogus reference is left.
    corrupt_pointer_writes(
        "unaligned-data",
        d,
        &b,
        &[fails(&words), Ok(()), Ok(()), Ok(()), Ok(())],
        &words,
        Some(&[
            "ERROR offset=50200: Data cluster is not properly aligned; L2 entry corrupted.",
            "ERROR cluster 6 refcount=0 reference=1",
        ]),
    );
    print_largest_peak("unaligned data");
}

#[test]
fn subcluster_both_allocated_and_zero_is_a_read_and_write_error() {
    let s = Scratch::new();
    let d = s.dir();
    let e = extl2_image(d);
    let g = Geom::of(&e);
    assert_ne!(get64(&e, INCOMPATIBLE_FEATURES) & INCOMPAT_EXTL2, 0);
    let l2 = g.l2_table(&e, 0);
    assert_eq!(
        get64(&e, l2 + 8),
        0xffff_ffff,
        "all 32 subclusters allocated"
    );
    let mut b = e.clone();
    let bitmap = 0x0000_0001_ffff_ffffu64;
    put64(&mut b, l2 + 8, bitmap);
    let b = Arc::new(b);
    let value = format!("{bitmap:#x}");
    let words = ["subcluster bitmap", value.as_str()];
    expect_read_error("allocated and zero subcluster", &b, 0, 512, &words);
    corrupt_pointer_writes(
        "allocated-and-zero",
        d,
        &b,
        &[fails(&words), Ok(()), Ok(()), Ok(()), Ok(())],
        &words,
        None,
    );
    print_largest_peak("subcluster");
}

/// Garbage where a compressed cluster's data should be: reading it, or
/// writing part of it (which needs its old contents), fails naming the
/// host offset; QEMU fails both with EIO too, without marking the image
/// corrupt. Overwriting the whole cluster needs no old contents: it
/// succeeds, and the image then checks clean, for us as for QEMU.
#[test]
fn garbage_compressed_clusters_are_decompression_errors() {
    let s = Scratch::new();
    let d = s.dir();
    for ctype in ["zlib", "zstd"] {
        let (mut b, raw) = compressed_image(d, ctype);
        let g = Geom::of(&b);
        let cs = to_usize(g.cluster_size);
        let l2 = g.l2_table(&b, 0);
        let entry = get64(&b, l2);
        assert_ne!(entry & COMPRESSED, 0, "{ctype}: cluster 0 is compressed");
        let valid = Arc::new(b.clone());
        let first = bounded(&format!("{ctype}: valid image"), move || {
            let mut img = Image::open(valid.to_vec(), &OpenOptions::default()).unwrap();
            let mut buf = vec![0u8; cs];
            img.read_at(0, &mut buf).unwrap();
            buf
        });
        assert!(first == raw[..cs], "{ctype}: valid image reads back");

        let (off, len) = compressed_extent(entry, g.cluster_bits);
        let end = (off + len).min(b.len());
        b[off..end].fill(0xff);
        let file = format!("garbage-{ctype}.qcow2");
        std::fs::write(s.path(&file), &b).unwrap();
        let b = Arc::new(b);
        let host = format!("{off:#x}");

        let bb = Arc::clone(&b);
        let err = bounded(&format!("{ctype}: decompressing garbage"), move || {
            let mut img = Image::open(bb.to_vec(), &OpenOptions::default()).unwrap();
            let mut buf = vec![0u8; cs];
            let err = img.read_at(0, &mut buf).expect_err("garbage decompressed");
            let offset = match err {
                Error::Decompress { host_offset, .. } => Some(host_offset),
                _ => None,
            };
            (offset, err.to_string())
        });
        assert_eq!(err.0, Some(off as u64), "{ctype}: {}", err.1);
        assert!(
            err.1
                .starts_with("cannot decompress cluster at host offset")
                && err.1.contains(&host),
            "{ctype}: {}",
            err.1
        );

        // A partial write needs the old contents: refused the same way,
        // changing nothing (no cluster allocated for the copy stays
        // allocated); the other writes of the script succeed, and the image
        // checks clean afterwards, as it does after QEMU's refused write.
        let words = ["cannot decompress cluster at host offset", host.as_str()];
        let case = format!("garbage-{ctype}-written");
        let w = expect_script(&case, &b, &[fails(&words), Ok(()), Ok(()), Ok(()), Ok(())]);
        judge_with_qemu(&case, d, &w, 0, &[]);
        let bb = Arc::clone(&b);
        let whole = bounded(&format!("{ctype}: overwriting garbage"), move || {
            let mut w =
                WritableImage::open(Capped::new(bb.to_vec()), &OpenOptions::default()).unwrap();
            let ops = (
                w.write_at(0, &vec![0x3c; cs]).map_err(|e| e.to_string()),
                w.flush().map_err(|e| e.to_string()),
            );
            let mut buf = vec![0u8; cs];
            (
                ops,
                w.read_at(0, &mut buf)
                    .map(|()| buf)
                    .map_err(|e| e.to_string()),
                w.into_inner().bytes,
            )
        });
        assert_eq!(whole.0, (Ok(()), Ok(())), "{ctype}");
        assert!(
            whole.1.is_ok_and(|buf| buf.iter().all(|&x| x == 0x3c)),
            "{ctype}: reads back"
        );
        let over = format!("garbage-{ctype}-overwritten.qcow2");
        std::fs::write(s.path(&over), &whole.2).unwrap();
        assert_eq!(qemu_problems(&over, d, &over), (0, vec![]), "{ctype}");

        let out = ours(&file, d, &["convert", "-O", "raw", &file, "garbage.raw"]);
        assert_cli_error(&file, &out, &words);
        let out = bench_write(&file, d, &file);
        assert_cli_error(&file, &out, &words);
        assert!(
            std::fs::read(s.path(&file)).unwrap() == *b,
            "{ctype}: bench -w changed the file"
        );

        // QEMU: the same partial write fails, without marking the image
        // corrupt; the whole-cluster write succeeds.
        let (text, corrupt) = qemu_writes(
            &file,
            d,
            "q.qcow2",
            &b,
            &["write -P 0xa5 0 4k", "write -P 0x3c 0 64k"],
        );
        assert!(
            text.contains("write failed: Input/output error")
                && text.contains("wrote 65536/65536 bytes at offset 0")
                && !corrupt,
            "{ctype}: qemu-io: {text}"
        );
    }
    print_largest_peak("garbage compressed");
}

/// An L1 entry pointing past the end of the file: the L2 table reads as
/// zeros (as in QEMU, whose reads past the end of a file return zeros), so
/// the disk reads as zeros, and `check` reports the reference past the end
/// exactly as `qemu-img check` does. Writing updates the L2 table where the
/// entry says, as QEMU does: on a file that makes the file sparse up to it
/// (and the image reads back and checks as QEMU's does after the same
/// write); in memory the storage refuses to grow to 1 TiB, and the flush
/// reports that I/O error.
#[test]
fn l2_table_past_end_of_file_reads_zeros_and_writes_there_like_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let g = Geom::of(&plain);
    let far = 1u64 << 40;
    let mut b = plain.clone();
    put64(&mut b, g.l1_entry(0), COPIED | far);
    std::fs::write(s.path("far-l2.qcow2"), &b).unwrap();
    let b = Arc::new(b);
    let size = to_usize(g.size);

    let bb = Arc::clone(&b);
    let (read, check) = bounded("L2 table past EOF: read and check", move || {
        let mut img = Image::open(bb.to_vec(), &OpenOptions::default()).unwrap();
        let mut buf = vec![0x77u8; size];
        let read = img
            .read_at(0, &mut buf)
            .map(|()| buf.iter().all(|&x| x == 0));
        let check = img
            .check()
            .map(|r| (r.corruptions, r.leaks, r.check_errors, r.messages));
        (
            read.map_err(|e| e.to_string()),
            check.map_err(|e| e.to_string()),
        )
    });
    assert_eq!(read, Ok(true), "a missing L2 table reads zeros");
    let (corruptions, leaks, check_errors, messages) = check.expect("check runs");
    assert_eq!(
        (corruptions, leaks, check_errors),
        (2, 3, 0),
        "{messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains(&format!("offset {far:#x} size 0x10000")))
            && messages
                .iter()
                .any(|m| m.starts_with("ERROR OFLAG_COPIED L2 cluster")),
        "{messages:#?}"
    );
    let q = run_bounded(
        "far-l2 qemu-io",
        d,
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read -P 0 0 1M", "far-l2.qcow2"],
    );
    assert!(
        code(&q) == 0 && !output_text(&q).contains("fail"),
        "qemu-io reads zeros too: {}",
        output_text(&q)
    );
    let qc = run_bounded("far-l2 check", d, "qemu-img", &["check", "far-l2.qcow2"]);
    let oc = ours("far-l2 check", d, &["check", "far-l2.qcow2"]);
    assert_eq!(code(&qc), 2);
    assert_eq!(
        (code(&oc), stdout_of(&oc)),
        (code(&qc), stdout_of(&qc)),
        "`qcow2 check` reports what `qemu-img check` does (stderr {})",
        stderr_of(&oc)
    );

    // The same through files and the CLI.
    let path = s.path("far-l2.qcow2");
    let disk_read = bounded("L2 table past EOF: Disk", move || {
        let mut disk = Disk::open(&path, &DiskOptions::default()).unwrap();
        let mut buf = vec![0x77u8; 4096];
        disk.read_at(0, &mut buf)
            .map(|()| buf.iter().all(|&x| x == 0))
            .map_err(|e| e.to_string())
    });
    assert_eq!(disk_read, Ok(true));
    let out = ours(
        "far-l2 convert",
        d,
        &["convert", "-O", "raw", "far-l2.qcow2", "far.raw"],
    );
    assert_eq!(code(&out), 0, "{}", output_text(&out));
    let raw = std::fs::read(s.path("far.raw")).unwrap();
    assert!(
        raw.len() == size && raw.iter().all(|&x| x == 0),
        "converted to zeros"
    );

    // Writing in memory: the writes succeed; the flush writes the L2 table
    // at 1 TiB, past what the storage holds, and fails with its I/O error.
    let past = past_cap(far, to_usize(g.cluster_size));
    let w = expect_script(
        "far-l2 write script",
        &b,
        &[Ok(()), Ok(()), Ok(()), Ok(()), fails(&[&past])],
    );
    assert!(!w.corrupt);

    // Writing a file, with the L2 table at 1 GiB: as QEMU, the table is
    // written there, the file becomes sparse up to it, the data reads back,
    // and `qemu-img check` then says what it says after QEMU's write.
    let gib = 1u64 << 30;
    let mut b = plain.clone();
    put64(&mut b, g.l1_entry(0), COPIED | gib);
    std::fs::write(s.path("gib-l2.qcow2"), &b).unwrap();
    let out = bench_write("gib-l2", d, "gib-l2.qcow2");
    assert_eq!(code(&out), 0, "{}", output_text(&out));
    let len = std::fs::metadata(s.path("gib-l2.qcow2")).unwrap().len();
    assert_eq!(len, gib + g.cluster_size, "the file ends with the L2 table");
    let (text, corrupt) = qemu_writes(
        "gib-l2",
        d,
        "gib-l2-qemu.qcow2",
        &b,
        &["write -P 0xa5 0 4k"],
    );
    assert!(!text.contains("fail") && !corrupt, "qemu-io: {text}");
    let q_len = std::fs::metadata(s.path("gib-l2-qemu.qcow2"))
        .unwrap()
        .len();
    assert_eq!(q_len, len, "QEMU's file ends there too");
    for file in ["gib-l2.qcow2", "gib-l2-qemu.qcow2"] {
        let q = run_bounded(
            file,
            d,
            "qemu-io",
            &[
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read -P 0xa5 0 4k",
                "-c",
                "read -P 0 4k 1020k",
                file,
            ],
        );
        assert!(
            code(&q) == 0 && !output_text(&q).contains("fail"),
            "{file}: {}",
            output_text(&q)
        );
    }
    let ours_after = run_bounded("gib-l2", d, "qemu-img", &["check", "gib-l2.qcow2"]);
    let qemu_after = run_bounded("gib-l2", d, "qemu-img", &["check", "gib-l2-qemu.qcow2"]);
    assert_eq!(code(&ours_after), 2);
    assert_eq!(
        (code(&ours_after), output_text(&ours_after)),
        (
            code(&qemu_after),
            output_text(&qemu_after).replace("gib-l2-qemu", "gib-l2")
        ),
    );
    print_largest_peak("L2 table past EOF");
}

/// One truncation of the plain image and what it must do.
struct Cut {
    what: &'static str,
    len: usize,
    /// The open's error (reading and writing), or None when it opens.
    refused: Option<&'static str>,
    /// Bytes of guest data (0x5a) still in the file; the rest reads as zeros.
    data_left: usize,
    /// `qemu-img check` after the write script: exit code and problems.
    after: (i32, &'static [&'static str]),
}

fn cuts(plain: &[u8]) -> Vec<Cut> {
    let g = Geom::of(plain);
    let cs = to_usize(g.cluster_size);
    let l2 = g.l2_table(plain, 0);
    let data = to_usize(get64(plain, l2) & OFFSET_MASK);
    let rt = to_usize(g.rt_offset);
    let rb = g.refcount_block(plain);
    let l1 = to_usize(g.l1_offset);
    // The qemu-img layout the expectations below name by cluster number.
    assert_eq!((rt, rb, l1, l2, data), (cs, 2 * cs, 3 * cs, 4 * cs, 5 * cs));
    // After writes to an image whose refcount table is gone, the header,
    // refcount table and L1 table (clusters 0, 1, 3) still have no refcount:
    // the damage the truncation did, no more. The new clusters are counted.
    const LOST_REFCOUNTS: &[&str] = &[
        "ERROR cluster 0 refcount=0 reference=1",
        "ERROR cluster 1 refcount=0 reference=1",
        "ERROR cluster 3 refcount=0 reference=1",
    ];
    // Tables lost with the L1 table leave their clusters leaked.
    const L1_LOST: &[&str] = &[
        "Leaked cluster 4 refcount=1 reference=0",
        "Leaked cluster 5 refcount=1 reference=0",
        "Leaked cluster 6 refcount=1 reference=0",
    ];
    let short = "invalid header_length 0 (0x0): version 3 header must be at least 104 bytes";
    let cut = |what, len, refused, data_left, after| Cut {
        what,
        len,
        refused,
        data_left,
        after,
    };
    vec![
        cut(
            "empty",
            0,
            Some("not a qcow2 image (magic 0x00000000, expected 0x514649fb)"),
            0,
            (0, &[]),
        ),
        cut("50 bytes", 50, Some(short), 0, (0, &[])),
        cut("100 bytes", 100, Some(short), 0, (0, &[])),
        cut("104 bytes", 104, None, 0, (2, LOST_REFCOUNTS)),
        cut("header", g.header_length, None, 0, (2, LOST_REFCOUNTS)),
        cut("first cluster", cs, None, 0, (2, LOST_REFCOUNTS)),
        cut("refcount table", rt + 4, None, 0, (2, LOST_REFCOUNTS)),
        cut(
            "refcount block",
            rb + 10,
            None,
            0,
            (3, &["Leaked cluster 4 refcount=1 reference=0"]),
        ),
        cut("before L1", l1, None, 0, (3, L1_LOST)),
        // Half an L1 entry: 0x8000000000000000, "copied" at offset 0; it
        // reads as unallocated (QEMU's reads agree; its check reads the
        // header as an L2 table, and qemu-io's write aborts on an assertion,
        // "qcow2_cache_do_get: Assertion `offset != 0' failed").
        cut("half an L1 entry", l1 + 4, None, 0, (3, L1_LOST)),
        cut("L2 table", l2 + 100, None, 0, (0, &[])),
        cut("first data cluster", data + 1000, None, 1000, (0, &[])),
    ]
}

/// Truncated files: too short for a header, they are refused (for reading
/// and writing) as QEMU refuses them ("qcow2 header too short"); otherwise
/// what is missing reads as zeros, exactly as QEMU reads it, and the write
/// script succeeds (QEMU refuses the writes when the refcount table is
/// gone: its allocator, finding every refcount 0, picks the refcount
/// table's cluster and its overlap check marks the image corrupt; ours
/// never allocates metadata) and leaves no damage beyond the truncation's.
#[test]
fn truncated_images_fail_cleanly() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let size = to_usize(Geom::of(&plain).size);
    for c in cuts(&plain) {
        let case = format!("truncated at {} ({})", c.len, c.what);
        let bytes = Arc::new(plain[..c.len].to_vec());
        let file = format!("cut-{}.qcow2", c.len);
        std::fs::write(s.path(&file), bytes.as_slice()).unwrap();
        if let Some(msg) = c.refused {
            assert_eq!(
                open_both(&case, &bytes),
                (Err(msg.to_string()), Err(msg.to_string())),
                "{case}"
            );
            let q = qemu_open_ro(&case, d, &file);
            assert!(!q.status.success(), "{case}: qemu-io opens it");
            continue;
        }
        let b = Arc::clone(&bytes);
        let read = bounded(&case, move || {
            let mut img = Image::open(b.to_vec(), &OpenOptions::default()).unwrap();
            let mut buf = vec![0x77u8; size];
            img.read_at(0, &mut buf)
                .map(|()| buf)
                .map_err(|e| e.to_string())
        });
        let read = read.unwrap_or_else(|e| panic!("{case}: read failed: {e}"));
        let left = read.iter().take_while(|&&x| x == 0x5a).count();
        assert!(
            left == c.data_left && read[left..].iter().all(|&x| x == 0),
            "{case}: {left} bytes of data, then not only zeros"
        );
        let raw = format!("cut-{}.raw", c.len);
        let q = run_bounded(
            &case,
            d,
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", &file, &raw],
        );
        assert_eq!(code(&q), 0, "{case}: {}", output_text(&q));
        assert!(
            std::fs::read(s.path(&raw)).unwrap() == read,
            "{case}: QEMU reads other bytes"
        );

        let w = expect_script(&case, &bytes, &all_ok());
        assert!(!w.corrupt, "{case}");
        judge_with_qemu(
            &format!("cut-{}-written", c.len),
            d,
            &w,
            c.after.0,
            c.after.1,
        );
    }

    // The CLI on a 50-byte file, reading and writing.
    std::fs::write(s.path("short.qcow2"), &plain[..50]).unwrap();
    let short = "invalid header_length 0";
    let out = ours("short info", d, &["info", "-f", "qcow2", "short.qcow2"]);
    assert_cli_error("short info", &out, &["Could not open 'short.qcow2'", short]);
    let out = bench_write("short bench", d, "short.qcow2");
    assert_cli_error(
        "short bench -w",
        &out,
        &["Could not open 'short.qcow2'", short],
    );
    print_largest_peak("truncated");
}

/// `qcow2 check` on truncated files says what `qemu-img check` says, word
/// for word (files too short for a header: both exit 1), except on the
/// half L1 entry, where `qemu-img check` reads the header as an L2 table
/// (45 errors) while its reads, like ours, find nothing allocated: there
/// the image is clean.
#[test]
fn truncated_images_check_like_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    let plain = plain_image(d);
    let g = Geom::of(&plain);
    let mut failures = Vec::new();
    for c in cuts(&plain) {
        let case = format!("truncated at {} ({})", c.len, c.what);
        let file = format!("cut-{}.qcow2", c.len);
        std::fs::write(s.path(&file), &plain[..c.len]).unwrap();
        let q = run_bounded(&case, d, "qemu-img", &["check", "-f", "qcow2", &file]);
        let o = ours(&case, d, &["check", "-f", "qcow2", &file]);
        let (want_code, want_out) = if c.refused.is_some() {
            (1, String::new())
        } else if c.len == to_usize(g.l1_offset) + 4 {
            assert_eq!(code(&q), 2, "{case}: qemu-img check: {}", stdout_of(&q));
            (
                0,
                format!(
                    "No errors were found on the image.\nImage end offset: {}\n",
                    4 * g.cluster_size
                ),
            )
        } else {
            (code(&q), stdout_of(&q))
        };
        if code(&o) != want_code || stdout_of(&o) != want_out {
            failures.push(format!(
                "{case}: `qcow2 check` exits {} with\n{}{}want {want_code} with\n{want_out}",
                code(&o),
                stdout_of(&o),
                stderr_of(&o),
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Backing chains.

/// Opens `path` for reading and for writing (through the std adapter,
/// with `opts`), bounded: the two errors (an open that succeeds fails the
/// test).
fn open_errors(path: &Path, opts: &DiskOptions) -> (String, String) {
    let case = path.display().to_string();
    let p = path.to_path_buf();
    let o = opts.clone();
    let (ro, rw) = bounded(&case, move || {
        (
            retry_locked(|| Disk::open(&p, &o).map(|_| ()).map_err(|e| e.to_string())),
            retry_locked(|| {
                qcowkit_std::open_qcow2_rw(&p, &o.qcow2)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        )
    });
    (
        ro.err()
            .unwrap_or_else(|| panic!("{case}: opened for reading")),
        rw.err()
            .unwrap_or_else(|| panic!("{case}: opened for writing")),
    )
}

/// `open` again while it fails on a lock conflict (at most 1000 times):
/// other tests of this process start child processes, and a child holds a
/// copy of every open descriptor, with its lock, until it execs, so the
/// lock of a file this test has just closed can linger for a moment.
fn retry_locked(open: impl Fn() -> Result<(), String>) -> Result<(), String> {
    let mut r = open();
    for _ in 0..1000 {
        match &r {
            Err(e) if e.contains("Failed to get") && e.contains("lock") => {
                std::thread::yield_now();
                r = open();
            }
            _ => break,
        }
    }
    r
}

/// Opening `path` for reading and for writing fails with an error
/// containing `want`.
fn expect_open_error(path: &Path, opts: &DiskOptions, want: &str) {
    let (ro, rw) = open_errors(path, opts);
    for (mode, e) in [("reading", ro), ("writing", rw)] {
        assert!(
            e.contains(want),
            "{} ({mode}): {e} lacks {want:?}",
            path.display()
        );
    }
}

/// Images whose backing chains loop, made in `d`: A -> A, B -> A -> B, and
/// C -> link -> C where link.qcow2 is a symbolic link to C (loops are found
/// by file identity, not by name).
fn backing_loops(d: &Path) -> [&'static str; 4] {
    qemu_create(d, "self.qcow2", "", "1M");
    qemu_img(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    );
    qemu_create(d, "a.qcow2", "", "1M");
    qemu_overlay(d, "b.qcow2", "", ("a.qcow2", "qcow2"), Some("1M"));
    qemu_img(
        d,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    qemu_create(d, "c.qcow2", "", "1M");
    std::os::unix::fs::symlink("c.qcow2", d.join("link.qcow2")).unwrap();
    qemu_img(
        d,
        &["rebase", "-u", "-b", "link.qcow2", "-F", "qcow2", "c.qcow2"],
    );
    ["self.qcow2", "a.qcow2", "b.qcow2", "c.qcow2"]
}

/// Reading through a backing loop is an error naming the loop. (qemu-io -r
/// on a.qcow2 or b.qcow2 never finishes: it opens the chain again and again,
/// its memory growing; so QEMU is asked only through `qemu-img info
/// --backing-chain`, which finds the loop.)
#[test]
fn backing_loops_are_errors() {
    let s = Scratch::new();
    let d = s.dir();
    let no_backing = DiskOptions {
        qcow2: OpenOptions {
            no_backing: true,
            ..OpenOptions::default()
        },
        ..DiskOptions::default()
    };
    for name in backing_loops(d) {
        let (ro, _) = open_errors(&s.path(name), &DiskOptions::default());
        assert!(
            ro.starts_with("backing chain loops: '") && ro.ends_with("' appears twice"),
            "{name}: {ro}"
        );
        // Without following backing files the images are fine.
        let p = s.path(name);
        let o = no_backing.clone();
        bounded(name, move || {
            Disk::open(&p, &o).map(|_| ()).map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("{name} without its backing file: {e}"));
    }

    for name in ["self.qcow2", "b.qcow2"] {
        let out = ours(name, d, &["convert", "-O", "raw", name, "out.raw"]);
        assert_cli_error(name, &out, &["backing chain loops"]);
        let out = ours(name, d, &["info", "--backing-chain", name]);
        let q = run_bounded(name, d, "qemu-img", &["info", "--backing-chain", name]);
        assert_eq!(code(&out), code(&q), "{name}: info --backing-chain");
        assert!(stderr_of(&out).contains("loop"), "{name}: {out:?}");
    }
    print_largest_peak("backing loops");
}

/// Opening a looping chain for writing must name the loop too. Today it
/// fails on the lock the first open of the file holds ("Failed to get
/// shared \"write\" lock: is another process using the image?"), which
/// sends the user looking for another process that does not exist. QEMU's
/// read-write open fails the same misleading way ("Could not open backing
/// file: Failed to get shared \"write\" lock / Is another process using the
/// image [self.qcow2]?"); our read-only open finds the loop by file
/// identity, and so could the read-write one.
#[test]
fn backing_loops_are_refused_for_writing_naming_the_loop() {
    let s = Scratch::new();
    let d = s.dir();
    let mut failures = Vec::new();
    for name in backing_loops(d) {
        let (_, rw) = open_errors(&s.path(name), &DiskOptions::default());
        if !rw.contains("backing chain loops") {
            failures.push(format!("{name}: open_qcow2_rw: {rw}"));
        }
        let out = bench_write(name, d, name);
        let err = stderr_of(&out);
        if code(&out) != 1 || !err.contains("backing chain loops") {
            failures.push(format!(
                "{name}: qcow2 bench -w exits {}: {err}",
                code(&out)
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn backing_chains_deeper_than_the_limit_are_errors() {
    let s = Scratch::new();
    let d = s.dir();
    let name = |i: usize| format!("c{i:03}.qcow2");
    qemu_image(d, &name(0), "", "1M", &["write -P 0x42 0 4k"]);
    qemu_overlay(d, &name(1), "", (&name(0), "qcow2"), Some("1M"));
    let template = std::fs::read(s.path(&name(1))).unwrap();
    let bfo = to_usize(get64(&template, BACKING_FILE_OFFSET));
    assert_eq!(&template[bfo..bfo + 10], name(0).as_bytes());
    let depth = qcowkit_core::DEFAULT_MAX_CHAIN_DEPTH as usize;
    for i in 2..=depth + 2 {
        let mut b = template.clone();
        b[bfo..bfo + 10].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(s.path(&name(i)), &b).unwrap();
    }

    // A small limit: three backing files below the top are fine, four are not.
    let limited = DiskOptions {
        qcow2: OpenOptions {
            max_chain_depth: 3,
            ..OpenOptions::default()
        },
        ..DiskOptions::default()
    };
    let (p, o) = (s.path(&name(3)), limited.clone());
    let buf = bounded("three backing files", move || {
        let mut disk = Disk::open(&p, &o).unwrap();
        let mut buf = [0u8; 512];
        disk.read_at(0, &mut buf).unwrap();
        buf
    });
    assert_eq!(buf, [0x42; 512], "data read through three backing files");
    expect_open_error(
        &s.path(&name(4)),
        &limited,
        "backing chain is deeper than the limit of 3",
    );

    // The default limit.
    let p = s.path(&name(depth));
    bounded("the deepest chain allowed", move || {
        Disk::open(&p, &DiskOptions::default())
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .expect("the deepest chain allowed opens");
    let deeper = format!("deeper than the limit of {depth}");
    expect_open_error(&s.path(&name(depth + 1)), &DiskOptions::default(), &deeper);
    let top = name(depth + 2);
    let out = ours(&top, d, &["convert", "-O", "raw", &top, "deep.raw"]);
    assert_cli_error(&top, &out, &[&deeper]);
    let out = bench_write(&top, d, &top);
    assert_cli_error(&top, &out, &["Could not open", &deeper]);
    print_largest_peak("deep chains");
}

// ---------------------------------------------------------------------------
// `qcow2 check` exit codes against `qemu-img check`.

/// Writes `bytes` as `file` in `d`, then runs `qemu-img check` and `qcow2
/// check` on it (format qcow2): (qemu-img's output, ours).
fn both_checks(d: &Path, file: &str, bytes: &[u8]) -> (Output, Output) {
    std::fs::write(d.join(file), bytes).unwrap();
    let args = ["check", "-f", "qcow2", file];
    (
        run_bounded(file, d, "qemu-img", &args),
        ours(file, d, &args),
    )
}

/// Images with one metadata error each, made from the plain image (and the
/// extended L2 one): (name, bytes, `qemu-img check`'s exit code).
fn metadata_errors(d: &Path) -> Vec<(&'static str, Vec<u8>, i32)> {
    let plain = plain_image(d);
    let ext = extl2_image(d);
    let g = Geom::of(&plain);
    let l2 = g.l2_table(&plain, 0);
    let data0 = get64(&plain, l2) & OFFSET_MASK;
    let data1 = get64(&plain, l2 + 8) & OFFSET_MASK;
    assert_ne!(data1, 0, "the second cluster is allocated");
    let rc0 = g.refcount_of(&plain, data0);
    assert_eq!(get16(&plain, rc0), 1);
    let ge = Geom::of(&ext);
    let el2 = ge.l2_table(&ext, 0);
    let rt = to_usize(g.rt_offset);
    let rb = g.refcount_block(&plain) as u64;
    let patched = |base: &Vec<u8>, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        b
    };
    vec![
        ("clean", plain.clone(), 0),
        // The second data cluster is no longer referenced: a leak.
        (
            "leaked-cluster",
            patched(&plain, &|b| put64(b, l2 + 8, 0)),
            3,
        ),
        // A referenced cluster with refcount 0.
        (
            "refcount-too-low",
            patched(&plain, &|b| put16(b, rc0, 0)),
            2,
        ),
        // Refcount 2 on a cluster referenced once with the COPIED flag.
        (
            "refcount-too-high-copied",
            patched(&plain, &|b| put16(b, rc0, 2)),
            2,
        ),
        (
            "l2-entry-unaligned",
            patched(&plain, &|b| put64(b, l2, COPIED | (data0 + 512))),
            2,
        ),
        (
            "l1-entry-unaligned",
            patched(&plain, &|b| {
                put64(b, g.l1_entry(0), COPIED | (l2 as u64 + 512))
            }),
            2,
        ),
        (
            "l2-table-past-eof",
            patched(&plain, &|b| put64(b, g.l1_entry(0), COPIED | (1 << 30))),
            2,
        ),
        (
            "extl2-allocated-and-zero",
            patched(&ext, &|b| put64(b, el2 + 8, 0x0000_0001_ffff_ffff)),
            2,
        ),
        // qemu-img check exits 1 here: after reporting the corruption its own
        // refcount lookups fail ("Can't get refcount for cluster N: Input/output
        // error"). Reporting corruptions (2) is the meaningful answer.
        (
            "refcount-block-unaligned",
            patched(&plain, &|b| put64(b, rt, rb + 512)),
            1,
        ),
        (
            "refcount-block-past-eof",
            patched(&plain, &|b| put64(b, rt, 1 << 30)),
            2,
        ),
    ]
}

#[test]
fn check_exit_codes_match_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    let mut failures = Vec::new();
    for (name, bytes, qemu_code) in metadata_errors(d) {
        // Where qemu-img check fails internally (exit 1), we report the
        // corruption it found first (2).
        let want = if qemu_code == 1 { 2 } else { qemu_code };
        let (q, o) = both_checks(d, &format!("{name}.qcow2"), &bytes);
        if code(&o) != want || code(&q) != qemu_code {
            failures.push(format!(
                "{name}: qcow2 check exited {} (stdout {:?}, stderr {:?}); qemu-img check exited {} ({:?} {:?}); expected {want} and {qemu_code}",
                code(&o),
                stdout_of(&o),
                stderr_of(&o),
                code(&q),
                stdout_of(&q),
                stderr_of(&q),
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The write script on each image with a metadata error: what each
/// operation does, what `qemu-img check` says afterwards, and what QEMU
/// does with the same writes. Where the answer is "nothing new", the
/// problems after are the problems before.
#[test]
fn writes_to_images_with_metadata_errors() {
    let s = Scratch::new();
    let d = s.dir();
    let cases = metadata_errors(d);
    let gib = past_cap(1 << 30, 65536);
    let refblock = ["refcount block not aligned to a cluster", "0x20200"];
    let l2_unaligned = ["unaligned L2 table", "0x40200"];
    // (name, the script's outcome, qemu-img check's exit code afterwards
    // (None: as before, with the same problems), whether qemu-io marks the
    // image corrupt on the same writes)
    type Want = (&'static str, [Expect; 5], Option<i32>, bool);
    let wants: Vec<Want> = vec![
        ("clean", all_ok(), Some(0), false),
        ("leaked-cluster", all_ok(), None, false),
        // The refcount says cluster 5, guest cluster 0's data, is free: the
        // new cluster of the second write is placed there, as QEMU places it
        // (both then map guest clusters 0 and 3 to host cluster 5; see
        // `writes_trust_refcounts_like_qemu`).
        ("refcount-too-low", all_ok(), Some(2), false),
        ("refcount-too-high-copied", all_ok(), None, false),
        // As in `unaligned_data_cluster_is_a_read_and_write_error`: the
        // zeroed cluster 6 is freed; check's bogus reference to it remains.
        (
            "l2-entry-unaligned",
            [
                fails(&["not aligned", "0x50200"]),
                Ok(()),
                Ok(()),
                Ok(()),
                Ok(()),
            ],
            Some(2),
            true,
        ),
        (
            "l1-entry-unaligned",
            [
                fails(&l2_unaligned),
                fails(&l2_unaligned),
                fails(&l2_unaligned),
                fails(&l2_unaligned),
                Ok(()),
            ],
            None,
            true,
        ),
        // The L2 table is written at 1 GiB, past the storage (a file becomes
        // sparse; see `l2_table_past_end_of_file_reads_zeros_...`).
        (
            "l2-table-past-eof",
            [Ok(()), Ok(()), Ok(()), Ok(()), fails(&[&gib])],
            Some(2),
            false,
        ),
        (
            "extl2-allocated-and-zero",
            [
                fails(&["subcluster bitmap", "0x1ffffffff"]),
                Ok(()),
                Ok(()),
                Ok(()),
                Ok(()),
            ],
            None,
            true,
        ),
        // Writing in place needs no refcount; allocating and freeing do.
        (
            "refcount-block-unaligned",
            [Ok(()), fails(&refblock), Ok(()), Ok(()), fails(&refblock)],
            Some(1),
            true,
        ),
        // The refcount block is at 1 GiB: the flush writes it there, past
        // the storage. QEMU, finding every refcount 0, allocates cluster 0
        // and its overlap check marks the image corrupt.
        (
            "refcount-block-past-eof",
            [Ok(()), Ok(()), Ok(()), Ok(()), fails(&[&gib])],
            Some(2),
            true,
        ),
    ];
    assert_eq!(cases.len(), wants.len());
    for ((name, bytes, _), (wname, want, after, qemu_corrupt)) in cases.into_iter().zip(wants) {
        assert_eq!(name, wname);
        let file = format!("{name}.qcow2");
        std::fs::write(d.join(&file), &bytes).unwrap();
        let (before_code, before) = qemu_problems(name, d, &file);
        let bytes = Arc::new(bytes);
        let w = expect_script(name, &bytes, &want);
        assert!(!w.corrupt, "{name}: marked corrupt");
        let written = format!("{name}-written.qcow2");
        std::fs::write(d.join(&written), &w.bytes).unwrap();
        let (after_code, after_problems) = qemu_problems(name, d, &written);
        match after {
            None => assert!(
                (after_code, &after_problems) == (before_code, &before),
                "{name}: qemu-img check after the writes exits {after_code} with {after_problems:#?}; before: {before_code} with {before:#?}"
            ),
            Some(c) => assert_eq!(after_code, c, "{name}: {after_problems:#?}"),
        }
        let (text, corrupt) = qemu_writes(
            name,
            d,
            &format!("{name}-qemu.qcow2"),
            &bytes,
            &[
                "write -P 0xa5 0 4k",
                "write -P 0xa6 197120 1k",
                "write -z 64k 64k",
            ],
        );
        assert_eq!(corrupt, qemu_corrupt, "{name}: qemu-io said {text}");
    }
    print_largest_peak("metadata errors");
}

/// A refcount of 0 on a cluster in use makes the allocator reuse it, in
/// QEMU as here (neither scans the metadata before allocating): after the
/// same two writes, both images map guest clusters 0 and 3 to host cluster
/// 5, so guest cluster 0 reads what the second write left there, and
/// `qemu-img check` reports the shared cluster the same way.
#[test]
fn writes_trust_refcounts_like_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    let (_, bytes, _) = metadata_errors(d)
        .into_iter()
        .find(|c| c.0 == "refcount-too-low")
        .unwrap();
    let bytes = Arc::new(bytes);
    let b = Arc::clone(&bytes);
    let ours_bytes = bounded("refcount too low: writes", move || {
        let mut w = WritableImage::open(Capped::new(b.to_vec()), &OpenOptions::default()).unwrap();
        w.write_at(0, &[0xa5; 4096]).unwrap();
        w.write_at(3 * 65536 + 512, &[0xa6; 1024]).unwrap();
        w.flush().unwrap();
        w.into_inner().bytes
    });
    std::fs::write(s.path("ours.qcow2"), &ours_bytes).unwrap();
    let (text, corrupt) = qemu_writes(
        "refcount too low",
        d,
        "qemu.qcow2",
        &bytes,
        &["write -P 0xa5 0 4k", "write -P 0xa6 197120 1k"],
    );
    assert!(!text.contains("fail") && !corrupt, "qemu-io: {text}");
    let mut maps = Vec::new();
    for file in ["ours.qcow2", "qemu.qcow2"] {
        let q = run_bounded(
            file,
            d,
            "qemu-io",
            &[
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read -P 0 0 512",
                "-c",
                "read -P 0xa6 512 1k",
                "-c",
                "read -P 0xa6 197120 1k",
                file,
            ],
        );
        assert!(
            code(&q) == 0 && !output_text(&q).contains("fail"),
            "{file}: {}",
            output_text(&q)
        );
        assert_eq!(
            qemu_problems(file, d, file),
            (
                2,
                vec!["ERROR cluster 5 refcount=1 reference=2".to_string()]
            ),
            "{file}"
        );
        let m = run_bounded(
            file,
            d,
            "qemu-img",
            &["map", "--output=json", "-f", "qcow2", file],
        );
        maps.push(stdout_of(&m));
    }
    assert_eq!(maps[0], maps[1], "the same mapping");
    assert!(maps[0].contains("\"offset\": 327680"), "{}", maps[0]);
    print_largest_peak("refcounts trusted");
}

/// A broken snapshot table entry is something `qemu-img check` reports (exit
/// 2, "snapshot table entry corrupted"); QEMU opens such images (it only
/// validates snapshot L1 tables when it uses them), so `qcow2 check` must be
/// able to open them too.
#[test]
fn check_reports_broken_snapshot_l1_tables_like_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    plain_image(d);
    let snap = snapshot_image(d);
    let so = to_usize(Geom::of(&snap).snapshots_offset);
    let mut failures = Vec::new();
    for (name, patch) in snapshot_l1_cases(so) {
        let mut b = snap.clone();
        patch(&mut b);
        let (q, o) = both_checks(d, &format!("{name}.qcow2"), &b);
        if code(&q) != 2 || code(&o) != code(&q) {
            failures.push(format!(
                "{name}: qemu-img check exited {} ({}), qcow2 check exited {} ({})",
                code(&q),
                stderr_of(&q).lines().next().unwrap_or(""),
                code(&o),
                stderr_of(&o).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn snapshot_l1_cases(so: usize) -> Vec<(&'static str, Patch)> {
    vec![
        (
            "snapshot-l1-unaligned",
            Box::new(move |b| {
                let off = get64(b, so);
                put64(b, so, off + 512);
            }),
        ),
        (
            "snapshot-l1-too-large",
            Box::new(move |b| put32(b, so + 8, 5_000_000)),
        ),
        (
            "snapshot-l1-size-u32-max",
            Box::new(move |b| put32(b, so + 8, u32::MAX)),
        ),
    ]
}

/// Writes to an image whose snapshot entry is broken. The writes touch
/// only the active tables; the snapshot keeps its clusters (their refcounts
/// drop from 2 to 1 as the active layer copies them). An entry claiming an
/// L1 table of 5,000,000 or 2^32 - 1 entries (40 MB or 32 GiB, far past the
/// end of the file) must not push new clusters past that range: each write
/// either succeeds with the file growing by what it wrote (a few clusters),
/// or is refused as an overlap with the inactive L1 table, which is what
/// QEMU does (it allocates at the end of the file, inside the claimed
/// range, and its overlap check marks the image corrupt).
#[test]
fn writes_to_images_with_broken_snapshot_entries() {
    let s = Scratch::new();
    let d = s.dir();
    plain_image(d);
    let snap = snapshot_image(d);
    let so = to_usize(Geom::of(&snap).snapshots_offset);
    let mut failures = Vec::new();
    for (name, patch) in snapshot_l1_cases(so) {
        let mut b = snap.clone();
        patch(&mut b);
        let bytes = Arc::new(b);
        let bb = Arc::clone(&bytes);
        let w = bounded(name, move || write_script(&bb))
            .unwrap_or_else(|e| panic!("{name}: opening for writing failed: {e}"));
        let grown = w.bytes.len().saturating_sub(bytes.len());
        if name == "snapshot-l1-unaligned" {
            assert!(
                w.results.iter().all(Result::is_ok),
                "{name}: {:?}",
                w.results
            );
            let file = format!("{name}-written.qcow2");
            std::fs::write(s.path(&file), &w.bytes).unwrap();
            let (c, problems) = qemu_problems(name, d, &file);
            assert_eq!(
                (c, problems.iter().map(String::as_str).collect::<Vec<_>>()),
                (
                    2,
                    vec![
                        "ERROR snapshot 1 (s1) l1_offset=0x70200: L1 table is not cluster aligned; snapshot table entry corrupted",
                        "Leaked cluster 4 refcount=1 reference=0",
                        "Leaked cluster 5 refcount=1 reference=0",
                        "Leaked cluster 6 refcount=1 reference=0",
                        "Leaked cluster 7 refcount=1 reference=0",
                    ]
                ),
                "{name}"
            );
            continue;
        }
        let clean = w.results.iter().all(Result::is_ok) && grown <= 8 * 65536;
        let refused = w.corrupt
            && w.results.iter().all(|r| {
                r.as_ref().is_ok()
                    || r.as_ref().is_err_and(|e| {
                        e.contains("inactive L1 table") || e.contains("marked corrupt")
                    })
            });
        if !(clean || refused) {
            failures.push(format!(
                "{name}: the write script gave {:?} and grew the image by {grown} bytes (from {:#x} to {:#x})",
                w.results,
                bytes.len(),
                w.bytes.len()
            ));
        }
        let (text, corrupt) = qemu_writes(
            name,
            d,
            &format!("{name}-qemu.qcow2"),
            &bytes,
            &["write -P 0xa5 0 4k", "write -P 0xa6 197120 1k"],
        );
        assert!(
            corrupt && text.contains("overlaps with inactive L1 table"),
            "{name}: qemu-io: {text}"
        );
    }
    print_largest_peak("broken snapshot entries");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// `qemu-img check` only flags a reference that extends past the end of the
/// file by a whole cluster or more (a file may end inside its last cluster,
/// reading zeros there): a fresh image cut just before its 8-byte L1 table
/// checks clean, and takes the write script, staying clean.
#[test]
fn check_tolerates_tables_less_than_a_cluster_past_eof_like_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "fresh.qcow2", "", "1M");
    let b = std::fs::read(s.path("fresh.qcow2")).unwrap();
    let g = Geom::of(&b);
    assert_eq!(
        b.len(),
        to_usize(g.l1_offset) + 8,
        "the L1 table ends the file"
    );
    let cut = &b[..to_usize(g.l1_offset)];
    let (q, o) = both_checks(d, "cut.qcow2", cut);
    assert_eq!(code(&q), 0, "{}", output_text(&q));
    assert_eq!(
        (code(&o), stdout_of(&o)),
        (code(&q), stdout_of(&q)),
        "stderr {}",
        stderr_of(&o)
    );
    let w = expect_script("cut before L1", &Arc::new(cut.to_vec()), &all_ok());
    judge_with_qemu("cut-written", d, &w, 0, &[]);
    print_largest_peak("cut before L1");
}

// ---------------------------------------------------------------------------
// Random mutations.

/// A base image for mutation and the byte ranges worth mutating.
struct FuzzBase {
    name: &'static str,
    bytes: Vec<u8>,
    regions: Vec<std::ops::Range<usize>>,
}

fn fuzz_base(name: &'static str, bytes: Vec<u8>) -> FuzzBase {
    let g = Geom::of(&bytes);
    let cs = to_usize(g.cluster_size);
    let v3 = get32(&bytes, VERSION) == 3;
    let fixed_end = if v3 { g.header_length } else { 72 };
    let ext_end = {
        let used: usize = if v3 {
            extensions(&bytes)
                .iter()
                .map(|(_, d)| 8 + d.len().div_ceil(8) * 8)
                .sum()
        } else {
            0
        };
        fixed_end + used + 8
    };
    let l1 = to_usize(g.l1_offset);
    let l1_end = l1 + 8 * g.l1_size as usize;
    // Ranges are repeated to weight them: header fields and tables matter
    // more than the feature names.
    let mut regions = vec![
        0..fixed_end,
        0..fixed_end,
        0..fixed_end,
        0..fixed_end,
        fixed_end..ext_end,
        0..cs,
        l1..l1_end,
        l1..l1_end,
    ];
    let entry = if v3 && get64(&bytes, INCOMPATIBLE_FEATURES) & INCOMPAT_EXTL2 != 0 {
        16
    } else {
        8
    };
    let used_entries = to_usize(g.size.div_ceil(g.cluster_size)).min(cs / entry);
    let mut l2_regions = Vec::new();
    for i in 0..g.l1_size as usize {
        let l2 = g.l2_table(&bytes, i);
        if l2 != 0 {
            l2_regions.push(l2..l2 + used_entries * entry);
        }
    }
    while !l2_regions.is_empty() && l2_regions.len() < 3 {
        l2_regions.extend(l2_regions.clone());
    }
    regions.extend(l2_regions);
    let rt = to_usize(g.rt_offset);
    regions.push(rt..rt + 16);
    let rb = g.refcount_block(&bytes);
    regions.push(rb..rb + 64);
    if get32(&bytes, NB_SNAPSHOTS) > 0 {
        let so = to_usize(g.snapshots_offset);
        regions.push(so..so + 64);
        regions.push(so..so + 64);
    }
    FuzzBase {
        name,
        bytes,
        regions,
    }
}

/// Applies one random mutation inside `region` and describes it.
fn mutate(rng: &mut XorShift64, bytes: &mut [u8], region: &std::ops::Range<usize>) -> String {
    let at = region.start + rng.index(region.len());
    match rng.index(4) {
        0 => {
            let old = bytes[at];
            bytes[at] ^= 1 << rng.index(8);
            format!("[{at:#x}] {old:#04x}->{:#04x}", bytes[at])
        }
        1 => {
            let old = bytes[at];
            bytes[at] = rng.next_u64() as u8;
            format!("[{at:#x}] {old:#04x}->{:#04x}", bytes[at])
        }
        2 => {
            let at = (at & !3).min(bytes.len() - 4);
            let values = [
                0,
                1,
                0x7fff_ffff,
                0x8000_0000,
                u32::MAX,
                rng.next_u64() as u32 & 0xffff,
            ];
            let v = values[rng.index(values.len())];
            let old = get32(bytes, at);
            put32(bytes, at, v);
            format!("u32[{at:#x}] {old:#x}->{v:#x}")
        }
        _ => {
            let at = (at & !7).min(bytes.len() - 8);
            let values = [
                0,
                COPIED,
                COMPRESSED | rng.next_u64() >> 2,
                u64::MAX,
                i64::MAX as u64,
                (rng.next_u64() % (1 << 20)) << 9,
                COPIED | ((rng.next_u64() % 64) << 16),
            ];
            let v = values[rng.index(values.len())];
            let old = get64(bytes, at);
            put64(bytes, at, v);
            format!("u64[{at:#x}] {old:#x}->{v:#x}")
        }
    }
}

/// Opens, reads every cluster of (the first 4 MiB of) the disk and checks;
/// then opens it for writing in memory, writes (in place, a new cluster,
/// zeroes, a discard), flushes, reads back and checks. Any clean outcome
/// is fine: only panics, hangs and memory are judged (by [`bounded`]).
fn exercise(bytes: &[u8]) {
    if let Ok(mut img) = Image::open(bytes.to_vec(), &OpenOptions::default()) {
        let limit = img.size().min(4 << 20);
        let chunk = img.cluster_size().max(64 * 1024);
        let mut buf = vec![0u8; to_usize(chunk)];
        let mut pos = 0;
        while pos < limit {
            let n = chunk.min(limit - pos);
            let _ = img.read_at(pos, &mut buf[..to_usize(n)]);
            pos += n;
        }
        let _ = img.check();
    }
    let Ok(mut w) = WritableImage::open(Capped::new(bytes.to_vec()), &OpenOptions::default())
    else {
        return;
    };
    let size = w.size();
    let cs = w.cluster_size();
    let clamp = |at: u64, len: u64| (at.min(size), len.min(size - at.min(size)));
    let (at, len) = clamp(0, 4096);
    let _ = w.write_at(at, &vec![0xa5; to_usize(len)]);
    let (at, len) = clamp((size / 2) & !511, 1536);
    let _ = w.write_at(at, &vec![0xa6; to_usize(len)]);
    let (at, len) = clamp(cs, cs);
    let _ = w.write_zeroes(at, len);
    let (at, len) = clamp(size.saturating_sub(2 * cs), 2 * cs);
    let _ = w.discard(at, len);
    let _ = w.flush();
    let (at, len) = clamp(0, 64 * 1024);
    let mut buf = vec![0u8; to_usize(len)];
    let _ = w.read_at(at, &mut buf);
    let _ = w.check();
}

#[test]
fn random_mutations_never_panic() {
    let seed = env_seed("HOSTILE_SEED")
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.as_nanos() as u64)
                .unwrap_or(1)
        })
        .max(1);
    announce_seed("random_mutations_never_panic", "HOSTILE_SEED", seed);

    let s = Scratch::new();
    let d = s.dir();
    let small = qemu_image(
        d,
        "small.qcow2",
        "cluster_size=512",
        "256k",
        &[
            "write -P 0x33 0 40k",
            "write -z 100k 8k",
            "write -P 0x44 200k 4k",
        ],
    );
    let (zlib, _) = compressed_image(d, "zlib");
    let v2 = qemu_image(
        d,
        "v2.qcow2",
        "compat=0.10,cluster_size=4k",
        "1M",
        &["write -P 0x55 0 12k", "write -P 0x66 600k 4k"],
    );
    let bases = [
        fuzz_base("plain", plain_image(d)),
        fuzz_base("512-byte clusters", small),
        fuzz_base("extended L2", extl2_image(d)),
        fuzz_base("compressed", zlib),
        fuzz_base("snapshot", snapshot_image(d)),
        fuzz_base("version 2", v2),
    ];
    for b in &bases {
        let bytes = Arc::new(b.bytes.clone());
        bounded(&format!("unmutated base {}", b.name), move || {
            exercise(&bytes)
        });
    }

    let mut rng = XorShift64(seed);
    let started = Instant::now();
    let mut slowest = (Duration::ZERO, 0usize);
    let iterations = 2000;
    for iter in 0..iterations {
        let base = &bases[iter % bases.len()];
        let mut bytes = base.bytes.clone();
        let mut mutations = Vec::new();
        for _ in 0..1 + rng.index(3) {
            let region = &base.regions[rng.index(base.regions.len())];
            mutations.push(mutate(&mut rng, &mut bytes, region));
        }
        let case = format!(
            "seed {seed}, iteration {iter}, base {}: mutations {}",
            base.name,
            mutations.join(", ")
        );
        // The caller keeps the bytes (and frees them): the case copies them.
        let bytes = Arc::new(bytes);
        let b = Arc::clone(&bytes);
        let t = Instant::now();
        bounded(&case, move || exercise(&b));
        let took = t.elapsed();
        if took > slowest.0 {
            slowest = (took, iter);
        }
    }
    println!(
        "{iterations} mutations in {:?}, slowest {:?} (iteration {})",
        started.elapsed(),
        slowest.0,
        slowest.1
    );
    print_largest_peak("random mutations");
}

// ---------------------------------------------------------------------------
// A full disk.

/// On a full disk, a write that must allocate fails and changes nothing:
/// no refcount moves, the image on disk stays as it was (and the flush
/// that follows has nothing to do). The image has a snapshot, so guest
/// cluster 0's L2 table is shared (refcount 2) and a write must first copy
/// it to a new cluster, which the full disk refuses.
#[test]
fn failed_allocations_on_a_full_disk_change_nothing() {
    let s = Scratch::new();
    let d = s.dir();
    plain_image(d);
    let snap = snapshot_image(d);
    let g = Geom::of(&snap);
    let l2 = g.l2_table(&snap, 0) as u64;
    let cluster = l2 / g.cluster_size;
    let bytes = Arc::new(snap.clone());
    let b = Arc::clone(&bytes);
    let (refcounts, results, after) = bounded("full disk", move || {
        let mut w = WritableImage::open(Capped::full(b.to_vec()), &OpenOptions::default()).unwrap();
        let before = w.refcount(cluster).map_err(|e| e.to_string());
        let results = [
            w.write_at(0, &[0xa5; 4096]).map_err(|e| e.to_string()),
            w.write_at(0, &[0xa5; 4096]).map_err(|e| e.to_string()),
            w.flush().map_err(|e| e.to_string()),
        ];
        let after = w.refcount(cluster).map_err(|e| e.to_string());
        ((before, after), results, w.into_inner().bytes)
    });
    assert_eq!(
        refcounts.0,
        Ok(2),
        "the L2 table is shared with the snapshot"
    );
    for r in &results[..2] {
        assert!(
            r.as_ref()
                .is_err_and(|e| e.starts_with("i/o error: in-memory access")),
            "{results:?}"
        );
    }
    std::fs::write(s.path("full.qcow2"), &after).unwrap();
    let (exit, problems) = qemu_problems("full disk", d, "full.qcow2");
    assert!(
        results[2].is_ok() && refcounts.1 == Ok(2) && after == *bytes,
        "after two refused writes: flush {:?}, refcount of the shared L2 table {:?}, \
         image {}; qemu-img check exits {exit}: {problems:#?}",
        results[2],
        refcounts.1,
        if after == *bytes {
            "unchanged"
        } else {
            "changed"
        },
    );
    print_largest_peak("full disk");
}
