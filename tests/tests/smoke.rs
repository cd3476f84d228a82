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
