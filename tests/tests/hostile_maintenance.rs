//! Damaged images through every maintenance subcommand (resize, snapshot,
//! amend, rebase, commit, measure, check -r): never a crash, a clean
//! `qcow2: ...` error when refused, and the image never left worse than it
//! was (qemu-img check finds no more corruptions or errors after than
//! before, and an image qemu-img could open still opens).

use std::path::Path;

use qcowkit_tests::*;

fn be64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn set64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Offset of the bitmap directory (from the bitmaps header extension).
fn bitmap_directory(b: &[u8]) -> usize {
    let mut at = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
    loop {
        let kind = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return be64_at(b, at + 8 + 16) as usize;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// Refcount entry (16 bits) of cluster `c`, as a byte offset in the file.
fn refcount_at(b: &[u8], c: u64) -> usize {
    let cs = 1u64 << u32::from_be_bytes(b[20..24].try_into().unwrap());
    let per_block = cs / 2;
    let rt = be64_at(b, 48) as usize;
    let block = be64_at(b, rt + (c / per_block) as usize * 8) & !0x1ff;
    block as usize + (c % per_block) as usize * 2
}

/// The damages: a name and an edit of the image's bytes.
type Damage = (&'static str, fn(&mut Vec<u8>));

const DAMAGES: &[Damage] = &[
    ("L1 entry onto the refcount table", |b| {
        let l1 = be64_at(b, 40) as usize;
        let rt = be64_at(b, 48);
        set64(b, l1, (1 << 63) | rt);
    }),
    ("L2 entry onto the refcount table", |b| {
        let l1 = be64_at(b, 40) as usize;
        let l2 = (be64_at(b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
        let rt = be64_at(b, 48);
        set64(b, l2, (1 << 63) | rt);
    }),
    ("an L2 table's refcount 0", |b| {
        let l1 = be64_at(b, 40) as usize;
        let l2 = be64_at(b, l1) & 0x00ff_ffff_ffff_fe00;
        let at = refcount_at(b, l2 >> 16);
        b[at..at + 2].copy_from_slice(&0u16.to_be_bytes());
    }),
    ("refcount table entry unaligned", |b| {
        let rt = be64_at(b, 48) as usize;
        let e = be64_at(b, rt);
        set64(b, rt, e | 0x1234);
    }),
    ("snapshot L1 unaligned", |b| {
        let st = be64_at(b, 64) as usize;
        let e = be64_at(b, st);
        set64(b, st, e + 0x200);
    }),
    ("bitmap table past the end", |b| {
        let dir = bitmap_directory(b);
        set64(b, dir, 0x7_0000_0000);
    }),
    ("a leaked cluster", |b| {
        let end = b.len() as u64;
        b.resize(b.len() + 65536, 0);
        let at = refcount_at(b, end >> 16);
        b[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }),
    ("the corrupt bit", |b| {
        b[79] |= 2;
    }),
];

const COMMANDS: &[&[&str]] = &[
    &["resize", "IMG", "+1M"],
    &["resize", "--shrink", "IMG", "512k"],
    &["snapshot", "-l", "IMG"],
    &["snapshot", "-c", "new", "IMG"],
    &["snapshot", "-a", "s1", "IMG"],
    &["snapshot", "-d", "s1", "IMG"],
    &["amend", "-o", "compat=0.10", "IMG"],
    &["amend", "-o", "refcount_bits=64", "IMG"],
    &["amend", "-o", "lazy_refcounts=on", "IMG"],
    &["rebase", "-u", "-b", "", "IMG"],
    &["rebase", "-b", "", "IMG"],
    &["commit", "IMG"],
    &["commit", "-d", "IMG"],
    &["measure", "-O", "qcow2", "IMG"],
    &["check", "-r", "leaks", "IMG"],
    &["check", "-r", "all", "IMG"],
];

/// (corruptions, check errors) qemu-img check reports for `img`, or
/// `None` when it cannot check it at all.
fn damage_of(d: &Path, img: &str) -> Option<(u64, u64)> {
    let out = run_in(d, "qemu-img", &["check", "-U", "--output=json", img]);
    let text = stdout_of(&out);
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((
        v["corruptions"].as_u64().unwrap_or(0),
        v["check-errors"].as_u64().unwrap_or(0),
    ))
}

#[test]
fn damaged_images_through_every_maintenance_command() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "b.qcow2", "", "2M");
    qemu_io(d, "b.qcow2", &["write -P 1 0 2M"]);
    qemu_overlay(d, "good.qcow2", "", ("b.qcow2", "qcow2"), None);
    qemu_io(d, "good.qcow2", &["write -P 2 0 128k", "write -P 3 1M 64k"]);
    qemu_img(d, &["snapshot", "-c", "s1", "good.qcow2"]);
    qemu_io(d, "good.qcow2", &["write -P 4 64k 64k"]);
    qemu_img(d, &["bitmap", "--add", "good.qcow2", "b0"]);
    let good = std::fs::read(s.path("good.qcow2")).unwrap();
    let base = std::fs::read(s.path("b.qcow2")).unwrap();
    let mut problems = Vec::new();
    let mut runs = 0;
    for (name, damage) in DAMAGES {
        let mut bad = good.clone();
        damage(&mut bad);
        std::fs::write(s.path("bad.qcow2"), &bad).unwrap();
        let before = damage_of(d, "bad.qcow2");
        for cmd in COMMANDS {
            std::fs::write(s.path("t.qcow2"), &bad).unwrap();
            std::fs::write(s.path("b.qcow2"), &base).unwrap();
            let args: Vec<&str> = cmd
                .iter()
                .map(|a| if *a == "IMG" { "t.qcow2" } else { a })
                .collect();
            let out = ours(d, &args);
            runs += 1;
            let what = format!("{name}: {}", cmd.join(" "));
            let c = code(&out);
            let is_check = cmd[0] == "check";
            if !(0..=3).contains(&c) || (!is_check && c > 1) {
                problems.push(format!("{what}: exit {c}: {}", output_text(&out)));
                continue;
            }
            if c == 1 && !stderr_of(&out).starts_with("qcow2: ") && !is_check {
                problems.push(format!("{what}: unclear error: {}", output_text(&out)));
            }
            let after = damage_of(d, "t.qcow2");
            let worse = match (before, after) {
                (Some(_), None) => true,
                (Some((c0, e0)), Some((c1, e1))) => c1 > c0 || e1 > e0,
                (None, _) => false,
            };
            if worse {
                problems.push(format!("{what}: worse: {before:?} -> {after:?}"));
            }
            if damage_of(d, "b.qcow2") != Some((0, 0)) {
                problems.push(format!("{what}: the base was damaged"));
            }
        }
    }
    eprintln!("{runs} runs over {} damages", DAMAGES.len());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
