//! `qcow2 amend -o refcount_bits=N,lazy_refcounts=on|off` against
//! `qemu-img amend`: every width from 1 to 64 bits on images with
//! snapshots, compressed clusters, extended L2 and small clusters; both
//! tools succeed or refuse alike, and after ours qemu-img finds the image
//! clean, with the new width and the same guest data. A width change
//! interrupted anywhere leaves the image with the old structure or the new
//! one, at worst leaks.

use qcowkit_core::{Image, OpenOptions, WritableImage};
use qcowkit_tests::record::{assert_at_worst_leaks, crash_states, crashed, Recording};
use qcowkit_tests::*;

#[test]
fn refcount_widths_change_like_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    let mut problems = Vec::new();
    for opts in [
        "",
        "cluster_size=4k",
        "extended_l2=on",
        "compression_type=zstd",
    ] {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            for img in ["o.qcow2", "q.qcow2"] {
                let _ = std::fs::remove_file(s.path(img));
                qemu_create(d, img, opts, "4M");
                qemu_io(
                    d,
                    img,
                    &[
                        "write -P 1 0 64k",
                        "write -c -P 2 1M 64k",
                        "write -P 3 3M 8k",
                    ],
                );
                qemu_img(d, &["snapshot", "-c", "s", img]);
            }
            let before = qemu_contents(d, "o.qcow2");
            let arg = format!("refcount_bits={bits}");
            let o = ours(d, &["amend", "-o", &arg, "o.qcow2"]);
            let q = run_in(d, "qemu-img", &["amend", "-o", &arg, "q.qcow2"]);
            let what = format!("[{opts}] {bits} bits");
            if code(&o) != code(&q) {
                problems.push(format!(
                    "{what}: ours {} / qemu-img {}",
                    output_text(&o),
                    output_text(&q)
                ));
                continue;
            }
            if let Err(e) = qemu_img_check(d, "o.qcow2") {
                problems.push(format!("{what}: {e}"));
            }
            if qemu_contents(d, "o.qcow2") != before {
                problems.push(format!("{what}: guest data changed"));
            }
            let width =
                |f: &str| qemu_info(d, f)["format-specific"]["data"]["refcount-bits"].clone();
            if width("o.qcow2") != width("q.qcow2") {
                problems.push(format!(
                    "{what}: width {} / {}",
                    width("o.qcow2"),
                    width("q.qcow2")
                ));
            }
            // The snapshot still reads as it was.
            let _ = std::fs::remove_file(s.path("snap.raw"));
            qemu_img(
                d,
                &["convert", "-O", "raw", "-l", "s", "o.qcow2", "snap.raw"],
            );
            if std::fs::read(s.path("snap.raw")).unwrap() != before {
                problems.push(format!("{what}: the snapshot changed"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn lazy_refcounts_and_refusals_match_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "a.qcow2", "", "1M");
    for on in ["on", "off"] {
        let o = ours(
            d,
            &["amend", "-o", &format!("lazy_refcounts={on}"), "a.qcow2"],
        );
        assert_eq!(code(&o), 0, "{}", output_text(&o));
        assert_eq!(
            qemu_info(d, "a.qcow2")["format-specific"]["data"]["lazy-refcounts"],
            on == "on"
        );
        assert_qemu_img_check(d, "a.qcow2");
    }
    let refused: &[&[&str]] = &[
        &["amend", "-o", "refcount_bits=3", "a.qcow2"],
        &["amend", "a.qcow2"],
    ];
    for args in refused {
        let o = ours(d, args);
        let q = run_in(d, "qemu-img", args);
        assert_eq!((code(&o), code(&q)), (1, 1), "{args:?}");
    }
    assert!(differs_from_qemu_img(
        d,
        &["amend", "-o", "refcount_bits=3", "a.qcow2"],
        &["amend", "-o", "refcount_bits=3", "a.qcow2"]
    )
    .is_none());
}

#[test]
fn a_width_change_interrupted_anywhere_leaves_at_worst_leaks() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "c.qcow2", "cluster_size=4k", "4M");
    qemu_io(d, "c.qcow2", &["write -P 1 0 64k", "write -P 3 3M 8k"]);
    let start = std::fs::read(s.path("c.qcow2")).unwrap();
    let read_all = |disk: &[u8]| {
        let mut img = Image::open(disk.to_vec(), &OpenOptions::default()).unwrap();
        let mut out = vec![0u8; img.size() as usize];
        img.read_at(0, &mut out).unwrap();
        (out, img.header().refcount_order)
    };
    let (want, _) = read_all(&start);
    for bits in [1u32, 64] {
        let img = Image::open(Recording::new(start.clone()), &OpenOptions::default()).unwrap();
        let mut w = WritableImage::new(img).unwrap();
        w.set_refcount_bits(bits).unwrap();
        let log = w.into_inner().log;
        for (k, lost) in crash_states(&log) {
            let disk = crashed(&start, &log, k, lost);
            let at = format!(
                "{bits} bits: crash after {k} of {} (lost {lost:?})",
                log.len()
            );
            let (got, order) = read_all(&disk);
            assert!(got == want, "{at}: the disk changed");
            assert!(
                [4, bits.trailing_zeros()].contains(&order),
                "{at}: order {order}"
            );
            assert_at_worst_leaks(disk, &at);
        }
    }
}
