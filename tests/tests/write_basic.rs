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

/// Zeroing that may not unmap keeps the host clusters the image owns
/// (flagged as zeros, as QEMU keeps them without `BDRV_REQ_MAY_UNMAP`);
/// zeroing that may unmap frees them. qemu-img map and check judge both,
/// on standard and extended L2 entries, and `zeroes_are_cheap` says which
/// ranges need no data written.
#[test]
fn zeroing_keeps_or_frees_host_clusters_as_asked() {
    let s = Scratch::new();
    for (label, extended, v3) in [
        ("v3", false, true),
        ("extended", true, true),
        ("v2", false, false),
    ] {
        let mut img = new_image(&CreateOptions {
            size: 4 << 20,
            extended_l2: extended,
            v3,
            ..CreateOptions::default()
        });
        img.write_at(0, &[0x77; 4 << 20]).unwrap();
        img.write_zeroes_with(0, 128 << 10, false).unwrap();
        img.write_zeroes_with(1 << 20, 128 << 10, true).unwrap();
        // Cheap: whole clusters (subclusters with extended L2), to the end.
        assert!(img.zeroes_are_cheap(64 << 10, 64 << 10), "{label}");
        assert!(
            img.zeroes_are_cheap((4 << 20) - (64 << 10), 64 << 10),
            "{label}"
        );
        assert_eq!(img.zeroes_are_cheap(2048, 2048), extended, "{label}");
        assert!(!img.zeroes_are_cheap(100, 64 << 10), "{label}");
        assert!(!img.zeroes_are_cheap(4 << 20, 1), "{label}: past the end");
        img.flush().unwrap();
        let name = format!("{label}.qcow2");
        save_and_check(&s, &name, img);
        let map = json(&qemu_img(s.dir(), &["map", "--output=json", &name]));
        let at = |offset: u64| map_entry_at(&map, offset);
        let kept = at(0);
        let freed = at(1 << 20);
        if v3 {
            assert_eq!(kept["zero"], true, "{label}: {kept}");
            assert_eq!(kept["data"], false, "{label}: {kept}");
            assert!(
                kept["offset"].is_u64(),
                "{label}: host cluster kept: {kept}"
            );
            assert_eq!(freed["zero"], true, "{label}: {freed}");
            assert!(freed.get("offset").is_none(), "{label}: freed: {freed}");
        } else {
            // Version 2 has no zero flag: kept clusters hold zeros.
            assert_eq!(kept["data"], true, "{label}: {kept}");
            assert!(freed.get("offset").is_none(), "{label}: freed: {freed}");
        }
        qemu_io(
            s.dir(),
            &name,
            &[
                "read -P 0 0 128k",
                "read -P 0x77 128k 896k",
                "read -P 0 1M 128k",
            ],
        );
    }
}
