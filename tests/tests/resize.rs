//! `qcow2 resize` against `qemu-img resize`: the same messages and exit
//! codes, the same guest contents and virtual size after, `qemu-img check`
//! clean; growing with an L1 table that must move, shrinking across L2
//! tables, relative sizes, preallocation, version 2, snapshots. And a crash
//! at any point of a resize leaves an image with no corruption, the old or
//! the new size, and the guest data below both.

use qcowkit_core::{Image, OpenOptions, Preallocation, RepairMode, WritableImage};
use qcowkit_tests::record::{crash_states, crashed, Recording};
use qcowkit_tests::*;

/// (name, create options, size, qemu-io commands, resize arguments with
/// IMG for the image).
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);

const CASES: &[Case] = &[
    ("grow", "", "1M", &["write -P 1 0 64k"], &["IMG", "2G"]),
    (
        "grow relative",
        "",
        "1M",
        &["write -P 1 0 64k"],
        &["IMG", "+1G"],
    ),
    (
        "grow moves L1",
        "cluster_size=512",
        "1M",
        &["write -P 1 0 4k"],
        &["IMG", "100M"],
    ),
    (
        "grow extended L2",
        "extended_l2=on,cluster_size=16k",
        "1M",
        &["write -P 1 4k 4k"],
        &["IMG", "300M"],
    ),
    (
        "shrink refused",
        "",
        "1M",
        &["write -P 1 0 64k"],
        &["IMG", "512k"],
    ),
    (
        "shrink",
        "",
        "1M",
        &["write -P 1 0 64k", "write -P 2 768k 64k"],
        &["--shrink", "IMG", "512k"],
    ),
    (
        "shrink relative",
        "",
        "1M",
        &["write -P 1 0 64k", "write -P 2 768k 64k"],
        &["--shrink", "IMG", "-256k"],
    ),
    (
        "shrink mid-cluster",
        "",
        "1M",
        &["write -P 1 0 1M"],
        &["--shrink", "IMG", "100352"],
    ),
    (
        "shrink drops L2 tables",
        "cluster_size=512",
        "1M",
        &["write -P 1 0 4k", "write -P 3 900k 8k"],
        &["--shrink", "IMG", "64k"],
    ),
    ("not a multiple of 512", "", "1M", &[], &["IMG", "1000"]),
    ("below zero", "", "1M", &[], &["IMG", "-2M"]),
    ("zero", "", "1M", &[], &["IMG", "0"]),
    (
        "prealloc metadata",
        "",
        "1M",
        &["write -P 1 0 64k"],
        &["--preallocation=metadata", "IMG", "3M"],
    ),
    (
        "prealloc full",
        "",
        "1M",
        &["write -P 1 0 64k"],
        &["--preallocation=full", "IMG", "3M"],
    ),
    (
        "prealloc falloc extl2",
        "extended_l2=on,cluster_size=128k",
        "1M",
        &["write -P 1 0 64k"],
        &["--preallocation=falloc", "IMG", "3M"],
    ),
    (
        "prealloc shrinking",
        "",
        "1M",
        &[],
        &["--preallocation=full", "IMG", "512k"],
    ),
    (
        "bad prealloc",
        "",
        "1M",
        &[],
        &["--preallocation=foo", "IMG", "2M"],
    ),
    (
        "v2 grow",
        "compat=0.10",
        "1M",
        &["write -P 1 0 64k"],
        &["IMG", "5M"],
    ),
];

#[test]
fn resize_matches_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    let mut problems = Vec::new();
    for (name, create, size, cmds, args) in CASES {
        for img in ["o.qcow2", "q.qcow2"] {
            let _ = std::fs::remove_file(s.path(img));
            qemu_create(d, img, create, size);
            if !cmds.is_empty() {
                qemu_io(d, img, cmds);
            }
        }
        let with = |img: &str| -> Vec<String> {
            let mut v = vec!["resize".to_string()];
            v.extend(args.iter().map(|a| {
                if *a == "IMG" {
                    img.to_string()
                } else {
                    a.to_string()
                }
            }));
            v
        };
        let oa = with("o.qcow2");
        let qa = with("q.qcow2");
        let oa: Vec<&str> = oa.iter().map(String::as_str).collect();
        let qa: Vec<&str> = qa.iter().map(String::as_str).collect();
        if let Some(diff) = differs_from_qemu_img(d, &oa, &qa) {
            problems.push(format!("{name}:\n{diff}"));
        }
        if let Err(e) = qemu_img_check(d, "o.qcow2") {
            problems.push(format!("{name}: {e}"));
        }
        let vs = |f: &str| qemu_info(d, f)["virtual-size"].clone();
        if vs("o.qcow2") != vs("q.qcow2") {
            problems.push(format!(
                "{name}: size {} vs {}",
                vs("o.qcow2"),
                vs("q.qcow2")
            ));
        }
        if let Err(e) = qemu_img_compare(d, "o.qcow2", "qcow2", "q.qcow2", "qcow2") {
            problems.push(format!("{name}: {e}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn resize_keeps_snapshots_and_data_files() {
    let s = Scratch::new();
    let d = s.dir();
    // A v3 image with a snapshot: both ways; the snapshot still reads as
    // it was (its own size).
    qemu_create(d, "snap.qcow2", "", "1M");
    qemu_io(d, "snap.qcow2", &["write -P 5 0 1M"]);
    qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]);
    qemu_img(d, &["convert", "-O", "raw", "snap.qcow2", "before.raw"]);
    for args in [["snap.qcow2", "8M"], ["--shrink", "snap.qcow2"]] {
        let mut a = vec!["resize"];
        a.extend(args);
        if a.len() == 3 && a[1] == "--shrink" {
            a.push("256k");
        }
        let out = ours(d, &a);
        assert_eq!(code(&out), 0, "{a:?}: {}", output_text(&out));
        assert_qemu_img_check(d, "snap.qcow2");
    }
    // (qemu-img reads a snapshot at the image's current size.)
    qemu_img(
        d,
        &["convert", "-O", "raw", "-l", "s1", "snap.qcow2", "snap.raw"],
    );
    let snap = std::fs::read(s.path("snap.raw")).unwrap();
    assert!(snap[..] == std::fs::read(s.path("before.raw")).unwrap()[..256 << 10]);
    assert_eq!(qemu_info(d, "snap.qcow2")["virtual-size"], 262144);
    // An external data file follows the new size.
    qemu_create(d, "df.qcow2", "data_file=df.raw", "1M");
    qemu_io(d, "df.qcow2", &["write -P 6 0 64k"]);
    let out = ours(d, &["resize", "df.qcow2", "4M"]);
    assert_eq!(code(&out), 0, "{}", output_text(&out));
    assert_eq!(std::fs::metadata(s.path("df.raw")).unwrap().len(), 4 << 20);
    assert_qemu_img_check(d, "df.qcow2");
}

/// The guest bytes of the first `len` bytes of `disk`.
fn guest(disk: &[u8], len: u64) -> Result<Vec<u8>, String> {
    let mut img = Image::open(disk.to_vec(), &OpenOptions::default()).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; len as usize];
    img.read_at(0, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[test]
fn a_resize_interrupted_anywhere_leaves_a_consistent_image() {
    let s = Scratch::new();
    let d = s.dir();
    let mut states = 0;
    for (create, cmds, new_size) in [
        (
            "cluster_size=512",
            &["write -P 1 0 4k", "write -P 2 500k 4k"][..],
            100u64 << 20,
        ),
        (
            "cluster_size=512",
            &["write -P 1 0 4k", "write -P 3 900k 8k"][..],
            64 << 10,
        ),
        (
            "",
            &["write -P 1 0 64k", "write -P 2 768k 64k"][..],
            512 << 10,
        ),
        ("", &["write -P 1 0 64k"][..], 2 << 30),
    ] {
        let _ = std::fs::remove_file(s.path("c.qcow2"));
        qemu_create(d, "c.qcow2", create, "1M");
        qemu_io(d, "c.qcow2", cmds);
        let start = std::fs::read(s.path("c.qcow2")).unwrap();
        let keep = new_size.min(1 << 20);
        let want = guest(&start, keep).unwrap();
        let img = Image::open(Recording::new(start.clone()), &OpenOptions::default()).unwrap();
        let mut w = WritableImage::new(img).unwrap();
        w.resize(new_size, Preallocation::Off).unwrap();
        let log = w.into_inner().log;
        let what = format!("{create} 1M -> {new_size}");
        let crashes = crash_states(&log);
        for (k, lost) in crashes {
            let disk = crashed(&start, &log, k, lost);
            states += 1;
            let at = format!("{what}: crash after {k} of {} (lost {lost:?})", log.len());
            let mut img = Image::open(disk.clone(), &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{at}: does not open: {e}"));
            assert!(
                [1 << 20, new_size].contains(&img.size()),
                "{at}: size {}",
                img.size()
            );
            let r = img.check().unwrap();
            assert_eq!(
                (r.corruptions, r.check_errors),
                (0, 0),
                "{at}: {:?}",
                r.messages
            );
            assert!(
                guest(&disk, keep).unwrap() == want,
                "{at}: guest data changed"
            );
            // And a repair leaves nothing behind.
            let img = Image::open(
                disk,
                &OpenOptions {
                    check_mode: true,
                    ..OpenOptions::default()
                },
            )
            .unwrap();
            let mut w = WritableImage::for_repair(img).unwrap();
            let done = w.repair(RepairMode::All, &mut |_| {}).unwrap();
            assert_eq!(
                (done.left.corruptions, done.left.leaks),
                (0, 0),
                "{at}: after repair"
            );
        }
    }
    println!("{states} crash states");
    assert!(states > 50, "only {states} crash states");
}
