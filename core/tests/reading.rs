//! Reading, mapping and copying the checked-in images (made by qemu-img,
//! see `tests/data/make-fixtures.sh`): no qemu needed at test time.

mod common;

use common::{files, guest, image, open, Rng, FIXTURES};
use qcowkit_core::compress::Decompressor;
use qcowkit_core::copy::{copy, ChunkRead, CopyOptions, RawDisk, Sink};
use qcowkit_core::map::{merged_map, merged_page, Allocation};
use qcowkit_core::report::{Info, InfoParams};
use qcowkit_core::{BlockRead, Chunk, Extent, MemError, Source};

#[test]
fn whole_disks_read_as_qemu_img_converts_them() {
    for name in FIXTURES {
        let mut img = open(name, image(name));
        let want = guest(name);
        assert_eq!(img.size(), want.len() as u64, "{name}");
        let mut got = vec![0xa5u8; want.len()];
        img.read_at(0, &mut got).unwrap();
        assert!(got == want, "{name}: guest contents differ");
    }
}

#[test]
fn reads_at_any_offset_and_length_match() {
    let mut rng = Rng::seeded("reads_at_any_offset_and_length_match", 0x5eed_0001);
    for name in FIXTURES {
        let mut img = open(name, image(name));
        let want = guest(name);
        for _ in 0..200 {
            let off = rng.below(want.len() as u64) as usize;
            let len = (rng.below(70_000) as usize).min(want.len() - off);
            let mut got = vec![0xa5u8; len];
            img.read_at(off as u64, &mut got).unwrap();
            assert!(got == want[off..off + len], "{name}: read {len} at {off}");
        }
        let size = img.size();
        assert!(img.read_at(size - 1, &mut [0u8; 2]).is_err(), "{name}");
    }
}

/// The bytes an extent points at, read from the file that holds them.
fn extent_bytes(name: &str, e: &Extent) -> Option<Vec<u8>> {
    let Source::Data { host, external } = e.source else {
        return None;
    };
    assert!(!external, "{name}: no fixture has a data file");
    let mut file = match e.depth {
        0 => image(name),
        1 => files().0.remove("base-4k.qcow2").unwrap(),
        d => panic!("{name}: depth {d}"),
    };
    let mut out = vec![0u8; e.len as usize];
    file.read_at(host, &mut out).unwrap();
    Some(out)
}

#[test]
fn extents_cover_the_disk_and_point_at_the_right_bytes() {
    for name in FIXTURES {
        let mut img = open(name, image(name));
        let want = guest(name);
        let mut ext = Vec::new();
        img.extents(0, img.size(), &mut ext).unwrap();
        let mut pos = 0;
        let mut kinds = [0u32; 3];
        for e in &ext {
            assert_eq!(e.start, pos, "{name}: extents are contiguous");
            assert!(e.len > 0, "{name}: empty extent");
            let guest = &want[e.start as usize..e.end() as usize];
            match e.source {
                Source::Zero => {
                    kinds[0] += 1;
                    assert!(guest.iter().all(|b| *b == 0), "{name}: zero extent {e:?}")
                }
                Source::Data { .. } => {
                    kinds[1] += 1;
                    assert!(extent_bytes(name, e).unwrap() == guest, "{name}: {e:?}")
                }
                Source::Compressed { cluster_start, .. } => {
                    kinds[2] += 1;
                    assert_eq!(cluster_start % 4096, 0, "{name}: {e:?}");
                    assert!(e.start >= cluster_start && e.end() <= cluster_start + 4096);
                }
            }
            pos = e.end();
        }
        assert_eq!(pos, img.size(), "{name}: extents end at the disk's end");
        assert!(kinds[0] > 0, "{name}: has zeros");
        let compressed = name.starts_with("zlib") || name.starts_with("zstd");
        assert_eq!(kinds[2] > 0, compressed, "{name}: compressed extents");
    }
}

#[test]
fn map_runs_are_contiguous_and_agree_with_map_shallow() {
    for name in FIXTURES {
        let mut img = open(name, image(name));
        let mut runs = Vec::new();
        img.map_range(0, img.size(), &mut runs).unwrap();
        let mut pos = 0;
        for r in &runs {
            assert_eq!(r.start, pos, "{name}");
            let (m, len) = img.map_shallow(r.start, r.len).unwrap();
            assert_eq!(m, r.mapping, "{name}: at {:#x}", r.start);
            assert!(len <= r.len && len > 0, "{name}");
            pos = r.end();
        }
        assert_eq!(pos, img.size(), "{name}");
    }
}

/// A sink that rebuilds the guest contents and records the chunks.
struct Rebuild {
    out: Vec<u8>,
    chunks: Vec<(u64, u64, bool)>,
}

impl Sink for Rebuild {
    type Error = qcowkit_core::Error<MemError>;
    fn data(&mut self, offset: u64, buf: &mut Vec<u8>, len: usize) -> Result<(), Self::Error> {
        self.out[offset as usize..offset as usize + len].copy_from_slice(&buf[..len]);
        self.chunks.push((offset, len as u64, false));
        Ok(())
    }
    fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), Self::Error> {
        self.out[offset as usize..(offset + len) as usize].fill(0);
        self.chunks.push((offset, len, true));
        Ok(())
    }
}

#[test]
fn copies_rebuild_the_disk_in_aligned_chunks() {
    for name in FIXTURES {
        let want = guest(name);
        for (align, chunk) in [
            (1u64, 4096usize),
            (4096, 8192),
            (65536, 65536),
            (512, 2 << 20),
        ] {
            let mut img = open(name, image(name));
            let mut sink = Rebuild {
                out: vec![0xa5; want.len()],
                chunks: Vec::new(),
            };
            let opts = CopyOptions { chunk, align };
            copy(
                &mut img,
                0,
                want.len() as u64,
                opts,
                &mut Decompressor::default(),
                &mut sink,
            )
            .unwrap();
            assert!(sink.out == want, "{name}: align {align} chunk {chunk}");
            let mut pos = 0;
            for &(off, len, zero) in &sink.chunks {
                assert_eq!(off, pos, "{name}: chunks in order");
                assert!(zero || len <= chunk as u64, "{name}: data chunk too long");
                let end = off + len;
                assert!(
                    end % align == 0 || end == want.len() as u64,
                    "{name}: {off:#x}+{len:#x} not aligned to {align}"
                );
                if zero {
                    assert!(want[off as usize..end as usize].iter().all(|b| *b == 0));
                }
                pos = end;
            }
        }
    }
}

#[test]
fn raw_disks_copy_through_the_same_routine() {
    let want = guest("zlib-4k");
    let mut raw = RawDisk::new(want.clone()).unwrap();
    let mut sink = Rebuild {
        out: vec![0xa5; want.len()],
        chunks: Vec::new(),
    };
    copy(
        &mut raw,
        0,
        want.len() as u64,
        CopyOptions::default(),
        &mut Decompressor::default(),
        &mut sink,
    )
    .unwrap();
    assert!(sink.out == want);
    let mut buf = vec![0u8; 4096];
    let first = raw.read_chunk(4096, 100, 1, &mut buf, &mut Decompressor::default());
    assert_eq!(first.unwrap(), Chunk::Data(100));
}

#[test]
fn every_fixture_checks_clean() {
    for name in FIXTURES {
        let mut img = open(name, image(name));
        let r = img.check().unwrap();
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "{name}: {:?}",
            r.messages
        );
        assert_eq!(
            r.total_clusters,
            img.size().div_ceil(img.cluster_size()),
            "{name}"
        );
    }
}

#[test]
fn reports_and_allocation_describe_the_images() {
    let p = |name| InfoParams {
        filename: name,
        full_backing_filename: None,
        full_data_filename: None,
        actual_size: 0,
    };
    let img = open("top-4k", image("top-4k"));
    let info = Info::of(&img, &p("top-4k"));
    assert_eq!(info.backing_filename.as_deref(), Some("base-4k.qcow2"));
    assert_eq!(info.files_to_open.len(), 1);
    assert_eq!(info.files_to_open[0].role, "backing");
    assert_eq!(info.files_to_open[0].path, "base-4k.qcow2");
    assert_eq!(info.backing_filename_format.as_deref(), Some("qcow2"));
    assert_eq!(info.cluster_size, Some(4096));
    let v2 = Info::of(&open("v2-4k", image("v2-4k")), &p("v2-4k"));
    let d = v2.format_specific.unwrap().data;
    assert_eq!((d.compat, d.corrupt, d.extended_l2), ("0.10", None, None));
    let e = Info::of(&open("extl2-16k", image("extl2-16k")), &p("extl2-16k"));
    assert_eq!(e.format_specific.unwrap().data.extended_l2, Some(true));
    let s = Info::of(&open("snap-4k", image("snap-4k")), &p("snap-4k"));
    assert_eq!(s.snapshots.len(), 1);
    assert_eq!(s.snapshots[0].name, "before");

    for name in FIXTURES {
        let mut img = open(name, image(name));
        let size = img.size();
        let a = Allocation::of(0, size, |pos, len| img.block_status(pos, len)).unwrap();
        let total = a.data + a.compressed + a.zero + a.backing + a.unallocated;
        assert_eq!(total, size, "{name}: {a:?}");
        let map = merged_map(0, size, |pos, len| img.block_status(pos, len)).unwrap();
        assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), size, "{name}");
        // Pages of any size, joined, are the map.
        assert!(map.len() > 1, "{name}: a map of one range pages trivially");
        for max in [1, 2, 3, map.len()] {
            let (mut joined, mut at, mut pages) = (Vec::new(), Some(0), 0);
            while let Some(start) = at {
                let (page, next) =
                    merged_page(start, size, max, |pos, len| img.block_status(pos, len)).unwrap();
                assert!(
                    !page.is_empty() && page.len() <= max,
                    "{name}: page of {max}"
                );
                joined.extend(page);
                at = next;
                pages += 1;
            }
            assert_eq!(joined, map, "{name}: pages of {max}");
            assert_eq!(pages, map.len().div_ceil(max), "{name}: pages of {max}");
        }
        match *name {
            "zlib-4k" | "zstd-4k" => assert!(a.compressed > 0, "{name}: {a:?}"),
            "top-4k" => assert!(a.backing > 0 && a.zero > 0 && a.data > 0, "{name}: {a:?}"),
            "plain-512" | "extl2-16k" => assert!(a.zero > 0 && a.data > 0, "{name}: {a:?}"),
            _ => assert!(a.data > 0, "{name}: {a:?}"),
        }
    }
}

/// A codec that counts how clusters reach it.
#[derive(Default)]
struct Counting {
    inner: Decompressor,
    batches: usize,
    batched_jobs: usize,
}

impl qcowkit_core::Codec for Counting {
    fn decompress(
        &mut self,
        kind: qcowkit_core::header::CompressionType,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), qcowkit_core::compress::DecompressError> {
        self.inner.decompress(kind, input, out)
    }

    fn decompress_many(
        &mut self,
        jobs: &mut [qcowkit_core::compress::Job<'_>],
    ) -> Result<(), (usize, qcowkit_core::compress::DecompressError)> {
        self.batches += 1;
        self.batched_jobs += jobs.len();
        for (i, j) in jobs.iter_mut().enumerate() {
            self.inner
                .decompress(j.kind, j.input, j.out)
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

#[test]
fn compressed_clusters_of_a_backing_file_are_decoded_in_batches() {
    use qcowkit_core::{create, CreateOptions, Image, OpenOptions};
    let want = guest("zlib-4k");
    let mut top = Vec::new();
    let opts = CreateOptions {
        size: want.len() as u64,
        cluster_size: 4096,
        backing_file: Some("zlib-4k.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..CreateOptions::default()
    };
    create::format(&mut top, &opts).unwrap();
    let mut files = common::Files::default();
    files.0.insert("zlib-4k.qcow2".into(), image("zlib-4k"));
    let mut img = Image::open_with(top, "top", "top", &mut files, &OpenOptions::default()).unwrap();
    let mut ext = Vec::new();
    img.extents(0, img.size(), &mut ext).unwrap();
    let compressed = ext
        .iter()
        .filter(|e| e.depth == 1 && matches!(e.source, Source::Compressed { .. }))
        .count();
    assert!(
        compressed > 50,
        "{compressed} compressed clusters in the backing file"
    );
    let mut sink = Rebuild {
        out: vec![0xa5; want.len()],
        chunks: Vec::new(),
    };
    let mut codec = Counting::default();
    copy(
        &mut img,
        0,
        want.len() as u64,
        CopyOptions::default(),
        &mut codec,
        &mut sink,
    )
    .unwrap();
    assert!(sink.out == want);
    // Every compressed cluster of the backing file goes through the batched
    // path, several per call (the fixture has a zero cluster after every
    // four compressed ones, which ends a chunk).
    assert_eq!(codec.batched_jobs, compressed);
    assert!(
        codec.batched_jobs >= 3 * codec.batches,
        "{} clusters in {} batches",
        codec.batched_jobs,
        codec.batches
    );
}
