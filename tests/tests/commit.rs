//! `qcow2 commit` against `qemu-img commit`: into the backing file (then
//! emptied, or kept with `-d`), into a deeper base with `-b`, into a raw
//! base, into a smaller base (grown) and a larger one, across cluster
//! sizes, refcount widths, extended L2, version 2 and compressed clusters;
//! the same messages and exit codes, the same guest contents of every
//! image afterwards, and `qemu-img check` clean. Crash replay of both
//! halves: writing into the base and emptying the top.

use qcowkit_tests::*;

/// One chain to commit: the base's creation, the layers above it (options
/// and qemu-io commands), the commit's arguments.
struct Case {
    name: &'static str,
    /// `qemu-img create` options of the base ("raw" for a raw base) and
    /// its size.
    base: (&'static str, &'static str),
    /// qemu-io commands on the base.
    base_io: &'static [&'static str],
    /// Layers above the base, bottom up: (options, size, qemu-io commands).
    layers: &'static [(&'static str, Option<&'static str>, &'static [&'static str])],
    /// Arguments of commit before the image name (`BASE` is replaced by the
    /// base's file name).
    args: &'static [&'static str],
}

const WRITES: &[&str] = &[
    "write -P 0x22 512k 64k",
    "write -z 1M 128k",
    "write -P 0x33 1600k 4k",
    "discard 64k 64k",
];

const CASES: &[Case] = &[
    Case {
        name: "default",
        base: ("", "2M"),
        base_io: &["write -P 0x11 0 1536k"],
        layers: &[("", None, WRITES)],
        args: &[],
    },
    Case {
        name: "-d keeps the top",
        base: ("", "2M"),
        base_io: &["write -P 0x11 0 1536k"],
        layers: &[("", None, WRITES)],
        args: &["-d"],
    },
    Case {
        name: "4k clusters, refcount_bits=1",
        base: ("cluster_size=4096,refcount_bits=1", "2M"),
        base_io: &["write -P 0x11 0 1536k"],
        layers: &[("cluster_size=4096", None, WRITES)],
        args: &[],
    },
    Case {
        name: "extended L2 both",
        base: ("extended_l2=on,cluster_size=128k", "2M"),
        base_io: &["write -P 0x11 0 1536k"],
        layers: &[(
            "extended_l2=on,cluster_size=64k",
            None,
            &[
                "write -P 0x22 520k 8k",
                "write -z 1M 4k",
                "write -P 0x33 1600k 4k",
            ],
        )],
        args: &[],
    },
    Case {
        name: "version 2",
        base: ("compat=0.10", "2M"),
        base_io: &["write -P 0x11 0 1536k"],
        layers: &[("compat=0.10", None, WRITES)],
        args: &[],
    },
    Case {
        name: "compressed top",
        base: ("", "2M"),
        base_io: &["write -P 0x11 0 1536k"],
        layers: &[(
            "",
            None,
            &["write -c -P 0x44 0 64k", "write -c -P 0x45 1088k 64k"],
        )],
        args: &[],
    },
    Case {
        name: "raw base",
        base: ("raw", "2M"),
        base_io: &["write -P 0x11 0 1536k"],
        layers: &[("", None, WRITES)],
        args: &[],
    },
    Case {
        name: "the base grows",
        base: ("", "1M"),
        base_io: &["write -P 0x11 0 1M"],
        layers: &[(
            "",
            Some("3M"),
            &["write -P 0x55 2560k 64k", "write -P 0x56 0 4k"],
        )],
        args: &[],
    },
    Case {
        name: "a larger base keeps its size",
        base: ("", "3M"),
        base_io: &["write -P 0x11 0 3M"],
        layers: &[("", Some("1M"), &["write -P 0x56 4k 4k"])],
        args: &[],
    },
    Case {
        name: "three layers, into the backing file",
        base: ("", "2M"),
        base_io: &["write -P 0x11 0 2M"],
        layers: &[
            ("", None, &["write -P 0x66 0 256k", "write -z 768k 64k"]),
            ("", None, WRITES),
        ],
        args: &[],
    },
    Case {
        name: "three layers, -b the base",
        base: ("", "2M"),
        base_io: &["write -P 0x11 0 2M"],
        layers: &[
            ("", None, &["write -P 0x66 0 256k", "write -z 768k 64k"]),
            ("", None, WRITES),
        ],
        args: &["-b", "BASE"],
    },
    Case {
        name: "a shorter layer in between",
        base: ("", "2M"),
        base_io: &["write -P 0x11 0 2M"],
        layers: &[
            ("", Some("1M"), &["write -P 0x66 0 64k"]),
            ("", Some("2M"), &["write -P 0x77 256k 4k"]),
        ],
        args: &["-b", "BASE"],
    },
    Case {
        name: "-b not in the chain",
        base: ("", "2M"),
        base_io: &[],
        layers: &[("", None, WRITES)],
        args: &["-b", "elsewhere.qcow2"],
    },
    Case {
        name: "no backing file",
        base: ("", "2M"),
        base_io: &[],
        layers: &[],
        args: &[],
    },
];

/// Builds `case`'s chain with file names prefixed by `p`; returns the
/// names, base first.
fn build(s: &Scratch, case: &Case, p: &str) -> Vec<String> {
    let d = s.dir();
    let base = if case.base.0 == "raw" {
        format!("{p}base.raw")
    } else {
        format!("{p}base.qcow2")
    };
    let _ = std::fs::remove_file(s.path(&base));
    if case.base.0 == "raw" {
        qemu_img(d, &["create", "-q", "-f", "raw", &base, case.base.1]);
        if !case.base_io.is_empty() {
            let mut a = vec!["-f", "raw"];
            for c in case.base_io {
                a.extend(["-c", c]);
            }
            a.push(&base);
            ok_in(d, "qemu-io", &a);
        }
    } else {
        qemu_create(d, &base, case.base.0, case.base.1);
        if !case.base_io.is_empty() {
            qemu_io(d, &base, case.base_io);
        }
    }
    let mut names = vec![base];
    for (i, (opts, size, io)) in case.layers.iter().enumerate() {
        let name = format!("{p}l{i}.qcow2");
        let _ = std::fs::remove_file(s.path(&name));
        let below = names.last().unwrap().clone();
        let fmt = if below.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        qemu_overlay(d, &name, opts, (&below, fmt), *size);
        if !io.is_empty() {
            qemu_io(d, &name, io);
        }
        names.push(name);
    }
    names
}

/// Guest contents of `img` in `cwd` (qcow2 or raw), as qemu-img reads them.
fn contents(cwd: &std::path::Path, img: &str) -> Vec<u8> {
    if img.ends_with(".raw") {
        std::fs::read(cwd.join(img)).unwrap()
    } else {
        qemu_contents(cwd, img)
    }
}

#[test]
fn commit_matches_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    let mut problems = Vec::new();
    for case in CASES {
        let mut results = Vec::new();
        for (tool, p) in [("ours", "o-"), ("qemu-img", "q-")] {
            let names = build(&s, case, p);
            let top = names.last().unwrap().clone();
            let seen = contents(d, &top);
            let mut a = vec!["commit".to_string()];
            for x in case.args {
                a.push(x.replace("BASE", &names[0]));
            }
            a.push(top.clone());
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = run_tool(tool, d, &a);
            let err = stderr_of(&out)
                .replace("qemu-img:", "qcow2:")
                .replace(p, "");
            // Every image's guest contents, base first (the layers in
            // between may change meaning after -b; they are compared too).
            let after: Vec<Vec<u8>> = names.iter().map(|n| contents(d, n)).collect();
            if code(&out) == 0 && after.last() != Some(&seen) {
                problems.push(format!("{}: {tool} changed what the top reads", case.name));
            }
            for n in names.iter().filter(|n| n.ends_with(".qcow2")) {
                if let Err(e) = qemu_img_check(d, n) {
                    problems.push(format!("{}: {tool}: {n}: {e}", case.name));
                }
            }
            let base_size = qemu_img(d, &["info", "--output=json", &names[0]]);
            let base_size = json(&base_size)["virtual-size"].clone();
            // What the top still holds itself (emptied unless -d / -b).
            let own = if names.len() > 1 {
                let map = qemu_img(d, &["map", "--output=json", &top]);
                json(&map)
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["depth"] == 0 && e["data"] == true)
                    .map(|e| e["length"].as_u64().unwrap())
                    .sum::<u64>()
            } else {
                0
            };
            results.push((code(&out), stdout_of(&out), err, base_size, own, after));
        }
        if results[0] != results[1] {
            let (o, q) = (&results[0], &results[1]);
            let diff: Vec<String> =
                o.5.iter()
                    .zip(&q.5)
                    .enumerate()
                    .filter_map(|(i, (a, b))| byte_diff(a, b).map(|d| format!("layer {i}: {d}")))
                    .collect();
            problems.push(format!(
                "{}: ours exit {} {:?}{:?} base size {} own {} / qemu-img exit {} {:?}{:?} base size {} own {}; {}",
                case.name, o.0, o.1, o.2, o.3, o.4, q.0, q.1, q.2, q.3, q.4,
                diff.join(", ")
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A crash anywhere while the base is written leaves it with at worst
/// leaks and the guest view through the top unchanged; a crash anywhere
/// while the top is emptied leaves it with at worst leaks, reading the same
/// disk through the committed base.
#[test]
fn a_commit_interrupted_anywhere_loses_nothing() {
    use qcowkit_core::commit::commit;
    use qcowkit_core::copy::{CopyOptions, ImageSink};
    use qcowkit_core::{compress::Decompressor, Image, OpenOptions, WritableImage};
    use qcowkit_tests::mem::Files;
    use qcowkit_tests::record::{assert_at_worst_leaks, crash_states, crashed, Recording};

    let s = Scratch::new();
    let d = s.dir();
    for (opts, writes) in [
        ("cluster_size=4096", WRITES),
        (
            "extended_l2=on,cluster_size=64k",
            &[
                "write -P 0x22 520k 8k",
                "write -z 1M 4k",
                "write -P 0x33 1600k 68k",
            ][..],
        ),
    ] {
        let _ = std::fs::remove_file(s.path("b.qcow2"));
        let _ = std::fs::remove_file(s.path("t.qcow2"));
        qemu_create(d, "b.qcow2", opts, "2M");
        qemu_io(d, "b.qcow2", &["write -P 0x11 0 1536k"]);
        qemu_overlay(d, "t.qcow2", opts, ("b.qcow2", "qcow2"), None);
        qemu_io(d, "t.qcow2", writes);
        let base0 = std::fs::read(s.path("b.qcow2")).unwrap();
        let top0 = std::fs::read(s.path("t.qcow2")).unwrap();
        let want = qemu_contents(d, "t.qcow2");
        let guest = |top: Vec<u8>, base: Vec<u8>| -> Vec<u8> {
            let mut files = Files::new().with("b.qcow2", base);
            let mut img: Image<Recording> = Image::open_with(
                Recording::new(top),
                "t.qcow2",
                "t.qcow2",
                &mut files,
                &OpenOptions::default(),
            )
            .unwrap();
            let mut out = vec![0u8; want.len()];
            img.read_at(0, &mut out).unwrap();
            out
        };

        // Writing into the base.
        let mut files = Files::new().with("b.qcow2", base0.clone());
        let mut top: Image<Recording> = Image::open_with(
            Recording::new(top0.clone()),
            "t.qcow2",
            "t.qcow2",
            &mut files,
            &OpenOptions::default(),
        )
        .unwrap();
        let mut base =
            WritableImage::open(Recording::new(base0.clone()), &OpenOptions::default()).unwrap();
        let align = base.cluster_size();
        let mut sink = ImageSink::new(&mut base);
        sink.over_backing = true;
        let copy = CopyOptions {
            align,
            ..CopyOptions::default()
        };
        commit(&mut top, 1, copy, &mut Decompressor::default(), &mut sink).unwrap();
        base.flush().unwrap();
        let log = base.into_inner().log;
        assert!(log.len() >= 3, "{opts}: the commit wrote {} ops", log.len());
        let states = crash_states(&log);
        for &(k, lost) in &states {
            let at = format!("{opts}: base, crash after {k} (lost {lost:?})");
            let disk = assert_at_worst_leaks(crashed(&base0, &log, k, lost), &at);
            assert_eq!(
                byte_diff(&guest(top0.clone(), disk), &want),
                None,
                "{at}: the top reads differently"
            );
        }
        let base1 = crashed(&base0, &log, log.len(), None);
        assert_eq!(byte_diff(&guest(top0.clone(), base1.clone()), &want), None);

        // Emptying the top.
        let mut files = Files::new().with("b.qcow2", base1.clone());
        let img: Image<Recording> = Image::open_with(
            Recording::new(top0.clone()),
            "t.qcow2",
            "t.qcow2",
            &mut files,
            &OpenOptions::default(),
        )
        .unwrap();
        let mut w = WritableImage::new(img).unwrap();
        w.make_empty().unwrap();
        let log = w.into_inner().log;
        let states2 = crash_states(&log);
        for &(k, lost) in &states2 {
            let at = format!("{opts}: top, crash after {k} (lost {lost:?})");
            let disk = assert_at_worst_leaks(crashed(&top0, &log, k, lost), &at);
            assert_eq!(
                byte_diff(&guest(disk, base1.clone()), &want),
                None,
                "{at}: the top reads differently"
            );
        }
        let emptied = crashed(&top0, &log, log.len(), None);
        let mut img = Image::open(
            emptied,
            &OpenOptions {
                no_backing: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let mut st = Vec::new();
        img.map_range(0, img.size(), &mut st).unwrap();
        assert!(
            st.iter()
                .all(|r| matches!(r.mapping, qcowkit_core::Mapping::Unallocated { .. })),
            "{opts}: the emptied top still maps {st:?}"
        );
        eprintln!(
            "{opts}: {} crash states writing the base, {} emptying the top",
            states.len(),
            states2.len()
        );
    }
}

/// Hostile images through commit: a clean error (exit 1), and no file
/// changed.
#[test]
fn hostile_chains_are_refused_without_writing() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "b.qcow2", "", "1M");
    qemu_io(d, "b.qcow2", &["write -P 0x11 0 64k"]);
    qemu_overlay(d, "t.qcow2", "", ("b.qcow2", "qcow2"), None);
    qemu_io(d, "t.qcow2", &["write -P 0x22 0 64k"]);
    // The top's L1 entry points into its header: reading it is refused.
    let mut top = std::fs::read(s.path("t.qcow2")).unwrap();
    let l1 = u64::from_be_bytes(top[40..48].try_into().unwrap()) as usize;
    top[l1..l1 + 8].copy_from_slice(&(0x8000_0000_0000_0000u64 | 0x200).to_be_bytes());
    std::fs::write(s.path("t.qcow2"), &top).unwrap();
    let base = std::fs::read(s.path("b.qcow2")).unwrap();
    let out = ours(d, &["commit", "t.qcow2"]);
    assert_eq!(code(&out), 1, "{}", output_text(&out));
    assert!(
        stderr_of(&out).starts_with("qcow2: "),
        "{}",
        output_text(&out)
    );
    assert_eq!(
        std::fs::read(s.path("b.qcow2")).unwrap(),
        base,
        "base changed"
    );
    assert_eq!(
        std::fs::read(s.path("t.qcow2")).unwrap(),
        top,
        "top changed"
    );
    // A chain naming itself.
    qemu_create(d, "loop.qcow2", "", "1M");
    qemu_img(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "loop.qcow2",
            "-F",
            "qcow2",
            "loop.qcow2",
        ],
    );
    let before = std::fs::read(s.path("loop.qcow2")).unwrap();
    let out = ours(d, &["commit", "loop.qcow2"]);
    assert_eq!(code(&out), 1, "{}", output_text(&out));
    assert_eq!(std::fs::read(s.path("loop.qcow2")).unwrap(), before);
}
