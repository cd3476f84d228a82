//! The core's API on images made by qemu-img: instant open of huge images,
//! bounded caches, one read call per contiguous host range, the opener
//! policy, and block status.

use std::cell::RefCell;
use std::rc::Rc;

use qcowkit_core::{BlockRead, Error, FileRole, Image, Mapping, OpenOptions, WritableImage};
use qcowkit_tests::*;

/// A storage that counts read calls and bytes.
struct Counting {
    inner: Vec<u8>,
    calls: Rc<RefCell<Vec<(u64, usize)>>>,
}

impl BlockRead for Counting {
    type Error = qcowkit_core::MemError;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.calls.borrow_mut().push((offset, buf.len()));
        self.inner.read_at(offset, buf)
    }
    fn len(&mut self) -> Result<u64, Self::Error> {
        BlockRead::len(&mut self.inner)
    }
}

#[test]
fn a_64_tib_image_opens_and_reads_without_loading_l2_tables() {
    let s = Scratch::new();
    let bytes = qemu_image(
        s.dir(),
        "big.qcow2",
        "",
        "64T",
        &["write -P 0x11 32T 4k", "write -P 0x22 70368744173568 4k"],
    );
    let mut img = Image::open(bytes, &OpenOptions::default()).unwrap();
    assert_eq!(img.size(), 64 << 40);
    // QEMU's default: enough to cover the image, capped at 32 MiB.
    assert_eq!(img.l2_cache_capacity(), 32 * 1024 * 1024 / 65536);
    let mut buf = vec![0u8; 4096];
    img.read_at(32 << 40, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x11));
    img.read_at((64 << 40) - 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x22));
    img.read_at(1 << 40, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    assert_eq!(
        img.l2_cache_misses(),
        2,
        "only the two L2 tables in use are read"
    );
    // Out of bounds is an error, not a panic.
    let err = img.read_at((64 << 40) - 100, &mut buf).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { .. }), "{err}");
}

#[test]
fn l2_cache_budget_is_respected() {
    let s = Scratch::new();
    // 512-byte clusters: one L2 table covers 32 KiB, so this touches 64 tables.
    let cmds: Vec<String> = (0..64)
        .map(|i| format!("write -P {} {} 512", i + 1, i * 32768))
        .collect();
    let bytes = qemu_image(s.dir(), "c.qcow2", "cluster_size=512", "2M", &cmds);
    let opts = OpenOptions {
        l2_cache_bytes: Some(4 * 512),
        ..OpenOptions::default()
    };
    let mut img = Image::open(bytes, &opts).unwrap();
    assert_eq!(img.l2_cache_capacity(), 4);
    let mut buf = vec![0u8; 512];
    for round in 0..2 {
        for i in 0..64u64 {
            img.read_at(i * 32768, &mut buf).unwrap();
            assert!(
                buf.iter().all(|b| u64::from(*b) == i + 1),
                "round {round} table {i}"
            );
        }
    }
    // With 4 slots and 64 tables read in a cycle, every access misses.
    assert_eq!(img.l2_cache_misses(), 128);
}

#[test]
fn contiguous_host_ranges_are_read_in_one_call() {
    let s = Scratch::new();
    let inner = qemu_image(
        s.dir(),
        "c.qcow2",
        "cluster_size=4k",
        "8M",
        &["write -P 0x33 0 1M"],
    );
    let calls = Rc::new(RefCell::new(Vec::new()));
    let io = Counting {
        inner,
        calls: calls.clone(),
    };
    let mut img = Image::open(io, &OpenOptions::default()).unwrap();
    calls.borrow_mut().clear();
    let mut buf = vec![0u8; 1 << 20];
    img.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x33));
    let calls = calls.borrow();
    let big: Vec<_> = calls.iter().filter(|(_, len)| *len > 4096).collect();
    // 1 MiB = 256 clusters over two 4 KiB L2 tables (512 entries each): one
    // table, then one data read for the whole contiguous run.
    assert_eq!(big.len(), 1, "reads: {calls:?}");
    assert_eq!(big[0].1, 1 << 20);
}

#[test]
fn map_shallow_reports_each_kind() {
    let s = Scratch::new();
    let bytes = qemu_image(
        s.dir(),
        "e.qcow2",
        "extended_l2=on,cluster_size=64k",
        "4M",
        &["write -P 1 0 4k", "write -z 64k 2k", "write -c -P 2 1M 64k"],
    );
    let mut img = Image::open(bytes, &OpenOptions::default()).unwrap();
    let (m, len) = img.map_shallow(0, 1 << 20).unwrap();
    assert!(
        matches!(
            m,
            Mapping::Data {
                external: false,
                ..
            }
        ),
        "{m:?}"
    );
    assert_eq!(len, 4096);
    let (m, len) = img.map_shallow(4096, 1 << 20).unwrap();
    assert!(
        matches!(
            m,
            Mapping::Unallocated {
                host_offset: Some(_)
            }
        ),
        "{m:?}"
    );
    assert_eq!(len, 65536 - 4096);
    let (m, len) = img.map_shallow(65536, 1 << 20).unwrap();
    assert_eq!(m, Mapping::Zero { host_offset: None });
    assert_eq!(len, 2048);
    let (m, len) = img.map_shallow(1 << 20, 1 << 20).unwrap();
    assert!(
        matches!(
            m,
            Mapping::Compressed {
                cluster_start: 0x100000,
                ..
            }
        ),
        "{m:?}"
    );
    assert_eq!(len, 65536);
}

#[test]
fn backing_files_come_from_the_opener_only() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "base.qcow2", "", "1M");
    qemu_io(d, "base.qcow2", &["write -P 7 0 64k"]);
    qemu_overlay(d, "top.qcow2", "", ("base.qcow2", "qcow2"), None);
    let top = std::fs::read(s.path("top.qcow2")).unwrap();
    let base = std::fs::read(s.path("base.qcow2")).unwrap();

    // Without an opener, a backing file is an error (or ignored on request).
    let err = Image::open(top.clone(), &OpenOptions::default()).unwrap_err();
    assert!(err.to_string().contains("base.qcow2"), "{err}");
    let no_backing = OpenOptions {
        no_backing: true,
        ..OpenOptions::default()
    };
    let mut img = Image::open(top.clone(), &no_backing).unwrap();
    let mut buf = [9u8; 16];
    img.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [0; 16]);

    let mut opener = Files::new().with("base.qcow2", base);
    let mut img = Image::open_with(
        top,
        "top.qcow2",
        "top",
        &mut opener,
        &OpenOptions::default(),
    )
    .unwrap();
    img.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [7; 16]);
    assert_eq!(
        opener.asked,
        vec![(
            "top.qcow2".to_string(),
            "base.qcow2".to_string(),
            FileRole::Backing
        )]
    );
    let (st, _) = img.block_status(0, 4096).unwrap();
    assert_eq!(st.depth, 1);
    assert!(st.data && st.present);
}

#[test]
fn missing_backing_file_names_it() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "base.qcow2", "", "1M");
    qemu_overlay(d, "top.qcow2", "", ("base.qcow2", "qcow2"), None);
    std::fs::remove_file(s.path("base.qcow2")).unwrap();
    let out = ours(d, &["convert", "-O", "raw", "top.qcow2", "out.raw"]);
    assert_eq!(code(&out), 1);
    let err = stderr_of(&out);
    assert!(err.starts_with("qcow2: "), "{err}");
    assert!(err.contains("base.qcow2"), "{err}");
}

#[test]
fn no_follow_refuses_files_named_by_the_image() {
    let s = Scratch::new();
    let d = s.dir();
    std::fs::write(s.path("secret.raw"), b"top secret").unwrap();
    qemu_overlay(d, "evil.qcow2", "", ("secret.raw", "raw"), Some("1M"));
    let out = ours(
        d,
        &[
            "convert",
            "--no-follow",
            "-O",
            "raw",
            "evil.qcow2",
            "out.raw",
        ],
    );
    assert_eq!(code(&out), 1);
    let err = stderr_of(&out);
    assert!(
        err.contains("secret.raw") && err.contains("disabled"),
        "{err}"
    );
    assert!(!s.path("out.raw").exists());
    // Without the flag the backing file is followed, like qemu-img.
    ours_ok(d, &["convert", "-O", "raw", "evil.qcow2", "out.raw"]);
    assert!(std::fs::read(s.path("out.raw"))
        .unwrap()
        .starts_with(b"top secret"));
}

#[test]
fn writing_a_huge_image_stays_within_the_cache_budget() {
    use qcowkit_core::CreateOptions;
    let disk = new_disk(&CreateOptions {
        size: 64 << 40,
        ..CreateOptions::default()
    });
    let opts = OpenOptions {
        l2_cache_bytes: Some(4 * 65536),
        refcount_cache_bytes: Some(2 * 65536),
        ..OpenOptions::default()
    };
    let mut img = WritableImage::open(disk, &opts).unwrap();
    // Every write lands in a different L2 table (each covers 512 MiB).
    for i in 0..40u64 {
        let off = i * (1 << 40) + i * 4096;
        img.write_at(off, &[i as u8 + 1; 4096]).unwrap();
        assert!(
            img.l2_cache_len() <= 4,
            "write {i}: {} L2 tables cached",
            img.l2_cache_len()
        );
        assert!(
            img.refcount_cache_len() <= 2,
            "write {i}: {} refcount blocks",
            img.refcount_cache_len()
        );
    }
    img.flush().unwrap();
    let mut buf = [0u8; 4096];
    for i in 0..40u64 {
        img.read_at(i * (1 << 40) + i * 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == i as u8 + 1), "read back {i}");
    }
    let rep = img.check().unwrap();
    assert_eq!((rep.corruptions, rep.leaks), (0, 0), "{:?}", rep.messages);
    // The file holds the metadata plus 40 data clusters and 40 L2 tables.
    let bytes = img.into_inner();
    assert!(bytes.len() < 16 << 20);
    // qemu-img is the judge: a clean image with the data where we put it.
    let s = Scratch::new();
    std::fs::write(s.path("huge.qcow2"), &bytes).unwrap();
    assert_qemu_img_check(s.dir(), "huge.qcow2");
    let reads: Vec<String> = (0..40u64)
        .map(|i| format!("read -P {} {} 4k", i + 1, i * (1 << 40) + i * 4096))
        .collect();
    qemu_io(s.dir(), "huge.qcow2", &reads);
}
