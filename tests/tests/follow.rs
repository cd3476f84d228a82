//! Files an image names are opened only as the caller allows: every
//! subcommand honours `--no-follow`, `--follow inside` keeps to the
//! image's directory, and a FIFO or device named by an image is refused
//! instead of blocking.

use qcowkit_tests::*;

/// `qcow2 ARGS` in `cwd`, killed after 20 s (a blocking open fails the test
/// instead of hanging it).
fn ours_bounded(cwd: &std::path::Path, args: &[&str]) -> std::process::Output {
    let bin = bin("qcow2");
    let mut all = vec!["20", bin.to_str().unwrap()];
    all.extend_from_slice(args);
    run_in(cwd, "timeout", &all)
}

#[test]
fn every_subcommand_honours_no_follow() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "base.qcow2", "", "1M");
    qemu_overlay(d, "top.qcow2", "", ("base.qcow2", "qcow2"), None);
    let refused = "following files named by images is disabled";
    for args in [
        &["convert", "--no-follow", "-O", "raw", "top.qcow2", "o.raw"][..],
        &["map", "--no-follow", "top.qcow2"],
        &["compare", "--no-follow", "top.qcow2", "base.qcow2"],
        &["info", "--no-follow", "--backing-chain", "top.qcow2"],
        &["bench", "--no-follow", "-q", "-c", "1", "top.qcow2"],
        &["bench", "--no-follow", "-q", "-w", "-c", "1", "top.qcow2"],
        &["dd", "--no-follow", "if=top.qcow2", "of=o.raw", "count=1"],
        &[
            "convert",
            "--follow",
            "none",
            "-O",
            "raw",
            "top.qcow2",
            "o.raw",
        ],
    ] {
        let out = ours_bounded(d, args);
        assert_ne!(code(&out), 0, "{args:?} succeeded");
        assert!(
            stderr_of(&out).contains(refused),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }
    // Without the flag they all work.
    ours_ok(d, &["info", "--backing-chain", "top.qcow2"]);
    ours_ok(d, &["dd", "if=top.qcow2", "of=o.raw", "count=1"]);
    // qcow2-info says what it did not open.
    let out = run_in(
        d,
        bin("qcow2-info").to_str().unwrap(),
        &["--no-follow", "top.qcow2"],
    );
    assert_eq!(code(&out), 0, "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains(refused), "{}", stdout_of(&out));
}

#[test]
fn follow_inside_keeps_to_the_images_directory() {
    let s = Scratch::new();
    let d = s.dir();
    std::fs::create_dir_all(d.join("vm")).unwrap();
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    qemu_create(d, "vm/base.qcow2", "", "1M");
    qemu_create(d, "elsewhere/secret.qcow2", "", "1M");
    let abs = d.join("elsewhere/secret.qcow2");
    let cases = [
        ("inside.qcow2", "base.qcow2", true),
        ("dotdot.qcow2", "../elsewhere/secret.qcow2", false),
        ("absolute.qcow2", abs.to_str().unwrap(), false),
        ("link.qcow2", "link-to-secret.qcow2", false),
    ];
    std::os::unix::fs::symlink(&abs, d.join("vm/link-to-secret.qcow2")).unwrap();
    for (top, backing, allowed) in cases {
        let path = format!("vm/{top}");
        qemu_img(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", &path, "1M",
            ],
        );
        let out = ours_bounded(
            d,
            &["convert", "--follow", "inside", "-O", "raw", &path, "o.raw"],
        );
        assert_eq!(code(&out) == 0, allowed, "{top}: {}", stderr_of(&out));
        if !allowed {
            assert!(
                stderr_of(&out).contains("outside the image's directory")
                    || stderr_of(&out).contains("only relative names"),
                "{top}: {}",
                stderr_of(&out)
            );
        }
        // The default follows them all, like qemu-img.
        let any = ours_bounded(d, &["convert", "-O", "raw", &path, "o.raw"]);
        assert_eq!(code(&any), 0, "{top}: {}", stderr_of(&any));
    }
}

#[test]
fn a_fifo_named_by_an_image_is_refused_without_blocking() {
    let s = Scratch::new();
    let d = s.dir();
    ok_in(d, "mkfifo", &["pipe"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "pipe",
            "-F",
            "raw",
            "top.qcow2",
            "1M",
        ],
    );
    for args in [
        &["convert", "-O", "raw", "top.qcow2", "o.raw"][..],
        &["map", "top.qcow2"],
        &["info", "--backing-chain", "top.qcow2"],
    ] {
        let out = ours_bounded(d, args);
        assert_ne!(code(&out), 124, "{args:?} blocked on the FIFO");
        assert_ne!(code(&out), 0, "{args:?}");
        assert!(
            stderr_of(&out).contains("not a regular file") || stderr_of(&out).contains("pipe"),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }
}

#[test]
fn info_json_says_which_files_a_chain_would_open() {
    let s = Scratch::new();
    let d = s.dir();
    std::fs::create_dir_all(d.join("vm")).unwrap();
    qemu_create(d, "vm/base.qcow2", "", "1M");
    qemu_overlay(d, "vm/top.qcow2", "", ("base.qcow2", "qcow2"), None);
    qemu_create(d, "vm/df.qcow2", "data_file=df.raw", "1M");
    let top = json(&ours_ok(d, &["info", "--output=json", "vm/top.qcow2"]));
    assert_eq!(top["files-to-open"][0]["role"], "backing");
    assert_eq!(top["files-to-open"][0]["name"], "base.qcow2");
    assert_eq!(top["files-to-open"][0]["path"], "vm/base.qcow2");
    let df = json(&ours_ok(d, &["info", "--output=json", "vm/df.qcow2"]));
    assert_eq!(df["files-to-open"][0]["role"], "data-file");
    assert_eq!(df["files-to-open"][0]["path"], "vm/df.raw");
    let base = json(&ours_ok(d, &["info", "--output=json", "vm/base.qcow2"]));
    assert!(base.get("files-to-open").is_none(), "{base}");
}
