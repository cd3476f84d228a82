//! Crash-replay tests of the write path.
//!
//! A workload runs on an in-memory storage that records every write, length
//! change and flush. Crashes are then replayed after every prefix of the
//! log: the disk is rebuilt as the initial bytes plus the operations of the
//! prefix, and also with sets of the writes and length changes issued since
//! the prefix's last flush lost (unflushed operations may be lost or
//! reordered; a lost extension leaves the file shorter unless a later write
//! extends it, a lost shrink keeps the old bytes). Random drop sets at
//! every prefix; right before each flush everything lost, each operation
//! lost alone, and every length change (or every write) lost. Every crashed
//! disk must
//! - open and pass our `check()` with no corruption (leaks are allowed),
//! - read back, for the whole guest disk, what was written before the last
//!   completed `flush()`; ranges written after it may hold old or new data,
//! - for a sample (every state right after a flush, and random ones that
//!   lost unflushed ops, some of them length changes), pass `qemu-img check`
//!   (exit 0, or 3 for leaks only) and accept new writes and a flush
//!   without getting corrupted.
//!
//! Each replay prints a summary line: prefixes, crash states, how many lost
//! writes or a length change, and the qemu-img checks of each kind.
//!
//! Workloads: plain 64k clusters (with compressed writes), extended L2 over
//! a qcow2 backing file, refcount table growth with 512-byte clusters, v2
//! over a raw backing file with tiny caches (early flushes), and a qemu-img
//! image with an internal snapshot (copy-on-write of shared tables and
//! clusters). Self-tests check that the replay notices a storage that
//! ignores flushes and loses length changes as it should, and a last test
//! repairs a QEMU crash with lazy refcounts.
//!
//! Seeds: `CRASH_SEED=<u64>` replaces the fixed default seed of every test;
//! the workload's random operations and the replay's choices (drop sets,
//! qemu-img sample) all derive from it. Each test prints its seed, and
//! every failure message names it.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Instant;

use qcowkit_core::{
    create, BlockRead, CreateOptions, FileRole, Image, MemError, OpenOptions, Opened, Opener,
    WritableImage,
};
use qcowkit_tests::*;

// ---------------------------------------------------------------------------
// Recording storage

use qcowkit_tests::record::{apply, LogOp, Recording};

// ---------------------------------------------------------------------------
// Deterministic randomness

/// The seed of crash test `test`: `CRASH_SEED` when set (it must be a u64),
/// else `default`; printed.
fn seed_for(test: &str, default: u64) -> u64 {
    let seed = env_seed("CRASH_SEED").unwrap_or(default);
    announce_seed(test, "CRASH_SEED", seed);
    seed
}

// ---------------------------------------------------------------------------
// Workloads

/// One guest operation of a workload.
#[derive(Clone, Copy)]
enum G {
    Write { off: u64, len: u64 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Compressed { off: u64 },
    Flush,
}

impl fmt::Debug for G {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            G::Write { off, len } => write!(f, "write({off:#x}, {len:#x})"),
            G::Zero { off, len } => write!(f, "write_zeroes({off:#x}, {len:#x})"),
            G::Discard { off, len } => write!(f, "discard({off:#x}, {len:#x})"),
            G::Compressed { off } => write!(f, "write_compressed({off:#x})"),
            G::Flush => write!(f, "flush()"),
        }
    }
}

/// A backing file given to the image through the opener.
struct BackingFile {
    name: &'static str,
    format: &'static str,
    file: Vec<u8>,
    /// Its guest contents (what the top image reads where unallocated).
    guest: Vec<u8>,
}

#[derive(Default)]
struct Workload {
    name: &'static str,
    seed: u64,
    create: CreateOptions,
    open: OpenOptions,
    backing: Option<BackingFile>,
    /// An image to start from instead of a new one (file, guest contents).
    prefilled: Option<(Vec<u8>, Vec<u8>)>,
    ops: Vec<G>,
}

impl Workload {
    fn files(&self) -> Files {
        match &self.backing {
            Some(b) => Files::new().with(b.name, b.file.clone()),
            None => Files::new(),
        }
    }

    fn open_rec(&self, rec: Recording) -> WritableImage<Recording> {
        let r = if self.backing.is_some() {
            WritableImage::open_with(rec, "top.qcow2", "top", &mut self.files(), &self.open)
        } else {
            WritableImage::open(rec, &self.open)
        };
        r.unwrap_or_else(|e| {
            panic!(
                "{} (seed {}): open_rw of the new image: {e}",
                self.name, self.seed
            )
        })
    }

    fn open_vec(&self, disk: Vec<u8>) -> Result<Image<Vec<u8>>, String> {
        let opts = OpenOptions::default();
        let r = if self.backing.is_some() {
            Image::open_with(disk, "top.qcow2", "top", &mut self.files(), &opts)
        } else {
            Image::open(disk, &opts)
        };
        r.map_err(|e| format!("open: {e}"))
    }

    /// Opens `disk` read-only without copying it (nor the backing file).
    fn open_slice<'a>(&'a self, disk: &'a [u8]) -> Result<Image<Bytes<'a>>, String> {
        let opts = OpenOptions::default();
        let r = match self.backing.as_ref() {
            Some(mut b) => {
                Image::open_with(Bytes::Borrowed(disk), "top.qcow2", "top", &mut b, &opts)
            }
            None => Image::open(Bytes::Borrowed(disk), &opts),
        };
        r.map_err(|e| format!("open: {e}"))
    }

    fn open_vec_rw(&self, disk: Vec<u8>) -> Result<WritableImage<Vec<u8>>, String> {
        let opts = OpenOptions::default();
        let r = if self.backing.is_some() {
            WritableImage::open_with(disk, "top.qcow2", "top", &mut self.files(), &opts)
        } else {
            WritableImage::open(disk, &opts)
        };
        r.map_err(|e| format!("open_rw: {e}"))
    }

    fn size(&self) -> u64 {
        self.create.size
    }

    /// A scratch directory holding the backing file, for qemu-img.
    fn scratch(&self) -> Scratch {
        let s = Scratch::new();
        if let Some(b) = &self.backing {
            std::fs::write(s.path(b.name), &b.file).unwrap();
        }
        s
    }

    /// Guest contents of the new, empty image.
    fn base_model(&self) -> Vec<u8> {
        let size = self.size() as usize;
        let mut m = vec![0u8; size];
        if let Some(b) = &self.backing {
            let n = b.guest.len().min(size);
            m[..n].copy_from_slice(&b.guest[..n]);
        }
        m
    }
}

/// A disk (or backing file) held in memory, read in place when borrowed:
/// replaying thousands of crash states copies no disk to read one.
enum Bytes<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Bytes<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Bytes::Borrowed(b) => b,
            Bytes::Owned(v) => v,
        }
    }
}

impl From<Vec<u8>> for Bytes<'_> {
    fn from(v: Vec<u8>) -> Self {
        Bytes::Owned(v)
    }
}

impl BlockRead for Bytes<'_> {
    type Error = MemError;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.bytes().read_at(offset, buf)
    }
    fn len(&mut self) -> Result<u64, MemError> {
        Ok(self.bytes().len() as u64)
    }
}

/// The backing file, handed out in place.
impl<'a> Opener<Bytes<'a>> for &'a BackingFile {
    fn open(
        &mut self,
        _parent: &str,
        name: &str,
        _role: FileRole,
    ) -> Result<Opened<Bytes<'a>>, MemError> {
        if name != self.name {
            return Err(MemError { offset: 0, len: 0 });
        }
        Ok(Opened {
            io: Bytes::Borrowed(&self.file),
            resolved: name.to_string(),
            identity: name.to_string(),
        })
    }
}

/// Data written by step `k` at guest `off`: one nonzero value per 512-byte
/// sector, different for every step.
fn step_data(k: usize, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|x| (((k as u64) * 131 + (x >> 9) * 7) % 255 + 1) as u8)
        .collect()
}

/// Random guest ops: `n` of them, ranges aligned to `align` bytes with
/// probability 3/4, lengths up to `max_len`, a flush every few ops.
fn random_ops(
    rng: &mut SplitMix64,
    n: usize,
    size: u64,
    cs: u64,
    align: u64,
    compressed: bool,
) -> Vec<G> {
    let mut out = Vec::new();
    for _ in 0..n {
        let roll = rng.below(100);
        if roll < 12 {
            out.push(G::Flush);
            continue;
        }
        if compressed && roll < 17 {
            out.push(G::Compressed {
                off: rng.below(size.div_ceil(cs)) * cs,
            });
            continue;
        }
        let (off, len) = if rng.chance(3, 4) {
            let units = size / align;
            let off = rng.below(units) * align;
            let len = (1 + rng.below(3 * cs / align)) * align;
            (off, len.min(size - off))
        } else {
            let off = rng.below(size);
            let len = 1 + rng.below(2 * cs);
            (off, len.min(size - off))
        };
        out.push(match roll {
            17..=64 => G::Write { off, len },
            65..=84 => G::Zero { off, len },
            _ => G::Discard { off, len },
        });
    }
    out
}

// ---------------------------------------------------------------------------
// Running a workload

/// A guest operation as executed: its span of the log and its effect on the
/// guest disk.
struct Step {
    op: G,
    start: usize,
    end: usize,
    changes: Vec<(u64, Vec<u8>)>,
}

struct Recorded {
    initial: Vec<u8>,
    log: Vec<LogOp>,
    steps: Vec<Step>,
    base: Vec<u8>,
}

fn run_workload(w: &Workload) -> (Recorded, WritableImage<Recording>) {
    let initial = match &w.prefilled {
        Some((file, _)) => file.clone(),
        None => {
            let mut initial = Vec::new();
            create::format(&mut initial, &w.create)
                .unwrap_or_else(|e| panic!("{} (seed {}): create: {e}", w.name, w.seed));
            initial
        }
    };
    let mut img = w.open_rec(Recording::new(initial));
    // Only the workload is recorded; whatever the open wrote is initial state.
    let initial = img.storage().disk.clone();
    let log_base = img.storage().log.len();

    let size = w.size();
    let cs = w.create.cluster_size;
    let v3 = w.create.v3;
    // Discarded clusters of v2 images show the backing file.
    let base = w.base_model();
    let initial_model = match &w.prefilled {
        Some((_, guest)) => guest.clone(),
        None => base.clone(),
    };
    let mut model = initial_model.clone();
    let mut steps = Vec::new();
    for (k, &op) in w.ops.iter().enumerate() {
        let start = img.storage().log.len() - log_base;
        let mut changes = Vec::new();
        let res = match op {
            G::Write { off, len } => {
                let data = step_data(k, off, len);
                let r = img.write_at(off, &data);
                changes.push((off, data));
                r
            }
            G::Zero { off, len } => {
                changes.push((off, vec![0u8; len as usize]));
                img.write_zeroes(off, len)
            }
            G::Discard { off, len } => {
                let mut c = off - off % cs;
                while c < off + len {
                    let cend = (c + cs).min(size);
                    if c >= off && cend <= off + len {
                        let new = if v3 {
                            vec![0u8; (cend - c) as usize]
                        } else {
                            base[c as usize..cend as usize].to_vec()
                        };
                        changes.push((c, new));
                    }
                    c += cs;
                }
                img.discard(off, len)
            }
            G::Compressed { off } => {
                let len = cs.min(size - off);
                let data = step_data(k, off, len);
                let r = img.write_compressed(off, &data).map(|_| ());
                changes.push((off, data));
                r
            }
            G::Flush => img.flush(),
        };
        if let Err(e) = res {
            panic!("{} (seed {}): step {k} {op:?} failed: {e}", w.name, w.seed);
        }
        for (off, data) in &changes {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        let end = img.storage().log.len() - log_base;
        steps.push(Step {
            op,
            start,
            end,
            changes,
        });
        if matches!(op, G::Flush) || k + 1 == w.ops.len() {
            // The live image must read back the model (no crash involved).
            let mut got = vec![0u8; size as usize];
            img.read_at(0, &mut got).unwrap_or_else(|e| {
                panic!(
                    "{} (seed {}): live read after step {k}: {e}",
                    w.name, w.seed
                )
            });
            if let Some(m) = first_mismatch(&got, &model) {
                panic!(
                    "{} (seed {}): live image after step {k} {op:?}: {m}",
                    w.name, w.seed
                );
            }
        }
    }
    let log = img.storage().log[log_base..].to_vec();
    (
        Recorded {
            initial,
            log,
            steps,
            base: initial_model,
        },
        img,
    )
}

/// After the workload: flush, then the image must be clean for us and for
/// `qemu-img check` (run next to the backing file).
fn final_state_is_clean(w: &Workload, mut img: WritableImage<Recording>) {
    img.flush()
        .unwrap_or_else(|e| panic!("{} (seed {}): final flush: {e}", w.name, w.seed));
    let disk = img.into_inner().disk;
    let mut ro = w
        .open_vec(disk.clone())
        .unwrap_or_else(|e| panic!("{} (seed {}): final {e}", w.name, w.seed));
    let rep = ro
        .check()
        .unwrap_or_else(|e| panic!("{} (seed {}): check: {e}", w.name, w.seed));
    assert!(
        rep.corruptions == 0 && rep.leaks == 0,
        "{} (seed {}): final image after a clean flush: {} corruptions, {} leaks: {}",
        w.name,
        w.seed,
        rep.corruptions,
        rep.leaks,
        errors_first(&rep.messages)
    );
    let s = w.scratch();
    std::fs::write(s.path("final.qcow2"), &disk).unwrap();
    if let Err(e) = qemu_img_check(s.dir(), "final.qcow2") {
        panic!("{} (seed {}): final image: {e}", w.name, w.seed);
    }
}

/// Runs workload `w`, replays a crash after every prefix of its log (see
/// [`replay`]), requires every crash state to be clean, and checks the
/// image left at the end.
fn crash_test(w: &Workload, limits: &Limits) -> Outcome {
    let (rec, img) = run_workload(w);
    let out = replay(w, &rec, limits);
    out.assert_clean();
    final_state_is_clean(w, img);
    out
}

// ---------------------------------------------------------------------------
// qemu-img check, a few processes at a time

/// `qemu-img check` processes one replay worker keeps running at a time.
const QEMU_INFLIGHT: usize = 3;

/// `qemu-img check` of crash states in the background, each on its own copy
/// of the disk, at most [`QEMU_INFLIGHT`] at a time.
struct QemuChecks<'a> {
    dir: &'a Path,
    worker: usize,
    /// (crash state, its description, file, process)
    inflight: VecDeque<(usize, String, String, Child)>,
    next: usize,
}

impl<'a> QemuChecks<'a> {
    fn new(dir: &'a Path, worker: usize) -> Self {
        QemuChecks {
            dir,
            worker,
            inflight: VecDeque::new(),
            next: 0,
        }
    }

    /// Starts checking crash state `index`, described by `what`.
    fn submit(&mut self, index: usize, what: &str, disk: &[u8], t: &mut Tally) {
        while self.inflight.len() >= QEMU_INFLIGHT {
            self.reap(t);
        }
        let name = format!("crash-{}-{}.qcow2", self.worker, self.next);
        self.next += 1;
        std::fs::write(self.dir.join(&name), disk).unwrap();
        let child = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", &name])
            .current_dir(self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run qemu-img");
        self.inflight
            .push_back((index, what.to_string(), name, child));
    }

    /// Waits for the oldest check.
    fn reap(&mut self, t: &mut Tally) {
        let Some((index, what, name, child)) = self.inflight.pop_front() else {
            return;
        };
        let out = child.wait_with_output().expect("wait for qemu-img");
        t.qemu_done += 1;
        match code(&out) {
            0 => {}
            3 => t.qemu_leaky += 1,
            c => {
                // Its errors and summary, not one line per leaked cluster.
                let text = format!("{}\n{}", stdout_of(&out), stderr_of(&out));
                let lines: Vec<&str> = (text.lines())
                    .filter(|l| !l.trim().is_empty() && !l.starts_with("Leaked cluster"))
                    .collect();
                t.fail(
                    index,
                    &what,
                    &format!("qemu-img check exited {c}: {}", lines.join(" | ")),
                );
            }
        }
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    fn finish(mut self, t: &mut Tally) {
        while !self.inflight.is_empty() {
            self.reap(t);
        }
    }
}

// ---------------------------------------------------------------------------
// Crash replay

/// A guest change that may or may not have reached the disk: (step, guest
/// offset, data).
type Change<'a> = (usize, u64, &'a [u8]);

/// Bytes of the guest disk compared at a time.
const CHUNK: usize = 4096;
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// The durable guest contents, and which of their chunks are all zeros
/// (compared without reading them: the replay reads the whole guest disk
/// thousands of times).
struct Durable {
    bytes: Vec<u8>,
    zero: Vec<bool>,
}

impl Durable {
    fn new(bytes: Vec<u8>) -> Self {
        let zero = bytes
            .chunks(CHUNK)
            .map(|c| c == &ZEROS[..c.len()])
            .collect();
        Durable { bytes, zero }
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let off = off as usize;
        let end = off + data.len();
        self.bytes[off..end].copy_from_slice(data);
        for c in off / CHUNK..end.div_ceil(CHUNK) {
            let chunk = &self.bytes[c * CHUNK..((c + 1) * CHUNK).min(self.bytes.len())];
            self.zero[c] = chunk == &ZEROS[..chunk.len()];
        }
    }
}

/// Whether `got`, read at guest offset `at` (a multiple of [`CHUNK`]), is
/// allowed: equal to the durable contents except where one of the `maybe`
/// changes covers the byte with the value read.
fn verify_guest(got: &[u8], durable: &Durable, at: usize, maybe: &[Change]) -> Result<(), String> {
    const SECTOR: usize = 512;
    let range = &durable.bytes[at..at + got.len()];
    let zero = &durable.zero[at / CHUNK..];
    for (ci, (g, d)) in got.chunks(CHUNK).zip(range.chunks(CHUNK)).enumerate() {
        if zero[ci] && g == &ZEROS[..g.len()] || g == d {
            continue;
        }
        let chunk_lo = (at + ci * CHUNK) as u64;
        for (si, (gs, ds)) in g.chunks(SECTOR).zip(d.chunks(SECTOR)).enumerate() {
            if gs == ds {
                continue;
            }
            let lo = chunk_lo + (si * SECTOR) as u64;
            let hi = lo + gs.len() as u64;
            let near: Vec<&Change> = maybe
                .iter()
                .filter(|(_, off, data)| *off < hi && off + data.len() as u64 > lo)
                .collect();
            // Fast path: one change covers the sector and matches it.
            if near.iter().any(|(_, off, data)| {
                *off <= lo
                    && off + data.len() as u64 >= hi
                    && &data[(lo - off) as usize..(hi - off) as usize] == gs
            }) {
                continue;
            }
            for i in 0..gs.len() {
                if gs[i] == ds[i] {
                    continue;
                }
                let x = lo + i as u64;
                let covers = |off: u64, data: &[u8]| x >= off && x < off + data.len() as u64;
                let explained = near
                    .iter()
                    .any(|(_, off, data)| covers(*off, data) && data[(x - off) as usize] == gs[i]);
                if !explained {
                    let touching: Vec<String> = near
                        .iter()
                        .filter(|(_, off, data)| covers(*off, data))
                        .map(|(k, off, data)| {
                            format!("step {k} wrote {:#04x}", data[(x - off) as usize])
                        })
                        .collect();
                    return Err(format!(
                        "durability: guest byte {x:#x} reads {:#04x}, durable value {:#04x} (later writes there: {})",
                        gs[i],
                        ds[i],
                        if touching.is_empty() {
                            "none".to_string()
                        } else {
                            touching.join(", ")
                        }
                    ));
                }
            }
        }
    }
    Ok(())
}

/// How much a replay tries, and how.
struct Limits {
    /// Random subsets of the unflushed operations dropped at a prefix that
    /// does not end right before a flush (where more are tried), in
    /// hundredths: 150 is one, and a second one half of the time.
    between_pct: u64,
    /// Crash states with dropped operations checked by qemu-img, chosen at
    /// random (on top of every state right after a storage flush).
    qemu_dropped: usize,
    /// Of those, at least this many with a dropped length change (when
    /// there are that many).
    qemu_set_len: usize,
    /// Crash states without dropped operations between flushes checked
    /// by qemu-img, chosen at random.
    qemu_between: usize,
    /// Storage flushes a dropped operation may cross: 1 for a correct
    /// storage; more simulates a storage that ignores flushes (harness
    /// self-test).
    barrier_window: usize,
    /// Run `qemu-img check` (and writes after the crash) on the sample.
    qemu: bool,
}

impl Limits {
    fn standard() -> Self {
        Limits {
            between_pct: 200,
            qemu_dropped: 120,
            qemu_set_len: 30,
            qemu_between: 30,
            barrier_window: 1,
            qemu: true,
        }
    }
}

/// One crash: the disk as the storage may hold it when power is lost after
/// the first `p` operations of the log.
struct CrashState {
    /// Storage operations issued before the crash.
    p: usize,
    /// Operations before `f` are durable: `f` is right after the last
    /// storage flush of the prefix (the `barrier_window`-th last one).
    f: usize,
    /// Unflushed writes and length changes (log indexes in `f..p`, sorted)
    /// that the crash lost; the others reached the disk, in order. A lost
    /// length change leaves the file as long as it was (later writes beyond
    /// the end still extend it).
    dropped: Vec<usize>,
    /// Also check it with `qemu-img check`, and write on it after the crash.
    qemu: bool,
}

/// Where the flushes are in a recorded workload.
struct Marks {
    /// `i + 1` for each storage flush at log index `i`.
    flush_ends: Vec<usize>,
    /// (end in the log, step index) of each guest flush.
    guest_flushes: Vec<(usize, usize)>,
    barrier_window: usize,
}

impl Marks {
    fn new(rec: &Recorded, barrier_window: usize) -> Self {
        Marks {
            flush_ends: (rec.log.iter().enumerate())
                .filter(|(_, op)| matches!(op, LogOp::Flush))
                .map(|(i, _)| i + 1)
                .collect(),
            guest_flushes: (rec.steps.iter().enumerate())
                .filter(|(_, st)| matches!(st.op, G::Flush))
                .map(|(k, st)| (st.end, k))
                .collect(),
            barrier_window,
        }
    }

    /// Where the durable part of prefix `p` ends.
    fn barrier(&self, p: usize) -> usize {
        let c = self.flush_ends.partition_point(|&e| e <= p);
        match c.checked_sub(self.barrier_window) {
            Some(i) => self.flush_ends[i],
            None => 0,
        }
    }

    /// The steps whose guest data is durable after prefix `p`: those up to
    /// the last guest flush completed within it.
    fn durable_steps(&self, p: usize) -> usize {
        let c = self.guest_flushes.partition_point(|&(end, _)| end <= p);
        c.checked_sub(1).map_or(0, |i| self.guest_flushes[i].1 + 1)
    }
}

/// Up to `cap` elements of `v`, evenly spread (first and last included).
fn spread(v: &[usize], cap: usize) -> Vec<usize> {
    if v.len() <= cap {
        return v.to_vec();
    }
    (0..cap).map(|j| v[j * (v.len() - 1) / (cap - 1)]).collect()
}

/// Sets of unflushed operations (`pending`: writes and length changes) to
/// drop, the first one empty.
fn drop_sets(
    log: &[LogOp],
    pending: &[usize],
    heavy: bool,
    limits: &Limits,
    rng: &mut SplitMix64,
) -> Vec<Vec<usize>> {
    let mut v: Vec<Vec<usize>> = vec![Vec::new()];
    if pending.is_empty() {
        return v;
    }
    v.push(pending.to_vec());
    let set_lens: Vec<usize> = (pending.iter().copied())
        .filter(|&i| matches!(log[i], LogOp::SetLen(_)))
        .collect();
    let randoms = if heavy {
        // Each one lost alone (a sample when many), every length change
        // lost while the writes survive, and the other way round.
        v.extend(spread(pending, 12).into_iter().map(|i| vec![i]));
        v.extend(spread(&set_lens, 12).into_iter().map(|i| vec![i]));
        if !set_lens.is_empty() && set_lens.len() < pending.len() {
            let writes = (pending.iter().copied())
                .filter(|i| set_lens.binary_search(i).is_err())
                .collect();
            v.push(set_lens);
            v.push(writes);
        }
        3
    } else {
        let pct = limits.between_pct;
        pct / 100 + usize::from(rng.below(100) < pct % 100) as u64
    };
    for _ in 0..randoms {
        let sub: Vec<usize> = (pending.iter().copied())
            .filter(|_| rng.chance(1, 2))
            .collect();
        if !sub.is_empty() && sub.len() < pending.len() {
            v.push(sub);
        }
    }
    v
}

/// `k` distinct random elements of `v` (all of them when fewer).
fn choose(v: &mut [usize], k: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let k = k.min(v.len());
    for i in 0..k {
        let j = i + rng.index(v.len() - i);
        v.swap(i, j);
    }
    v[..k].to_vec()
}

/// The crash states replayed: every prefix of the log with nothing lost,
/// with random subsets of its unflushed operations lost, and right before
/// each flush (and at the end) with everything lost, each one lost alone
/// and every length change lost. A disk already replayed with the same
/// durable data (for instance everything lost: the disk at the last flush)
/// is not replayed again. Then the sample checked by qemu-img is chosen.
fn plan(rec: &Recorded, marks: &Marks, limits: &Limits, rng: &mut SplitMix64) -> Vec<CrashState> {
    let log = &rec.log;
    let n = log.len();
    // A disk is the one at `f` plus the operations that survived; it is
    // known by (f, durable steps, the sum of a hash of each surviving
    // operation's index). `sums[i]`: the sum over the operations before i.
    let mix = |i: usize| SplitMix64(i as u64).next_u64();
    let mut sums = vec![0u64; n + 1];
    for (i, op) in log.iter().enumerate() {
        let h = if matches!(op, LogOp::Flush) {
            0
        } else {
            mix(i)
        };
        sums[i + 1] = sums[i].wrapping_add(h);
    }
    let mut seen = HashSet::new();
    let mut states = Vec::new();
    let mut pending: Vec<usize> = Vec::new();
    let mut pending_from = 0;
    for p in 0..=n {
        let f = marks.barrier(p);
        if f != pending_from {
            pending.clear();
            pending.extend((f..p).filter(|&i| !matches!(log[i], LogOp::Flush)));
            pending_from = f;
        } else if p > f && !matches!(log[p - 1], LogOp::Flush) {
            pending.push(p - 1);
        }
        let heavy = p == n || matches!(log[p], LogOp::Flush);
        let durable = marks.durable_steps(p);
        for dropped in drop_sets(log, &pending, heavy, limits, rng) {
            // The first (strictest) prefix giving a disk is kept.
            let lost = (dropped.iter()).fold(0u64, |a, &i| a.wrapping_add(mix(i)));
            let survived = sums[p].wrapping_sub(sums[f]).wrapping_sub(lost);
            if seen.insert((f, durable, survived)) {
                states.push(CrashState {
                    p,
                    f,
                    dropped,
                    qemu: false,
                });
            }
        }
    }
    if limits.qemu {
        // Every state right after a flush with nothing lost; random ones
        // with lost operations (some with a lost length change) and
        // between flushes.
        let after_flush = |s: &CrashState| s.p > 0 && matches!(log[s.p - 1], LogOp::Flush);
        let lost_set_len =
            |s: &CrashState| (s.dropped.iter()).any(|&i| matches!(log[i], LogOp::SetLen(_)));
        let mut with_set_len = Vec::new();
        let mut with_drops = Vec::new();
        let mut between = Vec::new();
        for (i, s) in states.iter_mut().enumerate() {
            if s.dropped.is_empty() && after_flush(s) {
                s.qemu = true;
            } else if s.dropped.is_empty() {
                between.push(i);
            } else if lost_set_len(s) {
                with_set_len.push(i);
            } else {
                with_drops.push(i);
            }
        }
        let mut chosen = choose(&mut with_set_len, limits.qemu_set_len, rng);
        let rest = limits.qemu_dropped.saturating_sub(chosen.len());
        with_drops.extend_from_slice(&with_set_len[chosen.len()..]);
        chosen.extend(choose(&mut with_drops, rest, rng));
        chosen.extend(choose(&mut between, limits.qemu_between, rng));
        for i in chosen {
            states[i].qemu = true;
        }
    }
    states
}

/// Log indexes as ranges: `#3-#7, #9`.
fn index_ranges(v: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            format!("#{}", v[i])
        } else {
            format!("#{}-#{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

/// What a replay (or one worker of it) found.
#[derive(Default)]
struct Tally {
    failure_count: usize,
    /// Failures of the durability check, and of our check (corruptions).
    durability_failures: usize,
    check_failures: usize,
    /// The first failures (by crash state), described.
    failures: Vec<(usize, String)>,
    states: usize,
    leaky: usize,
    /// States that lost operations.
    dropped: usize,
    /// States that lost a length change.
    dropped_set_len: usize,
    /// States whose file length differs from the one with nothing lost.
    other_length: usize,
    qemu_done: usize,
    qemu_leaky: usize,
    qemu_dropped: usize,
    qemu_set_len: usize,
}

/// Failures described in full (the count covers all).
const FAILURES_KEPT: usize = 40;

impl Tally {
    /// Records failure `msg` of crash state `index`, described by `what`.
    fn fail(&mut self, index: usize, what: &str, msg: &str) {
        self.failure_count += 1;
        if msg.starts_with("durability:") {
            self.durability_failures += 1;
        } else if msg.starts_with("check:") {
            self.check_failures += 1;
        }
        if self.failures.len() < FAILURES_KEPT {
            self.failures.push((index, format!("{what}: {msg}")));
        }
    }

    fn merge(&mut self, o: Tally) {
        self.failure_count += o.failure_count;
        self.durability_failures += o.durability_failures;
        self.check_failures += o.check_failures;
        self.failures.extend(o.failures);
        self.states += o.states;
        self.leaky += o.leaky;
        self.dropped += o.dropped;
        self.dropped_set_len += o.dropped_set_len;
        self.other_length += o.other_length;
        self.qemu_done += o.qemu_done;
        self.qemu_leaky += o.qemu_leaky;
        self.qemu_dropped += o.qemu_dropped;
        self.qemu_set_len += o.qemu_set_len;
    }
}

/// What a replay found.
struct Outcome {
    name: &'static str,
    seed: u64,
    /// Prefixes of the log replayed, and operations in the log.
    prefixes: usize,
    log_ops: usize,
    tally: Tally,
    failure_count: usize,
    /// The first failures, described.
    failures: Vec<String>,
    qemu: bool,
}

impl Outcome {
    /// No failure, and (with qemu-img) some crash states that lost
    /// operations were among those qemu-img checked.
    fn assert_clean(&self) {
        assert!(
            self.failure_count == 0,
            "{} (seed {}, replay with CRASH_SEED={}): {} crash-replay failures; the first ones:\n{}",
            self.name,
            self.seed,
            self.seed,
            self.failure_count,
            self.failures.join("\n")
        );
        if self.qemu {
            assert!(
                self.tally.dropped > 0 && self.tally.qemu_dropped > 0,
                "{} (seed {}): qemu-img checked {} of the {} crash states that lost unflushed ops",
                self.name,
                self.seed,
                self.tally.qemu_dropped,
                self.tally.dropped
            );
        }
    }
}

/// Replays a crash after every prefix of the recorded log (see [`plan`]).
/// Every crashed disk must
/// - open and pass our `check()` with no corruption (leaks are allowed),
/// - read back, for the whole guest disk, what was written before the
///   last completed guest flush (later writes may be there or not),
/// - for a sample, pass `qemu-img check` (exit 0, or 3 for leaks only)
///   and accept new writes and a flush without getting corrupted.
///
/// The plan, and so the result, depends on the seed only; its states are
/// replayed in segments by a few threads, each with its own qemu-img
/// processes.
fn replay(w: &Workload, rec: &Recorded, limits: &Limits) -> Outcome {
    let t0 = Instant::now();
    let s = w.scratch();
    let mut rng = SplitMix64(w.seed ^ 0x5eed_c0a5);
    let marks = Marks::new(rec, limits.barrier_window);
    let states = plan(rec, &marks, limits, &mut rng);
    let prefixes = 1 + (states.windows(2)).filter(|v| v[0].p != v[1].p).count();
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    // Segments of consecutive states, taken in order by whichever worker
    // is free: each worker only moves forward through the log.
    let segment = states.len().div_ceil(workers * 16).max(1);
    let segments: Vec<(usize, &[CrashState])> = (states.chunks(segment).enumerate())
        .map(|(k, part)| (k * segment, part))
        .collect();
    let next = AtomicUsize::new(0);
    let mut tally = Tally::default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|k| {
                let (marks, dir, segments, next) = (&marks, s.dir(), &segments, &next);
                scope.spawn(move || {
                    let mut worker = Worker::new(w, rec, marks, dir, k);
                    while let Some(&(first, part)) = segments.get(next.fetch_add(1, SeqCst)) {
                        for (j, st) in part.iter().enumerate() {
                            worker.replay_state(first + j, st);
                        }
                    }
                    worker.finish()
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(t) => tally.merge(t),
                Err(_) => panic!("{} (seed {}): a replay worker panicked", w.name, w.seed),
            }
        }
    });
    tally.failures.sort_by_key(|(i, _)| *i);
    tally.failures.truncate(FAILURES_KEPT);
    let failures = tally.failures.iter().map(|(_, m)| m.clone()).collect();
    let t = &tally;
    eprintln!(
        "{} (seed {}): {} log ops ({} length changes), {} of {} prefixes, {} crash states ({} lost unflushed ops, {} of them a length change, {} of another length; {} with leaks), {} qemu-img checks ({} lost unflushed ops, {} of them a length change; {} with leaks), {} workers, {:.1}s",
        w.name,
        w.seed,
        rec.log.len(),
        (rec.log.iter()).filter(|op| matches!(op, LogOp::SetLen(_))).count(),
        prefixes,
        rec.log.len() + 1,
        t.states,
        t.dropped,
        t.dropped_set_len,
        t.other_length,
        t.leaky,
        t.qemu_done,
        t.qemu_dropped,
        t.qemu_set_len,
        t.qemu_leaky,
        workers,
        t0.elapsed().as_secs_f64()
    );
    Outcome {
        name: w.name,
        seed: w.seed,
        prefixes,
        log_ops: rec.log.len(),
        failure_count: tally.failure_count,
        failures,
        tally,
        qemu: limits.qemu,
    }
}

/// Bytes of the guest disk read (and compared) at a time.
const READ_CHUNK: usize = 256 << 10;

/// One replay thread: replays crash states in the order of the log.
struct Worker<'a> {
    w: &'a Workload,
    rec: &'a Recorded,
    marks: &'a Marks,
    qemu: QemuChecks<'a>,
    t: Tally,
    /// The disk at the last storage flush, and where that is in the log.
    flushed: Vec<u8>,
    flushed_upto: usize,
    /// The disk after the whole prefix (nothing lost).
    whole: Vec<u8>,
    whole_upto: usize,
    /// The guest contents as of the last completed guest flush.
    durable: Durable,
    durable_steps: usize,
    /// The disk of a crash state that lost operations.
    built: Vec<u8>,
    /// Guest data read.
    buf: Vec<u8>,
}

impl<'a> Worker<'a> {
    fn new(w: &'a Workload, rec: &'a Recorded, marks: &'a Marks, dir: &'a Path, k: usize) -> Self {
        Worker {
            w,
            rec,
            marks,
            qemu: QemuChecks::new(dir, k),
            t: Tally::default(),
            flushed: rec.initial.clone(),
            flushed_upto: 0,
            whole: rec.initial.clone(),
            whole_upto: 0,
            durable: Durable::new(rec.base.clone()),
            durable_steps: 0,
            built: Vec::new(),
            buf: vec![0u8; READ_CHUNK],
        }
    }

    /// Replays crash state `index` of the plan (after those before it).
    fn replay_state(&mut self, index: usize, st: &CrashState) {
        let (w, rec) = (self.w, self.rec);
        let log = &rec.log;
        let p = st.p;
        for op in &log[self.flushed_upto..st.f] {
            apply(&mut self.flushed, op);
        }
        self.flushed_upto = st.f;
        for op in &log[self.whole_upto..p] {
            apply(&mut self.whole, op);
        }
        self.whole_upto = p;
        let upto = self.marks.durable_steps(p);
        for step in &rec.steps[self.durable_steps..upto] {
            for (off, data) in &step.changes {
                self.durable.write(*off, data);
            }
        }
        self.durable_steps = upto;
        // Changes of the steps begun since the last guest flush: each may
        // be there or not.
        let maybe: Vec<Change> = (rec.steps.iter().enumerate())
            .skip(upto)
            .take_while(|(_, step)| step.start < p)
            .flat_map(|(k, step)| {
                (step.changes.iter()).map(move |(off, data)| (k, *off, data.as_slice()))
            })
            .collect();

        let disk: &[u8] = if st.dropped.is_empty() {
            &self.whole
        } else {
            crashed_disk(&self.flushed, log, st, &mut self.built);
            &self.built
        };
        let lost_set_len = (st.dropped.iter()).any(|&i| matches!(log[i], LogOp::SetLen(_)));
        let t = &mut self.t;
        t.states += 1;
        t.dropped += usize::from(!st.dropped.is_empty());
        t.dropped_set_len += usize::from(lost_set_len);
        t.other_length += usize::from(disk.len() != self.whole.len());

        let what = describe(w, rec, index, st);
        let (durable, buf) = (&self.durable, &mut self.buf);
        let found = match guarded(|| Ok(check_crashed(w, disk, durable, &maybe, buf))) {
            Ok((found, leaky)) => {
                t.leaky += usize::from(leaky);
                found
            }
            Err(m) => vec![m],
        };
        if !found.is_empty() {
            keep(w, index, disk);
        }
        for m in found {
            t.fail(index, &what, &m);
        }
        if st.qemu {
            self.qemu.submit(index, &what, disk, t);
            t.qemu_dropped += usize::from(!st.dropped.is_empty());
            t.qemu_set_len += usize::from(lost_set_len);
            if let Err(m) = guarded(|| write_after_crash(w, disk.to_vec())) {
                t.fail(index, &what, &m);
            }
        }
    }

    fn finish(mut self) -> Tally {
        self.qemu.finish(&mut self.t);
        self.t
    }
}

/// Builds in `out` the disk of crash state `st`: `flushed` (the disk after
/// the first `st.f` operations of `log`) plus the operations up to `st.p`
/// that the crash did not lose, in order. A lost extension leaves the file
/// shorter (a later write beyond its end still extends it); a lost shrink
/// keeps the bytes it would have cut.
fn crashed_disk(flushed: &[u8], log: &[LogOp], st: &CrashState, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(flushed);
    for (i, op) in log.iter().enumerate().take(st.p).skip(st.f) {
        if st.dropped.binary_search(&i).is_err() {
            apply(out, op);
        }
    }
}

/// A check's messages for a failure message: the errors, then a few of
/// the leaks (there may be thousands).
fn errors_first(messages: &[String]) -> String {
    let (leaks, errors): (Vec<&String>, Vec<&String>) =
        messages.iter().partition(|m| m.starts_with("Leaked"));
    let mut shown: Vec<&String> = errors.into_iter().take(20).collect();
    shown.extend(leaks.iter().take(3));
    let hidden = messages.len() - shown.len();
    let more = if hidden > 0 {
        format!(" (and {hidden} more)")
    } else {
        String::new()
    };
    format!("{shown:?}{more}")
}

/// Runs `f`, turning a panic into an error (so that the failure names the
/// crash state and the seed).
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(e) => {
            let msg = (e.downcast_ref::<String>().cloned())
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panicked: {msg}"))
        }
    }
}

/// With `CRASH_KEEP=<dir>`, saves the disk of failing crash state `index`
/// of workload `w` there (the first 20 of the process, and the backing
/// file), for a closer look with qemu-img or our tools.
fn keep(w: &Workload, index: usize, disk: &[u8]) {
    static SAVED: AtomicUsize = AtomicUsize::new(0);
    let Some(dir) = std::env::var_os("CRASH_KEEP") else {
        return;
    };
    if SAVED.fetch_add(1, SeqCst) >= 20 {
        return;
    }
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).expect("create CRASH_KEEP");
    let name = format!("{}-seed{}-state{index}.qcow2", w.name, w.seed);
    std::fs::write(dir.join(&name), disk).expect("save a crashed disk");
    if let Some(b) = &w.backing {
        std::fs::write(dir.join(b.name), &b.file).expect("save the backing file");
    }
    eprintln!("crash state {index} saved as {}", dir.join(name).display());
}

/// The crash state, described for failure messages: workload, seed,
/// where the crash happened and what it lost.
fn describe(w: &Workload, rec: &Recorded, index: usize, st: &CrashState) -> String {
    let log = &rec.log;
    let p = st.p;
    // The last step begun within the prefix, if it had not ended.
    let begun = rec.steps.partition_point(|step| step.start < p);
    let in_step = match begun.checked_sub(1) {
        Some(k) if p <= rec.steps[k].end => format!("in step {k} {:?}", rec.steps[k].op),
        _ => "between steps".to_string(),
    };
    let last = match p.checked_sub(1) {
        Some(i) => format!("#{i} {:?}", log[i]),
        None => "none".to_string(),
    };
    let lost = if st.dropped.is_empty() {
        "nothing".to_string()
    } else {
        const SHOWN: usize = 8;
        let shown: Vec<String> = (st.dropped.iter().take(SHOWN))
            .map(|&i| format!("#{i} {:?}", log[i]))
            .collect();
        format!(
            "{} of the {} unflushed ops since #{} ({}): {}{}",
            st.dropped.len(),
            (st.f..p)
                .filter(|&i| !matches!(log[i], LogOp::Flush))
                .count(),
            st.f,
            index_ranges(&st.dropped),
            shown.join(", "),
            if st.dropped.len() > SHOWN {
                ", ..."
            } else {
                ""
            }
        )
    };
    format!(
        "{} (seed {}): crash state {index}: after {p} of {} storage ops ({in_step}; last op {last}), lost {lost}",
        w.name,
        w.seed,
        log.len(),
    )
}

/// Our checks of one crashed disk: it opens, our `check()` finds no
/// corruption, and the guest disk reads back its durable data (read into
/// `buf` a piece at a time). Returns the failures and whether the check
/// found leaks.
fn check_crashed(
    w: &Workload,
    disk: &[u8],
    durable: &Durable,
    maybe: &[Change],
    buf: &mut [u8],
) -> (Vec<String>, bool) {
    let mut found = Vec::new();
    let mut leaky = false;
    let mut img = match w.open_slice(disk) {
        Ok(img) => img,
        Err(e) => return (vec![e], false),
    };
    match img.check() {
        Err(e) => found.push(format!("check() failed: {e}")),
        Ok(rep) if rep.corruptions > 0 || rep.check_errors > 0 => found.push(format!(
            "check: {} corruptions, {} check errors, {} leaks: {}",
            rep.corruptions,
            rep.check_errors,
            rep.leaks,
            errors_first(&rep.messages)
        )),
        Ok(rep) => leaky = rep.leaks > 0,
    }
    let size = durable.bytes.len();
    let mut at = 0usize;
    while at < size {
        let n = (size - at).min(buf.len());
        let got = &mut buf[..n];
        if let Err(e) = img.read_at(at as u64, got) {
            found.push(format!("read of guest {at:#x}+{n:#x} failed: {e}"));
            break;
        }
        if let Err(m) = verify_guest(got, durable, at, maybe) {
            found.push(m);
            break;
        }
        at += n;
    }
    (found, leaky)
}

/// A crashed image must accept writes: open it read-write, write over the
/// first and last clusters, flush, and check again.
fn write_after_crash(w: &Workload, disk: Vec<u8>) -> Result<(), String> {
    let mut img = w
        .open_vec_rw(disk)
        .map_err(|e| format!("after the crash: {e}"))?;
    let size = w.size();
    let cs = w.create.cluster_size;
    let a = vec![0xa5u8; 3000];
    let b = vec![0x5au8; cs as usize];
    img.write_at(0, &a)
        .and_then(|()| img.write_at(size - cs, &b))
        .and_then(|()| img.flush())
        .map_err(|e| format!("write after the crash: {e}"))?;
    let mut img = w
        .open_vec(img.into_inner())
        .map_err(|e| format!("after writing on the crashed image: {e}"))?;
    let rep = img
        .check()
        .map_err(|e| format!("check after writing on the crashed image: {e}"))?;
    if rep.corruptions > 0 {
        return Err(format!(
            "after writing on the crashed image: {} corruptions: {:?}",
            rep.corruptions,
            errors_first(&rep.messages)
        ));
    }
    let mut got = vec![0u8; 3000];
    img.read_at(0, &mut got)
        .map_err(|e| format!("read after writing on the crashed image: {e}"))?;
    let mut got_b = vec![0u8; cs as usize];
    img.read_at(size - cs, &mut got_b)
        .map_err(|e| format!("read after writing on the crashed image: {e}"))?;
    if got != a || got_b != b {
        return Err("data written on the crashed image does not read back".to_string());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The workloads

const MIB: u64 = 1 << 20;

fn plain_workload(seed: u64) -> Workload {
    let cs = 65536u64;
    let size = 4 * MIB;
    let mut rng = SplitMix64(seed);
    let mut ops = vec![
        G::Write { off: 0, len: cs },
        G::Write {
            off: 100,
            len: 5000,
        },
        G::Write {
            off: 60000,
            len: 10000,
        },
        G::Flush,
        G::Zero { off: 0, len: cs },
        G::Zero {
            off: 70000,
            len: 3000,
        },
        G::Write {
            off: 2 * cs,
            len: 2 * cs,
        },
        G::Flush,
        G::Discard {
            off: 2 * cs,
            len: cs,
        },
        G::Discard {
            off: 3 * cs + 512,
            len: 4096,
        },
        G::Write {
            off: 2 * cs + 512,
            len: 700,
        },
        G::Flush,
        G::Compressed { off: 5 * cs },
        G::Compressed { off: 6 * cs },
        G::Flush,
        G::Write {
            off: 5 * cs + 1000,
            len: 3000,
        },
        G::Discard {
            off: 6 * cs,
            len: cs,
        },
        G::Compressed { off: 7 * cs },
        G::Flush,
    ];
    ops.extend(random_ops(&mut rng, 40, size, cs, 512, true));
    ops.push(G::Flush);
    ops.push(G::Write {
        off: 9 * cs,
        len: 3 * cs,
    });
    ops.push(G::Discard {
        off: 0,
        len: 4 * cs,
    });
    Workload {
        name: "plain-64k",
        seed,
        create: CreateOptions {
            size,
            ..CreateOptions::default()
        },
        ops,
        ..Workload::default()
    }
}

#[test]
fn crash_plain_64k_clusters() {
    crash_test(
        &plain_workload(seed_for("crash_plain_64k_clusters", 1)),
        &Limits::standard(),
    );
}

/// The harness itself: replaying the same workload on a storage that lets
/// writes cross flushes must find broken images (otherwise the replay could
/// not tell a correct write order from a wrong one).
#[test]
fn harness_catches_a_storage_that_ignores_flushes() {
    let w = plain_workload(seed_for(
        "harness_catches_a_storage_that_ignores_flushes",
        1,
    ));
    let (rec, _) = run_workload(&w);
    let out = replay(
        &w,
        &rec,
        &Limits {
            barrier_window: 4,
            qemu: false,
            ..Limits::standard()
        },
    );
    let t = &out.tally;
    assert!(
        out.failure_count > 10,
        "{} (seed {}): a storage ignoring flushes went unnoticed ({} failures)",
        w.name,
        w.seed,
        out.failure_count
    );
    eprintln!(
        "{} failures found as expected ({} lost data, {} found by our check), e.g.:\n{}",
        out.failure_count,
        t.durability_failures,
        t.check_failures,
        out.failures[..out.failures.len().min(3)].join("\n")
    );
    assert!(
        t.durability_failures > 0 && t.check_failures > 0,
        "{} (seed {}): expected both lost data ({}) and corrupt images ({}):\n{}",
        w.name,
        w.seed,
        t.durability_failures,
        t.check_failures,
        out.failures.join("\n")
    );
}

/// The harness loses unflushed length changes as a storage may: a lost
/// extension leaves the file shorter, unless a later write beyond the end
/// extends it; a lost shrink keeps the bytes it would have cut. The plan
/// replays such losses (the refcount-growth test checks that a real
/// workload has crash states that lost one).
#[test]
fn harness_loses_unflushed_length_changes() {
    let w = |offset: u64, byte: u8, len: usize| LogOp::Write {
        offset,
        data: vec![byte; len],
    };
    let flushed = vec![1u8; 1024];
    let state = |p: usize, dropped: &[usize]| CrashState {
        p,
        f: 2,
        dropped: dropped.to_vec(),
        qemu: false,
    };
    let check = |log: &[LogOp], st: CrashState, want: &[u8], what: &str| {
        let mut got = Vec::new();
        crashed_disk(&flushed, log, &st, &mut got);
        assert!(
            got.len() == want.len() && got == want,
            "{what} (lost {:?}): {} bytes, expected {}; {}",
            st.dropped,
            got.len(),
            want.len(),
            first_mismatch(&got, want).unwrap_or_default()
        );
    };
    let mut written = vec![1u8; 1024];
    written.resize(6000, 0);
    written.extend_from_slice(&[3; 8]);

    // An extension (#2), then a write beyond its end (#3).
    let grow = [
        w(0, 1, 1024),
        LogOp::Flush,
        LogOp::SetLen(4096),
        w(6000, 3, 8),
    ];
    check(&grow, state(4, &[]), &written, "nothing lost");
    check(
        &grow,
        state(4, &[2]),
        &written,
        "the write extends the file",
    );
    check(
        &grow,
        state(4, &[3]),
        &written[..4096],
        "the extension stays",
    );
    check(&grow, state(4, &[2, 3]), &flushed, "both lost");
    check(&grow, state(3, &[2]), &flushed, "the extension lost");

    // A shrink (#2), then an extension (#3).
    let shrink = [
        w(0, 1, 1024),
        LogOp::Flush,
        LogOp::SetLen(512),
        LogOp::SetLen(2048),
    ];
    let mut cut = vec![1u8; 512];
    cut.resize(2048, 0);
    let mut kept = flushed.clone();
    kept.resize(2048, 0);
    check(&shrink, state(4, &[]), &cut, "nothing lost");
    check(&shrink, state(4, &[2]), &kept, "the old bytes stay");
    check(&shrink, state(4, &[3]), &flushed[..512], "the shrink stays");
    check(&shrink, state(4, &[2, 3]), &flushed, "both lost");

    // The plan loses them: alone, all of them, and with random writes.
    let log = vec![
        w(0, 1, 1024),
        LogOp::Flush,
        w(1024, 2, 512),
        LogOp::SetLen(4096),
        w(2048, 3, 512),
        LogOp::SetLen(8192),
        w(4096, 4, 512),
        w(8192, 5, 512),
        LogOp::Flush,
    ];
    let rec = Recorded {
        initial: Vec::new(),
        log,
        steps: Vec::new(),
        base: Vec::new(),
    };
    let limits = Limits {
        qemu: false,
        ..Limits::standard()
    };
    let seed = seed_for("harness_loses_unflushed_length_changes", 6);
    let states = plan(&rec, &Marks::new(&rec, 1), &limits, &mut SplitMix64(seed));
    // A disk replayed once is not replayed again: look for the surviving
    // operations.
    let survived = |ops: &[usize]| {
        states.iter().any(|st| {
            st.f == 2
                && (2..st.p)
                    .filter(|i| st.dropped.binary_search(i).is_err())
                    .eq(ops.iter().copied())
        })
    };
    assert!(
        survived(&[2, 4, 5, 6, 7]) && survived(&[2, 3, 4, 6, 7]),
        "seed {seed}: before the flush, each length change is lost alone"
    );
    assert!(
        survived(&[2, 4, 6, 7]) && survived(&[3, 5]),
        "seed {seed}: before the flush, all length changes are lost, and all writes"
    );
}

/// A qcow2 backing file made by qemu-img, with its guest contents.
fn qemu_backing(s: &Scratch, size: &str, cluster_size: &str, cmds: &[&str]) -> BackingFile {
    let opts = format!("cluster_size={cluster_size}");
    BackingFile {
        name: "base.qcow2",
        format: "qcow2",
        file: qemu_image(s.dir(), "base.qcow2", &opts, size, cmds),
        guest: qemu_contents(s.dir(), "base.qcow2"),
    }
}

#[test]
fn crash_extended_l2_with_backing() {
    let seed = seed_for("crash_extended_l2_with_backing", 2);
    let cs = 65536u64;
    let sc = cs / 32;
    let size = 4 * MIB;
    let s = Scratch::new();
    let backing = qemu_backing(
        &s,
        "4M",
        "64k",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 1M 512k",
            "write -P 0x33 2100000 70000",
            "write -P 0x44 3M 100k",
            "write -z 3200k 64k",
        ],
    );
    let mut rng = SplitMix64(seed);
    let mut ops = vec![
        // One whole subcluster, no copy-on-write needed.
        G::Write { off: 0, len: sc },
        // Inside a subcluster: the rest comes from the backing file.
        G::Write {
            off: 3 * sc + 100,
            len: 300,
        },
        // Across two clusters.
        G::Write {
            off: cs - 1000,
            len: 3000,
        },
        G::Flush,
        G::Zero {
            off: 2 * sc,
            len: 2 * sc,
        },
        G::Zero {
            off: 10000,
            len: 5000,
        },
        G::Zero {
            off: 2 * cs,
            len: cs,
        },
        G::Discard {
            off: 3 * cs,
            len: cs,
        },
        G::Discard {
            off: 4 * cs + 100,
            len: 4000,
        },
        G::Write {
            off: 3 * cs + 5 * sc,
            len: sc,
        },
        G::Write {
            off: 16 * cs + 7 * sc + 1,
            len: 10,
        },
        G::Flush,
        G::Write {
            off: 32 * cs + 10,
            len: 2 * cs,
        },
        G::Zero {
            off: 32 * cs + sc,
            len: 20 * sc,
        },
        G::Flush,
    ];
    ops.extend(random_ops(&mut rng, 40, size, cs, sc, false));
    ops.push(G::Flush);
    ops.push(G::Write {
        off: 40 * cs + 3 * sc + 7,
        len: 5 * sc,
    });
    ops.push(G::Zero {
        off: 0,
        len: 3 * cs,
    });
    let w = Workload {
        name: "extended-l2-backing",
        seed,
        create: CreateOptions {
            size,
            extended_l2: true,
            backing_file: Some(backing.name.to_string()),
            backing_format: Some(backing.format.to_string()),
            ..CreateOptions::default()
        },
        backing: Some(backing),
        ops,
        ..Workload::default()
    };
    crash_test(&w, &Limits::standard());
}

/// An image made by qemu-img with data, compressed and zero clusters and an
/// internal snapshot: every L2 table and data cluster is shared, so writes,
/// zero writes and discards go through copy-on-write and drop references.
#[test]
fn crash_on_a_qemu_image_with_a_snapshot() {
    let seed = seed_for("crash_on_a_qemu_image_with_a_snapshot", 5);
    let cs = 4096u64;
    let size = 8 * MIB;
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "snap.qcow2", "cluster_size=4k", "8M");
    qemu_io(
        d,
        "snap.qcow2",
        &[
            "write -P 0x21 0 1M",
            "write -c -P 0x22 1M 4k",
            "write -c -P 0x23 1028k 4k",
            "write -z 1100k 64k",
            "write -P 0x24 2M 2M",
            "write -P 0x25 7M 100k",
        ],
    );
    qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]);
    let prefilled = (
        std::fs::read(s.path("snap.qcow2")).unwrap(),
        qemu_contents(d, "snap.qcow2"),
    );
    let mut rng = SplitMix64(seed);
    let mut ops = vec![
        // Partial write into a shared cluster: L2 table and data copied.
        G::Write {
            off: 1000,
            len: 100,
        },
        G::Flush,
        // Shared compressed clusters: overwrite one, discard the other.
        G::Write {
            off: MIB + 512,
            len: 512,
        },
        G::Discard {
            off: MIB + 4096,
            len: 4096,
        },
        // Shared data in the second L2 table: zeroed, discarded.
        G::Zero {
            off: 2 * MIB,
            len: 64 * 1024,
        },
        G::Discard {
            off: 3 * MIB,
            len: 100 * 1024,
        },
        G::Flush,
        G::Compressed { off: 7 * MIB },
        G::Write {
            off: 7 * MIB + 40960,
            len: 10000,
        },
        G::Flush,
    ];
    ops.extend(random_ops(&mut rng, 50, size, cs, 512, true));
    ops.push(G::Flush);
    ops.push(G::Write {
        off: 5 * MIB,
        len: 3 * cs,
    });
    let w = Workload {
        name: "qemu-snapshot-4k",
        seed,
        create: CreateOptions {
            size,
            cluster_size: cs,
            ..CreateOptions::default()
        },
        prefilled: Some(prefilled),
        ops,
        ..Workload::default()
    };
    crash_test(&w, &Limits::standard());
}

/// Refcount table offset and number of nonzero entries, read from the disk.
fn refcount_table(disk: &[u8]) -> (u64, usize) {
    let off = get64(disk, 48);
    let clusters = get32(disk, 56) as u64;
    let cs = 1u64 << get32(disk, 20);
    let table = &disk[off as usize..(off + clusters * cs) as usize];
    let used = table.chunks_exact(8).filter(|e| get64(e, 0) != 0).count();
    (off, used)
}

#[test]
fn crash_refcount_table_growth_512_byte_clusters() {
    let seed = seed_for("crash_refcount_table_growth_512_byte_clusters", 3);
    let cs = 512u64;
    let size = 8 * MIB;
    let mut rng = SplitMix64(seed);
    // 64-bit refcounts: a refcount block covers 32 KiB and the initial
    // one-cluster table 2 MiB of the file, so ~3 MiB of scattered data
    // needs new blocks and a larger table.
    let mut ops = Vec::new();
    for i in 0..900 {
        if i % 60 == 59 {
            ops.push(G::Flush);
        }
        let roll = rng.below(100);
        let off = rng.below(size / 4096) * 4096;
        ops.push(match roll {
            0..=89 => G::Write { off, len: 4096 },
            90..=94 => G::Zero { off, len: 2048 },
            _ => G::Discard { off, len: 4096 },
        });
    }
    ops.push(G::Flush);
    ops.push(G::Write {
        off: size - 8192,
        len: 8192,
    });
    let w = Workload {
        name: "refcount-growth-512",
        seed,
        create: CreateOptions {
            size,
            cluster_size: cs,
            refcount_bits: 64,
            ..CreateOptions::default()
        },
        ops,
        ..Workload::default()
    };
    let (rec, img) = run_workload(&w);
    let (off_before, used_before) = refcount_table(&rec.initial);
    let (off_after, used_after) = refcount_table(&img.storage().disk);
    assert_eq!(
        img.header().refcount_table_offset,
        off_after,
        "seed {seed}: in-memory header and disk agree"
    );
    assert_ne!(
        off_before, off_after,
        "seed {seed}: the workload was meant to relocate the refcount table"
    );
    assert!(
        used_after > used_before + 50,
        "seed {seed}: the workload was meant to add refcount blocks ({used_before} -> {used_after})"
    );
    // Every prefix of the log (thousands of operations), plus about 4000
    // random drop sets between flushes in all (at most two per prefix):
    // a crash state costs ~5 ms in a debug build.
    let prefixes = rec.log.len() as u64 + 1;
    let out = replay(
        &w,
        &rec,
        &Limits {
            between_pct: (400_000 / prefixes).min(200),
            ..Limits::standard()
        },
    );
    out.assert_clean();
    let t = &out.tally;
    assert_eq!(
        out.prefixes,
        out.log_ops + 1,
        "{} (seed {seed}): every prefix of the log is replayed",
        w.name
    );
    // Lost length changes were replayed, some left the file shorter, and
    // qemu-img checked some of them.
    assert!(
        t.dropped_set_len > 0 && t.other_length > 0 && t.qemu_set_len > 0,
        "{} (seed {seed}): {} crash states lost a length change ({} of another length), {} checked by qemu-img",
        w.name,
        t.dropped_set_len,
        t.other_length,
        t.qemu_set_len
    );
    final_state_is_clean(&w, img);
}

#[test]
fn crash_v2_raw_backing_small_caches() {
    let seed = seed_for("crash_v2_raw_backing_small_caches", 4);
    let cs = 4096u64;
    // Not a multiple of the cluster size: the last cluster is partial.
    let size = 8 * MIB - 1536;
    let mut raw = vec![0u8; (5 * MIB + 1234) as usize];
    let mut r = SplitMix64(seed ^ 0xbac);
    for chunk in raw.chunks_mut(512) {
        let v = (r.next_u64() as u8) | 1;
        chunk.fill(v);
    }
    let backing = BackingFile {
        name: "base.raw",
        format: "raw",
        guest: raw.clone(),
        file: raw,
    };
    let mut rng = SplitMix64(seed);
    let mut ops = vec![
        G::Write {
            off: 100,
            len: 10000,
        },
        G::Discard {
            off: 0,
            len: 3 * cs,
        },
        G::Flush,
        G::Zero {
            off: 5 * cs,
            len: 3 * cs,
        },
        G::Write {
            off: size - 3000,
            len: 3000,
        },
        G::Discard {
            off: size - 1000,
            len: 1000,
        },
        G::Flush,
        // The whole (partial) last cluster.
        G::Discard {
            off: size - 2560,
            len: 2560,
        },
        G::Flush,
    ];
    ops.extend(random_ops(&mut rng, 60, size, cs, 512, true));
    ops.push(G::Flush);
    ops.push(G::Write {
        off: 3 * MIB,
        len: 6 * cs,
    });
    let w = Workload {
        name: "v2-raw-backing-small-caches",
        seed,
        create: CreateOptions {
            size,
            cluster_size: cs,
            v3: false,
            backing_file: Some(backing.name.to_string()),
            backing_format: Some(backing.format.to_string()),
            ..CreateOptions::default()
        },
        open: OpenOptions {
            l2_cache_bytes: Some(2 * cs),
            refcount_cache_bytes: Some(cs),
            ..OpenOptions::default()
        },
        backing: Some(backing),
        ops,
        ..Workload::default()
    };
    crash_test(&w, &Limits::standard());
}

/// QEMU crashing with lazy refcounts leaves a dirty image whose refcounts
/// are stale (here: refcount blocks missing for the newly written data).
/// Opening it read-write must rebuild the refcounts without overwriting
/// anything in use, after which the image is clean and keeps its data.
#[test]
fn qemu_crash_with_lazy_refcounts_is_repaired_by_open_rw() {
    let s = Scratch::new();
    let d = s.dir();
    for (name, cluster) in [
        ("c512.qcow2", "512"),
        ("c4k.qcow2", "4k"),
        ("c64k.qcow2", "64k"),
    ] {
        let opts = format!("lazy_refcounts=on,cluster_size={cluster}");
        qemu_create(d, name, &opts, "8M");
        // qemu-io's `abort` crashes it: L2 tables are flushed, refcounts
        // are not (lazy), the dirty bit stays set.
        let out = run_in(
            d,
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x41 0 64k",
                "-c",
                "write -P 0x42 1M 300k",
                "-c",
                "write -c -P 0x44 3M 64k",
                "-c",
                "write -P 0x43 5M 200k",
                "-c",
                "flush",
                "-c",
                "abort",
                name,
            ],
        );
        assert_ne!(code(&out), 0, "qemu-io was meant to crash");
        let crashed = std::fs::read(s.path(name)).unwrap();
        assert_eq!(crashed[79] & 1, 1, "{name}: the dirty bit is set");
        let mut model = qemu_contents(d, name);

        let mut img = WritableImage::open(crashed, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("{name}: open_rw of the dirty image: {e}"));
        let mut got = vec![0u8; model.len()];
        img.read_at(0, &mut got).unwrap();
        assert!(
            first_mismatch(&got, &model).is_none(),
            "{name}: after the repair: {}",
            first_mismatch(&got, &model).unwrap()
        );
        // More writes on the repaired image.
        let data = vec![0x55u8; 200_000];
        img.write_at(6 << 20, &data).unwrap();
        model[6 << 20..(6 << 20) + data.len()].copy_from_slice(&data);
        img.flush().unwrap();
        let disk = img.into_inner();
        assert_eq!(disk[79] & 1, 0, "{name}: the dirty bit is cleared");
        let mut ro = Image::open(disk.clone(), &OpenOptions::default()).unwrap();
        let rep = ro.check().unwrap();
        assert_eq!(
            (rep.corruptions, rep.leaks),
            (0, 0),
            "{name}: check after the repair: {:?}",
            rep.messages
        );
        ro.read_at(0, &mut got).unwrap();
        assert!(
            first_mismatch(&got, &model).is_none(),
            "{name}: after writing on the repaired image: {}",
            first_mismatch(&got, &model).unwrap()
        );
        std::fs::write(s.path("repaired.qcow2"), &disk).unwrap();
        std::fs::write(s.path("model.raw"), &model).unwrap();
        if let Err(e) = qemu_img_check(d, "repaired.qcow2")
            .and_then(|()| qemu_img_compare(d, "repaired.qcow2", "qcow2", "model.raw", "raw"))
        {
            panic!("{name}: {e}");
        }
    }
}
