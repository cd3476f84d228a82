//! Replays the fuzz corpus (fuzz/corpus, zstd-compressed or plain) and the
//! regression inputs of bugs the fuzzers found (fuzz/regressions) through
//! the same harnesses the cargo-fuzz targets run: none may panic, and each
//! input's heap use is bounded (a counting allocator): its peak growth, and
//! the bytes it allocates in all (which bounds the work of zero-filling
//! buffers sized by hostile fields).

#[allow(dead_code)]
#[path = "../../fuzz/harness.rs"]
mod harness;

use std::io::Read;
use std::path::Path;

use qcowkit_tests::heap;

#[global_allocator]
static GLOBAL: heap::Counting = heap::Counting;

/// Most heap one input may hold at once: the harnesses' storage limit
/// (64 MiB, for the write target's growing image, plus its copy while a
/// `Vec` grows) and caches of a few hundred KiB.
const PEAK_BUDGET: usize = 160 << 20;
/// Most bytes one input may allocate in all (the maintenance harness runs
/// eight operations, each on its own copy of an image of up to 64 MiB, and
/// checks the image before restructuring it).
const TOTAL_BUDGET: usize = 512 << 20;

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries {
        let p = e.unwrap().path();
        let raw = std::fs::read(&p).unwrap();
        let bytes = if p.extension().is_some_and(|x| x == "zst") {
            let mut v = Vec::new();
            ruzstd::decoding::StreamingDecoder::new(&raw[..])
                .unwrap()
                .read_to_end(&mut v)
                .unwrap();
            v
        } else {
            raw
        };
        out.push((p.display().to_string(), bytes));
    }
    out.sort();
    out
}

/// The counters are global: replays run one at a time (`cargo test` runs
/// tests on threads of one process).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn replay(target: &str, run: fn(&[u8])) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    let mut most = (0, 0);
    for sub in ["corpus", "regressions"] {
        for (name, bytes) in inputs(&root.join(sub).join(target)) {
            let base = heap::reset_peak();
            let total = heap::total();
            let r = std::panic::catch_unwind(|| run(&bytes));
            assert!(r.is_ok(), "{target}: {name} panicked");
            let peak = heap::peak() - base;
            let all = heap::total() - total;
            assert!(
                peak <= PEAK_BUDGET,
                "{target}: {name} held {peak} bytes at once"
            );
            assert!(
                all <= TOTAL_BUDGET,
                "{target}: {name} allocated {all} bytes in all"
            );
            most = (most.0.max(peak), most.1.max(all));
            n += 1;
        }
    }
    assert!(n > 0, "{target}: no corpus");
    println!(
        "{target}: {n} inputs replayed; most heap held at once {} KiB, most allocated by one input {} KiB",
        most.0 >> 10,
        most.1 >> 10
    );
}

#[test]
fn open_read_corpus() {
    replay("open_read", harness::open_read);
}

#[test]
fn open_check_corpus() {
    replay("open_check", harness::open_check);
}

/// Maintenance (resize, snapshots) over every image the other targets
/// keep: the check and write corpora and their regressions.
#[test]
fn maintain_over_the_check_and_write_corpora() {
    replay("open_check", harness::maintain);
    replay("open_write", |d| {
        harness::maintain(d.get(64..).unwrap_or(&[]))
    });
    replay("open_maintain", harness::maintain);
}

#[test]
fn open_map_corpus() {
    replay("open_map", harness::open_map);
}

#[test]
fn open_write_corpus() {
    replay("open_write", |d| {
        harness::open_write(d);
    });
}

/// The write harness's model check on purpose-made scripts over the
/// checked-in qemu-img images (the fuzzer's own inputs rarely run a whole
/// script on a clean image): every script must run through and read back.
#[test]
fn open_write_scripts_on_clean_images_read_back() {
    use qcowkit_tests::{announce_seed, env_seed, Rng, SplitMix64};
    let seed = env_seed("FUZZ_SCRIPT_SEED").unwrap_or(0x5c21_97ed);
    announce_seed("open_write_scripts", "FUZZ_SCRIPT_SEED", seed);
    let mut rng = SplitMix64(seed);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/data");
    let mut verified = 0;
    // top-4k names a backing file, which the harness does not open.
    let images = [
        "base-4k",
        "extl2-16k",
        "plain-512",
        "snap-4k",
        "v2-4k",
        "zlib-4k",
        "zstd-4k",
    ];
    for name in images {
        let mut image = Vec::new();
        let raw = std::fs::read(data.join(format!("{name}.qcow2.zst"))).unwrap();
        ruzstd::decoding::StreamingDecoder::new(&raw[..])
            .unwrap()
            .read_to_end(&mut image)
            .unwrap();
        for i in 0..12 {
            // 16 operations: kinds 0-5, offsets within the image's first
            // few MiB (4 KiB steps), lengths up to 128 KiB.
            let mut input: Vec<u8> = (0..16)
                .flat_map(|_| {
                    let at = rng.below(1024) as u16;
                    [
                        rng.below(6) as u8,
                        (at >> 8) as u8,
                        at as u8,
                        rng.below(256) as u8,
                    ]
                })
                .collect();
            input.extend_from_slice(&image);
            let ok = std::panic::catch_unwind(|| harness::open_write(&input));
            match ok {
                Ok(true) => verified += 1,
                Ok(false) => panic!("seed {seed}: {name} script {i} did not run through"),
                Err(_) => panic!("seed {seed}: {name} script {i} panicked"),
            }
        }
    }
    println!("{verified} scripts verified");
}
