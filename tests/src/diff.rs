//! Where bytes differ: for failure messages comparing guest disks, models
//! and files.

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Offset of the first byte where `a` and `b` differ, within the length
/// they have in common.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Describes the first guest byte where `got` differs from `want` (None
/// when they are equal, or differ only in length).
pub fn first_mismatch(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let i = first_difference(got, want)?;
    Some(format!(
        "guest byte {i:#x} reads {:#04x}, expected {:#04x}",
        got[i], want[i]
    ))
}

/// Describes how `got` differs from `want` (None when equal): the lengths
/// when they differ, how many bytes differ in how many runs, and the first
/// runs with their first bytes.
pub fn byte_diff(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let mut msg = String::new();
    if got.len() != want.len() {
        msg += &format!("length {} instead of {}; ", got.len(), want.len());
    }
    let n = got.len().min(want.len());
    let mut runs = Vec::new();
    let mut i = 0;
    let mut total = 0usize;
    while i < n {
        if got[i] != want[i] {
            let s = i;
            while i < n && got[i] != want[i] {
                i += 1;
            }
            total += i - s;
            runs.push((s, i));
        } else {
            i += 1;
        }
    }
    msg += &format!("{total} byte(s) differ in {} run(s):", runs.len());
    for (s, e) in runs.iter().take(8) {
        msg += &format!(" [{s}..{e}) got {:#04x} want {:#04x};", got[*s], want[*s]);
    }
    Some(msg)
}

/// First difference between two files (their lengths, else the first
/// differing byte), read in 1 MiB pieces; None when they are equal.
pub fn file_difference(a: &Path, b: &Path) -> Option<String> {
    const PIECE: u64 = 1 << 20;
    let (la, lb) = (
        std::fs::metadata(a).expect("stat").len(),
        std::fs::metadata(b).expect("stat").len(),
    );
    if la != lb {
        return Some(format!("lengths differ: {la} / {lb}"));
    }
    let (mut fa, mut fb) = (File::open(a).expect("open"), File::open(b).expect("open"));
    let mut ba = vec![0u8; PIECE as usize];
    let mut bb = vec![0u8; PIECE as usize];
    let mut pos = 0u64;
    while pos < la {
        let n = (la - pos).min(PIECE) as usize;
        fa.read_exact(&mut ba[..n]).expect("read");
        fb.read_exact(&mut bb[..n]).expect("read");
        if let Some(i) = first_difference(&ba[..n], &bb[..n]) {
            let at = pos + i as u64;
            return Some(format!(
                "first differing byte at offset {at}: {:#04x} / {:#04x}",
                ba[i], bb[i]
            ));
        }
        pos += n as u64;
    }
    None
}
