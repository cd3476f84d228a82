//! Frugal reading: with an L2 budget far below one cluster, reads use
//! slices of L2 tables, return the same bytes as qemu-img, and the heap
//! stays far below one cluster (measured by a counting allocator).

use std::os::unix::fs::FileExt;

use qcowkit_core::OpenOptions;
use qcowkit_std::{Disk, DiskOptions};
use qcowkit_tests::heap::{self, reset_peak};
use qcowkit_tests::*;

#[global_allocator]
static GLOBAL: heap::Counting = heap::Counting;

/// Opens `image` frugally, reads it all in 4 KiB pieces comparing with
/// `expected` (a raw file), and returns (heap growth during open, during reading).
fn frugal_read(s: &Scratch, image: &str, expected: &str, slice: u64) -> (usize, usize) {
    let raw = std::fs::File::open(s.path(expected)).unwrap();
    let size = raw.metadata().unwrap().len();
    let mut ours = vec![0u8; 4096];
    let mut theirs = vec![0u8; 4096];
    let path = s.path(image);
    let opts = DiskOptions {
        format: None,
        qcow2: OpenOptions {
            l2_cache_bytes: Some(slice),
            refcount_cache_bytes: Some(0),
            ..OpenOptions::default()
        },
        follow: qcowkit_std::Follow::Any,
        force_share: false,
        // No window: the heap measured is the core's alone.
        read_ahead: 0,
    };
    let base = reset_peak();
    let mut disk = Disk::open(&path, &opts).unwrap();
    let open_peak = heap::peak() - base;
    assert_eq!(disk.size(), size, "{image}");
    let base = reset_peak();
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(4096) as usize;
        disk.read_at(pos, &mut ours[..n]).unwrap();
        raw.read_exact_at(&mut theirs[..n], pos).unwrap();
        assert!(
            ours[..n] == theirs[..n],
            "{image}: bytes differ in the 4 KiB at {pos}"
        );
        pos += n as u64;
    }
    let read_peak = heap::peak() - base;
    (open_peak, read_peak)
}

#[test]
fn frugal_mode_reads_the_same_bytes_with_a_tiny_heap() {
    let s = Scratch::new();
    let d = s.dir();
    // Plain, extended L2, and a backing chain, all with 64 KiB clusters.
    qemu_create(d, "plain.qcow2", "", "8M");
    qemu_io(
        d,
        "plain.qcow2",
        &[
            "write -P 1 0 100k",
            "write -P 2 3M 1M",
            "write -z 5M 64k",
            "write -P 3 8355840 32k",
        ],
    );
    qemu_create(d, "ext.qcow2", "extended_l2=on", "8M");
    qemu_io(
        d,
        "ext.qcow2",
        &[
            "write -P 4 1000 5000",
            "write -z 64k 2k",
            "write -P 5 7M 33k",
        ],
    );
    qemu_overlay(d, "top.qcow2", "", ("plain.qcow2", "qcow2"), None);
    qemu_io(d, "top.qcow2", &["write -P 6 50k 100k", "discard 3M 64k"]);
    for img in ["plain", "ext", "top"] {
        qemu_img(
            d,
            &[
                "convert",
                "-O",
                "raw",
                &format!("{img}.qcow2"),
                &format!("{img}.raw"),
            ],
        );
    }
    for img in ["plain", "ext", "top"] {
        for slice in [512u64, 2048] {
            let (open, read) =
                frugal_read(&s, &format!("{img}.qcow2"), &format!("{img}.raw"), slice);
            println!("{img} with {slice}-byte L2 slices: open grew the heap by {open} B, reading by {read} B");
            // One cluster is 64 KiB: the whole reader stays far below it.
            assert!(open < 16 * 1024, "{img}: opening took {open} bytes of heap");
            assert!(read < 8 * 1024, "{img}: reading took {read} bytes of heap");
        }
    }
    // The same images in normal mode read the same bytes (sanity).
    let (_, normal) = frugal_read(&s, "plain.qcow2", "plain.raw", 32 << 20);
    assert!(
        normal >= 64 * 1024,
        "normal mode caches whole 64 KiB tables ({normal} B)"
    );
}
