//! Encrypted images made by qemu-img (LUKS in every mode and IV generator
//! QEMU creates with AES, several hashes, cluster sizes, version 2, an
//! external data file, a LUKS backing file with its own passphrase, and
//! the legacy AES method) read bit-exactly through the core, as qemu-img
//! reads them; a wrong passphrase is refused; without a passphrase the
//! metadata opens and data reads are refused.

use std::path::Path;

use qcowkit_core::luks::Secret;
use qcowkit_core::{Error, Image, OpenOptions};
use qcowkit_tests::*;

/// `qemu-img create` of an encrypted image `name` with `opts` (after the
/// encryption options), passphrase `pass`.
fn create(d: &Path, name: &str, format: &str, pass: &str, opts: &str, extra: &[&str]) {
    let secret = format!("secret,id=sec0,data={pass}");
    let mut o = format!("encrypt.format={format},encrypt.key-secret=sec0");
    if format == "luks" && !opts.contains("iter-time") {
        o.push_str(",encrypt.iter-time=10");
    }
    if !opts.is_empty() {
        o.push(',');
        o.push_str(opts);
    }
    let mut args = vec!["create", "-q", "--object", &secret, "-f", "qcow2", "-o", &o];
    args.extend_from_slice(extra);
    args.push(name);
    args.push("4M");
    qemu_img(d, &args);
}

/// Runs qemu-io commands on encrypted `name` (passphrase `pass`).
fn write(d: &Path, name: &str, pass: &str, cmds: &[&str]) {
    let secret = format!("secret,id=sec0,data={pass}");
    let opts = format!("driver=qcow2,file.filename={name},encrypt.key-secret=sec0");
    let mut args = vec!["--object", secret.as_str(), "--image-opts", opts.as_str()];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    ok_in(d, "qemu-io", &args);
}

/// The guest contents of encrypted `name` as qemu-img reads them.
fn contents(d: &Path, name: &str, pass: &str) -> Vec<u8> {
    let secret = format!("secret,id=sec0,data={pass}");
    let opts = format!("driver=qcow2,file.filename={name},encrypt.key-secret=sec0");
    let raw = format!("{name}.raw");
    let _ = std::fs::remove_file(d.join(&raw));
    qemu_img(
        d,
        &[
            "convert",
            "--object",
            &secret,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            &raw,
        ],
    );
    std::fs::read(d.join(raw)).unwrap()
}

fn opts(pass: Option<&str>) -> OpenOptions {
    OpenOptions {
        passphrase: pass.map(Secret::from),
        no_backing: true,
        ..OpenOptions::default()
    }
}

const WRITES: &[&str] = &[
    "write -P 0x5a 0 4k",
    "write -P 0x11 1000 3000",
    "write -P 0x22 65024 1024",
    "write -z 128k 64k",
    "write -c -P 0x33 1M 64k",
    "write -P 0x44 3M 300k",
];

#[test]
fn qemu_img_luks_modes_read_bit_exactly() {
    read_cases(&[
        ("", "", &[]),
        ("aes-128 xts", "encrypt.cipher-alg=aes-128", &[]),
        ("aes-192 xts", "encrypt.cipher-alg=aes-192", &[]),
        ("cbc plain64", "encrypt.cipher-mode=cbc", &[]),
        ("ctr", "encrypt.cipher-mode=ctr", &[]),
        ("ecb", "encrypt.cipher-mode=ecb", &[]),
        ("xts plain", "encrypt.ivgen-alg=plain", &[]),
        (
            "qemu-img's default iteration time",
            "encrypt.iter-time=2000",
            &[],
        ),
        ("sha224", "encrypt.hash-alg=sha224", &[]),
        ("sha384", "encrypt.hash-alg=sha384", &[]),
    ]);
}

#[test]
fn qemu_img_luks_ivgens_hashes_and_layouts_read_bit_exactly() {
    read_cases(&[
        (
            "cbc essiv",
            "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            &[],
        ),
        (
            "aes-128 cbc essiv",
            "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            &[],
        ),
        ("xts essiv", "encrypt.ivgen-alg=essiv", &[]),
        ("sha1", "encrypt.hash-alg=sha1", &[]),
        ("sha512", "encrypt.hash-alg=sha512", &[]),
        ("md5", "encrypt.hash-alg=md5", &[]),
        ("ripemd160", "encrypt.hash-alg=ripemd160", &[]),
        ("sm3", "encrypt.hash-alg=sm3", &[]),
        (
            "cbc essiv md5",
            "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=md5",
            &[],
        ),
        ("4k clusters", "cluster_size=4096", &[]),
        ("version 2", "compat=0.10", &[]),
    ]);
}

/// Each case (name, create options, extra create arguments): made by
/// qemu-img, written by qemu-io, read by the core with the passphrase,
/// with a wrong one, and without one.
fn read_cases(cases: &[(&str, &str, &[&str])]) {
    let s = Scratch::new();
    let d = s.dir();
    let mut problems = Vec::new();
    for (what, o, extra) in cases {
        let name = "e.qcow2";
        let _ = std::fs::remove_file(s.path(name));
        create(d, name, "luks", "abc", o, extra);
        write(d, name, "abc", WRITES);
        let want = contents(d, name, "abc");
        let bytes = std::fs::read(s.path(name)).unwrap();
        match Image::open(bytes.clone(), &opts(Some("abc"))) {
            Ok(mut img) => {
                let mut got = vec![0u8; want.len()];
                match img.read_at(0, &mut got) {
                    Ok(()) => {
                        if let Some(diff) = byte_diff(&got, &want) {
                            problems.push(format!("{what}: {diff}"));
                        }
                        // A read not aligned to sectors.
                        let mut part = vec![0u8; 1234];
                        img.read_at(999, &mut part).unwrap();
                        if part[..] != want[999..999 + 1234] {
                            problems.push(format!("{what}: unaligned read differs"));
                        }
                    }
                    Err(e) => problems.push(format!("{what}: read: {e}")),
                }
            }
            Err(e) => problems.push(format!("{what}: open: {e}")),
        }
        match Image::open(bytes.clone(), &opts(Some("abd"))) {
            Err(Error::InvalidPassphrase) => {}
            Err(e) => problems.push(format!("{what}: wrong passphrase: {e}")),
            Ok(_) => problems.push(format!("{what}: a wrong passphrase opened it")),
        }
        match Image::open(bytes, &opts(None)) {
            Ok(mut img) => {
                if !matches!(
                    img.read_at(0, &mut [0u8; 512]),
                    Err(Error::Encrypted { method: "luks" })
                ) {
                    problems.push(format!("{what}: data read without the passphrase"));
                }
                // Zeros and unallocated ranges need no key.
                let mut z = vec![1u8; 4096];
                if img.read_at(128 << 10, &mut z).is_err() || z.iter().any(|&b| b != 0) {
                    problems.push(format!("{what}: zero cluster without the passphrase"));
                }
            }
            Err(e) => problems.push(format!("{what}: open without passphrase: {e}")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn legacy_aes_images_read_like_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    create(d, "a.qcow2", "aes", "a-longer-passphrase-than-16", "", &[]);
    write(d, "a.qcow2", "a-longer-passphrase-than-16", WRITES);
    let want = contents(d, "a.qcow2", "a-longer-passphrase-than-16");
    let bytes = std::fs::read(s.path("a.qcow2")).unwrap();
    let mut img = Image::open(bytes, &opts(Some("a-longer-passphrase-than-16"))).unwrap();
    let mut got = vec![0u8; want.len()];
    img.read_at(0, &mut got).unwrap();
    assert_eq!(byte_diff(&got, &want), None);
}

#[test]
fn encrypted_chains_and_data_files_read_like_qemu_img() {
    use qcowkit_tests::mem::Files;
    let s = Scratch::new();
    let d = s.dir();
    // A LUKS base (abc) under a LUKS overlay (xyz), each with its own key.
    create(d, "base.qcow2", "luks", "abc", "", &[]);
    write(d, "base.qcow2", "abc", &["write -P 0x61 0 2M"]);
    let secret = "secret,id=sec0,data=xyz";
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "--object",
            secret,
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
    );
    let both = "secret,id=sec1,data=abc";
    let io_opts = "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=sec0,backing.encrypt.key-secret=sec1";
    ok_in(
        d,
        "qemu-io",
        &[
            "--object",
            secret,
            "--object",
            both,
            "--image-opts",
            io_opts,
            "-c",
            "write -P 0x62 1000 5000",
        ],
    );
    qemu_img(
        d,
        &[
            "convert",
            "--object",
            secret,
            "--object",
            both,
            "--image-opts",
            io_opts,
            "-O",
            "raw",
            "want.raw",
        ],
    );
    let want = std::fs::read(s.path("want.raw")).unwrap();
    let mut files = Files::new().with("base.qcow2", std::fs::read(s.path("base.qcow2")).unwrap());
    let o = OpenOptions {
        passphrase: Some(Secret::from("xyz")),
        backing_passphrases: vec![("base.qcow2".into(), Secret::from("abc"))],
        ..OpenOptions::default()
    };
    let top = std::fs::read(s.path("top.qcow2")).unwrap();
    let mut img: Image<Vec<u8>> =
        Image::open_with(top, "top.qcow2", "top.qcow2", &mut files, &o).unwrap();
    let mut got = vec![0u8; want.len()];
    img.read_at(0, &mut got).unwrap();
    assert_eq!(byte_diff(&got, &want), None, "chain");

    // An external data file: data encrypted at its offsets there.
    create(d, "df.qcow2", "luks", "abc", "data_file=df.data", &[]);
    // (No compressed clusters with a data file.)
    let writes: Vec<&str> = WRITES
        .iter()
        .copied()
        .filter(|w| !w.contains("-c"))
        .collect();
    write(d, "df.qcow2", "abc", &writes);
    let want = contents(d, "df.qcow2", "abc");
    let mut files = Files::new().with("df.data", std::fs::read(s.path("df.data")).unwrap());
    let o = OpenOptions {
        passphrase: Some(Secret::from("abc")),
        ..OpenOptions::default()
    };
    let meta = std::fs::read(s.path("df.qcow2")).unwrap();
    let mut img: Image<Vec<u8>> =
        Image::open_with(meta, "df.qcow2", "df.qcow2", &mut files, &o).unwrap();
    let mut got = vec![0u8; want.len()];
    img.read_at(0, &mut got).unwrap();
    assert_eq!(byte_diff(&got, &want), None, "data file");
}

/// The command line: info (human and JSON) as qemu-img's without a
/// passphrase, check without one as qemu-img's with one, map without host
/// offsets, convert and compare with `--passphrase-file`, and a wrong
/// passphrase refused with qemu-img's words.
#[test]
fn the_command_line_reads_encrypted_images_like_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    create(
        d,
        "c.qcow2",
        "luks",
        "abc",
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        &[],
    );
    write(
        d,
        "c.qcow2",
        "abc",
        &["write -P 0x5a 0 100k", "write -P 0x11 1M 4k"],
    );
    create(d, "a.qcow2", "aes", "abc", "", &[]);
    std::fs::write(s.path("pass"), "abc").unwrap();
    std::fs::write(s.path("wrong"), "abd").unwrap();
    let secret = "secret,id=sec0,data=abc";
    let opts = "driver=qcow2,file.filename=c.qcow2,encrypt.key-secret=sec0";
    // info, without a passphrase on either side.
    for img in ["c.qcow2", "a.qcow2"] {
        for out in ["human", "json"] {
            let o = ours_ok(d, &["info", &format!("--output={out}"), img]);
            let q = qemu_img(d, &["info", &format!("--output={out}"), img]);
            let (o, q) = if out == "json" {
                let mut q = json(&q);
                q.as_object_mut().unwrap().remove("children");
                (json(&o), q)
            } else {
                let q = q.split("Child node").next().unwrap().to_string();
                (serde_json::Value::String(o), serde_json::Value::String(q))
            };
            assert_eq!(o, q, "info --output={out} {img}");
        }
    }
    // check: ours needs no passphrase (it reads no data).
    let o = ours(d, &["check", "c.qcow2"]);
    let q = run_in(
        d,
        "qemu-img",
        &["check", "--object", secret, "--image-opts", opts],
    );
    assert_eq!((code(&o), stdout_of(&o)), (code(&q), stdout_of(&q)));
    // map: no host offsets, as qemu-img.
    let o = ours_ok(d, &["map", "--output=json", "c.qcow2"]);
    let q = qemu_img(
        d,
        &[
            "map",
            "--output=json",
            "--object",
            secret,
            "--image-opts",
            opts,
        ],
    );
    assert_eq!(json(&o), json(&q));
    // convert and compare with the passphrase.
    ours_ok(
        d,
        &[
            "convert",
            "--passphrase-file",
            "pass",
            "-O",
            "raw",
            "c.qcow2",
            "ours.raw",
        ],
    );
    assert_eq!(
        byte_diff(
            &std::fs::read(s.path("ours.raw")).unwrap(),
            &contents(d, "c.qcow2", "abc")
        ),
        None
    );
    let o = ours(
        d,
        &[
            "compare",
            "--passphrase-file",
            "pass",
            "c.qcow2",
            "ours.raw",
        ],
    );
    assert_eq!(code(&o), 0, "{}", output_text(&o));
    // Without it, or with a wrong one: refused.
    let o = ours(d, &["convert", "-O", "raw", "c.qcow2", "x.raw"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr_of(&o).contains("a passphrase is required"),
        "{}",
        output_text(&o)
    );
    let o = ours(
        d,
        &[
            "convert",
            "--passphrase-file",
            "wrong",
            "-O",
            "raw",
            "c.qcow2",
            "x.raw",
        ],
    );
    assert_eq!(code(&o), 1);
    assert!(
        stderr_of(&o).contains("Invalid password, cannot unlock any keyslot"),
        "{}",
        output_text(&o)
    );
    assert!(
        !stderr_of(&o).contains("abd"),
        "the secret is never printed"
    );
}

/// Writes into LUKS images qemu-img made (aligned and not, inside and
/// across clusters, into new clusters and over written ones, zeroing,
/// discards, a cluster shared with a snapshot), then qemu-img reads with
/// the passphrase exactly what the writes made, and its check is clean.
#[test]
fn our_writes_into_luks_images_read_back_in_qemu() {
    use qcowkit_core::WritableImage;
    let s = Scratch::new();
    let d = s.dir();
    for (what, o) in [
        ("default", ""),
        (
            "4k clusters, cbc essiv",
            "cluster_size=4096,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
        ),
        ("extended L2", "extended_l2=on"),
    ] {
        let _ = std::fs::remove_file(s.path("w.qcow2"));
        create(d, "w.qcow2", "luks", "abc", o, &[]);
        write(d, "w.qcow2", "abc", &["write -P 0x5a 0 192k"]);
        let mut model = contents(d, "w.qcow2", "abc");
        let opts = OpenOptions {
            passphrase: Some(Secret::from("abc")),
            ..OpenOptions::default()
        };
        let mut w: WritableImage<_> =
            qcowkit_std::open_qcow2_rw(&s.path("w.qcow2"), &opts).unwrap();
        let mut put = |w: &mut WritableImage<_>, off: usize, data: &[u8]| {
            w.write_at(off as u64, data).unwrap();
            model[off..off + data.len()].copy_from_slice(data);
        };
        put(&mut w, 1 << 20, &[1; 65536]);
        put(&mut w, 100, &[2; 1000]);
        put(&mut w, 70_000, &[3; 100_000]);
        put(&mut w, 2 << 20 | 777, &[4; 333]);
        put(&mut w, (3 << 20) - 10, &[5; 20]);
        w.create_snapshot("s", 0, 0).unwrap();
        put(&mut w, 4096, &[6; 512]);
        w.write_zeroes(1 << 20, 65536).unwrap();
        model[1 << 20..(1 << 20) + 65536].fill(0);
        w.flush().unwrap();
        drop(w);
        let secret = "secret,id=sec0,data=abc";
        let io_opts = "driver=qcow2,file.filename=w.qcow2,encrypt.key-secret=sec0";
        let check = run_in(
            d,
            "qemu-img",
            &["check", "--object", secret, "--image-opts", io_opts],
        );
        assert_eq!(code(&check), 0, "{what}: {}", output_text(&check));
        assert_eq!(
            byte_diff(&contents(d, "w.qcow2", "abc"), &model),
            None,
            "{what}"
        );
    }
}

/// Writes into an encrypted image interrupted anywhere: at worst leaks,
/// and each sector written reads either as before or as written (never
/// garbage from a half-encrypted sector).
#[test]
fn writes_into_an_encrypted_image_interrupted_anywhere() {
    use qcowkit_core::WritableImage;
    use qcowkit_tests::record::{assert_at_worst_leaks, crash_states, crashed, Recording};
    let s = Scratch::new();
    let d = s.dir();
    create(d, "r.qcow2", "luks", "abc", "cluster_size=4096", &[]);
    write(d, "r.qcow2", "abc", &["write -P 0x5a 0 64k"]);
    let start = std::fs::read(s.path("r.qcow2")).unwrap();
    let read_all = |disk: Vec<u8>| {
        let mut img = Image::open(disk, &opts(Some("abc"))).unwrap();
        let mut out = vec![0u8; img.size() as usize];
        img.read_at(0, &mut out).unwrap();
        out
    };
    let before = read_all(start.clone());
    let writes: &[(usize, usize, u8)] = &[(1000, 5000, 1), (64 << 10, 8192, 2), (300_000, 100, 3)];
    let img = Image::open(Recording::new(start.clone()), &opts(Some("abc"))).unwrap();
    let mut w = WritableImage::new(img).unwrap();
    for &(off, len, v) in writes {
        w.write_at(off as u64, &vec![v; len]).unwrap();
    }
    w.flush().unwrap();
    let log = w.into_inner().log;
    let states = crash_states(&log);
    for &(k, lost) in &states {
        let at = format!("crash after {k} of {} (lost {lost:?})", log.len());
        let disk = assert_at_worst_leaks(crashed(&start, &log, k, lost), &at);
        let got = read_all(disk);
        // Each sector of each write: as before or as written (a write over
        // several clusters lands cluster by cluster, as in QEMU).
        for &(off, len, v) in writes {
            let mut p = off;
            while p < off + len {
                let e = ((p / 512 + 1) * 512).min(off + len);
                assert!(
                    got[p..e] == before[p..e] || got[p..e].iter().all(|&b| b == v),
                    "{at}: a sector of the write at {off} is torn at {p}"
                );
                p = e;
            }
        }
    }
    eprintln!("{} crash states", states.len());
}

/// Images we create and convert with `-o encrypt.format=luks` open in
/// qemu-io with the same secret, pass qemu-img check, read as written,
/// and refuse a wrong passphrase; the options qemu-img takes.
#[test]
fn images_we_encrypt_open_in_qemu() {
    let s = Scratch::new();
    let d = s.dir();
    std::fs::write(s.path("pass"), "xyz").unwrap();
    let mut raw = vec![0u8; 4 << 20];
    for (i, b) in raw.iter_mut().enumerate().skip(4096).take(3 << 20) {
        *b = (i % 251) as u8;
    }
    std::fs::write(s.path("src.raw"), &raw).unwrap();
    let secret = "secret,id=k,data=xyz";
    for (what, o) in [
        ("default", ""),
        ("aes-128 cbc essiv sha1", ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1"),
        ("aes-192 xts plain", ",encrypt.cipher-alg=aes-192,encrypt.ivgen-alg=plain"),
        ("md5 and ripemd160 hashes", ",encrypt.hash-alg=ripemd160,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=md5"),
        ("ctr sha512, 4k clusters, v2", ",encrypt.cipher-mode=ctr,encrypt.hash-alg=sha512,cluster_size=4096,compat=0.10"),
    ] {
        let opts = format!("encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10{o}");
        for img in ["c.qcow2", "v.qcow2"] {
            let _ = std::fs::remove_file(s.path(img));
        }
        let out = ours(d, &["create", "-f", "qcow2", "--object", secret, "-o", &opts, "c.qcow2", "4M"]);
        assert_eq!(code(&out), 0, "{what}: {}", output_text(&out));
        let out = ours(
            d,
            &["convert", "--object", secret, "-O", "qcow2", "-o", &opts, "src.raw", "v.qcow2"],
        );
        assert_eq!(code(&out), 0, "{what}: {}", output_text(&out));
        for img in ["c.qcow2", "v.qcow2"] {
            let io = format!("driver=qcow2,file.filename={img},encrypt.key-secret=k");
            let check = run_in(d, "qemu-img", &["check", "--object", secret, "--image-opts", &io]);
            assert_eq!(code(&check), 0, "{what} {img}: {}", output_text(&check));
            let info = qemu_info(d, img);
            assert_eq!(info["encrypted"], true, "{what} {img}");
            assert_eq!(info["format-specific"]["data"]["encrypt"]["format"], "luks");
        }
        // qemu-io writes into the image we created, and reads it back.
        let io = "driver=qcow2,file.filename=c.qcow2,encrypt.key-secret=k";
        ok_in(
            d,
            "qemu-io",
            &["--object", secret, "--image-opts", io, "-c", "write -P 0x42 1000 70000", "-c", "read -P 0x42 1000 70000"],
        );
        // The converted image holds the raw file, as qemu-img reads it.
        assert_eq!(byte_diff(&contents(d, "v.qcow2", "xyz"), &raw), None, "{what}");
        // And we read it back with the passphrase file.
        ours_ok(d, &["convert", "--passphrase-file", "pass", "-O", "raw", "v.qcow2", "back.raw"]);
        assert_eq!(byte_diff(&std::fs::read(s.path("back.raw")).unwrap(), &raw), None);
        let wrong = run_in(
            d,
            "qemu-io",
            &["--object", "secret,id=k,data=xya", "--image-opts", io, "-c", "read 0 1"],
        );
        assert!(stderr_of(&wrong).contains("Invalid password"), "{}", output_text(&wrong));
    }
    // Refusals: no secret, an unknown one, compression.
    let out = ours(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks",
            "x.qcow2",
            "1M",
        ],
    );
    assert!(stderr_of(&out).contains("Parameter 'encrypt.key-secret' is required for cipher"));
    let out = ours(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=nope",
            "x.qcow2",
            "1M",
        ],
    );
    assert!(stderr_of(&out).contains("No secret with id 'nope'"));
    let out = ours(
        d,
        &[
            "convert",
            "-c",
            "--object",
            secret,
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k",
            "src.raw",
            "x.qcow2",
        ],
    );
    assert!(stderr_of(&out).contains("Compression and encryption not supported at the same time"));
}

/// qemu-img's own syntax: `--object secret,...` with `--image-opts
/// driver=qcow2,file.filename=...,encrypt.key-secret=...` (and
/// `backing.encrypt.key-secret` for an encrypted backing file), the same
/// command lines given to both tools.
#[test]
fn qemu_img_command_lines_with_image_opts_work_here_too() {
    let s = Scratch::new();
    let d = s.dir();
    create(d, "base.qcow2", "luks", "abc", "", &[]);
    write(d, "base.qcow2", "abc", &["write -P 0x61 0 2M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "--object",
            "secret,id=k1,data=xyz",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k1,encrypt.iter-time=10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
    );
    let objects = [
        "--object",
        "secret,id=k0,data=abc",
        "--object",
        "secret,id=k1,data=xyz",
    ];
    let top =
        "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=k1,backing.encrypt.key-secret=k0";
    ok_in(
        d,
        "qemu-io",
        &[
            objects[0],
            objects[1],
            objects[2],
            objects[3],
            "--image-opts",
            top,
            "-c",
            "write -P 0x62 100k 8k",
        ],
    );
    for (tool, out) in [("ours", "o.raw"), ("qemu-img", "q.raw")] {
        let mut a = vec!["convert"];
        a.extend(objects);
        a.extend(["--image-opts", top, "-O", "raw", out]);
        let r = run_tool(tool, d, &a);
        assert_eq!(code(&r), 0, "{tool}: {}", output_text(&r));
    }
    assert_eq!(
        std::fs::read(s.path("o.raw")).unwrap(),
        std::fs::read(s.path("q.raw")).unwrap()
    );
    // compare, both sides as option strings.
    let mut a = vec!["compare"];
    a.extend(objects);
    a.extend(["--image-opts", "driver=raw,file.filename=q.raw", top]);
    for tool in ["ours", "qemu-img"] {
        let r = run_tool(tool, d, &a);
        assert_eq!(
            (code(&r), stdout_of(&r)),
            (0, "Images are identical.\n".to_string()),
            "{tool}"
        );
    }
    // A wrong key for the backing file.
    let bad =
        "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=k1,backing.encrypt.key-secret=k1";
    let r = ours(
        d,
        &[
            objects[0],
            objects[1],
            objects[2],
            objects[3],
            "convert",
            "--image-opts",
            bad,
            "-O",
            "raw",
            "x.raw",
        ],
    );
    assert_eq!(code(&r), 1);
    assert!(
        stderr_of(&r).contains("Invalid password"),
        "{}",
        output_text(&r)
    );
}
