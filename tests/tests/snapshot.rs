//! `qcow2 snapshot -l | -c` against qemu-img: snapshots we take list like
//! qemu-img's (`qemu-img snapshot -l`), read back the disk as it was
//! (`qemu-img convert -l`), stay intact under later writes, and qemu-img
//! can apply and delete them with `qemu-img check` clean after every step;
//! across version 2, extended L2, compressed clusters and small clusters
//! with 64-bit refcounts. A crash at any point of taking a snapshot leaves
//! at worst leaked clusters and the disk as it was.

use qcowkit_core::{Image, OpenOptions, WritableImage};
use qcowkit_tests::record::{apply, assert_at_worst_leaks, crash_states, crashed, Recording};
use qcowkit_tests::*;

/// The snapshot table without the DATE column (the two tools take their
/// snapshots at different times).
fn listing(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 7 && f[0] != "ID" {
                format!("{} {} {} {} {} {}", f[0], f[1], f[2], f[3], f[6], f[7])
            } else {
                l.to_string()
            }
        })
        .collect()
}

#[test]
fn snapshots_we_take_are_qemu_img_snapshots() {
    let s = Scratch::new();
    let d = s.dir();
    for opts in [
        "",
        "compat=0.10",
        "extended_l2=on",
        "compression_type=zstd",
        "cluster_size=4k,refcount_bits=64",
    ] {
        let mut lists = Vec::new();
        for (tool, img) in [("ours", "o.qcow2"), ("qemu-img", "q.qcow2")] {
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
            let before = qemu_contents(d, img);
            let take = |name: &str| {
                let out = run_tool(tool, d, &["snapshot", "-c", name, img]);
                assert_eq!(code(&out), 0, "[{opts}] {tool}: {}", output_text(&out));
                assert!(stdout_of(&out).is_empty(), "{}", stdout_of(&out));
                assert_qemu_img_check(d, img);
            };
            take("first");
            qemu_io(d, img, &["write -P 9 0 128k", "write -P 8 1M 4k"]);
            let middle = qemu_contents(d, img);
            take("second");
            take("first"); // names may repeat, as in qemu-img
            qemu_io(d, img, &["write -P 7 0 1M"]);
            assert_qemu_img_check(d, img);
            for (name, want) in [("1", &before), ("2", &middle)] {
                let raw = format!("{img}.{name}.raw");
                let _ = std::fs::remove_file(s.path(&raw));
                qemu_img(d, &["convert", "-O", "raw", "-l", name, img, &raw]);
                assert!(
                    std::fs::read(s.path(&raw)).unwrap() == *want,
                    "[{opts}] {tool}: snapshot {name}"
                );
            }
            let ours_list = stdout_of(&ours(d, &["snapshot", "-l", img]));
            let qemu_list = qemu_img(d, &["snapshot", "-l", img]);
            assert_eq!(listing(&ours_list), listing(&qemu_list), "[{opts}] {tool}");
            lists.push(listing(&qemu_list));
            qemu_img(d, &["snapshot", "-a", "1", img]);
            assert!(qemu_contents(d, img) == before, "[{opts}] {tool}: applied");
            qemu_img(d, &["snapshot", "-d", "second", img]);
            assert_qemu_img_check(d, img);
        }
        assert_eq!(
            lists[0], lists[1],
            "[{opts}] our snapshots list like qemu-img's"
        );
    }
}

#[test]
fn a_snapshot_interrupted_anywhere_leaves_the_disk_as_it_was() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "c.qcow2", "cluster_size=4k", "4M");
    qemu_io(
        d,
        "c.qcow2",
        &[
            "write -P 1 0 64k",
            "write -c -P 2 1M 64k",
            "write -P 3 3M 8k",
        ],
    );
    let start = std::fs::read(s.path("c.qcow2")).unwrap();
    let read_all = |disk: &[u8]| {
        let mut img = Image::open(disk.to_vec(), &OpenOptions::default()).unwrap();
        let mut out = vec![0u8; img.size() as usize];
        img.read_at(0, &mut out).unwrap();
        (out, img.snapshots().len())
    };
    let (want, _) = read_all(&start);
    let img = Image::open(Recording::new(start.clone()), &OpenOptions::default()).unwrap();
    let mut w = WritableImage::new(img).unwrap();
    w.create_snapshot("s", 1_700_000_000, 0).unwrap();
    let log = w.into_inner().log;
    let crashes = crash_states(&log);
    let states = crashes.len();
    for (k, lost) in crashes {
        let disk = crashed(&start, &log, k, lost);
        let at = format!("crash after {k} of {} (lost {lost:?})", log.len());
        let (got, snaps) = read_all(&disk);
        assert!(got == want, "{at}: the disk changed");
        assert!(snaps <= 1, "{at}");
        // At worst leaks: a leaks-only repair leaves nothing to report (a
        // refcount raised before the COPIED flags were cleared reads as a
        // flag error until the leak is freed, as in QEMU).
        let repaired = assert_at_worst_leaks(disk, &at);
        let (after, _) = read_all(&repaired);
        assert!(after == want, "{at}: the repair changed the disk");
    }
    assert!(states > 10, "only {states} crash states");
}

#[test]
fn deleting_snapshots_keeps_the_rest_and_leaves_qemu_img_check_clean() {
    let s = Scratch::new();
    let d = s.dir();
    for opts in [
        "",
        "compat=0.10",
        "extended_l2=on",
        "compression_type=zstd",
        "cluster_size=4k,refcount_bits=64",
    ] {
        for maker in ["ours", "qemu-img"] {
            let _ = std::fs::remove_file(s.path("t.qcow2"));
            qemu_create(d, "t.qcow2", opts, "4M");
            qemu_io(
                d,
                "t.qcow2",
                &[
                    "write -P 1 0 64k",
                    "write -c -P 2 1M 64k",
                    "write -P 3 3M 8k",
                ],
            );
            let made = if maker == "ours" {
                ours(d, &["snapshot", "-c", "a", "t.qcow2"])
            } else {
                run_in(d, "qemu-img", &["snapshot", "-c", "a", "t.qcow2"])
            };
            assert_eq!(code(&made), 0, "{}", output_text(&made));
            qemu_io(d, "t.qcow2", &["write -P 9 0 128k"]);
            let middle = qemu_contents(d, "t.qcow2");
            qemu_img(d, &["snapshot", "-c", "b", "t.qcow2"]);
            qemu_io(d, "t.qcow2", &["write -P 7 0 1M"]);
            let now = qemu_contents(d, "t.qcow2");
            let what = format!("[{opts}] {maker}'s snapshot");
            let out = ours(d, &["snapshot", "-d", "a", "t.qcow2"]);
            assert_eq!(code(&out), 0, "{what}: {}", output_text(&out));
            assert_qemu_img_check(d, "t.qcow2");
            assert!(
                qemu_contents(d, "t.qcow2") == now,
                "{what}: the disk changed"
            );
            let _ = std::fs::remove_file(s.path("b.raw"));
            qemu_img(d, &["convert", "-O", "raw", "-l", "b", "t.qcow2", "b.raw"]);
            assert!(
                std::fs::read(s.path("b.raw")).unwrap() == middle,
                "{what}: snapshot b changed"
            );
            assert!(
                differs_from_qemu_img(
                    d,
                    &["snapshot", "-d", "a", "t.qcow2"],
                    &["snapshot", "-d", "a", "t.qcow2"]
                )
                .is_none(),
                "{what}: deleting it twice"
            );
            let out = ours(d, &["snapshot", "-d", "b", "t.qcow2"]);
            assert_eq!(code(&out), 0, "{what}: {}", output_text(&out));
            assert_qemu_img_check(d, "t.qcow2");
            assert!(
                qemu_img(d, &["snapshot", "-l", "t.qcow2"]).is_empty(),
                "{what}"
            );
            // The clusters are the active layer's alone again: writes go in
            // place and the image stays clean.
            qemu_io(d, "t.qcow2", &["write -P 5 0 2M"]);
            assert_qemu_img_check(d, "t.qcow2");
        }
    }
}

#[test]
fn a_deletion_interrupted_anywhere_leaves_at_worst_leaks() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "c.qcow2", "cluster_size=4k", "4M");
    qemu_io(d, "c.qcow2", &["write -P 1 0 64k", "write -c -P 2 1M 64k"]);
    qemu_img(d, &["snapshot", "-c", "a", "c.qcow2"]);
    qemu_io(d, "c.qcow2", &["write -P 3 0 8k"]);
    let start = std::fs::read(s.path("c.qcow2")).unwrap();
    let read_all = |disk: &[u8]| {
        let mut img = Image::open(disk.to_vec(), &OpenOptions::default()).unwrap();
        let mut out = vec![0u8; img.size() as usize];
        img.read_at(0, &mut out).unwrap();
        out
    };
    let want = read_all(&start);
    let img = Image::open(Recording::new(start.clone()), &OpenOptions::default()).unwrap();
    let mut w = WritableImage::new(img).unwrap();
    assert!(w.delete_snapshot("a").unwrap());
    let log = w.into_inner().log;
    let crashes = crash_states(&log);
    for (k, lost) in crashes {
        let disk = crashed(&start, &log, k, lost);
        let at = format!("crash after {k} of {} (lost {lost:?})", log.len());
        assert!(read_all(&disk) == want, "{at}: the disk changed");
        assert_at_worst_leaks(disk, &at);
    }
}

#[test]
fn applying_snapshots_reverts_the_disk_like_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    for opts in [
        "",
        "extended_l2=on",
        "compression_type=zstd",
        "cluster_size=512,refcount_bits=64",
    ] {
        for maker in ["ours", "qemu-img"] {
            let _ = std::fs::remove_file(s.path("t.qcow2"));
            qemu_create(d, "t.qcow2", opts, "4M");
            qemu_io(
                d,
                "t.qcow2",
                &[
                    "write -P 1 0 64k",
                    "write -c -P 2 1M 64k",
                    "write -P 3 3M 8k",
                ],
            );
            let before = qemu_contents(d, "t.qcow2");
            let made = if maker == "ours" {
                ours(d, &["snapshot", "-c", "a", "t.qcow2"])
            } else {
                run_in(d, "qemu-img", &["snapshot", "-c", "a", "t.qcow2"])
            };
            assert_eq!(code(&made), 0, "{}", output_text(&made));
            // Written and grown after the snapshot: applying it brings the
            // old size back too.
            qemu_io(d, "t.qcow2", &["write -P 9 0 128k"]);
            qemu_img(d, &["resize", "t.qcow2", "8M"]);
            qemu_io(d, "t.qcow2", &["write -P 4 6M 64k"]);
            let what = format!("[{opts}] {maker}'s snapshot");
            let out = ours(d, &["snapshot", "-a", "a", "t.qcow2"]);
            assert_eq!(code(&out), 0, "{what}: {}", output_text(&out));
            assert_qemu_img_check(d, "t.qcow2");
            assert!(
                qemu_contents(d, "t.qcow2") == before,
                "{what}: not reverted"
            );
            // Writes after it land beside the snapshot, which stays as it was.
            qemu_io(d, "t.qcow2", &["write -P 5 0 2M"]);
            assert_qemu_img_check(d, "t.qcow2");
            let _ = std::fs::remove_file(s.path("a.raw"));
            qemu_img(d, &["convert", "-O", "raw", "-l", "a", "t.qcow2", "a.raw"]);
            assert!(
                std::fs::read(s.path("a.raw")).unwrap() == before,
                "{what}: snapshot changed"
            );
            // By ID too, and qemu-img's message for a missing one.
            let out = ours(d, &["snapshot", "-a", "1", "t.qcow2"]);
            assert_eq!(code(&out), 0, "{what}: {}", output_text(&out));
            assert!(qemu_contents(d, "t.qcow2") == before, "{what}: by ID");
            assert!(
                differs_from_qemu_img(
                    d,
                    &["snapshot", "-a", "zz", "t.qcow2"],
                    &["snapshot", "-a", "zz", "t.qcow2"]
                )
                .is_none(),
                "{what}: missing snapshot"
            );
        }
    }
}

#[test]
fn an_apply_interrupted_anywhere_leaves_at_worst_leaks() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "c.qcow2", "cluster_size=4k", "4M");
    qemu_io(d, "c.qcow2", &["write -P 1 0 64k", "write -c -P 2 1M 64k"]);
    qemu_img(d, &["snapshot", "-c", "a", "c.qcow2"]);
    qemu_io(d, "c.qcow2", &["write -P 3 0 8k", "write -P 4 2M 8k"]);
    let start = std::fs::read(s.path("c.qcow2")).unwrap();
    let read_all = |disk: &[u8]| {
        let mut img = Image::open(disk.to_vec(), &OpenOptions::default()).unwrap();
        let mut out = vec![0u8; img.size() as usize];
        img.read_at(0, &mut out).unwrap();
        out
    };
    let old = read_all(&start);
    let img = Image::open(Recording::new(start.clone()), &OpenOptions::default()).unwrap();
    let mut w = WritableImage::new(img).unwrap();
    assert!(w.apply_snapshot("a").unwrap());
    let log = w.into_inner().log;
    let mut end = start.clone();
    for op in &log {
        apply(&mut end, op);
    }
    let new = read_all(&end);
    let crashes = crash_states(&log);
    for (k, lost) in crashes {
        let disk = crashed(&start, &log, k, lost);
        let at = format!("crash after {k} of {} (lost {lost:?})", log.len());
        let got = read_all(&disk);
        assert!(
            got == old || got == new,
            "{at}: neither the old disk nor the snapshot's"
        );
        assert_at_worst_leaks(disk, &at);
    }
}

#[test]
fn convert_reads_a_snapshot_like_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "cv.qcow2", "", "4M");
    qemu_io(d, "cv.qcow2", &["write -P 1 0 64k", "write -c -P 2 1M 64k"]);
    qemu_img(d, &["snapshot", "-c", "a", "cv.qcow2"]);
    qemu_io(d, "cv.qcow2", &["write -P 9 0 128k"]);
    // Grown since: qemu-img reads the snapshot at today's size.
    qemu_img(d, &["resize", "cv.qcow2", "8M"]);
    for param in ["a", "1", "snapshot.name=a", "snapshot.id=1"] {
        for out in ["o.raw", "q.raw"] {
            let _ = std::fs::remove_file(s.path(out));
        }
        let o = ours(
            d,
            &["convert", "-l", param, "-O", "raw", "cv.qcow2", "o.raw"],
        );
        assert_eq!(code(&o), 0, "{param}: {}", output_text(&o));
        qemu_img(
            d,
            &["convert", "-l", param, "-O", "raw", "cv.qcow2", "q.raw"],
        );
        assert!(
            std::fs::read(s.path("o.raw")).unwrap() == std::fs::read(s.path("q.raw")).unwrap(),
            "{param}: bytes differ"
        );
    }
    let o = ours(
        d,
        &["convert", "-s", "a", "-O", "qcow2", "cv.qcow2", "o.qcow2"],
    );
    assert_eq!(code(&o), 0, "{}", output_text(&o));
    assert_qemu_img_check(d, "o.qcow2");
    qemu_img_compare(d, "o.qcow2", "qcow2", "q.raw", "raw").unwrap();
    let missing = ["convert", "-l", "zz", "-O", "raw", "cv.qcow2", "z.raw"];
    assert!(differs_from_qemu_img(d, &missing, &missing).is_none());
}
