//! Crash-replay tests of the write path.
//!
//! A workload runs on an in-memory storage that records every write, length
//! change and flush. Crashes are then replayed: for (a deterministic sample
//! of) every prefix of the log the disk is rebuilt as the initial bytes plus
//! the operations of the prefix, and also with subsets of the writes issued
//! since the prefix's last flush dropped (unflushed writes may be lost or
//! reordered). Every crashed disk must
//! - open and pass our `check()` with no corruption (leaks are allowed),
//! - (for a sample) pass `qemu-img check` (exit 0, or 3 for leaks only),
//! - read back, for the whole guest disk, what was written before the last
//!   completed `flush()`; ranges written after it may hold old or new data,
//! - (for the same sample) accept new writes and a flush without getting
//!   corrupted.
//!
//! Workloads: plain 64k clusters (with compressed writes), extended L2 over
//! a qcow2 backing file, refcount table growth with 512-byte clusters, v2
//! over a raw backing file with tiny caches (early flushes), and a qemu-img
//! image with an internal snapshot (copy-on-write of shared tables and
//! clusters). A self-test checks that the replay notices a storage that
//! ignores flushes, and a last test repairs a QEMU crash with lazy refcounts.
//!
//! Seeds: `CRASH_SEED=<u64>` replaces the fixed default seed of the random
//! part of every workload (printed by each test, with `--nocapture`).

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use qcowkit_core::{
    create, BlockRead, BlockWrite, CreateOptions, Image, MemError, OpenOptions, WritableImage,
};
use qcowkit_tests::*;

// ---------------------------------------------------------------------------
// Recording storage

/// One storage operation, as issued by the image.
#[derive(Clone)]
enum LogOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Flush,
}

impl fmt::Debug for LogOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogOp::Write { offset, data } => {
                write!(f, "Write{{offset: {offset:#x}, len: {:#x}}}", data.len())
            }
            LogOp::SetLen(n) => write!(f, "SetLen({n:#x})"),
            LogOp::Flush => write!(f, "Flush"),
        }
    }
}

/// A `BlockWrite` over a `Vec<u8>` that logs every operation in order while
/// applying it.
struct Recording {
    disk: Vec<u8>,
    log: Vec<LogOp>,
}

impl Recording {
    fn new(disk: Vec<u8>) -> Self {
        Recording {
            disk,
            log: Vec::new(),
        }
    }
}

/// Backing files opened through [`Files`] are recorded too.
impl From<Vec<u8>> for Recording {
    fn from(disk: Vec<u8>) -> Self {
        Recording::new(disk)
    }
}

impl fmt::Debug for Recording {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Recording({} bytes, {} ops)",
            self.disk.len(),
            self.log.len()
        )
    }
}

impl BlockRead for Recording {
    type Error = MemError;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.disk.read_at(offset, buf)
    }
    fn len(&mut self) -> Result<u64, MemError> {
        Ok(self.disk.len() as u64)
    }
}

impl BlockWrite for Recording {
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), MemError> {
        let op = LogOp::Write {
            offset,
            data: buf.to_vec(),
        };
        apply(&mut self.disk, &op);
        self.log.push(op);
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> Result<(), MemError> {
        let op = LogOp::SetLen(len);
        apply(&mut self.disk, &op);
        self.log.push(op);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), MemError> {
        self.log.push(LogOp::Flush);
        Ok(())
    }
}

fn apply(disk: &mut Vec<u8>, op: &LogOp) {
    match op {
        LogOp::Write { offset, data } => write_bytes(disk, *offset, data),
        LogOp::SetLen(n) => {
            let n = *n as usize;
            if n <= Vec::len(disk) {
                disk.truncate(n);
            } else {
                disk.extend_from_slice(&vec![0u8; n - Vec::len(disk)]);
            }
        }
        LogOp::Flush => {}
    }
}

/// Writes `data` at `offset`, growing `disk` with zeros as needed (without
/// `Vec::resize`, which is slow in debug builds).
fn write_bytes(disk: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if start > Vec::len(disk) {
        disk.extend_from_slice(&vec![0u8; start - Vec::len(disk)]);
    }
    let inside = end.min(Vec::len(disk)) - start;
    disk[start..start + inside].copy_from_slice(&data[..inside]);
    disk.extend_from_slice(&data[inside..]);
}

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
        r.unwrap_or_else(|e| panic!("{}: open_rw of the new image: {e}", self.name))
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
                .unwrap_or_else(|e| panic!("{}: create: {e}", w.name));
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
            img.read_at(0, &mut got)
                .unwrap_or_else(|e| panic!("{}: live read after step {k}: {e}", w.name));
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
        .unwrap_or_else(|e| panic!("{}: final flush: {e}", w.name));
    let disk = img.into_inner().disk;
    let mut ro = w
        .open_vec(disk.clone())
        .unwrap_or_else(|e| panic!("{}: final {e}", w.name));
    let rep = ro
        .check()
        .unwrap_or_else(|e| panic!("{}: check: {e}", w.name));
    assert!(
        rep.corruptions == 0 && rep.leaks == 0,
        "{} (seed {}): final image after a clean flush: {} corruptions, {} leaks: {:?}",
        w.name,
        w.seed,
        rep.corruptions,
        rep.leaks,
        rep.messages
    );
    let s = w.scratch();
    std::fs::write(s.path("final.qcow2"), &disk).unwrap();
    if let Err(e) = qemu_img_check(s.dir(), "final.qcow2") {
        panic!("{} (seed {}): final image: {e}", w.name, w.seed);
    }
}

/// Runs workload `w`, replays crashes at its flush points and `random`
/// random log positions (see [`Limits::standard`]), and checks the image
/// left at the end.
fn crash_test(w: &Workload, random: usize) {
    let (rec, img) = run_workload(w);
    replay(w, &rec, &Limits::standard(random)).assert_clean();
    final_state_is_clean(w, img);
}

// ---------------------------------------------------------------------------
// qemu-img check, a few processes at a time

struct QemuChecks<'a> {
    dir: &'a Path,
    inflight: VecDeque<(String, String, Child)>,
    next: usize,
    done: usize,
    leaky: usize,
    failures: Vec<String>,
}

impl<'a> QemuChecks<'a> {
    fn new(dir: &'a Path) -> Self {
        QemuChecks {
            dir,
            inflight: VecDeque::new(),
            next: 0,
            done: 0,
            leaky: 0,
            failures: Vec::new(),
        }
    }

    fn submit(&mut self, what: String, disk: &[u8]) {
        let name = format!("crash-{}.qcow2", self.next);
        self.next += 1;
        std::fs::write(self.dir.join(&name), disk).unwrap();
        let child = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", &name])
            .current_dir(self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run qemu-img");
        self.inflight.push_back((what, name, child));
        while self.inflight.len() >= 8 {
            self.reap();
        }
    }

    fn reap(&mut self) {
        let Some((what, name, child)) = self.inflight.pop_front() else {
            return;
        };
        let out = child.wait_with_output().expect("wait for qemu-img");
        self.done += 1;
        match code(&out) {
            0 => {}
            3 => self.leaky += 1,
            c => self.failures.push(format!(
                "{what}: qemu-img check exited {c}: {}{}",
                stdout_of(&out).trim(),
                stderr_of(&out).trim()
            )),
        }
        let _ = std::fs::remove_file(self.dir.join(name));
    }

    fn finish(mut self) -> (Vec<String>, usize, usize) {
        while !self.inflight.is_empty() {
            self.reap();
        }
        (self.failures, self.done, self.leaky)
    }
}

// ---------------------------------------------------------------------------
// Crash replay

/// Whether `got` is allowed: equal to `durable` except where a later change
/// covers the byte with the value read.
fn verify_guest(got: &[u8], durable: &[u8], later: &[(&Step, usize)]) -> Result<(), String> {
    const CHUNK: usize = 4096;
    const SECTOR: usize = 512;
    let changes: Vec<(usize, u64, &[u8])> = later
        .iter()
        .flat_map(|(s, k)| s.changes.iter().map(move |(o, d)| (*k, *o, d.as_slice())))
        .collect();
    for (ci, (g, d)) in got.chunks(CHUNK).zip(durable.chunks(CHUNK)).enumerate() {
        if g == d {
            continue;
        }
        let chunk_lo = ci * CHUNK;
        for (si, (gs, ds)) in g.chunks(SECTOR).zip(d.chunks(SECTOR)).enumerate() {
            if gs == ds {
                continue;
            }
            let lo = (chunk_lo + si * SECTOR) as u64;
            let hi = lo + gs.len() as u64;
            let near: Vec<&(usize, u64, &[u8])> = changes
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

/// The log positions replayed as crash points.
fn sample_prefixes(
    log: &[LogOp],
    rng: &mut SplitMix64,
    all_below: usize,
    random: usize,
) -> Vec<usize> {
    let n = log.len();
    if n < all_below {
        return (0..=n).collect();
    }
    let mut set = BTreeSet::new();
    set.insert(0);
    set.insert(n);
    for (i, op) in log.iter().enumerate() {
        if matches!(op, LogOp::Flush) {
            set.insert(i);
            set.insert(i + 1);
        }
    }
    for _ in 0..random {
        set.insert(rng.below(n as u64 + 1) as usize);
    }
    set.into_iter().collect()
}

/// Sets of unflushed writes to drop (log indexes), the first one empty.
fn drop_sets(pending: &[usize], heavy: bool, rng: &mut SplitMix64) -> Vec<Vec<usize>> {
    let mut v: Vec<Vec<usize>> = vec![Vec::new()];
    if pending.is_empty() {
        return v;
    }
    v.push(pending.to_vec());
    if heavy {
        const CAP: usize = 12;
        if pending.len() <= CAP {
            v.extend(pending.iter().map(|i| vec![*i]));
        } else {
            for j in 0..CAP {
                let idx = j * (pending.len() - 1) / (CAP - 1);
                v.push(vec![pending[idx]]);
            }
        }
    }
    let randoms = if heavy { 3 } else { 1 };
    for _ in 0..randoms {
        let sub: Vec<usize> = pending
            .iter()
            .copied()
            .filter(|_| rng.chance(1, 2))
            .collect();
        if !sub.is_empty() && sub.len() < pending.len() {
            v.push(sub);
        }
    }
    v.sort();
    v.dedup();
    // Keep the no-drop set first.
    v.sort_by_key(|s| !s.is_empty());
    v
}

struct Limits {
    /// Replay every prefix when the log is shorter than this.
    all_below: usize,
    /// Otherwise: flush points and this many random prefixes.
    random: usize,
    /// Extra (non flush point) crash states checked by qemu-img.
    qemu_extra: usize,
    /// Storage flushes a dropped write may cross: 1 for a correct storage;
    /// more simulates a storage that ignores flushes (harness self-test).
    barrier_window: usize,
    /// Run `qemu-img check` and writes after the crash on the sample.
    qemu: bool,
}

impl Limits {
    fn standard(random: usize) -> Self {
        Limits {
            all_below: 700,
            random,
            qemu_extra: 30,
            barrier_window: 1,
            qemu: true,
        }
    }
}

/// What a replay found.
struct Outcome {
    failure_count: usize,
    /// The first failures, described.
    failures: Vec<String>,
}

impl Outcome {
    fn assert_clean(&self) {
        assert!(
            self.failure_count == 0,
            "{} crash-replay failures; the first ones:\n{}",
            self.failure_count,
            self.failures.join("\n")
        );
    }
}

fn replay(w: &Workload, rec: &Recorded, limits: &Limits) -> Outcome {
    let t0 = Instant::now();
    let s = w.scratch();
    let mut rng = SplitMix64(w.seed ^ 0x5eed_c0a5);
    let log = &rec.log;
    let prefixes = sample_prefixes(log, &mut rng, limits.all_below, limits.random);
    // Extra qemu-img samples: prefixes that are not right after a flush.
    let mut qemu_extra = BTreeSet::new();
    let others: Vec<usize> = prefixes
        .iter()
        .copied()
        .filter(|&p| p == 0 || !matches!(log[p - 1], LogOp::Flush))
        .collect();
    for _ in 0..limits.qemu_extra.min(others.len()) {
        qemu_extra.insert(others[rng.below(others.len() as u64) as usize]);
    }

    let size = w.size() as usize;
    let mut failures: Vec<String> = Vec::new();
    let mut failure_count = 0usize;
    let mut qemu = QemuChecks::new(s.dir());
    let mut crashes = 0usize;
    let mut leaky = 0usize;

    // Incremental state: the disk as of the last storage flush, and the
    // guest model as of the last completed guest flush.
    let mut flushed_disk = rec.initial.clone();
    let mut flushed_upto = 0usize;
    let mut durable = rec.base.clone();
    let mut durable_steps = 0usize; // steps applied to `durable`
    let mut got = vec![0u8; size];

    for &p in &prefixes {
        // Last storage flush within the prefix (the `barrier_window`-th
        // last one, to simulate a storage ignoring flushes).
        let f = log[..p]
            .iter()
            .enumerate()
            .filter(|(_, op)| matches!(op, LogOp::Flush))
            .map(|(i, _)| i + 1)
            .rev()
            .nth(limits.barrier_window - 1)
            .unwrap_or(0);
        for op in &log[flushed_upto..f] {
            apply(&mut flushed_disk, op);
        }
        flushed_upto = f;
        // Last completed guest flush.
        let last_flush_step = rec
            .steps
            .iter()
            .rposition(|st| matches!(st.op, G::Flush) && st.end <= p);
        let upto = last_flush_step.map_or(0, |j| j + 1);
        for st in &rec.steps[durable_steps..upto] {
            for (off, data) in &st.changes {
                durable[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        }
        durable_steps = upto;
        let later: Vec<(&Step, usize)> = rec
            .steps
            .iter()
            .enumerate()
            .skip(upto)
            .filter(|(_, st)| st.start < p)
            .map(|(k, st)| (st, k))
            .collect();
        let in_step = rec
            .steps
            .iter()
            .position(|st| st.start < p && p <= st.end)
            .map_or("between steps".to_string(), |k| {
                format!("in step {k} {:?}", rec.steps[k].op)
            });

        let pending: Vec<usize> = (f..p)
            .filter(|&i| matches!(log[i], LogOp::Write { .. }))
            .collect();
        // Right before a flush (or at the end) the most writes are pending:
        // try many drop sets there, a few elsewhere.
        let heavy = p == log.len() || matches!(log[p], LogOp::Flush);
        let after_flush = p > 0 && matches!(log[p - 1], LogOp::Flush);
        for (vi, dropped) in drop_sets(&pending, heavy, &mut rng).into_iter().enumerate() {
            crashes += 1;
            let mut disk = flushed_disk.clone();
            for (i, op) in log.iter().enumerate().take(p).skip(f) {
                if !dropped.contains(&i) {
                    apply(&mut disk, op);
                }
            }
            let last = match p.checked_sub(1) {
                Some(i) => format!("#{i} {:?}", log[i]),
                None => "none".to_string(),
            };
            let dropped_text = if dropped.is_empty() {
                "nothing".to_string()
            } else {
                dropped
                    .iter()
                    .map(|&i| format!("#{i} {:?}", log[i]))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let what = format!(
                "{} (seed {}): crash after {p} of {} storage ops ({in_step}; last op {last}), dropped unflushed writes: {dropped_text}",
                w.name,
                w.seed,
                log.len(),
            );
            let mut fail = |msg: String| {
                failure_count += 1;
                if failures.len() < 40 {
                    failures.push(format!("{what}: {msg}"));
                }
            };
            // (a) our open and check.
            let mut img = match w.open_vec(disk.clone()) {
                Ok(img) => img,
                Err(e) => {
                    fail(e);
                    continue;
                }
            };
            match img.check() {
                Err(e) => fail(format!("check() failed: {e}")),
                Ok(rep) if rep.corruptions > 0 || rep.check_errors > 0 => fail(format!(
                    "check: {} corruptions, {} check errors: {:?}",
                    rep.corruptions, rep.check_errors, rep.messages
                )),
                Ok(rep) => {
                    if rep.leaks > 0 {
                        leaky += 1;
                    }
                }
            }
            // (c) durability of what the last completed flush covered.
            match img.read_at(0, &mut got) {
                Err(e) => fail(format!("read of the whole disk failed: {e}")),
                Ok(()) => {
                    if let Err(m) = verify_guest(&got, &durable, &later) {
                        fail(m);
                    }
                }
            }
            drop(img);
            // (b) qemu-img check and (d) further writes, for a sample.
            let sampled =
                limits.qemu && ((vi == 0 && after_flush) || (qemu_extra.contains(&p) && vi <= 1));
            if sampled {
                qemu.submit(what.clone(), &disk);
                if let Err(m) = write_after_crash(w, disk) {
                    fail(m);
                }
            }
        }
    }
    let (qfail, qdone, qleaky) = qemu.finish();
    failure_count += qfail.len();
    failures.extend(qfail.into_iter().take(20));
    eprintln!(
        "{} (seed {}): {} log ops, {} prefixes, {} crash states ({} with leaks), {} qemu-img checks ({} with leaks), {:.1}s",
        w.name,
        w.seed,
        log.len(),
        prefixes.len(),
        crashes,
        leaky,
        qdone,
        qleaky,
        t0.elapsed().as_secs_f64()
    );
    Outcome {
        failure_count,
        failures,
    }
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
            rep.corruptions, rep.messages
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
        400,
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
            ..Limits::standard(400)
        },
    );
    assert!(
        out.failure_count > 10,
        "a storage ignoring flushes went unnoticed ({} failures)",
        out.failure_count
    );
    let text = out.failures.join("\n");
    eprintln!(
        "{} failures found as expected, e.g.:\n{}",
        out.failure_count,
        out.failures[..out.failures.len().min(3)].join("\n")
    );
    assert!(
        text.contains("durability:") && text.contains("corruptions"),
        "expected both lost data and corrupt refcounts:\n{text}"
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
    crash_test(&w, 400);
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
    crash_test(&w, 400);
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
        "in-memory header and disk agree"
    );
    assert_ne!(
        off_before, off_after,
        "the workload was meant to relocate the refcount table"
    );
    assert!(
        used_after > used_before + 50,
        "the workload was meant to add refcount blocks ({used_before} -> {used_after})"
    );
    replay(&w, &rec, &Limits::standard(300)).assert_clean();
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
    crash_test(&w, 400);
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
