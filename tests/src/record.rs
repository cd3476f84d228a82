//! A storage that records every write, length change and flush, for
//! crash-replay tests: a crash after any prefix of the log is the initial
//! bytes plus the operations of the prefix ([`apply`]).

use std::fmt;

use qcowkit_core::{BlockRead, BlockWrite, MemError};

/// One storage operation, as issued by the image.
#[derive(Clone)]
pub enum LogOp {
    /// Bytes written at an offset.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// The length set.
    SetLen(u64),
    /// A flush.
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
pub struct Recording {
    /// The bytes as they are now.
    pub disk: Vec<u8>,
    /// Every operation, in order.
    pub log: Vec<LogOp>,
}

impl Recording {
    /// A recording storage starting with `disk`.
    pub fn new(disk: Vec<u8>) -> Self {
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

/// Applies one logged operation to `disk`.
pub fn apply(disk: &mut Vec<u8>, op: &LogOp) {
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

/// Crash states of `log`, as `(k, lost)`: every prefix (the first `k`
/// operations applied, `lost` None), and for each flush, each write or
/// length change issued since the one before lost alone (`k` is the
/// flush's index).
pub fn crash_states(log: &[LogOp]) -> Vec<(usize, Option<usize>)> {
    let mut states: Vec<(usize, Option<usize>)> = (0..=log.len()).map(|k| (k, None)).collect();
    let mut since = Vec::new();
    for (i, op) in log.iter().enumerate() {
        if matches!(op, LogOp::Flush) {
            states.extend(since.iter().map(|&w| (i, Some(w))));
            since.clear();
        } else {
            since.push(i);
        }
    }
    states
}

/// The disk of crash state `(k, lost)` of `log` (see [`crash_states`])
/// over the initial bytes `start`.
pub fn crashed(start: &[u8], log: &[LogOp], k: usize, lost: Option<usize>) -> Vec<u8> {
    let mut disk = start.to_vec();
    for (i, op) in log[..k].iter().enumerate() {
        if Some(i) != lost {
            apply(&mut disk, op);
        }
    }
    disk
}

/// Asserts that crashed disk `disk` holds at worst leaks: a leaks-only
/// repair (`check -r leaks`) leaves nothing to report. `at` names the crash
/// state in the failure. Returns the repaired bytes.
pub fn assert_at_worst_leaks(disk: Vec<u8>, at: &str) -> Vec<u8> {
    use qcowkit_core::{Image, OpenOptions, RepairMode, WritableImage};
    let opts = OpenOptions {
        check_mode: true,
        no_backing: true,
        no_data_file: true,
        ..OpenOptions::default()
    };
    let img = Image::open(disk, &opts).unwrap_or_else(|e| panic!("{at}: does not open: {e}"));
    let mut w = WritableImage::for_repair(img).unwrap_or_else(|e| panic!("{at}: {e}"));
    let r = w
        .repair(RepairMode::Leaks, &mut |_| {})
        .unwrap_or_else(|e| panic!("{at}: the repair failed: {e}"));
    assert_eq!(
        (r.left.corruptions, r.left.leaks, r.left.check_errors),
        (0, 0, 0),
        "{at}: found {:?}",
        r.found
    );
    w.into_inner()
}
