//! Persistent dirty bitmaps made by QEMU through our writes and every
//! maintenance operation: enabled bitmaps record exactly the ranges QEMU's
//! would (read back through qemu-nbd's dirty-bitmap export and `qemu-img
//! map`), disabled ones stay as they were, none is left flagged in use
//! after a clean finish, resizing resizes them, and `qemu-img check` stays
//! clean. A write interrupted anywhere leaves every enabled bitmap either
//! holding the write's bits or flagged in use (inconsistent), never a clean
//! bitmap that misses the write.

use std::path::Path;

use qcowkit_core::{OpenOptions, WritableImage};
use qcowkit_std::open_qcow2_rw;
use qcowkit_tests::*;

/// The dirty ranges (start, length) of bitmap `name` of `img` in `d`, as
/// QEMU reads them: qemu-nbd exports the image with the bitmap on a Unix
/// socket (`--fork`: it is serving when it returns, and it exits when the
/// one client leaves; it takes no file locks), `qemu-img map` reads the
/// bitmap as allocation.
fn dirty(d: &Path, img: &str, name: &str) -> Vec<(u64, u64)> {
    let sock = d.join(format!("{img}.{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let sock_s = sock.to_str().unwrap();
    // Without file locks: the server exits on its own after the client
    // leaves, and must not hold the image from the next command meanwhile.
    let image = format!("driver=qcow2,file.driver=file,file.filename={img},file.locking=off");
    ok_in(
        d,
        "qemu-nbd",
        &[
            "-r",
            "--fork",
            "-k",
            sock_s,
            "-B",
            name,
            "--image-opts",
            &image,
        ],
    );
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={sock_s},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
    );
    let map = ok_in(
        d,
        "qemu-img",
        &["map", "--output=json", "--image-opts", &opts],
    );
    json(&map)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// The bitmaps of `img` as qemu-img info lists them: (name, flags,
/// granularity).
fn bitmaps(d: &Path, img: &str) -> Vec<(String, Vec<String>, u64)> {
    let info = qemu_info(d, img);
    let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
                b["granularity"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A 4 MiB image with data, and three bitmaps: b0 enabled (64 KiB
/// granularity), b1 disabled, b2 enabled with 4 KiB granularity; b0 and b1
/// already record a write.
fn image_with_bitmaps(d: &Path, img: &str, opts: &str) {
    let _ = std::fs::remove_file(d.join(img));
    qemu_create(d, img, opts, "4M");
    qemu_io(d, img, &["write -P 1 0 1M"]);
    qemu_img(d, &["bitmap", "--add", img, "b0"]);
    qemu_img(d, &["bitmap", "--add", img, "b1"]);
    qemu_img(d, &["bitmap", "--add", "-g", "4k", img, "b2"]);
    qemu_io(d, img, &["write -P 2 2M 8k"]);
    qemu_img(d, &["bitmap", "--disable", img, "b1"]);
}

/// The same guest changes through qemu-io and through our writer give the
/// same bits in every bitmap.
#[test]
fn our_writes_set_the_bits_qemu_sets() {
    let s = Scratch::new();
    let d = s.dir();
    let mut problems = Vec::new();
    for opts in ["", "cluster_size=4k", "extended_l2=on,cluster_size=128k"] {
        image_with_bitmaps(d, "o.qcow2", opts);
        image_with_bitmaps(d, "q.qcow2", opts);
        qemu_io(
            d,
            "q.qcow2",
            &[
                "write -P 3 100k 4k",
                "write -z 1536k 200k",
                "discard 3M 64k",
                "write -P 4 3968k 128k",
            ],
        );
        let mut w = open_qcow2_rw(&s.path("o.qcow2"), &OpenOptions::default()).unwrap();
        w.write_at(100 << 10, &[3; 4096]).unwrap();
        w.write_zeroes(1536 << 10, 200 << 10).unwrap();
        w.discard(3 << 20, 64 << 10).unwrap();
        w.write_at(3968 << 10, &[4; 128 << 10]).unwrap();
        w.flush().unwrap();
        drop(w);
        for img in ["o.qcow2", "q.qcow2"] {
            if let Err(e) = qemu_img_check(d, img) {
                problems.push(format!("[{opts}] {img}: {e}"));
            }
        }
        if bitmaps(d, "o.qcow2") != bitmaps(d, "q.qcow2") {
            problems.push(format!(
                "[{opts}] bitmaps: ours {:?} / qemu {:?}",
                bitmaps(d, "o.qcow2"),
                bitmaps(d, "q.qcow2")
            ));
        }
        for b in ["b0", "b1", "b2"] {
            let (o, q) = (dirty(d, "o.qcow2", b), dirty(d, "q.qcow2", b));
            if o != q {
                problems.push(format!("[{opts}] {b}: ours {o:?} / qemu {q:?}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Resizing resizes the bitmaps as qemu-img does: the same bitmaps, flags
/// and bits after growing and after shrinking (bits past the new end gone).
#[test]
fn resize_resizes_bitmaps_like_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    let mut problems = Vec::new();
    for (opts, args) in [
        ("", &["9M"][..]),
        ("", &["--shrink", "2100k"][..]),
        ("cluster_size=4k", &["64M"][..]),
        ("cluster_size=4k", &["--shrink", "1M"][..]),
    ] {
        let mut results = Vec::new();
        for (tool, img) in [("ours", "o.qcow2"), ("qemu-img", "q.qcow2")] {
            image_with_bitmaps(d, img, opts);
            let mut a = vec!["resize"];
            a.extend(args.iter().take(args.len() - 1));
            a.push(img);
            a.push(args[args.len() - 1]);
            let out = run_tool(tool, d, &a);
            if code(&out) != 0 {
                problems.push(format!("[{opts}] {args:?}: {tool}: {}", output_text(&out)));
                continue;
            }
            if let Err(e) = qemu_img_check(d, img) {
                problems.push(format!("[{opts}] {args:?}: {tool}: {e}"));
            }
            // qemu can keep using them.
            qemu_io(d, img, &["write -P 7 1000k 8k"]);
            let bits: Vec<_> = ["b0", "b1", "b2"]
                .iter()
                .map(|b| dirty(d, img, b))
                .collect();
            results.push((bitmaps(d, img), bits, qemu_contents(d, img)));
        }
        if results.len() == 2 && results[0] != results[1] {
            problems.push(format!(
                "[{opts}] {args:?}: ours {:?} / qemu {:?}",
                (&results[0].0, &results[0].1),
                (&results[1].0, &results[1].1)
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Operations that do not change guest data leave the bitmaps as they
/// were; committing into a base with bitmaps sets the base's bits for what
/// it wrote; an inconsistent bitmap refuses a resize with qemu-img's words.
#[test]
fn maintenance_keeps_bitmaps_true() {
    let s = Scratch::new();
    let d = s.dir();
    let steady: &[&[&str]] = &[
        &["snapshot", "-c", "s1", "o.qcow2"],
        &["snapshot", "-d", "s1", "o.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "o.qcow2"],
        &["amend", "-o", "refcount_bits=64", "o.qcow2"],
        &["rebase", "-u", "-b", "", "o.qcow2"],
        &["check", "-r", "all", "o.qcow2"],
    ];
    image_with_bitmaps(d, "o.qcow2", "");
    let want: Vec<_> = ["b0", "b1", "b2"]
        .iter()
        .map(|b| dirty(d, "o.qcow2", b))
        .collect();
    let want_list = bitmaps(d, "o.qcow2");
    for args in steady {
        let out = ours(d, args);
        assert_eq!(code(&out), 0, "{args:?}: {}", output_text(&out));
        assert_qemu_img_check(d, "o.qcow2");
        assert_eq!(bitmaps(d, "o.qcow2"), want_list, "{args:?}");
        let got: Vec<_> = ["b0", "b1", "b2"]
            .iter()
            .map(|b| dirty(d, "o.qcow2", b))
            .collect();
        assert_eq!(got, want, "{args:?}");
    }

    // Commit: the base's enabled bitmaps record the clusters written.
    for (tool, p) in [("ours", "o"), ("qemu-img", "q")] {
        let base = format!("{p}-base.qcow2");
        let top = format!("{p}-top.qcow2");
        image_with_bitmaps(d, &base, "");
        let _ = std::fs::remove_file(s.path(&top));
        qemu_overlay(d, &top, "", (&base, "qcow2"), None);
        qemu_io(d, &top, &["write -P 9 1536k 64k", "write -P 8 3M 4k"]);
        let out = run_tool(tool, d, &["commit", &top]);
        assert_eq!(code(&out), 0, "{tool}: {}", output_text(&out));
        assert_qemu_img_check(d, &base);
    }
    for b in ["b0", "b1", "b2"] {
        assert_eq!(
            dirty(d, "o-base.qcow2", b),
            dirty(d, "q-base.qcow2", b),
            "commit, {b}"
        );
    }
    assert_eq!(bitmaps(d, "o-base.qcow2"), bitmaps(d, "q-base.qcow2"));

    // Reverting to a snapshot: refused while bitmaps exist, as by qemu-img.
    for (tool, img) in [("ours", "o.qcow2"), ("qemu-img", "q.qcow2")] {
        image_with_bitmaps(d, img, "");
        qemu_img(d, &["snapshot", "-c", "s", img]);
        let a = ["snapshot", "-a", "s", img];
        let out = run_tool(tool, d, &a);
        assert_eq!(code(&out), 1, "{tool}");
        assert_eq!(
            stderr_of(&out).replace("qemu-img:", "qcow2:"),
            "qcow2: Could not apply snapshot 's': Device has active dirty bitmaps\n",
            "{tool}"
        );
    }

    // An inconsistent bitmap: resize refused, as by qemu-img, file kept.
    image_with_bitmaps(d, "i.qcow2", "");
    let mut w = open_qcow2_rw(&s.path("i.qcow2"), &OpenOptions::default()).unwrap();
    w.write_at(0, &[1; 512]).unwrap();
    drop(w); // no flush: b0 and b2 stay flagged in use
    assert!(bitmaps(d, "i.qcow2")[0].1.contains(&"in-use".to_string()));
    let before = std::fs::read(s.path("i.qcow2")).unwrap();
    for tool in ["ours", "qemu-img"] {
        let out = run_tool(tool, d, &["resize", "i.qcow2", "8M"]);
        assert_eq!(code(&out), 1, "{tool}");
        assert_eq!(
            stderr_of(&out).replace("qemu-img:", "qcow2:"),
            "qcow2: Bitmap 'b0' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk\n",
            "{tool}"
        );
        // (qemu-img stores its bitmaps while closing the refused image.)
        if tool == "ours" {
            assert!(
                std::fs::read(s.path("i.qcow2")).unwrap() == before,
                "ours changed the file"
            );
        }
    }
}

/// A write interrupted anywhere: each enabled bitmap either records the
/// write or is flagged in use; the image has at worst leaks.
#[test]
fn a_write_interrupted_anywhere_never_leaves_a_bitmap_that_misses_it() {
    use qcowkit_core::Image;
    use qcowkit_tests::record::{assert_at_worst_leaks, crash_states, crashed, Recording};
    let s = Scratch::new();
    let d = s.dir();
    image_with_bitmaps(d, "c.qcow2", "cluster_size=4k");
    let start = std::fs::read(s.path("c.qcow2")).unwrap();
    let img = Image::open(Recording::new(start.clone()), &OpenOptions::default()).unwrap();
    let mut w = WritableImage::new(img).unwrap();
    w.write_at(3 << 20, &[5; 64 << 10]).unwrap();
    w.write_zeroes(0, 4096).unwrap();
    w.flush().unwrap();
    let log = w.into_inner().log;
    let states = crash_states(&log);
    let mut seen = std::collections::BTreeSet::new();
    for &(k, lost) in &states {
        let at = format!("crash after {k} of {} (lost {lost:?})", log.len());
        let disk = assert_at_worst_leaks(crashed(&start, &log, k, lost), &at);
        std::fs::write(s.path("crashed.qcow2"), &disk).unwrap();
        for (name, flags, _) in bitmaps(d, "crashed.qcow2") {
            if name == "b1" {
                assert!(flags.is_empty(), "{at}: b1 {flags:?}");
                continue;
            }
            if flags.contains(&"in-use".to_string()) {
                seen.insert("in-use");
                continue;
            }
            let bits = dirty(d, "crashed.qcow2", &name);
            let covers = |o: u64, l: u64| bits.iter().any(|&(s, n)| s <= o && o + l <= s + n);
            if covers(3 << 20, 64 << 10) && covers(0, 4096) {
                seen.insert("recorded");
            } else {
                // Consistent without the bits: only before any change.
                let mut img = Image::open(disk.clone(), &OpenOptions::default()).unwrap();
                let mut b = vec![0u8; 64 << 10];
                img.read_at(3 << 20, &mut b).unwrap();
                assert!(!b.contains(&5), "{at}: {name} misses a write: {bits:?}");
                img.read_at(0, &mut b[..4096]).unwrap();
                assert!(
                    b[..4096].iter().all(|&x| x == 1),
                    "{at}: {name} misses the zeroing: {bits:?}"
                );
                seen.insert("before");
            }
        }
    }
    assert!(
        seen.contains("in-use") && seen.contains("recorded"),
        "{seen:?}"
    );
    eprintln!("{} crash states", states.len());
}
