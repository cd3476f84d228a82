//! A first end-to-end check: qemu-img makes an image, we convert it to raw.

use qcowkit_tests::*;

#[test]
fn convert_matches_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "a.qcow2", "", "4M");
    qemu_io(
        d,
        "a.qcow2",
        &["write -P 0x5a 1000 70000", "write -z 1M 64k"],
    );
    ours_ok(d, &["convert", "-O", "raw", "a.qcow2", "ours.raw"]);
    qemu_img(d, &["convert", "-O", "raw", "a.qcow2", "qemu.raw"]);
    assert_eq!(
        std::fs::read(s.path("ours.raw")).unwrap(),
        std::fs::read(s.path("qemu.raw")).unwrap()
    );
}

/// `qcow2 --help` lists each subcommand on one line with qemu-img's
/// wording, and each subcommand's help ends with examples.
#[test]
fn help_lists_every_subcommand_with_examples() {
    let s = Scratch::new();
    let top = stdout_of(&ours(s.dir(), &["--help"]));
    assert!(top.starts_with("QEMU disk image utility"), "{top}");
    let expected = [
        ("amend", "Update format-specific options of the image"),
        ("bench", "Run simple image benchmark"),
        ("create", "Create and format new image file"),
        ("info", "Display information about image"),
        ("convert", "Copy one image to another"),
        ("map", "Dump image metadata"),
        ("compare", "Check if two images have the same contents"),
        ("check", "Check basic image integrity"),
        ("measure", "Calculate file size required for a new image"),
        ("rebase", "Change the backing file of the image"),
        ("resize", "Resize the image to the new size"),
        ("snapshot", "List or manipulate snapshots within image"),
        ("dd", "Copy input to output"),
    ];
    for (cmd, line) in expected {
        let listed = top
            .lines()
            .any(|l| l.trim_start().starts_with(cmd) && l.contains(line));
        assert!(listed, "`{cmd}` is not listed as \"{line}\":\n{top}");
        let out = ours(s.dir(), &[cmd, "--help"]);
        assert_eq!(code(&out), 0, "{cmd} --help");
        let help = stdout_of(&out);
        assert!(
            help.contains("Examples:\n  qcow2 "),
            "{cmd} --help has no example:\n{help}"
        );
    }
}
