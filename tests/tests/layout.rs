//! The host-file layout (`Image::host_layout`) against what qemu-img says
//! of the same images: every host offset `qemu-img map` reports holds
//! data (or compressed data), the structures the header names sit where it
//! says, leaked clusters `qemu-img check` finds are the ones marked
//! leaked, and the runs cover the file exactly.

use qcowkit_core::layout::{HostRun, HostUse};
use qcowkit_core::{Image, OpenOptions};
use qcowkit_tests::*;

fn layout_of(bytes: &[u8]) -> Vec<HostRun> {
    let opts = OpenOptions {
        no_backing: true,
        ..OpenOptions::default()
    };
    let mut img = Image::open(bytes.to_vec(), &opts).unwrap();
    img.host_layout().unwrap()
}

fn kind_at(runs: &[HostRun], off: u64) -> HostUse {
    runs.iter()
        .find(|r| r.start <= off && off < r.start + r.len)
        .map(|r| r.kind)
        .unwrap_or_else(|| panic!("offset {off:#x} not covered"))
}

#[test]
fn host_layout_agrees_with_qemu_img() {
    let s = Scratch::new();
    let d = s.dir();
    for opts in [
        "",
        "cluster_size=4096",
        "extended_l2=on",
        "compression_type=zstd",
    ] {
        let _ = std::fs::remove_file(s.path("l.qcow2"));
        qemu_create(d, "l.qcow2", opts, "8M");
        qemu_io(
            d,
            "l.qcow2",
            &[
                "write -P 1 0 192k",
                "write -c -P 2 1M 64k",
                "write -P 3 5M 64k",
            ],
        );
        qemu_img(d, &["snapshot", "-c", "s", "l.qcow2"]);
        qemu_io(d, "l.qcow2", &["write -P 4 0 4k"]);
        qemu_img(d, &["bitmap", "--add", "l.qcow2", "b0"]);
        let bytes = std::fs::read(s.path("l.qcow2")).unwrap();
        let runs = layout_of(&bytes);
        // Contiguous, in order, covering the file.
        let mut end = 0;
        for r in &runs {
            assert_eq!(r.start, end, "[{opts}] runs are contiguous");
            end += r.len;
        }
        assert_eq!(end, bytes.len() as u64, "[{opts}] the runs cover the file");
        // The structures where the header says.
        assert_eq!(kind_at(&runs, 0), HostUse::Header);
        assert_eq!(kind_at(&runs, get64(&bytes, 40)), HostUse::L1, "[{opts}]");
        assert_eq!(
            kind_at(&runs, get64(&bytes, 48)),
            HostUse::RefcountTable,
            "[{opts}]"
        );
        assert_eq!(
            kind_at(&runs, get64(&bytes, 64)),
            HostUse::SnapshotTable,
            "[{opts}]"
        );
        assert!(
            runs.iter().any(|r| r.kind == HostUse::Bitmap),
            "[{opts}] bitmap directory"
        );
        assert!(
            runs.iter().any(|r| r.kind == HostUse::SnapshotL1),
            "[{opts}]"
        );
        // Every table of the active L1 is the active layer's, also those it
        // shares with the snapshot (with 4 KiB clusters the table of the
        // range not written after the snapshot is shared); the snapshot
        // keeps the one the write after it copied.
        let l1 = get64(&bytes, 40) as usize;
        for i in 0..get32(&bytes, 36) as usize {
            let t = get64(&bytes, l1 + i * 8) & 0x00ff_ffff_ffff_fe00;
            if t != 0 {
                assert_eq!(kind_at(&runs, t), HostUse::L2, "[{opts}] table {t:#x}");
            }
        }
        assert!(
            runs.iter().any(|r| r.kind == HostUse::SnapshotL2),
            "[{opts}]"
        );
        // Every host offset qemu-img maps holds data.
        let map = json(&qemu_img(d, &["map", "--output=json", "l.qcow2"]));
        for e in map.as_array().unwrap() {
            if let Some(off) = e["offset"].as_u64() {
                let k = kind_at(&runs, off);
                assert_eq!(k, HostUse::Data, "[{opts}] qemu-img maps data at {off:#x}");
            }
            if e["compressed"] == true {
                assert!(
                    runs.iter().any(|r| r.kind == HostUse::Compressed),
                    "[{opts}]"
                );
            }
        }
        // Nothing is leaked on a clean image.
        assert!(
            !runs.iter().any(|r| r.kind == HostUse::Leaked),
            "[{opts}] {runs:?}"
        );
    }
    // A leaked cluster: where qemu-img check says.
    let _ = std::fs::remove_file(s.path("k.qcow2"));
    qemu_create(d, "k.qcow2", "", "1M");
    qemu_io(d, "k.qcow2", &["write -P 1 0 64k"]);
    let mut bytes = std::fs::read(s.path("k.qcow2")).unwrap();
    let l1 = get64(&bytes, 40) as usize;
    let l2 = (get64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = get64(&bytes, l2) & 0x00ff_ffff_ffff_fe00;
    put64(&mut bytes, l2, 0); // the data cluster loses its reference
    std::fs::write(s.path("k.qcow2"), &bytes).unwrap();
    let out = run_in(d, "qemu-img", &["check", "k.qcow2"]);
    let text = stderr_of(&out) + &stdout_of(&out);
    assert!(
        text.contains(&format!("Leaked cluster {} ", data >> 16)),
        "{text}"
    );
    assert_eq!(kind_at(&layout_of(&bytes), data), HostUse::Leaked);
}
