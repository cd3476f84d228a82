//! `QcowImage.contents()` in Node: partition tables (GPT, MBR with logical
//! partitions) and file systems crafted byte by byte inside qcow2 images of
//! 4 KiB clusters (the disks span several L2 tables), damaged tables
//! reported in the object, storage errors thrown with their codes, values
//! above 2^53 refused. (`wasm/tests/judge.mjs` checks disks made by the
//! real tools against blkid and sfdisk.)

use js_sys::{Array, Object, Reflect, Uint8Array};
use qcowkit_wasm::{create_image, QcowError, QcowImage};
use wasm_bindgen::prelude::*;
use wasm_bindgen_test::*;

#[wasm_bindgen(inline_js = r#"
export function memStorage(initial) {
  let buf = initial ? new Uint8Array(initial) : new Uint8Array(0);
  return {
    read(offset, length) {
      const out = new Uint8Array(length);
      if (offset < buf.length) out.set(buf.subarray(offset, Math.min(buf.length, offset + length)));
      return out;
    },
    write(offset, bytes) {
      if (offset + bytes.length > buf.length) {
        const n = new Uint8Array(offset + bytes.length); n.set(buf); buf = n;
      }
      buf.set(bytes, offset);
    },
    truncate(len) { const n = new Uint8Array(len); n.set(buf.subarray(0, Math.min(len, buf.length))); buf = n; },
    size() { return buf.length; },
    flush() {},
  };
}
export function failing(storage, code) {
  let on = false;
  return {
    read(offset, length) {
      if (on) {
        const e = new Error(`the disk went away at ${offset}`);
        if (code) e.code = code;
        throw e;
      }
      return storage.read(offset, length);
    },
    size() { return storage.size(); },
    fail() { on = true; },
  };
}
"#)]
extern "C" {
    fn memStorage(initial: JsValue) -> JsValue;
    fn failing(storage: JsValue, code: JsValue) -> JsValue;
}

const DEMO: &[u8] = include_bytes!("../../examples/demo.qcow2");
const MIB: usize = 1 << 20;

fn get(v: &JsValue, path: &[&str]) -> JsValue {
    let mut cur = v.clone();
    for p in path {
        cur = Reflect::get(&cur, &JsValue::from_str(p)).unwrap();
    }
    cur
}

fn text(v: &JsValue, path: &[&str]) -> String {
    get(v, path)
        .as_string()
        .unwrap_or_else(|| panic!("{path:?} is not a string in {}", json(v)))
}

fn num(v: &JsValue, path: &[&str]) -> f64 {
    get(v, path)
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {}", json(v)))
}

fn json(v: &JsValue) -> String {
    js_sys::JSON::stringify(v).unwrap().as_string().unwrap()
}

fn keys(v: &JsValue) -> Vec<String> {
    Object::keys(v.unchecked_ref::<Object>())
        .iter()
        .map(|k| k.as_string().unwrap())
        .collect()
}

fn strings(v: &JsValue) -> Vec<String> {
    Array::from(v)
        .iter()
        .map(|s| s.as_string().unwrap())
        .collect()
}

fn partitions(c: &JsValue) -> Vec<JsValue> {
    Array::from(&get(c, &["partitions"])).iter().collect()
}

fn code<T>(r: Result<T, QcowError>) -> (String, String) {
    let err: JsValue = r.err().expect("an error").into();
    assert!(err.is_instance_of::<js_sys::Error>(), "a JS Error");
    (text(&err, &["code"]), text(&err, &["message"]))
}

// ---------- crafting disks ----------

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A UUID's 16 bytes in text order.
fn uuid(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// GPT's mixed-endian layout of a GUID.
fn gpt_guid(text: &str) -> [u8; 16] {
    let mut g = uuid(text);
    g[0..4].reverse();
    g[4..6].reverse();
    g[6..8].reverse();
    g
}

/// An MBR partition entry `i` (0-3) of the sector at `sector`.
fn mbr_entry(d: &mut [u8], sector: usize, i: usize, status: u8, kind: u8, lba: u32, len: u32) {
    let e = sector * 512 + 446 + 16 * i;
    d[e] = status;
    d[e + 4] = kind;
    put32(d, e + 8, lba);
    put32(d, e + 12, len);
    d[sector * 512 + 510] = 0x55;
    d[sector * 512 + 511] = 0xaa;
}

const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
const LUKS: &str = "CA7D7CCB-63ED-4C53-861C-1742536059CC";
const MS_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
const ODD: &str = "12345678-9ABC-DEF0-1234-56789ABCDEF0";
const DISK_GUID: &str = "A1B2C3D4-E5F6-4789-8ABC-DEF012345678";

/// One GPT entry: type, first and last LBA, attributes, name, unique GUID.
struct Entry(&'static str, u64, u64, u64, &'static str, &'static str);

/// A GPT disk of `size` bytes (512-byte sectors): protective MBR, primary
/// header at LBA 1 with 128 entries from LBA 2, the backup entries and
/// header at the end.
fn gpt_disk(size: usize, entries: &[Entry]) -> Vec<u8> {
    let sectors = (size / 512) as u64;
    let mut d = vec![0u8; size];
    mbr_entry(&mut d, 0, 0, 0, 0xee, 1, (sectors - 1) as u32);
    let mut array = vec![0u8; 128 * 128];
    for (i, Entry(kind, first, last, attrs, name, guid)) in entries.iter().enumerate() {
        let e = &mut array[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(&gpt_guid(kind));
        e[16..32].copy_from_slice(&gpt_guid(guid));
        put64(e, 32, *first);
        put64(e, 40, *last);
        put64(e, 48, *attrs);
        for (k, u) in name.encode_utf16().enumerate() {
            put16(e, 56 + 2 * k, u);
        }
    }
    let array_crc = crc32(&array);
    let header = |my: u64, alt: u64, entries_lba: u64| {
        let mut h = [0u8; 92];
        h[0..8].copy_from_slice(b"EFI PART");
        put32(&mut h, 8, 0x10000);
        put32(&mut h, 12, 92);
        put64(&mut h, 24, my);
        put64(&mut h, 32, alt);
        put64(&mut h, 40, 34);
        put64(&mut h, 48, sectors - 34);
        h[56..72].copy_from_slice(&gpt_guid(DISK_GUID));
        put64(&mut h, 72, entries_lba);
        put32(&mut h, 80, 128);
        put32(&mut h, 84, 128);
        put32(&mut h, 88, array_crc);
        let crc = crc32(&h);
        put32(&mut h, 16, crc);
        h
    };
    let last = sectors - 1;
    d[512..604].copy_from_slice(&header(1, last, 2));
    d[1024..1024 + array.len()].copy_from_slice(&array);
    let backup_entries = (last - 32) as usize * 512;
    d[backup_entries..backup_entries + array.len()].copy_from_slice(&array);
    d[last as usize * 512..last as usize * 512 + 92].copy_from_slice(&header(last, 1, last - 32));
    d
}

const EXT4_UUID: &str = "3e6be9de-8139-4c0f-9106-a43f08d8f3a2";
const SWAP_UUID: &str = "5f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
const LUKS_UUID: &str = "8f3c1a2b-4d5e-4f60-8172-93a4b5c6d7e8";
const XFS_UUID: &str = "0a1b2c3d-4e5f-4061-8273-94a5b6c7d8e9";

/// An ext4 superblock (4 KiB blocks, `blocks` of them) at `at` + 1024.
fn ext4(d: &mut [u8], at: usize, blocks: u32, label: &str) {
    let s = &mut d[at + 1024..at + 2048];
    put32(s, 0x04, blocks);
    put32(s, 0x18, 2); // 1024 << 2
    put16(s, 0x38, 0xef53);
    put32(s, 0x4c, 1); // dynamic revision: the feature words count
    put32(s, 0x5c, 0x3c); // has_journal ext_attr resize_inode dir_index
    put32(s, 0x60, 0x2c2); // filetype extent 64bit flex_bg
    put32(s, 0x64, 0x46b); // sparse_super large_file huge_file dir_nlink extra_isize metadata_csum
    s[0x68..0x78].copy_from_slice(&uuid(EXT4_UUID));
    s[0x78..0x78 + label.len()].copy_from_slice(label.as_bytes());
}

const EXT4_FEATURES: [&str; 14] = [
    "has_journal",
    "ext_attr",
    "resize_inode",
    "dir_index",
    "filetype",
    "extent",
    "64bit",
    "flex_bg",
    "sparse_super",
    "large_file",
    "huge_file",
    "dir_nlink",
    "extra_isize",
    "metadata_csum",
];

/// A Linux swap header (4 KiB pages, `len` bytes) at `at`.
fn swap(d: &mut [u8], at: usize, len: usize, label: &str) {
    d[at + 4096 - 10..at + 4096].copy_from_slice(b"SWAPSPACE2");
    put32(d, at + 1024, 1);
    put32(d, at + 1028, (len / 4096 - 1) as u32);
    d[at + 1036..at + 1052].copy_from_slice(&uuid(SWAP_UUID));
    d[at + 1052..at + 1052 + label.len()].copy_from_slice(label.as_bytes());
}

/// A LUKS1 header (aes, xts-plain64) at `at`.
fn luks1(d: &mut [u8], at: usize) {
    d[at..at + 6].copy_from_slice(b"LUKS\xba\xbe");
    d[at + 7] = 1;
    d[at + 8..at + 11].copy_from_slice(b"aes");
    d[at + 40..at + 51].copy_from_slice(b"xts-plain64");
    d[at + 168..at + 204].copy_from_slice(LUKS_UUID.as_bytes());
}

/// An XFS superblock (v5, 4 KiB blocks) at `at`.
fn xfs(d: &mut [u8], at: usize, blocks: u64, label: &str) {
    d[at..at + 4].copy_from_slice(b"XFSB");
    d[at + 4..at + 8].copy_from_slice(&4096u32.to_be_bytes());
    d[at + 8..at + 16].copy_from_slice(&blocks.to_be_bytes());
    d[at + 32..at + 48].copy_from_slice(&uuid(XFS_UUID));
    d[at + 100..at + 102].copy_from_slice(&0xb4a5u16.to_be_bytes());
    d[at + 102..at + 104].copy_from_slice(&512u16.to_be_bytes());
    d[at + 108..at + 108 + label.len()].copy_from_slice(label.as_bytes());
}

/// `disk` as the guest disk of a new qcow2 image of 4 KiB clusters (an L2
/// table covers 2 MiB), in a storage object.
fn image_of(disk: &[u8]) -> JsValue {
    let storage = memStorage(JsValue::UNDEFINED);
    let o = Object::new();
    Reflect::set(&o, &"size".into(), &(disk.len() as f64).into()).unwrap();
    Reflect::set(&o, &"cluster_size".into(), &4096.into()).unwrap();
    create_image(storage.clone(), o.into()).unwrap();
    let mut w = QcowImage::open_writable(
        "disk.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    // Only the sectors that are not zero (the image stays small).
    for (i, chunk) in disk.chunks(4096).enumerate() {
        if chunk.iter().any(|b| *b != 0) {
            w.write((i * 4096) as f64, chunk).unwrap();
        }
    }
    w.flush().unwrap();
    storage
}

fn contents_of(disk: &[u8]) -> JsValue {
    let mut img = QcowImage::open(
        "disk.qcow2",
        image_of(disk),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    img.contents().unwrap()
}

/// The GPT disk of the tests: 8 MiB, five partitions.
fn crafted_gpt() -> Vec<u8> {
    let mut d = gpt_disk(
        8 * MIB,
        &[
            Entry(
                LINUX,
                2048,
                6143,
                0x4,
                "root \u{e9}\u{1F600}",
                "11111111-2222-4333-8444-555555555555",
            ),
            Entry(
                SWAP,
                6144,
                8191,
                0,
                "swap",
                "21111111-2222-4333-8444-555555555555",
            ),
            Entry(
                LUKS,
                8192,
                10239,
                0x1,
                "vault",
                "31111111-2222-4333-8444-555555555555",
            ),
            Entry(
                MS_DATA,
                10240,
                12287,
                (1 << 62) | (1 << 63) | (1 << 60) | (1 << 48),
                "",
                "41111111-2222-4333-8444-555555555555",
            ),
            Entry(
                ODD,
                12288,
                14335,
                0,
                "odd",
                "51111111-2222-4333-8444-555555555555",
            ),
            Entry(
                ESP,
                14336,
                16349,
                0x2,
                "EFI system",
                "61111111-2222-4333-8444-555555555555",
            ),
        ],
    );
    ext4(&mut d, MIB, 512, "rootfs");
    swap(&mut d, 3 * MIB, MIB, "swp");
    luks1(&mut d, 4 * MIB);
    d
}

// ---------- tests ----------

#[wasm_bindgen_test]
fn demo_image_holds_an_mbr_with_one_linux_partition() {
    let mut img = QcowImage::open(
        "demo.qcow2",
        Uint8Array::from(DEMO).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let c = img.contents().unwrap();
    // The keys and values of qcow2-info --json's "contents" for the same
    // image (keys in order, as in every report of the package).
    assert_eq!(keys(&c), ["partition-table", "partitions"], "{}", json(&c));
    assert_eq!(
        json(&get(&c, &["partition-table"])),
        r#"{"disk-id":"0x00000000","sector-size":512,"type":"mbr"}"#
    );
    assert_eq!(
        json(&get(&c, &["partitions"])),
        r#"[{"number":1,"size":66060288,"start":1048576,"type":"Linux","type-id":"0x83"}]"#
    );
}

#[wasm_bindgen_test]
fn gpt_partitions_and_their_file_systems() {
    let c = contents_of(&crafted_gpt());
    let t = get(&c, &["partition-table"]);
    assert_eq!(text(&t, &["type"]), "gpt");
    assert_eq!(num(&t, &["sector-size"]), 512.0);
    assert_eq!(text(&t, &["disk-guid"]), DISK_GUID);
    assert_eq!(text(&t, &["header"]), "primary");
    assert_eq!(keys(&t), ["disk-guid", "header", "sector-size", "type"]);
    assert!(get(&c, &["error"]).is_undefined());
    assert!(get(&c, &["filesystem"]).is_undefined(), "{}", json(&c));
    let p = partitions(&c);
    assert_eq!(p.len(), 6);
    let expect = [
        (
            1,
            2048,
            4096,
            "Linux filesystem",
            LINUX,
            "root \u{e9}\u{1F600}",
        ),
        (2, 6144, 2048, "Linux swap", SWAP, "swap"),
        (3, 8192, 2048, "Linux LUKS", LUKS, "vault"),
        (4, 10240, 2048, "Microsoft basic data", MS_DATA, ""),
        (5, 12288, 2048, ODD, ODD, "odd"),
        (6, 14336, 2014, "EFI System", ESP, "EFI system"),
    ];
    for (p, (n, first, sectors, kind, type_id, name)) in p.iter().zip(expect) {
        assert_eq!(num(p, &["number"]), n as f64);
        assert_eq!(num(p, &["start"]), (first * 512) as f64);
        assert_eq!(num(p, &["size"]), (sectors * 512) as f64);
        assert_eq!(text(p, &["type"]), kind);
        assert_eq!(text(p, &["type-id"]), type_id);
        assert_eq!(text(p, &["name"]), name);
        assert_eq!(
            text(p, &["uuid"]),
            format!("{n}1111111-2222-4333-8444-555555555555")
        );
        assert!(get(p, &["logical"]).is_undefined());
    }
    let flags = |i: usize| {
        let f = get(&p[i], &["flags"]);
        if f.is_undefined() {
            Vec::new()
        } else {
            strings(&f)
        }
    };
    assert_eq!(flags(0), ["legacy BIOS bootable"]);
    assert_eq!(flags(1), Vec::<String>::new());
    assert_eq!(flags(2), ["required"]);
    assert_eq!(
        flags(3),
        ["attribute bit 48", "read-only", "hidden", "no automount"]
    );
    assert_eq!(flags(5), ["no block IO protocol"]);

    // ext4: every field of the superblock.
    let f = get(&p[0], &["filesystem"]);
    assert_eq!(
        keys(&f),
        [
            "blkid-type",
            "block-size",
            "features",
            "label",
            "size",
            "type",
            "uuid"
        ]
    );
    assert_eq!(text(&f, &["type"]), "ext4");
    assert_eq!(text(&f, &["blkid-type"]), "ext4");
    assert_eq!(text(&f, &["label"]), "rootfs");
    assert_eq!(text(&f, &["uuid"]), EXT4_UUID);
    assert_eq!(num(&f, &["block-size"]), 4096.0);
    assert_eq!(num(&f, &["size"]), (2 * MIB) as f64);
    assert_eq!(strings(&get(&f, &["features"])), EXT4_FEATURES);
    // swap.
    let f = get(&p[1], &["filesystem"]);
    assert_eq!(text(&f, &["type"]), "Linux swap");
    assert_eq!(text(&f, &["blkid-type"]), "swap");
    assert_eq!(text(&f, &["label"]), "swp");
    assert_eq!(text(&f, &["uuid"]), SWAP_UUID);
    assert_eq!(num(&f, &["version"]), 1.0);
    assert_eq!(num(&f, &["block-size"]), 4096.0);
    assert_eq!(num(&f, &["size"]), MIB as f64);
    // LUKS1: the cipher.
    let f = get(&p[2], &["filesystem"]);
    assert_eq!(
        json(&f),
        format!(
            r#"{{"blkid-type":"crypto_LUKS","cipher":"aes","cipher-mode":"xts-plain64","type":"LUKS","uuid":"{LUKS_UUID}","version":1}}"#
        )
    );
    // Nothing recognised: no filesystem key.
    for i in [3, 4, 5] {
        assert!(
            get(&p[i], &["filesystem"]).is_undefined(),
            "{}",
            json(&p[i])
        );
    }

    // The same through a writable image (what was written is read back).
    let mut w = QcowImage::open_writable(
        "disk.qcow2",
        image_of(&crafted_gpt()),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    w.write((MIB + 1024 + 0x78) as f64, b"renamed\0").unwrap();
    let again = w.contents().unwrap();
    assert_eq!(
        text(
            &Array::from(&get(&again, &["partitions"])).get(0),
            &["filesystem", "label"]
        ),
        "renamed"
    );
}

#[wasm_bindgen_test]
fn damaged_gpt_headers_are_reported_in_the_object() {
    let good = crafted_gpt();
    let want = json(&get(&contents_of(&good), &["partitions"]));
    // The primary header's CRC broken: read from the backup, the problem named.
    let mut d = good.clone();
    d[512 + 40] ^= 1;
    let c = contents_of(&d);
    assert_eq!(text(&c, &["partition-table", "header"]), "backup");
    let problem = text(&c, &["partition-table", "primary-problem"]);
    assert!(
        problem.starts_with("primary GPT header at LBA 1: HeaderCRC32 "),
        "{problem}"
    );
    assert_eq!(json(&get(&c, &["partitions"])), want);
    // The backup header zeroed: the primary is used, the backup's problem named.
    let mut d = good.clone();
    let n = d.len();
    d[n - 512..].fill(0);
    let c = contents_of(&d);
    assert_eq!(text(&c, &["partition-table", "header"]), "primary");
    let problem = text(&c, &["partition-table", "backup-problem"]);
    assert!(
        problem.starts_with("backup GPT header at LBA 16383: Signature"),
        "{problem}"
    );
    assert_eq!(json(&get(&c, &["partitions"])), want);
    // Both gone: an error in the object, not an exception; no partitions.
    d[512..1024].fill(0);
    let c = contents_of(&d);
    assert_eq!(keys(&c), ["error"], "{}", json(&c));
    let e = text(&c, &["error"]);
    assert!(
        e.starts_with("invalid partition table: primary GPT header at LBA 1: Signature"),
        "{e}"
    );
}

/// An 8 MiB MBR disk (id 0x1234abcd): XFS in a bootable partition 1, an
/// extended partition 2 at LBA 4096 holding logical partitions 5 (swap,
/// at LBA 6144) and 6 (ext4, at LBA 9216), partition 3 of type 0x0c.
fn crafted_mbr() -> Vec<u8> {
    let mut d = vec![0u8; 8 * MIB];
    put32(&mut d, 440, 0x1234_abcd);
    mbr_entry(&mut d, 0, 0, 0x80, 0x83, 2048, 2048);
    mbr_entry(&mut d, 0, 1, 0, 0x05, 4096, 8192);
    mbr_entry(&mut d, 0, 2, 0, 0x0c, 12288, 4096);
    // EBR 1 at 4096: the logical at +2048 from it, the next EBR at +4096
    // from the extended partition's start.
    mbr_entry(&mut d, 4096, 0, 0, 0x82, 2048, 1024);
    mbr_entry(&mut d, 4096, 1, 0, 0x05, 4096, 2048);
    mbr_entry(&mut d, 8192, 0, 0, 0x83, 1024, 1024);
    xfs(&mut d, MIB, 512, "xfsvol");
    swap(&mut d, 6144 * 512, 1024 * 512, "logical5");
    ext4(&mut d, 9216 * 512, 128, "logical6");
    d
}

#[wasm_bindgen_test]
fn mbr_with_logical_partitions() {
    let c = contents_of(&crafted_mbr());
    assert_eq!(
        json(&get(&c, &["partition-table"])),
        r#"{"disk-id":"0x1234abcd","sector-size":512,"type":"mbr"}"#
    );
    let p = partitions(&c);
    let got: Vec<(f64, f64, f64, String, String, bool)> = p
        .iter()
        .map(|p| {
            (
                num(p, &["number"]),
                num(p, &["start"]) / 512.0,
                num(p, &["size"]) / 512.0,
                text(p, &["type"]),
                text(p, &["type-id"]),
                get(p, &["logical"]).as_bool() == Some(true),
            )
        })
        .collect();
    let s = |x: &str| x.to_string();
    assert_eq!(
        got,
        [
            (1.0, 2048.0, 2048.0, s("Linux"), s("0x83"), false),
            (2.0, 4096.0, 8192.0, s("Extended"), s("0x05"), false),
            (3.0, 12288.0, 4096.0, s("FAT32 (LBA)"), s("0x0c"), false),
            (5.0, 6144.0, 1024.0, s("Linux swap"), s("0x82"), true),
            (6.0, 9216.0, 1024.0, s("Linux"), s("0x83"), true),
        ]
    );
    assert_eq!(strings(&get(&p[0], &["flags"])), ["bootable"]);
    assert!(get(&p[1], &["flags"]).is_undefined());
    // MBR partitions have no name or GUID.
    assert!(get(&p[0], &["name"]).is_undefined() && get(&p[0], &["uuid"]).is_undefined());
    let f = get(&p[0], &["filesystem"]);
    assert_eq!(
        json(&f),
        format!(
            r#"{{"blkid-type":"xfs","block-size":4096,"label":"xfsvol","size":2097152,"type":"XFS","uuid":"{XFS_UUID}","version":5}}"#
        )
    );
    // The extended partition is a container: not probed.
    assert!(get(&p[1], &["filesystem"]).is_undefined());
    assert_eq!(text(&p[3], &["filesystem", "label"]), "logical5");
    assert_eq!(text(&p[4], &["filesystem", "label"]), "logical6");
    assert_eq!(num(&p[4], &["filesystem", "size"]), (128 * 4096) as f64);

    // A loop in the chain of EBRs: reported in the object, not thrown.
    let mut d = crafted_mbr();
    mbr_entry(&mut d, 8192, 1, 0, 0x05, 0, 2048);
    let c = contents_of(&d);
    assert_eq!(keys(&c), ["error"], "{}", json(&c));
    let e = text(&c, &["error"]);
    assert!(
        e.starts_with("invalid partition table: EBR at LBA ") && e.contains("loop"),
        "{e}"
    );
}

#[wasm_bindgen_test]
fn a_file_system_on_the_whole_disk() {
    let mut d = vec![0u8; 4 * MIB];
    ext4(&mut d, 0, 1024, "whole");
    let c = contents_of(&d);
    assert_eq!(keys(&c), ["filesystem"], "{}", json(&c));
    assert_eq!(text(&c, &["filesystem", "type"]), "ext4");
    assert_eq!(text(&c, &["filesystem", "label"]), "whole");
    assert_eq!(num(&c, &["filesystem", "size"]), (4 * MIB) as f64);
    // An empty disk: nothing at all.
    let c = contents_of(&vec![0u8; MIB]);
    assert_eq!(keys(&c), Vec::<String>::new(), "{}", json(&c));
}

#[wasm_bindgen_test]
fn storage_errors_are_thrown_with_their_codes() {
    for (given, want) in [
        (JsValue::UNDEFINED, "io"),
        (JsValue::from_str("busy"), "busy"),
    ] {
        let storage = failing(image_of(&crafted_gpt()), given);
        let mut img = QcowImage::open(
            "disk.qcow2",
            storage.clone(),
            JsValue::UNDEFINED,
            JsValue::UNDEFINED,
        )
        .unwrap();
        let fail: js_sys::Function = get(&storage, &["fail"]).dyn_into().unwrap();
        fail.call0(&storage).unwrap();
        let (code, message) = code(img.contents());
        assert_eq!(code, want, "{message}");
        assert!(message.contains("the disk went away"), "{message}");
    }
}

#[wasm_bindgen_test]
fn offsets_above_2_pow_53_are_refused_not_rounded() {
    // A GPT entry starting at LBA 2^50 (byte 2^59): beyond any number
    // JavaScript holds exactly.
    let d = gpt_disk(
        MIB,
        &[Entry(
            LINUX,
            1 << 50,
            (1 << 50) + 7,
            0,
            "far",
            "11111111-2222-4333-8444-555555555555",
        )],
    );
    let mut img = QcowImage::open(
        "far.qcow2",
        image_of(&d),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let (code, message) = code(img.contents());
    assert_eq!(code, "unsupported");
    assert!(
        message.contains("partitions[0].start is 576460752303423488"),
        "{message}"
    );
}
