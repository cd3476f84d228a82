//! First checks of the write path: images we create and write must pass
//! `qemu-img check` and read back through qemu-io.

use qcowkit_core::{CreateOptions, WritableImage};
use qcowkit_tests::*;

fn save_and_check(s: &Scratch, name: &str, img: WritableImage<Vec<u8>>) {
    std::fs::write(s.path(name), img.into_inner()).unwrap();
    assert_qemu_img_check(s.dir(), name);
}

#[test]
fn empty_images_pass_qemu_img_check() {
    let s = Scratch::new();
    for (i, cs) in [512u64, 4096, 65536, 2 << 20].into_iter().enumerate() {
        for rb in [1u32, 16, 64] {
            let img = new_image(&CreateOptions {
                size: 100 << 20,
                cluster_size: cs,
                refcount_bits: rb,
                ..CreateOptions::default()
            });
            save_and_check(&s, &format!("e{i}-{rb}.qcow2"), img);
        }
    }
}

#[test]
fn writes_read_back_in_qemu_io() {
    let s = Scratch::new();
    let mut img = new_image(&CreateOptions {
        size: 8 << 20,
        ..CreateOptions::default()
    });
    img.write_at(1000, &[0x5a; 70000]).unwrap();
    img.write_at(3 << 20, &[0x11; 4096]).unwrap();
    img.write_zeroes(2000, 1000).unwrap();
    img.flush().unwrap();
    let mut back = vec![0u8; 70000];
    img.read_at(1000, &mut back).unwrap();
    assert!(back[..1000].iter().all(|b| *b == 0x5a));
    assert!(back[1000..2000].iter().all(|b| *b == 0));
    assert!(back[2000..].iter().all(|b| *b == 0x5a));
    save_and_check(&s, "w.qcow2", img);
    qemu_io(
        s.dir(),
        "w.qcow2",
        &[
            "read -P 0x5a 1000 1000",
            "read -P 0 2000 1000",
            "read -P 0x5a 3000 68000",
            "read -P 0x11 3M 4k",
            "read -P 0 4M 1M",
        ],
    );
}
