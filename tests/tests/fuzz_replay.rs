//! Replays the fuzz corpus (fuzz/corpus, zstd-compressed or plain) and the
//! regression inputs of bugs the fuzzers found (fuzz/regressions) through
//! the same harnesses the cargo-fuzz targets run: none may panic.

#[allow(dead_code)]
#[path = "../../fuzz/harness.rs"]
mod harness;

use std::io::Read;
use std::path::Path;

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

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for sub in ["corpus", "regressions"] {
        for (name, bytes) in inputs(&root.join(sub).join(target)) {
            let r = std::panic::catch_unwind(|| run(&bytes));
            assert!(r.is_ok(), "{target}: {name} panicked");
            n += 1;
        }
    }
    assert!(n > 0, "{target}: no corpus");
    println!("{target}: {n} inputs replayed");
}

#[test]
fn open_read_corpus() {
    replay("open_read", harness::open_read);
}

#[test]
fn open_check_corpus() {
    replay("open_check", harness::open_check);
}

#[test]
fn open_map_corpus() {
    replay("open_map", harness::open_map);
}

#[test]
fn open_write_corpus() {
    replay("open_write", harness::open_write);
}
