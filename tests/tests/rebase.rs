//! `qcow2 rebase` against `qemu-img rebase`: safe mode onto another
//! backing file, onto a deeper one of the chain, and to none (flatten),
//! `-u`, and the refusals; the same messages and exit codes, the same
//! backing file named, the same guest contents (qemu-img compare), the
//! guest disk unchanged by a safe rebase, and `qemu-img check` clean.

use qcowkit_tests::*;

/// Makes `top` over `old` (64 KiB clusters, 1 MiB), with `new` beside:
/// old and new share their first cluster and differ elsewhere.
fn chain(s: &Scratch, top: &str) {
    let d = s.dir();
    for f in ["old.qcow2", "new.qcow2", "base.qcow2", top] {
        let _ = std::fs::remove_file(s.path(f));
    }
    qemu_create(d, "base.qcow2", "", "1M");
    qemu_io(d, "base.qcow2", &["write -P 4 900k 8k"]);
    qemu_overlay(d, "old.qcow2", "", ("base.qcow2", "qcow2"), None);
    qemu_io(
        d,
        "old.qcow2",
        &[
            "write -P 1 0 64k",
            "write -P 2 128k 64k",
            "write -P 3 300k 10k",
        ],
    );
    // The new backing file is shorter: what lies past it reads as zeros.
    qemu_create(d, "new.qcow2", "", "768k");
    qemu_io(d, "new.qcow2", &["write -P 1 0 64k", "write -P 7 700k 4k"]);
    qemu_overlay(d, top, "", ("old.qcow2", "qcow2"), None);
    qemu_io(d, top, &["write -P 9 512k 4k", "write -P 8 128k 4k"]);
}

#[test]
fn rebase_matches_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    let cases: &[(&str, &[&str], bool)] = &[
        (
            "onto another file",
            &["-b", "new.qcow2", "-F", "qcow2"],
            true,
        ),
        (
            "onto the chain's base",
            &["-b", "base.qcow2", "-F", "qcow2"],
            true,
        ),
        ("flatten", &["-b", ""], true),
        ("unsafe", &["-u", "-b", "new.qcow2", "-F", "qcow2"], false),
        ("no format", &["-b", "new.qcow2"], true),
    ];
    let mut problems = Vec::new();
    for (name, args, keeps) in cases {
        let mut results = Vec::new();
        for (tool, img) in [("ours", "o.qcow2"), ("qemu-img", "q.qcow2")] {
            chain(&s, img);
            let before = qemu_contents(d, img);
            let mut a = vec!["rebase"];
            a.extend_from_slice(args);
            a.push(img);
            let out = run_tool(tool, d, &a);
            let err = stderr_of(&out).replace("qemu-img:", "qcow2:");
            let info = qemu_info(d, img);
            let backing = (
                info["backing-filename"].clone(),
                info["backing-filename-format"].clone(),
            );
            let after = qemu_contents(d, img);
            if *keeps && after != before {
                problems.push(format!("{name}: {tool} changed the guest disk"));
            }
            if let Err(e) = qemu_img_check(d, img) {
                problems.push(format!("{name}: {tool}: {e}"));
            }
            results.push((code(&out), stdout_of(&out), err, backing, after));
        }
        if results[0] != results[1] {
            let short =
                |r: &(i32, String, String, _, Vec<u8>)| format!("exit {} {}{}", r.0, r.1, r.2);
            problems.push(format!(
                "{name}: ours {} {:?} / qemu-img {} {:?}",
                short(&results[0]),
                results[0].3,
                short(&results[1]),
                results[1].3
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Renaming the backing file is one write of the first cluster: a crash
/// anywhere leaves the old name or the new one, and a clean image.
#[test]
fn a_renaming_interrupted_anywhere_leaves_one_name_or_the_other() {
    use qcowkit_core::{Image, OpenOptions, WritableImage};
    use qcowkit_tests::record::{crash_states, crashed, Recording};
    let s = Scratch::new();
    chain(&s, "t.qcow2");
    let start = std::fs::read(s.path("t.qcow2")).unwrap();
    let opts = OpenOptions {
        no_backing: true,
        ..OpenOptions::default()
    };
    let img = Image::open(Recording::new(start.clone()), &opts).unwrap();
    let mut w = WritableImage::new(img).unwrap();
    w.set_backing_name(Some("new.qcow2"), Some("qcow2"))
        .unwrap();
    let log = w.into_inner().log;
    assert!(!log.is_empty());
    let mut names = std::collections::BTreeSet::new();
    for (k, lost) in crash_states(&log) {
        let disk = crashed(&start, &log, k, lost);
        let mut img = Image::open(disk, &opts).unwrap();
        let h = img.header().clone();
        let named = (h.backing_file.clone(), h.backing_format.clone());
        assert!(
            named == (Some("old.qcow2".into()), Some("qcow2".into()))
                || named == (Some("new.qcow2".into()), Some("qcow2".into())),
            "crash after {k} (lost {lost:?}): {named:?}"
        );
        names.insert(named.0);
        let r = img.check().unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "crash after {k}");
    }
    assert_eq!(names.len(), 2, "both names seen");
}

/// A safe rebase interrupted anywhere (copying the clusters that differ,
/// or renaming) leaves at worst leaks, and the guest reads the same disk
/// through whichever backing file the header names.
#[test]
fn a_safe_rebase_interrupted_anywhere_reads_the_same() {
    use qcowkit_core::compress::Decompressor;
    use qcowkit_core::{Image, OpenOptions, WritableImage};
    use qcowkit_tests::mem::Files;
    use qcowkit_tests::record::{assert_at_worst_leaks, crash_states, crashed, Recording};
    let s = Scratch::new();
    let d = s.dir();
    chain(&s, "t.qcow2");
    let want = qemu_contents(d, "t.qcow2");
    let start = std::fs::read(s.path("t.qcow2")).unwrap();
    let files = Files::new()
        .with("old.qcow2", std::fs::read(s.path("old.qcow2")).unwrap())
        .with("base.qcow2", std::fs::read(s.path("base.qcow2")).unwrap())
        .with("new.qcow2", std::fs::read(s.path("new.qcow2")).unwrap());
    let opts = OpenOptions::default();
    let img: Image<Recording> = Image::open_with(
        Recording::new(start.clone()),
        "t.qcow2",
        "t.qcow2",
        &mut files.clone(),
        &opts,
    )
    .unwrap();
    let mut new: Image<Vec<u8>> = Image::open_with(
        files.get("new.qcow2").unwrap(),
        "new.qcow2",
        "new.qcow2",
        &mut files.clone(),
        &opts,
    )
    .unwrap();
    let mut w = WritableImage::new(img).unwrap();
    let mut reached = 0;
    w.copy_backing_differences(Some(&mut new), &mut Decompressor::default(), &mut |d, _| {
        reached = d
    })
    .unwrap();
    assert_eq!(reached, w.size(), "progress reaches the end");
    w.set_backing_name(Some("new.qcow2"), Some("qcow2"))
        .unwrap();
    let log = w.into_inner().log;
    let states = crash_states(&log);
    let mut named = std::collections::BTreeSet::new();
    for &(k, lost) in &states {
        let at = format!("crash after {k} (lost {lost:?})");
        let disk = assert_at_worst_leaks(crashed(&start, &log, k, lost), &at);
        let mut img: Image<Vec<u8>> =
            Image::open_with(disk, "t.qcow2", "t.qcow2", &mut files.clone(), &opts).unwrap();
        named.insert(img.header().backing_file.clone());
        let mut got = vec![0u8; want.len()];
        img.read_at(0, &mut got).unwrap();
        assert_eq!(byte_diff(&got, &want), None, "{at}");
    }
    assert_eq!(named.len(), 2, "both names seen: {named:?}");
    eprintln!("{} crash states", states.len());
}
