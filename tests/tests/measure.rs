//! `qcow2 measure` against `qemu-img measure`: the same numbers, keys,
//! messages and exit codes for sizes and for qcow2 and raw sources (with
//! bitmaps, zero clusters, a backing chain), across cluster sizes,
//! refcount widths, extended L2, compat and preallocation; and a
//! conversion with the same options fits in the required size.

use qcowkit_tests::*;

#[test]
fn measure_matches_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "m.qcow2", "", "5M");
    qemu_io(
        d,
        "m.qcow2",
        &[
            "write 0 64k",
            "write 300k 4k",
            "write -z 512k 64k",
            "write -P 7 4M 100k",
        ],
    );
    qemu_img(d, &["bitmap", "--add", "m.qcow2", "bm0"]);
    qemu_img(
        d,
        &["bitmap", "--add", "-g", "4k", "m.qcow2", "second_bitmap"],
    );
    qemu_overlay(d, "top.qcow2", "", ("m.qcow2", "qcow2"), None);
    qemu_io(d, "top.qcow2", &["write -P 9 1M 8k"]);
    let mut raw = vec![0u8; 3 << 20];
    raw[100 << 12..103 << 12].fill(0x5a);
    std::fs::write(s.path("r.raw"), &raw).unwrap();
    qemu_create(d, "v2.qcow2", "compat=0.10", "2M");
    qemu_io(d, "v2.qcow2", &["write 1M 4k"]);
    qemu_create(d, "sn.qcow2", "", "4M");
    qemu_io(d, "sn.qcow2", &["write 0 1M"]);
    qemu_img(d, &["snapshot", "-c", "s", "sn.qcow2"]);
    qemu_io(d, "sn.qcow2", &["write 2M 1M", "discard 0 512k"]);
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "-l", "s", "sn.qcow2"],
        &["-O", "qcow2", "-l", "snapshot.name=s", "sn.qcow2"],
        &["-O", "qcow2", "-l", "snapshot.id=1", "sn.qcow2"],
        &["--output=json", "-O", "qcow2", "-l", "1", "sn.qcow2"],
        &["-O", "qcow2", "-l", "nosuch", "sn.qcow2"],
        &["-O", "qcow2", "sn.qcow2"],
        &["-l", "s", "--size", "1M"],
        &["-f", "qcow2", "--size", "1M"],
        &["--size", "1G"],
        &["-O", "qcow2", "--size", "1G"],
        &["--output=json", "-O", "qcow2", "--size", "1G"],
        &["-O", "qcow2", "--size", "1P"],
        &["-O", "qcow2", "-o", "cluster_size=512", "--size", "1P"],
        &["-O", "qcow2", "-o", "preallocation=full", "--size", "1G"],
        &[
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "--size",
            "3G",
        ],
        &["-O", "qcow2", "m.qcow2"],
        &["--output=json", "-O", "qcow2", "m.qcow2"],
        &["-O", "raw", "m.qcow2"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=1",
            "m.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M,refcount_bits=64",
            "m.qcow2",
        ],
        &["-O", "qcow2", "-o", "compat=0.10", "m.qcow2"],
        &[
            "-O",
            "qcow2",
            "-o",
            "backing_file=x,backing_fmt=raw",
            "m.qcow2",
        ],
        &["-O", "qcow2", "top.qcow2"],
        &["--output=json", "-O", "qcow2", "top.qcow2"],
        &["-O", "qcow2", "r.raw"],
        &[
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "r.raw",
        ],
        &["-O", "qcow2", "v2.qcow2"],
        &["--size", "1G", "m.qcow2"],
        &[],
        &["-O", "vmdk", "--size", "1M"],
    ];
    let mut problems = Vec::new();
    for args in cases {
        let mut a = vec!["measure"];
        a.extend_from_slice(args);
        if let Some(diff) = differs_from_qemu_img(d, &a, &a) {
            problems.push(format!("{args:?}:\n{diff}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Our conversions with the measured options fit in the required size.
    for (src, opts) in [
        ("m.qcow2", "cluster_size=65536"),
        ("top.qcow2", "cluster_size=4096,refcount_bits=1"),
        ("r.raw", "extended_l2=on,cluster_size=131072"),
    ] {
        let out = ours(
            d,
            &["measure", "--output=json", "-O", "qcow2", "-o", opts, src],
        );
        let required = json(&stdout_of(&out))["required"].as_u64().unwrap();
        let o = ours(d, &["convert", "-O", "qcow2", "-o", opts, src, "out.qcow2"]);
        assert_eq!(code(&o), 0, "{}", output_text(&o));
        let len = std::fs::metadata(s.path("out.qcow2")).unwrap().len();
        assert!(
            len <= required,
            "{src} {opts}: {len} bytes written, {required} measured"
        );
    }
}
