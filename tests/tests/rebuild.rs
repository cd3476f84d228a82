//! Rebuilding the refcounts of a dirty image (lazy refcounts after a
//! crash) keeps every byte: a hole in the refcount table over referenced
//! clusters gets a new block that lands on no referenced cluster and no
//! metadata, as QEMU's repair does.

use qcowkit_core::OpenOptions;
use qcowkit_tests::*;

const MIB: usize = 1 << 20;

#[test]
fn a_refcount_table_hole_over_referenced_clusters_is_rebuilt_in_place() {
    let s = Scratch::new();
    let d = s.dir();
    // 512-byte clusters: a refcount block covers 256 clusters (128 KiB).
    let mut bytes = qemu_image(
        d,
        "orig.qcow2",
        "cluster_size=512,lazy_refcounts=on",
        "4M",
        &[
            "write -P 0x21 0 1M",
            "write -P 0x22 1M 1M",
            "write -z 64k 4k",
        ],
    );
    let want = qemu_contents(d, "orig.qcow2");
    // What a crash with lazy refcounts can leave: the dirty bit, and a
    // refcount block missing from the table (its clusters referenced).
    let table = get64(&bytes, 48) as usize;
    assert_ne!(get64(&bytes, table + 3 * 8), 0, "block 3 exists");
    put64(&mut bytes, table + 3 * 8, 0);
    set_bits64(&mut bytes, 72, 1);
    for name in ["ours.qcow2", "qemu.qcow2"] {
        std::fs::write(d.join(name), &bytes).unwrap();
    }

    let mut img = qcowkit_std::open_qcow2_rw(&d.join("ours.qcow2"), &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open the dirty image: {e}"));
    img.write_at(3 * MIB as u64, &[0x33; 65536]).unwrap();
    img.flush().unwrap();
    drop(img);

    let after = std::fs::read(d.join("ours.qcow2")).unwrap();
    assert!(
        after[..72] == bytes[..72],
        "the header's fixed fields are intact"
    );
    assert_eq!(get64(&after, 72) & 1, 0, "the dirty bit is cleared");
    assert_qemu_img_check(d, "ours.qcow2");
    let mut model = want.clone();
    model[3 * MIB..3 * MIB + 65536].fill(0x33);
    let got = qemu_contents(d, "ours.qcow2");
    assert!(
        got == model,
        "every byte kept (first difference at {:?})",
        first_difference(&got, &model)
    );

    // QEMU repairs the same image on a read-write open, keeping every byte.
    qemu_io(d, "qemu.qcow2", &["write -P 0x33 3M 64k"]);
    assert_qemu_img_check(d, "qemu.qcow2");
    assert!(qemu_contents(d, "qemu.qcow2") == model);
}
