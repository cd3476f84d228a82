//! Writing into the checked-in images and into new ones, with a byte model
//! of the guest disk, and the allocator's bookkeeping checked by the
//! core's own check (a cluster handed out twice, or over metadata, shows
//! as a refcount below its references). No qemu needed at test time.

mod common;

use common::{guest, image, open, open_rw, Rng};
use qcowkit_core::{create, CreateOptions, Image, OpenOptions, WritableImage};

/// The fixtures that can be written (all of them: v2, v3, extended L2,
/// compressed clusters, a backing file, snapshot-shared clusters).
const WRITABLE: &[&str] = &[
    "plain-512",
    "v2-4k",
    "extl2-16k",
    "zlib-4k",
    "zstd-4k",
    "top-4k",
    "snap-4k",
];

fn assert_clean(name: &str, img: &mut WritableImage<Vec<u8>>) {
    let r = img.check().unwrap();
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{name}: {:?}",
        r.messages
    );
}

fn assert_reads(name: &str, img: &mut Image<Vec<u8>>, model: &[u8], when: &str) {
    let mut got = vec![0xa5u8; model.len()];
    img.read_at(0, &mut got).unwrap();
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{name}: {when}: first difference at {i:#x}");
    }
}

#[test]
fn random_workloads_read_back_and_check_clean() {
    let mut rng = Rng::seeded("random_workloads_read_back_and_check_clean", 0x5eed_0002);
    for name in WRITABLE {
        let mut model = guest(name);
        let size = model.len() as u64;
        let opts = OpenOptions {
            l2_cache_bytes: Some(8192),
            refcount_cache_bytes: Some(4096),
            ..OpenOptions::default()
        };
        let mut img = open_rw(name, image(name), &opts);
        let cs = img.cluster_size();
        let v3 = img.header().version == 3;
        for step in 0..300 {
            let off = rng.below(size);
            let len = (1 + rng.below(3 * cs)).min(size - off);
            match rng.below(10) {
                0..=5 => {
                    let fill = (step % 251) as u8 + 1;
                    let data: Vec<u8> = (0..len).map(|i| fill ^ (i as u8 & 7)).collect();
                    img.write_at(off, &data).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                6 | 7 => {
                    img.write_zeroes(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                8 => {
                    // Whole clusters are discarded: zeros on v3 (and on v2
                    // without a backing file); partial ones stay.
                    img.discard(off, len).unwrap();
                    let first = off.div_ceil(cs) * cs;
                    let end = off + len;
                    let last = if end == size { end } else { end - end % cs };
                    if first < last && (v3 || img.backing().is_none()) {
                        model[first as usize..last as usize].fill(0);
                    }
                }
                _ => {
                    let at = off - off % cs;
                    let n = cs.min(size - at);
                    let data: Vec<u8> = (0..n).map(|i| (i / 64) as u8).collect();
                    img.write_compressed(at, &data).unwrap();
                    model[at as usize..(at + n) as usize].copy_from_slice(&data);
                }
            }
            if step % 37 == 0 {
                img.flush().unwrap();
            }
        }
        img.flush().unwrap();
        assert_reads(name, &mut img, &model, "live image");
        assert_clean(name, &mut img);
        let mut again = open(name, img.into_inner());
        assert_reads(name, &mut again, &model, "reopened");
        let r = again.check().unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{name}: {:?}", r.messages);
    }
}

#[test]
fn writes_to_snapshot_shared_clusters_copy_them_first() {
    use qcowkit_core::Mapping;
    let name = "snap-4k";
    let mut img = open_rw(name, image(name), &OpenOptions::default());
    let host_of = |img: &mut WritableImage<Vec<u8>>| match img.map_shallow(0, 4096).unwrap().0 {
        Mapping::Data { host_offset, .. } => host_offset,
        m => panic!("guest 0 is {m:?}"),
    };
    let old = host_of(&mut img);
    assert_eq!(
        img.refcount(old / 4096).unwrap(),
        2,
        "shared with the snapshot"
    );
    img.write_at(0, &[0xee; 8192]).unwrap();
    img.flush().unwrap();
    let new = host_of(&mut img);
    assert_ne!(new, old, "the shared cluster was copied");
    assert_eq!(
        img.refcount(old / 4096).unwrap(),
        1,
        "the snapshot keeps it"
    );
    assert_eq!(img.refcount(new / 4096).unwrap(), 1);
    assert_clean(name, &mut img);
    let mut back = [0u8; 8192];
    img.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|b| *b == 0xee));
}

#[test]
fn growing_the_refcount_table_keeps_every_cluster_accounted() {
    let mut disk = Vec::new();
    let opts = CreateOptions {
        size: 8 << 20,
        cluster_size: 512,
        refcount_bits: 64,
        ..CreateOptions::default()
    };
    create::format(&mut disk, &opts).unwrap();
    let mut img = WritableImage::open(disk, &OpenOptions::default()).unwrap();
    let table_before = img.header().refcount_table_offset;
    let mut rng = Rng::seeded("growing_the_refcount_table", 0x5eed_0003);
    let mut model = vec![0u8; 8 << 20];
    for i in 0..700u64 {
        let off = rng.below((8 << 20) / 4096) * 4096;
        let fill = (i % 200) as u8 + 1;
        img.write_at(off, &[fill; 4096]).unwrap();
        model[off as usize..off as usize + 4096].fill(fill);
    }
    img.flush().unwrap();
    assert_ne!(
        img.header().refcount_table_offset,
        table_before,
        "the refcount table moved"
    );
    assert_clean("growth", &mut img);
    let mut again = Image::open(img.into_inner(), &OpenOptions::default()).unwrap();
    assert_reads("growth", &mut again, &model, "reopened");
}

#[test]
fn preallocated_images_map_every_cluster() {
    for mode in [
        qcowkit_core::Preallocation::Metadata,
        qcowkit_core::Preallocation::Full,
    ] {
        let mut disk = Vec::new();
        let opts = CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..CreateOptions::default()
        };
        create::format(&mut disk, &opts).unwrap();
        let mut img = WritableImage::open(disk, &OpenOptions::default()).unwrap();
        img.preallocate(mode).unwrap();
        assert_clean("prealloc", &mut img);
        let mut runs = Vec::new();
        img.map_range(0, 1 << 20, &mut runs).unwrap();
        assert!(
            runs.iter().all(|r| !matches!(
                r.mapping,
                qcowkit_core::Mapping::Unallocated { host_offset: None }
            )),
            "{mode:?}: {runs:?}"
        );
        let mut back = vec![1u8; 1 << 20];
        img.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|b| *b == 0), "{mode:?}");
    }
}

#[test]
fn check_counts_every_problem_and_streams_every_line() {
    // Two L2 tables (64 KiB clusters, 8192 entries each) filled with
    // entries that have reserved bits set: 16,384 problems, more than a
    // report keeps.
    let mut disk = Vec::new();
    let opts = CreateOptions {
        size: 1 << 30,
        ..CreateOptions::default()
    };
    create::format(&mut disk, &opts).unwrap();
    let mut img = WritableImage::open(disk, &OpenOptions::default()).unwrap();
    img.write_at(0, &[1; 512]).unwrap();
    img.write_at(512 << 20, &[2; 512]).unwrap();
    img.flush().unwrap();
    let mut disk = img.into_inner();
    let be64 = |d: &[u8], at: usize| u64::from_be_bytes(d[at..at + 8].try_into().unwrap());
    let l1 = be64(&disk, 40) as usize;
    for i in 0..2 {
        let l2 = (be64(&disk, l1 + 8 * i) & 0x00ff_ffff_ffff_fe00) as usize;
        for e in 0..8192 {
            disk[l2 + 8 * e..l2 + 8 * e + 8].copy_from_slice(&2u64.to_be_bytes());
        }
    }
    let mut img = Image::open(disk, &OpenOptions::default()).unwrap();
    let kept = img.check().unwrap();
    // The two data clusters are no longer referenced: two leaks.
    assert_eq!((kept.corruptions, kept.leaks), (16_384, 2));
    let max = qcowkit_core::check::MAX_CHECK_MESSAGES;
    assert_eq!(kept.messages.len(), max);
    assert_eq!(kept.omitted_messages, 16_386 - max as u64);
    assert!(
        kept.messages[0].contains("reserved bits set: 2"),
        "{}",
        kept.messages[0]
    );

    let mut lines = Vec::new();
    let streamed = img.check_with(&mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!((streamed.corruptions, streamed.leaks), (16_384, 2));
    assert!(streamed.messages.is_empty() && streamed.omitted_messages == 0);
    assert_eq!(lines.len(), 16_386);
    assert_eq!(lines[..max], kept.messages[..]);
    assert!(
        lines[16_385].starts_with("Leaked cluster"),
        "{}",
        lines[16_385]
    );
}

#[test]
fn a_table_left_by_copy_on_write_is_not_reused_before_the_flush() {
    // Found by the fuzzer: an L1 entry without the COPIED flag whose L2
    // table has refcount 0 (the fuzzer's image had no refcount block). A
    // write copies the table; the old one is still what the L1 table on
    // disk points to until the flush, so guest data must not be placed
    // there before it.
    let cs = 4096usize;
    let mut disk = Vec::new();
    let opts = CreateOptions {
        size: 4 << 20,
        cluster_size: cs as u64,
        ..CreateOptions::default()
    };
    create::format(&mut disk, &opts).unwrap();
    let mut img = WritableImage::open(disk, &OpenOptions::default()).unwrap();
    // Two L2 tables (2 MiB each); then a free cluster below the second.
    img.write_at(0, &[1; 4096]).unwrap();
    img.write_at(2 << 20, &[2; 4096]).unwrap();
    img.flush().unwrap();
    img.discard(0, 4096).unwrap();
    img.flush().unwrap();
    let mut disk = img.into_inner();
    let be64 = |d: &[u8], at: usize| u64::from_be_bytes(d[at..at + 8].try_into().unwrap());
    let l1 = be64(&disk, 40) as usize;
    let l2 = (be64(&disk, l1 + 8) & 0x00ff_ffff_ffff_fe00) as usize;
    disk[l1 + 8..l1 + 16].copy_from_slice(&(l2 as u64).to_be_bytes()); // no COPIED flag
    let block = be64(&disk, be64(&disk, 48) as usize) as usize;
    let entry = block + 2 * (l2 / cs);
    assert_eq!(disk[entry..entry + 2], [0, 1]);
    disk[entry..entry + 2].fill(0); // the table's refcount reads 0
    let old_table = disk[l2..l2 + cs].to_vec();

    let mut img = WritableImage::open(disk, &OpenOptions::default()).unwrap();
    img.write_at((2 << 20) + 4096, &[3; 4096]).unwrap();
    img.write_at((2 << 20) + 8192, &[4; 4096]).unwrap();
    let before_flush = img.storage()[l2..l2 + cs].to_vec();
    assert!(
        before_flush == old_table,
        "the old L2 table was overwritten before the flush"
    );
    img.flush().unwrap();
    let mut back = Image::open(img.into_inner(), &OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 3 * cs];
    back.read_at(2 << 20, &mut buf).unwrap();
    for (i, want) in [2u8, 3, 4].iter().enumerate() {
        assert!(
            buf[i * cs..(i + 1) * cs].iter().all(|b| b == want),
            "cluster {i}"
        );
    }
}

#[test]
fn a_snapshots_l2_table_is_never_handed_out_whatever_its_refcount() {
    // Found by the fuzzer: with a damaged refcount, a snapshot's L2 table
    // (not the active one's) read as free and took guest data. The
    // snapshot's tables are in the metadata map now.
    let mut disk = image("snap-4k");
    let be = |d: &[u8], at: usize, n: usize| {
        d[at..at + n]
            .iter()
            .fold(0u64, |a, x| a << 8 | u64::from(*x))
    };
    let cs = 1usize << be(&disk, 20, 4);
    assert_eq!(be(&disk, 60, 4), 1, "one snapshot");
    let snap = be(&disk, 64, 8) as usize;
    let snap_l1 = be(&disk, snap, 8) as usize;
    let active_l1 = be(&disk, 40, 8) as usize;
    let snap_l2 = (be(&disk, snap_l1, 8) & 0x00ff_ffff_ffff_fe00) as usize;
    let active_l2 = (be(&disk, active_l1, 8) & 0x00ff_ffff_ffff_fe00) as usize;
    assert!(
        snap_l2 != 0 && snap_l2 != active_l2,
        "the snapshot has its own L2 table"
    );
    assert_eq!(be(&disk, 96, 4), 4, "16-bit refcounts");
    let block = be(&disk, be(&disk, 48, 8) as usize, 8) as usize;
    let entry = block + 2 * (snap_l2 / cs);
    assert_eq!(be(&disk, entry, 2), 1);
    disk[entry..entry + 2].fill(0);
    let table = disk[snap_l2..snap_l2 + cs].to_vec();

    let mut img = open_rw("snap-4k", disk, &OpenOptions::default());
    let size = img.size();
    let mut rng = Rng::seeded("snapshot_l2", 11);
    for _ in 0..64 {
        let at = rng.below(size / 4096) * 4096;
        img.write_at(at, &[0x5c; 4096]).unwrap();
    }
    img.flush().unwrap();
    let after = img.into_inner();
    assert!(
        after[snap_l2..snap_l2 + cs] == table[..],
        "the snapshot's L2 table changed"
    );
}
