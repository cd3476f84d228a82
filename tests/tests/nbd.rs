//! `qcow2 serve` with real NBD clients: qemu-img and qemu-io over
//! `nbd+unix://` and `nbd://127.0.0.1`, libnbd's nbdinfo and nbdcopy.
//! Every image is made by qemu-img, every result is judged by qemu-img
//! (compare, check, map) after the server is gone.

use std::time::Duration;

use qcowkit_tests::serve::{On, Served};
use qcowkit_tests::{
    assert_qemu_img_check, json, ok_in, output_text, qemu_create, qemu_img, qemu_io, qemu_overlay,
    run_in, Scratch,
};

/// A chain with every kind of cluster: base data and zeros, top data over
/// part of it, a compressed cluster, zero clusters, unallocated ranges.
fn chain(s: &Scratch, top_opts: &str) {
    qemu_create(s.dir(), "base.qcow2", "", "64M");
    qemu_io(
        s.dir(),
        "base.qcow2",
        &[
            "write -P 0xaa 0 1M",
            "write -z 2M 1M",
            "write -P 0x5a 40M 3M",
        ],
    );
    qemu_overlay(
        s.dir(),
        "top.qcow2",
        top_opts,
        ("base.qcow2", "qcow2"),
        None,
    );
    qemu_io(
        s.dir(),
        "top.qcow2",
        &[
            "write -P 0xbb 512k 1M",
            "write -c -P 0xcc 8M 64k",
            "write -z 41M 64k",
            "write -P 0x33 63M 1M",
            "write -P 0x44 20M 4k",
        ],
    );
}

/// The file's guest contents as qemu-img reads them.
fn contents(s: &Scratch, img: &str, fmt: &str) -> Vec<u8> {
    let out = s.path(&format!("{img}.expected.raw"));
    let out = out.to_str().unwrap();
    qemu_img(
        s.dir(),
        &["convert", "-U", "-f", fmt, "-O", "raw", img, out],
    );
    std::fs::read(out).unwrap()
}

/// The export's contents, converted out of the server by qemu-img.
fn convert_out(s: &Scratch, uri: &str, name: &str) -> Vec<u8> {
    let out = s.path(name);
    let out = out.to_str().unwrap();
    qemu_img(s.dir(), &["convert", "-f", "raw", "-O", "raw", uri, out]);
    std::fs::read(out).unwrap()
}

fn assert_same(what: &str, ours: &[u8], expected: &[u8]) {
    assert_eq!(ours.len(), expected.len(), "{what}: length");
    if let Some(at) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: {:#04x} != {:#04x}",
            ours[at], expected[at]
        );
    }
}

/// `qemu-img map --output=json` as (start, length, zero, data) runs, with
/// neighbours of equal state merged (NBD only says hole/zero).
fn map_runs(text: &str) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in json(text).as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (zero, data) = (e["zero"].as_bool().unwrap(), e["data"].as_bool().unwrap());
        match out.last_mut() {
            Some(l) if l.2 == zero && l.3 == data && l.0 + l.1 == start => l.1 += len,
            _ => out.push((start, len, zero, data)),
        }
    }
    out
}

#[test]
fn qemu_img_converts_out_bit_exactly_over_unix_and_tcp() {
    // Layouts: a chain of default images, extended L2 with subclusters,
    // version 2 with 4 KiB clusters, zstd compression.
    for (label, opts) in [
        ("default", ""),
        ("extended_l2", "extended_l2=on"),
        ("v2", "compat=0.10,cluster_size=4k"),
        ("zstd", "compression_type=zstd"),
    ] {
        let s = Scratch::new();
        chain(&s, opts);
        let expected = contents(&s, "top.qcow2", "qcow2");
        for on in [On::Unix, On::Tcp] {
            let mut srv = Served::ours(s.dir(), on, "vm", &["-r", "-t", "-e", "2"], "top.qcow2");
            let got = convert_out(&s, &srv.uri, "out.raw");
            assert_same(&format!("{label} over {on:?}"), &got, &expected);
            // The same image through the old NBD_OPT_EXPORT_NAME path (qemu-io
            // reads a range and checks its pattern).
            let out = ok_in(
                s.dir(),
                "qemu-io",
                &["-r", "-f", "raw", "-c", "read -P 0xbb 512k 1M", &srv.uri],
            );
            assert!(out.contains("read 1048576/1048576"), "{out}");
            assert!(srv.stop().success(), "{}", srv.stderr_text());
        }
    }
}

#[test]
fn raw_and_encrypted_images_are_served_too() {
    let s = Scratch::new();
    qemu_img(s.dir(), &["create", "-q", "-f", "raw", "disk.raw", "16M"]);
    ok_in(
        s.dir(),
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x61 1M 2M", "disk.raw"],
    );
    let expected = contents(&s, "disk.raw", "raw");
    let srv = Served::ours(s.dir(), On::Unix, "raw", &["-f", "raw", "-r"], "disk.raw");
    assert_same("raw", &convert_out(&s, &srv.uri, "raw.out"), &expected);
    drop(srv);

    std::fs::write(s.path("pw"), "sesame").unwrap();
    qemu_img(
        s.dir(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,file=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "enc.qcow2",
            "8M",
        ],
    );
    ok_in(
        s.dir(),
        "qemu-io",
        &[
            "--object",
            "secret,id=sec0,file=pw",
            "--image-opts",
            "-c",
            "write -P 0x77 64k 1M",
            "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=sec0",
        ],
    );
    let srv = Served::ours(
        s.dir(),
        On::Unix,
        "enc",
        &["--object", "secret,id=sec0,file=pw", "--image-opts", "-r"],
        "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=sec0",
    );
    let got = convert_out(&s, &srv.uri, "enc.out");
    let mut expected = vec![0u8; 8 << 20];
    expected[64 << 10..(64 << 10) + (1 << 20)].fill(0x77);
    assert_same("LUKS", &got, &expected);
}

#[test]
fn qemu_img_map_over_nbd_shows_the_files_allocation() {
    for opts in ["", "extended_l2=on"] {
        let s = Scratch::new();
        chain(&s, opts);
        let file = map_runs(&qemu_img(
            s.dir(),
            &["map", "-U", "--output=json", "top.qcow2"],
        ));
        let srv = Served::ours(s.dir(), On::Unix, "vm", &["-r"], "top.qcow2");
        let nbd = map_runs(&qemu_img(
            s.dir(),
            &["map", "--output=json", "-f", "raw", &srv.uri],
        ));
        assert_eq!(nbd, file, "map over NBD vs the file ({opts:?})");
    }
}

/// A qemu-io workload: patterns written, zeroed with and without unmap,
/// discarded, written asynchronously, flushed, and read back with
/// verification.
const WORKLOAD: &[&str] = &[
    "write -P 0x11 100k 300k",
    "write -P 0x12 1M 3M",
    "write -z 4M 2M",
    "write -z -u 1M 1M",
    "aio_write -P 0x22 10M 64k",
    "aio_write -P 0x23 10304k 64k",
    "aio_flush",
    "write -P 0x24 7k 1k",
    "discard 2M 1M",
    "write -z 9000k 5k",
    "write -P 0x25 63M 1M",
    "flush",
    "read -P 0x11 100k 300k",
    "read -P 0x22 10M 64k",
    "read -P 0x25 63M 1M",
];

/// Runs [`WORKLOAD`] with qemu-io; `discards: false` leaves out its
/// discards (what a server with `--discard=ignore` makes of them).
fn run_workload(s: &Scratch, uri_or_file: &str, fmt: &str, discards: bool) {
    let mut args = vec!["-f", fmt];
    for c in WORKLOAD {
        if discards || !c.starts_with("discard") {
            args.extend(["-c", c]);
        }
    }
    args.push(uri_or_file);
    let out = run_in(s.dir(), "qemu-io", &args);
    let text = output_text(&out);
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("error"),
        "qemu-io over {uri_or_file}: {text}"
    );
}

#[test]
fn qemu_io_workloads_land_as_they_do_on_the_file() {
    // Trims are ignored by default (as by qemu-nbd): the range keeps its
    // data, which the direct run reproduces by leaving them out.
    for (label, create, serve_args) in [
        ("v3", "", vec![]),
        ("v3_unmap", "", vec!["--discard=unmap"]),
        ("extended_l2", "extended_l2=on", vec!["--discard=unmap"]),
        ("v2", "compat=0.10", vec!["--discard=unmap"]),
        (
            "detect_zeroes",
            "",
            vec!["--discard=unmap", "--detect-zeroes=unmap"],
        ),
        ("cache_none", "", vec!["--cache=none"]),
        ("raw", "raw", vec!["-f", "raw", "--discard=unmap"]),
    ] {
        let discards = serve_args.contains(&"--discard=unmap");
        let s = Scratch::new();
        let fmt = if create == "raw" { "raw" } else { "qcow2" };
        if fmt == "raw" {
            qemu_img(s.dir(), &["create", "-q", "-f", "raw", "a.img", "64M"]);
        } else {
            qemu_create(s.dir(), "a.img", create, "64M");
        }
        ok_in(
            s.dir(),
            "qemu-io",
            &["-f", fmt, "-c", "write -P 0x01 0 8M", "a.img"],
        );
        std::fs::copy(s.path("a.img"), s.path("b.img")).unwrap();
        let mut srv = Served::ours(s.dir(), On::Tcp, "", &serve_args, "a.img");
        run_workload(&s, &srv.uri, "raw", true);
        let status = srv
            .wait_exit(Duration::from_secs(60))
            .expect("the server exits after its only client");
        assert!(status.success(), "{label}: {}", srv.stderr_text());
        run_workload(&s, "b.img", fmt, discards);
        let cmp = run_in(
            s.dir(),
            "qemu-img",
            &["compare", "-f", fmt, "-F", fmt, "a.img", "b.img"],
        );
        assert!(cmp.status.success(), "{label}: {}", output_text(&cmp));
        if fmt == "qcow2" {
            assert_qemu_img_check(s.dir(), "a.img");
        }
    }
}

fn nbdinfo_json(s: &Scratch, uri: &str) -> serde_json::Value {
    json(&ok_in(s.dir(), "nbdinfo", &["--json", uri]))
}

#[test]
fn nbdinfo_sees_the_export_as_specified() {
    let s = Scratch::new();
    chain(&s, "");
    let srv = Served::ours(
        s.dir(),
        On::Unix,
        "vm",
        &["-t", "-A", "-D", "a test disk"],
        "top.qcow2",
    );
    let info = nbdinfo_json(&s, &srv.uri);
    let e = &info["exports"][0];
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(info["structured"], true);
    assert_eq!(e["export-name"], "vm");
    assert_eq!(e["description"], "a test disk");
    assert_eq!(e["export-size"], 64u64 << 20);
    assert_eq!(e["is_read_only"], false);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_df",
        "can_cache",
    ] {
        assert_eq!(e[flag], true, "{flag}");
    }
    assert_eq!(e["can_multi_conn"], false, "-e 1: one client at a time");
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 65536);
    assert_eq!(e["block_size_maximum"], 32u64 << 20);
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["base:allocation", "qemu:allocation-depth"]);
    let list = ok_in(s.dir(), "nbdinfo", &["--list", "--json", &srv.uri]);
    assert_eq!(json(&list)["exports"][0]["export-name"], "vm");

    // base:allocation as nbdinfo prints it, against qemu-img map of the file.
    let file = map_runs(&qemu_img(
        s.dir(),
        &["map", "-U", "--output=json", "top.qcow2"],
    ));
    let map = json(&ok_in(s.dir(), "nbdinfo", &["--map", "--json", &srv.uri]));
    let mut got = Vec::new();
    for m in map.as_array().unwrap() {
        let t = m["type"].as_u64().unwrap();
        got.push((
            m["offset"].as_u64().unwrap(),
            m["length"].as_u64().unwrap(),
            t & 2 != 0,
            t & 1 == 0,
        ));
    }
    assert_eq!(got, file);

    // qemu:allocation-depth: 1 where the top holds the range, 2 for the
    // base, 0 where no layer does; as qemu-img map's depth and present.
    let depth = json(&ok_in(
        s.dir(),
        "nbdinfo",
        &["--map=qemu:allocation-depth", "--json", &srv.uri],
    ));
    let mut expected: Vec<(u64, u64, u64)> = Vec::new();
    for e in json(&qemu_img(
        s.dir(),
        &["map", "-U", "--output=json", "top.qcow2"],
    ))
    .as_array()
    .unwrap()
    {
        let d = if e["present"].as_bool().unwrap() {
            e["depth"].as_u64().unwrap() + 1
        } else {
            0
        };
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match expected.last_mut() {
            Some(l) if l.2 == d => l.1 += len,
            _ => expected.push((start, len, d)),
        }
    }
    let got: Vec<(u64, u64, u64)> = depth
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["length"].as_u64().unwrap(),
                m["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn nbdcopy_copies_out_and_in_over_several_connections() {
    let s = Scratch::new();
    chain(&s, "");
    let expected = contents(&s, "top.qcow2", "qcow2");
    // Read-only, 4 clients at once: multi-conn is advertised and nbdcopy
    // opens several connections.
    let srv = Served::ours(
        s.dir(),
        On::Unix,
        "vm",
        &["-r", "-e", "4", "-t"],
        "top.qcow2",
    );
    let info = nbdinfo_json(&s, &srv.uri);
    assert_eq!(info["exports"][0]["can_multi_conn"], true);
    let out = s.path("copy.raw");
    ok_in(
        s.dir(),
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            &srv.uri,
            out.to_str().unwrap(),
        ],
    );
    assert_same("nbdcopy out", &std::fs::read(&out).unwrap(), &expected);
    drop(srv);

    // Into a writable export over 4 connections, then judged by qemu-img.
    qemu_create(s.dir(), "dst.qcow2", "", "64M");
    let mut dst = Served::ours(s.dir(), On::Tcp, "dst", &["-e", "4", "-t"], "dst.qcow2");
    ok_in(
        s.dir(),
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            out.to_str().unwrap(),
            &dst.uri,
        ],
    );
    assert!(dst.stop().success(), "{}", dst.stderr_text());
    assert_qemu_img_check(s.dir(), "dst.qcow2");
    let cmp = run_in(
        s.dir(),
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "dst.qcow2",
            "copy.raw",
        ],
    );
    assert!(cmp.status.success(), "{}", output_text(&cmp));
}

#[test]
fn snapshot_mode_leaves_the_image_alone_and_no_overlay_behind() {
    let s = Scratch::new();
    chain(&s, "");
    let before = contents(&s, "top.qcow2", "qcow2");
    let tmp = s.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let srv = {
        // The overlay goes to $TMPDIR.
        std::env::set_var("TMPDIR", &tmp);
        let srv = Served::ours(s.dir(), On::Unix, "snap", &["-s", "-t"], "top.qcow2");
        std::env::remove_var("TMPDIR");
        srv
    };
    let out = ok_in(
        s.dir(),
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xee 0 2M",
            "-c",
            "read -P 0xee 0 2M",
            &srv.uri,
        ],
    );
    assert!(out.contains("read 2097152/2097152"), "{out}");
    // The writes are seen by later clients of the same server.
    let out = ok_in(
        s.dir(),
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xee 1M 1M", &srv.uri],
    );
    assert!(out.contains("read 1048576/1048576"), "{out}");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "overlay unlinked"
    );
    drop(srv);
    assert_same(
        "image after -s",
        &contents(&s, "top.qcow2", "qcow2"),
        &before,
    );
    assert_qemu_img_check(s.dir(), "top.qcow2");
}

#[test]
fn an_internal_snapshot_is_served_read_only() {
    let s = Scratch::new();
    qemu_create(s.dir(), "a.qcow2", "", "16M");
    qemu_io(s.dir(), "a.qcow2", &["write -P 0x10 0 1M"]);
    qemu_img(s.dir(), &["snapshot", "-c", "first", "a.qcow2"]);
    qemu_io(s.dir(), "a.qcow2", &["write -P 0x20 0 2M"]);
    let expected = {
        qemu_img(
            s.dir(),
            &[
                "convert",
                "-l",
                "first",
                "-O",
                "raw",
                "a.qcow2",
                "first.raw",
            ],
        );
        std::fs::read(s.path("first.raw")).unwrap()
    };
    let srv = Served::ours(s.dir(), On::Unix, "", &["-l", "first", "-t"], "a.qcow2");
    let info = nbdinfo_json(&s, &srv.uri);
    assert_eq!(info["exports"][0]["is_read_only"], true);
    assert_same("snapshot", &convert_out(&s, &srv.uri, "got.raw"), &expected);
    let missing = run_in(
        s.dir(),
        &qcowkit_tests::bin("qcow2").display().to_string(),
        &["serve", "-k", "x.sock", "-l", "nope", "a.qcow2"],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        output_text(&missing).contains("Can't find snapshot 'nope'"),
        "{}",
        output_text(&missing)
    );
}

#[test]
fn without_persistent_the_server_ends_with_its_client_and_cleans_up() {
    let s = Scratch::new();
    qemu_create(s.dir(), "a.qcow2", "", "1M");
    let pid = s.path("serve.pid");
    let mut srv = Served::ours(
        s.dir(),
        On::Unix,
        "",
        &["--pid-file", pid.to_str().unwrap()],
        "a.qcow2",
    );
    let written: u32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(written, srv.pid());
    ok_in(s.dir(), "qemu-img", &["info", &srv.uri]);
    let status = srv.wait_exit(Duration::from_secs(60)).expect("exits");
    assert!(status.success());
    assert!(!pid.exists(), "pid file removed");
    assert!(!srv.socket.as_ref().unwrap().exists(), "socket removed");
}

#[test]
fn fork_returns_once_listening() {
    let s = Scratch::new();
    qemu_create(s.dir(), "a.qcow2", "", "1M");
    let pid = s.path("serve.pid");
    let sock = s.path("f.sock");
    let out = run_in(
        s.dir(),
        &qcowkit_tests::bin("qcow2").display().to_string(),
        &[
            "serve",
            "--fork",
            "-k",
            sock.to_str().unwrap(),
            "--pid-file",
            pid.to_str().unwrap(),
            "a.qcow2",
        ],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    // The pid file is written before --fork returns.
    let daemon: u32 = std::fs::read_to_string(&pid)
        .map(|t| t.trim().parse().unwrap())
        .unwrap();
    // Killed if the test ends before it ends by itself.
    let _reap = qcowkit_tests::serve::Reap(daemon);
    // Listening when --fork returned: the client connects at once.
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let info = ok_in(s.dir(), "qemu-img", &["info", "--output=json", &uri]);
    assert_eq!(json(&info)["virtual-size"], 1 << 20);
    // The daemon ends with its only client; its pid file goes with it.
    let start = std::time::Instant::now();
    while pid.exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::park_timeout(Duration::from_millis(5));
    }
    assert!(!pid.exists(), "daemon {daemon} still running");
    // A failing daemon makes --fork fail.
    let bad = run_in(
        s.dir(),
        &qcowkit_tests::bin("qcow2").display().to_string(),
        &[
            "serve",
            "--fork",
            "-k",
            sock.to_str().unwrap(),
            "missing.qcow2",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        output_text(&bad).contains("missing.qcow2"),
        "{}",
        output_text(&bad)
    );
}

/// Runs a QEMU machine (paused, `-S`) whose drive `d0` is `drive`, gives
/// its monitor `commands` (qemu-io on the drive), and returns what the
/// monitor printed.
fn qemu_machine(s: &Scratch, drive: &[&str], commands: &[&str]) -> String {
    use std::io::Write;
    let mut args = vec![
        "-M",
        "mps2-an386",
        "-nographic",
        "-S",
        "-monitor",
        "stdio",
        "-serial",
        "none",
    ];
    args.extend(drive);
    let mut child = std::process::Command::new("qemu-system-arm")
        .args(&args)
        .current_dir(s.dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-system-arm (scripts/install-qemu-system-arm.sh installs it)");
    let mut input = child.stdin.take().unwrap();
    for c in commands {
        writeln!(input, "{c}").unwrap();
    }
    writeln!(input, "quit").unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "qemu-system-arm: {text}");
    text
}

#[test]
fn a_qemu_machine_uses_the_export_as_its_drive() {
    let s = Scratch::new();
    chain(&s, "");
    let srv = Served::ours(s.dir(), On::Unix, "vm", &["-t"], "top.qcow2");
    let sock = srv.socket.clone().unwrap();
    // -drive with the URI.
    let drive = format!("file={},if=none,id=d0,format=raw", srv.uri);
    let text = qemu_machine(
        &s,
        &["-drive", &drive],
        &[
            r#"qemu-io d0 "read -P 0xbb 512k 1M""#,
            r#"qemu-io d0 "write -P 0x9d 30M 192k""#,
            r#"qemu-io d0 "read -P 0x9d 30M 192k""#,
            "info block",
        ],
    );
    assert!(
        text.contains("read 1048576/1048576 bytes at offset 524288"),
        "{text}"
    );
    assert!(
        text.contains("wrote 196608/196608 bytes at offset 31457280"),
        "{text}"
    );
    assert!(
        text.contains("read 196608/196608 bytes at offset 31457280"),
        "{text}"
    );
    assert!(!text.contains("failed"), "{text}");
    // -blockdev with the options, as the README shows.
    let blockdev = format!(
        "driver=nbd,node-name=d0,server.type=unix,server.path={},export=vm",
        sock.display()
    );
    let text = qemu_machine(
        &s,
        &["-blockdev", &blockdev],
        &[
            r#"qemu-io d0 "read -P 0x9d 30M 192k""#,
            r#"qemu-io d0 "read -P 0xaa 0 512k""#,
        ],
    );
    assert!(text.contains("read 196608/196608"), "{text}");
    assert!(text.contains("read 524288/524288"), "{text}");
    assert!(!text.contains("failed"), "{text}");
    drop(srv);
    assert_qemu_img_check(s.dir(), "top.qcow2");
    qemu_io(s.dir(), "top.qcow2", &["read -P 0x9d 30M 192k"]);
}

#[test]
fn detect_zeroes_turns_written_zeros_into_zero_clusters() {
    for (mode, zero_after) in [("off", false), ("on", true)] {
        let s = Scratch::new();
        qemu_create(s.dir(), "a.qcow2", "", "4M");
        qemu_io(s.dir(), "a.qcow2", &["write -P 0x21 0 4M"]);
        let arg = format!("--detect-zeroes={mode}");
        let srv = Served::ours(s.dir(), On::Unix, "", &[&arg], "a.qcow2");
        ok_in(
            s.dir(),
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0 1M 1M", &srv.uri],
        );
        drop(srv);
        assert_qemu_img_check(s.dir(), "a.qcow2");
        let map = json(&qemu_img(s.dir(), &["map", "--output=json", "a.qcow2"]));
        let e = qcowkit_tests::map_entry_at(&map, 1 << 20);
        assert_eq!(
            e["zero"] == true && e["data"] == false,
            zero_after,
            "{mode}: {e}"
        );
        qemu_io(
            s.dir(),
            "a.qcow2",
            &["read -P 0 1M 1M", "read -P 0x21 2M 2M"],
        );
    }
}

/// `nbdinfo --map=CONTEXT --json URI` as (offset, length, type) triples.
fn nbd_map(s: &Scratch, uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let arg = format!("--map={context}");
    json(&ok_in(s.dir(), "nbdinfo", &[&arg, "--json", uri]))
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["length"].as_u64().unwrap(),
                m["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// qemu-nbd serving `bm.qcow2` read-only on `sock` with bitmaps `names`.
fn qemu_nbd_bitmaps(
    s: &Scratch,
    sock: &std::path::Path,
    names: &[&str],
) -> qcowkit_tests::serve::Reap {
    let mut args = vec!["-k", sock.to_str().unwrap(), "-r", "-t", "-f", "qcow2"];
    for n in names {
        args.extend(["-B", n]);
    }
    args.push("bm.qcow2");
    qcowkit_tests::serve::qemu_nbd_daemon(s.dir(), &args)
}

#[test]
fn dirty_bitmaps_are_exported_as_qemu_nbd_exports_them() {
    let s = Scratch::new();
    qemu_create(s.dir(), "bm.qcow2", "", "64M");
    qemu_img(s.dir(), &["bitmap", "--add", "bm.qcow2", "b0"]);
    qemu_img(
        s.dir(),
        &["bitmap", "--add", "-g", "512k", "bm.qcow2", "b1"],
    );
    qemu_io(
        s.dir(),
        "bm.qcow2",
        &[
            "write -P 1 100k 200k",
            "write -P 2 10M 1M",
            "write -z 40M 64k",
        ],
    );
    // Read-only: both servers, the same maps.
    let ours = Served::ours(
        s.dir(),
        On::Unix,
        "",
        &["-r", "-t", "-B", "b0", "-B", "b1"],
        "bm.qcow2",
    );
    let qsock = s.path("q.sock");
    let _qemu = qemu_nbd_bitmaps(&s, &qsock, &["b0", "b1"]);
    let quri = format!("nbd+unix:///?socket={}", qsock.display());
    for b in ["b0", "b1"] {
        let context = format!("qemu:dirty-bitmap:{b}");
        let mine = nbd_map(&s, &ours.uri, &context);
        assert_eq!(mine, nbd_map(&s, &quri, &context), "{b}");
        assert!(mine.iter().any(|e| e.2 == 1), "{b}: {mine:?}");
    }
    drop(ours);
    drop(_qemu);

    // Writable: what clients write shows at once, before any flush, and
    // is stored with the bitmap when the server ends.
    let mut srv = Served::ours(s.dir(), On::Unix, "", &["-t", "-B", "b0"], "bm.qcow2");
    let mut c = qcowkit_tests::nbd::Client::unix(srv.socket.as_ref().unwrap()).unwrap();
    c.handshake().unwrap();
    assert!(c.structured_reply().unwrap());
    c.set_meta_context("", &["qemu:dirty-bitmap:b0"])
        .unwrap()
        .unwrap();
    c.go("", &[]).unwrap().unwrap();
    c.write(20 << 20, &[3; 70 << 10], false).unwrap().unwrap();
    let bs = c.block_status(20 << 20, 1 << 20, 0).unwrap().unwrap();
    assert_eq!(bs[0].1[0], (128 << 10, 1), "{bs:?}");
    c.disconnect().unwrap();
    assert!(srv.stop().success());
    assert_qemu_img_check(s.dir(), "bm.qcow2");
    let info = qcowkit_tests::qemu_info(s.dir(), "bm.qcow2");
    let flags = &info["format-specific"]["data"]["bitmaps"][0]["flags"];
    assert!(!flags.to_string().contains("in-use"), "{flags}");
    let _qemu = qemu_nbd_bitmaps(&s, &qsock, &["b0"]);
    let stored = nbd_map(&s, &quri, "qemu:dirty-bitmap:b0");
    assert!(
        stored.contains(&(20 << 20, 128 << 10, 1)),
        "qemu-nbd reads the stored bits: {stored:?}"
    );

    // A bitmap that is not there is refused at start, as qemu-nbd does.
    let out = run_in(
        s.dir(),
        &qcowkit_tests::bin("qcow2").display().to_string(),
        &["serve", "-k", "x.sock", "-r", "-B", "nope", "bm.qcow2"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output_text(&out).contains("Bitmap 'nope' not found"),
        "{}",
        output_text(&out)
    );
}
