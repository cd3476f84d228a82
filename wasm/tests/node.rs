//! wasm-bindgen tests of the JS API (run in Node by `wasm-pack test --node`).

use js_sys::{Function, Object, Reflect, Uint8Array};
use qcowkit_wasm::{
    convert_raw_to_qcow2, create_image, create_image_bytes, inspect, QcowError, QcowImage,
};
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
    bytes() { return buf; },
  };
}
export function collector() {
  const parts = [];
  const f = (offset, bytes, len) => { parts.push(bytes ? new Uint8Array(bytes) : new Uint8Array(len)); };
  f.result = () => { let n = 0; for (const p of parts) n += p.length; const out = new Uint8Array(n); let o = 0; for (const p of parts) { out.set(p, o); o += p.length; } return out; };
  return f;
}
"#)]
extern "C" {
    fn memStorage(initial: JsValue) -> JsValue;
    fn collector() -> Function;
}

const DEMO: &[u8] = include_bytes!("../../examples/demo.qcow2");

fn options(pairs: &[(&str, JsValue)]) -> JsValue {
    let o = Object::new();
    for (k, v) in pairs {
        Reflect::set(&o, &JsValue::from_str(k), v).unwrap();
    }
    o.into()
}

fn get(v: &JsValue, path: &[&str]) -> JsValue {
    let mut cur = v.clone();
    for p in path {
        cur = Reflect::get(&cur, &JsValue::from_str(p)).unwrap();
    }
    cur
}

fn storage_bytes(storage: &JsValue) -> Vec<u8> {
    let f: Function = get(storage, &["bytes"]).dyn_into().unwrap();
    f.call0(storage)
        .unwrap()
        .dyn_into::<Uint8Array>()
        .unwrap()
        .to_vec()
}

#[wasm_bindgen_test]
fn demo_image_info_map_check_and_read() {
    let mut img = QcowImage::open(
        "demo.qcow2",
        Uint8Array::from(DEMO).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let info = img.info().unwrap();
    assert_eq!(get(&info, &["virtual-size"]).as_f64(), Some(67108864.0));
    assert_eq!(get(&info, &["cluster-size"]).as_f64(), Some(16384.0));
    assert_eq!(
        get(&info, &["format-specific", "data", "compression-type"])
            .as_string()
            .unwrap(),
        "zstd"
    );
    assert_eq!(
        get(&info, &["format-specific", "data", "extended-l2"]).as_bool(),
        Some(true)
    );
    let mbr = img.read(0.0, 512).unwrap().to_vec();
    assert_eq!(&mbr[510..], &[0x55, 0xaa]);
    let map = img.map().unwrap();
    let entries: js_sys::Array = map.dyn_into().unwrap();
    assert!(entries.length() > 3);
    assert_eq!(get(&entries.get(0), &["compressed"]).as_bool(), Some(true));
    let check = img.check(None).unwrap();
    assert_eq!(get(&check, &["check-errors"]).as_f64(), Some(0.0));
    assert!(get(&check, &["corruptions"]).is_undefined());
}

#[wasm_bindgen_test]
fn inspect_and_allocation_report_what_the_core_computes() {
    let info = inspect("demo.qcow2", Uint8Array::from(DEMO).into()).unwrap();
    assert_eq!(get(&info, &["format"]).as_string().unwrap(), "qcow2");
    assert_eq!(get(&info, &["virtual-size"]).as_f64(), Some(67108864.0));
    let raw = inspect("x.raw", Uint8Array::from(&[1u8; 4096][..]).into()).unwrap();
    assert_eq!(get(&raw, &["format"]).as_string().unwrap(), "raw");
    assert_eq!(get(&raw, &["virtual-size"]).as_f64(), Some(4096.0));
    assert!(inspect("bad.qcow2", Uint8Array::from(&b"QFI\xfbgarbage"[..]).into()).is_err());

    let mut img = QcowImage::open(
        "demo.qcow2",
        Uint8Array::from(DEMO).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let totals = img.allocation(JsValue::UNDEFINED).unwrap();
    let sum: f64 = ["data", "compressed", "zero", "backing", "unallocated"]
        .iter()
        .map(|k| get(&totals, &[k]).as_f64().unwrap())
        .sum();
    assert_eq!(sum, 67108864.0);
    assert!(get(&totals, &["compressed"]).as_f64().unwrap() > 0.0);
    let ranges: js_sys::Array = img
        .allocation_map(JsValue::UNDEFINED)
        .unwrap()
        .dyn_into()
        .unwrap();
    let mut covered = 0.0;
    let mut compressed = 0.0;
    for r in ranges.iter() {
        assert_eq!(get(&r, &["start"]).as_f64(), Some(covered));
        let len = get(&r, &["length"]).as_f64().unwrap();
        if get(&r, &["category"]).as_string().unwrap() == "compressed" {
            compressed += len;
        }
        covered += len;
    }
    assert_eq!(covered, 67108864.0);
    assert_eq!(Some(compressed), get(&totals, &["compressed"]).as_f64());
}

#[wasm_bindgen_test]
fn create_write_and_read_back_through_a_js_storage_object() {
    let storage = memStorage(JsValue::UNDEFINED);
    create_image(
        storage.clone(),
        options(&[
            ("size", "8M".into()),
            ("extended_l2", true.into()),
            ("cluster_size", 65536.into()),
        ]),
    )
    .unwrap();
    let mut img = QcowImage::open_writable(
        "new.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    img.write(1000.0, &[7u8; 5000]).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut again =
        QcowImage::open("new.qcow2", storage, JsValue::UNDEFINED, JsValue::UNDEFINED).unwrap();
    let back = again.read(0.0, 8192).unwrap().to_vec();
    assert!(back[..1000].iter().all(|b| *b == 0));
    assert!(back[1000..6000].iter().all(|b| *b == 7));
    assert!(back[6000..].iter().all(|b| *b == 0));
    let info = again.info().unwrap();
    assert_eq!(
        get(&info, &["format-specific", "data", "extended-l2"]).as_bool(),
        Some(true)
    );
}

#[wasm_bindgen_test]
fn backing_files_are_found_by_name() {
    let base = memStorage(JsValue::UNDEFINED);
    create_image(base.clone(), options(&[("size", "1M".into())])).unwrap();
    let mut b = QcowImage::open_writable(
        "base.qcow2",
        base.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    b.write(0.0, &[0x42; 4096]).unwrap();
    b.flush().unwrap();
    drop(b);
    let top = create_image_bytes(options(&[
        ("size", "1M".into()),
        ("backing_file", "dir/base.qcow2".into()),
        ("backing_fmt", "qcow2".into()),
    ]))
    .unwrap();
    // Without the file: a clear error naming it.
    let err = QcowImage::open(
        "top.qcow2",
        top.clone().into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .err()
    .unwrap();
    let msg = JsValue::from(err);
    let text = get(&msg, &["message"]).as_string().unwrap();
    assert!(text.contains("base.qcow2"), "{text}");
    let files = options(&[(
        "base.qcow2",
        Uint8Array::from(&storage_bytes(&base)[..]).into(),
    )]);
    let mut img = QcowImage::open("top.qcow2", top.into(), files, JsValue::UNDEFINED).unwrap();
    let data = img.read(0.0, 4096).unwrap().to_vec();
    assert!(data.iter().all(|x| *x == 0x42));
    let info = img.info().unwrap();
    assert_eq!(
        get(&info, &["backing-filename"]).as_string().unwrap(),
        "dir/base.qcow2"
    );
    // The chain as opened: the base was found by its basename.
    let chain: js_sys::Array = img.chain().unwrap().dyn_into().unwrap();
    assert_eq!(chain.length(), 2);
    assert_eq!(
        get(&chain.get(0), &["full-backing-filename"])
            .as_string()
            .unwrap(),
        "base.qcow2"
    );
    assert_eq!(
        get(&chain.get(1), &["filename"]).as_string().unwrap(),
        "base.qcow2"
    );
    assert!(get(&chain.get(1), &["backing-filename"]).is_undefined());
}

#[wasm_bindgen_test]
fn malformed_images_throw_errors_with_the_core_message() {
    let err = QcowImage::open(
        "x",
        Uint8Array::from(&b"not an image at all"[..]).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .err()
    .unwrap();
    let text = get(&JsValue::from(err), &["message"]).as_string().unwrap();
    assert!(text.contains("not a qcow2 image"), "{text}");
    let mut bad = DEMO.to_vec();
    bad[20..24].copy_from_slice(&30u32.to_be_bytes());
    let err = QcowImage::open(
        "x",
        Uint8Array::from(&bad[..]).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .err()
    .unwrap();
    let text = get(&JsValue::from(err), &["message"]).as_string().unwrap();
    assert!(text.contains("cluster_bits 30"), "{text}");
}

#[wasm_bindgen_test]
fn convert_to_raw_streams_the_guest_contents() {
    let mut img = QcowImage::open(
        "demo.qcow2",
        Uint8Array::from(DEMO).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let sink = collector();
    img.convert_to_raw(&sink, options(&[("chunkSize", (1 << 20).into())]))
        .unwrap();
    let result: Function = get(&sink, &["result"]).dyn_into().unwrap();
    let raw = result
        .call0(&JsValue::NULL)
        .unwrap()
        .dyn_into::<Uint8Array>()
        .unwrap()
        .to_vec();
    assert_eq!(raw.len(), 64 << 20);
    let direct = img.read(0.0, 2 << 20).unwrap().to_vec();
    assert_eq!(&raw[..2 << 20], &direct[..]);

    // And raw back to qcow2 (compressed), which reads the same.
    let target = memStorage(JsValue::UNDEFINED);
    let src = Uint8Array::from(&raw[..(4 << 20)]);
    convert_raw_to_qcow2(
        src.into(),
        target.clone(),
        options(&[
            ("compress", true.into()),
            ("compression_type", "zstd".into()),
        ]),
    )
    .unwrap();
    let mut back =
        QcowImage::open("c.qcow2", target, JsValue::UNDEFINED, JsValue::UNDEFINED).unwrap();
    assert_eq!(
        back.read(0.0, 4 << 20).unwrap().to_vec(),
        raw[..(4 << 20)].to_vec()
    );
    let check = back.check(None).unwrap();
    assert!(get(&check, &["compressed-clusters"]).as_f64().unwrap() > 0.0);
}

fn be(b: &[u8], at: usize, n: usize) -> u64 {
    b[at..at + n]
        .iter()
        .fold(0u64, |a, x| a << 8 | u64::from(*x))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[wasm_bindgen_test]
fn writes_over_metadata_are_refused_and_mark_the_image_corrupt() {
    let storage = memStorage(JsValue::UNDEFINED);
    create_image(storage.clone(), options(&[("size", "1M".into())])).unwrap();
    let mut img = QcowImage::open_writable(
        "x.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    img.write(0.0, &[0x11; 4096]).unwrap();
    img.flush().unwrap();
    drop(img);
    // Point guest cluster 0 at the L1 table ("owned": COPIED).
    let mut bytes = storage_bytes(&storage);
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    bytes[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | l1 as u64).to_be_bytes());
    let l1_before = bytes[l1..l1 + 512].to_vec();
    let damaged = memStorage(Uint8Array::from(&bytes[..]).into());
    let mut img = QcowImage::open_writable(
        "x.qcow2",
        damaged.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let err = img.write(0.0, &[0x5a; 4096]).err().unwrap();
    let msg = get(&JsValue::from(err), &["message"]).as_string().unwrap();
    assert!(msg.contains("invalid write on metadata"), "{msg}");
    assert!(msg.contains("active L1 table"), "{msg}");
    drop(img);
    let after = storage_bytes(&damaged);
    assert_eq!(
        &after[l1..l1 + 512],
        &l1_before[..],
        "the L1 table is unchanged"
    );
    assert_eq!(be64(&after, 72) & 2, 2, "the corrupt bit is set");
    // Marked corrupt: opening for writing is refused from now on.
    assert!(
        QcowImage::open_writable("x.qcow2", damaged, JsValue::UNDEFINED, JsValue::UNDEFINED)
            .is_err()
    );
}

#[wasm_bindgen(inline_js = r#"
export function lines() {
  const got = [];
  const f = (line) => { got.push(line); };
  f.got = got;
  return f;
}
export function thrower() { return () => { throw new Error("stop"); }; }
export function json(v) { return JSON.stringify(v); }
"#)]
extern "C" {
    fn lines() -> Function;
    fn thrower() -> Function;
    fn json(v: &JsValue) -> String;
}

#[wasm_bindgen_test]
fn map_pages_join_to_the_map_and_check_streams_its_problems() {
    let mut img = QcowImage::open(
        "demo.qcow2",
        Uint8Array::from(DEMO).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let whole: js_sys::Array = img.map().unwrap().dyn_into().unwrap();
    for max in [1u32, 2, 5] {
        let joined = js_sys::Array::new();
        let mut at = Some(0.0);
        let mut pages = 0;
        while let Some(start) = at {
            let page = img.map_page(start, max).unwrap();
            let entries: js_sys::Array = get(&page, &["entries"]).dyn_into().unwrap();
            assert!(entries.length() >= 1 && entries.length() <= max);
            for e in entries.iter() {
                joined.push(&e);
            }
            at = get(&page, &["next"]).as_f64();
            pages += 1;
        }
        assert_eq!(json(&joined), json(&whole), "pages of {max}");
        assert_eq!(pages, whole.length().div_ceil(max));
    }
    let err = img.map_page(-1.0, 10).err().unwrap();
    let msg: JsValue = err.into();
    assert!(get(&msg, &["message"])
        .as_string()
        .unwrap()
        .contains("start must be a whole number"));

    // One leak: the header cluster's refcount raised from 1 to 2.
    let mut bytes = DEMO.to_vec();
    let be = |b: &[u8], at: usize, n: usize| {
        b[at..at + n]
            .iter()
            .fold(0u64, |a, x| a << 8 | u64::from(*x))
    };
    assert_eq!(be(&bytes, 96, 4), 4, "16-bit refcounts");
    let table = be(&bytes, 48, 8) as usize;
    let block = (be(&bytes, table, 8) & !511) as usize;
    assert_eq!(be(&bytes, block, 2), 1);
    bytes[block + 1] = 2;
    let mut img = QcowImage::open(
        "leak.qcow2",
        Uint8Array::from(&bytes[..]).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let f = lines();
    let check = img.check(Some(f.clone())).unwrap();
    assert_eq!(get(&check, &["leaks"]).as_f64(), Some(1.0));
    let got: js_sys::Array = get(&f, &["got"]).dyn_into().unwrap();
    assert_eq!(got.length(), 1);
    assert_eq!(
        got.get(0).as_string().unwrap(),
        "Leaked cluster 0 refcount=2 reference=1"
    );
    let err: JsValue = img.check(Some(thrower())).err().unwrap().into();
    assert!(get(&err, &["message"])
        .as_string()
        .unwrap()
        .contains("onProblem threw"));
}

/// The message of a thrown error (as JavaScript sees it).
fn message<T>(r: Result<T, QcowError>) -> String {
    let err: JsValue = r.err().expect("an error").into();
    get(&err, &["message"]).as_string().unwrap()
}

fn num(v: &JsValue, key: &str) -> Option<f64> {
    get(v, &[key]).as_f64()
}

/// The guest pattern of [`written_image`]: byte `i` is `i % 251`.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A 4 MiB image (64 KiB clusters, 16-bit refcounts) holding
/// [`pattern`] in its first MiB, in a storage object.
fn written_image() -> JsValue {
    let storage = memStorage(JsValue::UNDEFINED);
    create_image(storage.clone(), options(&[("size", "4M".into())])).unwrap();
    let mut img = QcowImage::open_writable(
        "r.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    img.write(0.0, &pattern(1 << 20)).unwrap();
    img.flush().unwrap();
    drop(img);
    storage
}

/// The header cluster's offset of cluster `c`'s 16-bit refcount (the
/// first refcount block covers the small test images).
fn refcount_at(bytes: &[u8], c: u64) -> usize {
    let table = be64(bytes, 48) as usize;
    (be64(bytes, table) & !511) as usize + 2 * c as usize
}

/// The guest contents of `storage` opened read-only (first `len` bytes).
fn guest(storage: JsValue, len: u32) -> Vec<u8> {
    let mut img =
        QcowImage::open("x.qcow2", storage, JsValue::UNDEFINED, JsValue::UNDEFINED).unwrap();
    img.read(0.0, len).unwrap().to_vec()
}

#[wasm_bindgen_test]
fn check_of_a_written_image_sees_the_file_as_it_is_now() {
    // Writes past the end of the file as it was opened: the check of the
    // same object must count them (not report references past the end).
    let storage = memStorage(JsValue::UNDEFINED);
    create_image(storage.clone(), options(&[("size", "64M".into())])).unwrap();
    let mut img = QcowImage::open_writable(
        "g.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    img.write(0.0, &[1u8; 1 << 20]).unwrap();
    img.write(40.0 * 1048576.0, &[2u8; 1 << 20]).unwrap();
    let f = lines();
    let check = img.check(Some(f.clone())).unwrap();
    assert_eq!(json(&get(&f, &["got"])), "[]");
    assert!(
        get(&check, &["corruptions"]).is_undefined(),
        "{}",
        json(&check)
    );
    assert!(get(&check, &["leaks"]).is_undefined(), "{}", json(&check));
    assert_eq!(num(&check, "allocated-clusters"), Some(32.0));
}

#[wasm_bindgen_test]
fn repair_leaks_frees_leaked_clusters_and_keeps_the_data() {
    let storage = written_image();
    let mut bytes = storage_bytes(&storage);
    let at = refcount_at(&bytes, 0);
    assert_eq!(be(&bytes, at, 2), 1);
    bytes[at + 1] = 3; // the header cluster: refcount 3, one reference
    let leaky = memStorage(Uint8Array::from(&bytes[..]).into());
    // A read-only image cannot be repaired.
    let mut ro = QcowImage::open(
        "r.qcow2",
        leaky.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    assert!(message(ro.repair("leaks", None)).contains("read-only"));
    drop(ro);

    let mut img = QcowImage::open_for_repair("r.qcow2", leaky.clone()).unwrap();
    assert!(message(img.repair("some", None)).contains("\"leaks\" or \"all\""));
    let f = lines();
    let r = img.repair("leaks", Some(f.clone())).unwrap();
    assert_eq!(num(&r, "leaks-fixed"), Some(1.0), "{}", json(&r));
    assert!(get(&r, &["leaks"]).is_undefined());
    assert!(get(&r, &["corruptions"]).is_undefined());
    assert_eq!(num(&r, "check-errors"), Some(0.0));
    assert_eq!(get(&r, &["filename"]).as_string().unwrap(), "r.qcow2");
    assert_eq!(num(&get(&r, &["found"]), "leaks"), Some(1.0));
    assert_eq!(get(&r, &["rebuilt"]).as_bool(), Some(false));
    let got: Vec<String> = js_sys::Array::from(&get(&f, &["got"]))
        .iter()
        .map(|l| l.as_string().unwrap())
        .collect();
    assert_eq!(
        got,
        [
            "Leaked cluster 0 refcount=3 reference=1",
            "Repairing cluster 0 refcount=3 reference=1"
        ]
    );
    // The image opened for repair is not for guest writes.
    assert!(message(img.write(0.0, &[1])).contains("openWritable"));
    assert!(message(img.resize("8M".into(), JsValue::UNDEFINED)).contains("openWritable"));
    assert!(message(img.create_snapshot("s")).contains("openWritable"));
    // The check of the same object, then of the bytes: clean.
    let again = img.check(None).unwrap();
    assert!(get(&again, &["leaks"]).is_undefined(), "{}", json(&again));
    drop(img);
    let after = storage_bytes(&leaky);
    assert_eq!(be(&after, refcount_at(&after, 0), 2), 1);
    let mut img = QcowImage::open(
        "r.qcow2",
        leaky.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let check = img.check(None).unwrap();
    assert!(get(&check, &["leaks"]).is_undefined());
    assert_eq!(guest(leaky, 1 << 20), pattern(1 << 20));
    // Repairing a clean image changes nothing.
    let before = storage_bytes(&storage);
    let mut img = QcowImage::open_writable(
        "r.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let r = img.repair("all", None).unwrap();
    assert!(get(&r, &["leaks-fixed"]).is_undefined());
    assert!(get(&r, &["corruptions-fixed"]).is_undefined());
    drop(img);
    assert_eq!(storage_bytes(&storage), before);
}

#[wasm_bindgen_test]
fn repair_all_rebuilds_the_refcounts_of_an_image_marked_corrupt() {
    let storage = written_image();
    let mut bytes = storage_bytes(&storage);
    // The L2 table's refcount 0 (the structure must be rebuilt), and the
    // corrupt bit set: openWritable refuses the image.
    let l1 = be64(&bytes, 40) as usize;
    let l2 = be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00;
    let at = refcount_at(&bytes, l2 >> 16);
    bytes[at..at + 2].copy_from_slice(&[0, 0]);
    bytes[79] |= 2;
    let broken = memStorage(Uint8Array::from(&bytes[..]).into());
    assert!(message(QcowImage::open_writable(
        "c.qcow2",
        broken.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED
    ))
    .contains("corrupt"));
    let mut img = QcowImage::open_for_repair("c.qcow2", broken.clone()).unwrap();
    let info = img.info().unwrap();
    assert_eq!(
        get(&info, &["format-specific", "data", "corrupt"]).as_bool(),
        Some(true)
    );
    // "leaks" cannot fix it: the message says what can.
    let msg = message(img.repair("leaks", None));
    assert!(msg.contains("\"all\""), "{msg}");
    let f = lines();
    let r = img.repair("all", Some(f.clone())).unwrap();
    assert_eq!(get(&r, &["rebuilt"]).as_bool(), Some(true), "{}", json(&r));
    assert!(num(&r, "corruptions-fixed").unwrap() >= 1.0, "{}", json(&r));
    assert!(get(&r, &["corruptions"]).is_undefined(), "{}", json(&r));
    assert!(get(&r, &["leaks"]).is_undefined(), "{}", json(&r));
    assert!(num(&get(&r, &["found"]), "corruptions").unwrap() >= 1.0);
    let got = json(&get(&f, &["got"]));
    assert!(got.contains("Rebuilding refcount structure"), "{got}");
    let info = img.info().unwrap();
    assert!(
        get(&info, &["format-specific", "data", "corrupt"]).is_undefined()
            || get(&info, &["format-specific", "data", "corrupt"]).as_bool() == Some(false)
    );
    drop(img);
    // Writable again, clean, the same guest data.
    let mut img = QcowImage::open_writable(
        "c.qcow2",
        broken.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let check = img.check(None).unwrap();
    assert!(
        get(&check, &["corruptions"]).is_undefined(),
        "{}",
        json(&check)
    );
    assert!(get(&check, &["leaks"]).is_undefined(), "{}", json(&check));
    drop(img);
    assert_eq!(guest(broken, 1 << 20), pattern(1 << 20));
}

#[wasm_bindgen_test]
fn resize_grows_and_shrinks_by_qemu_img_rules() {
    let storage = written_image();
    let mut img = QcowImage::open_writable(
        "z.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    img.write(3.0 * 1048576.0, &[0x77; 65536]).unwrap();
    assert_eq!(
        img.resize("+12M".into(), JsValue::UNDEFINED).unwrap(),
        16.0 * 1048576.0
    );
    assert_eq!(img.virtual_size().unwrap(), 16.0 * 1048576.0);
    let info = img.info().unwrap();
    assert_eq!(num(&info, "virtual-size"), Some(16.0 * 1048576.0));
    img.write(15.0 * 1048576.0, &[0x88; 4096]).unwrap();
    assert_eq!(img.read(0.0, 1 << 20).unwrap().to_vec(), pattern(1 << 20));
    // Shrinking needs shrink: true.
    let msg = message(img.resize((2.0 * 1048576.0).into(), JsValue::UNDEFINED));
    assert!(
        msg.starts_with("Use the shrink: true option to perform a shrink operation."),
        "{msg}"
    );
    let msg = message(img.resize("2M".into(), options(&[("shrink", false.into())])));
    assert!(msg.contains("shrink: true"), "{msg}");
    assert_eq!(img.virtual_size().unwrap(), 16.0 * 1048576.0);
    // qemu-img's other refusals.
    assert_eq!(
        message(img.resize(
            "2M".into(),
            options(&[("shrink", true.into()), ("preallocation", "full".into())])
        )),
        "Preallocation can only be used for growing images"
    );
    assert_eq!(
        message(img.resize("+1000".into(), JsValue::UNDEFINED)),
        "The new size must be a multiple of 512"
    );
    assert_eq!(
        message(img.resize(0.0.into(), options(&[("shrink", true.into())]))),
        "New image size must be positive"
    );
    assert!(
        message(img.resize("-20M".into(), options(&[("shrink", true.into())])))
            .contains("positive")
    );
    assert!(message(img.resize("lots".into(), JsValue::UNDEFINED)).contains("invalid size"));
    assert!(
        message(img.resize("+1M".into(), options(&[("preallocation", "some".into())])))
            .contains("Invalid preallocation mode 'some'")
    );
    assert!(
        message(img.resize("+1M".into(), options(&[("shrink", "yes".into())]))).contains("boolean")
    );
    // Shrink, relative and absolute: the data below the new end is kept.
    assert_eq!(
        img.resize("-12M".into(), options(&[("shrink", true.into())]))
            .unwrap(),
        4.0 * 1048576.0
    );
    assert_eq!(
        img.resize(
            (3.5 * 1048576.0).into(),
            options(&[("shrink", true.into())])
        )
        .unwrap(),
        3.5 * 1048576.0
    );
    assert_eq!(img.read(0.0, 1 << 20).unwrap().to_vec(), pattern(1 << 20));
    assert!(img
        .read(3.0 * 1048576.0, 65536)
        .unwrap()
        .to_vec()
        .iter()
        .all(|b| *b == 0x77));
    assert!(
        img.read(3.5 * 1048576.0 - 1.0, 2).is_err(),
        "reads past the end fail"
    );
    // Growing with preallocation.
    assert_eq!(
        img.resize(
            "8M".into(),
            options(&[("preallocation", "metadata".into())])
        )
        .unwrap(),
        8.0 * 1048576.0
    );
    let check = img.check(None).unwrap();
    assert!(
        get(&check, &["corruptions"]).is_undefined(),
        "{}",
        json(&check)
    );
    assert!(get(&check, &["leaks"]).is_undefined(), "{}", json(&check));
    drop(img);
    assert_eq!(guest(storage.clone(), 1 << 20), pattern(1 << 20));
    let mut ro =
        QcowImage::open("z.qcow2", storage, JsValue::UNDEFINED, JsValue::UNDEFINED).unwrap();
    assert_eq!(ro.virtual_size().unwrap(), 8.0 * 1048576.0);
    assert!(message(ro.resize("+1M".into(), JsValue::UNDEFINED)).contains("read-only"));
}

#[wasm_bindgen_test]
fn snapshots_are_taken_listed_applied_and_deleted() {
    let storage = written_image();
    let mut img = QcowImage::open_writable(
        "s.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    assert_eq!(json(&img.snapshots().unwrap()), "[]");
    let before = js_sys::Date::now() / 1000.0;
    assert_eq!(img.create_snapshot("one").unwrap(), "1");
    img.write(0.0, &[0xee; 8192]).unwrap();
    assert_eq!(img.create_snapshot("two").unwrap(), "2");
    let after = js_sys::Date::now() / 1000.0;
    let list = js_sys::Array::from(&img.snapshots().unwrap());
    assert_eq!(list.length(), 2);
    let names: Vec<String> = list
        .iter()
        .map(|s| get(&s, &["name"]).as_string().unwrap())
        .collect();
    assert_eq!(names, ["one", "two"]);
    let first = list.get(0);
    assert_eq!(get(&first, &["id"]).as_string().unwrap(), "1");
    let date = num(&first, "date-sec").unwrap() + num(&first, "date-nsec").unwrap() / 1e9;
    assert!(
        date >= before.floor() && date <= after + 1.0,
        "{date} in {before}..{after}"
    );
    assert_eq!(num(&first, "vm-state-size"), Some(0.0));
    assert_eq!(num(&first, "vm-clock-sec"), Some(0.0));
    assert_eq!(num(&first, "vm-clock-nsec"), Some(0.0));
    assert_eq!(num(&first, "icount"), Some(0.0));
    // The same list as info().
    let info = img.info().unwrap();
    assert_eq!(json(&get(&info, &["snapshots"])), json(&list));
    // Applied by name, then by ID.
    img.apply_snapshot("one").unwrap();
    assert_eq!(img.read(0.0, 1 << 20).unwrap().to_vec(), pattern(1 << 20));
    img.apply_snapshot("2").unwrap();
    assert!(img
        .read(0.0, 8192)
        .unwrap()
        .to_vec()
        .iter()
        .all(|b| *b == 0xee));
    assert_eq!(
        message(img.apply_snapshot("three")),
        "Could not apply snapshot 'three': Failed to load snapshot: No such file or directory"
    );
    // Deleted by name.
    img.delete_snapshot("one").unwrap();
    assert_eq!(
        message(img.delete_snapshot("one")),
        "Could not delete snapshot 'one': snapshot not found"
    );
    let list = js_sys::Array::from(&img.snapshots().unwrap());
    assert_eq!(list.length(), 1);
    assert_eq!(get(&list.get(0), &["name"]).as_string().unwrap(), "two");
    let check = img.check(None).unwrap();
    assert!(
        get(&check, &["corruptions"]).is_undefined(),
        "{}",
        json(&check)
    );
    assert!(get(&check, &["leaks"]).is_undefined(), "{}", json(&check));
    drop(img);
    // Read-only images list snapshots and refuse to take them.
    let mut ro = QcowImage::open(
        "s.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    assert_eq!(js_sys::Array::from(&ro.snapshots().unwrap()).length(), 1);
    assert!(message(ro.create_snapshot("x")).contains("read-only"));
    assert!(message(ro.delete_snapshot("two")).contains("read-only"));
    assert!(message(ro.apply_snapshot("two")).contains("read-only"));
    let check = ro.check(None).unwrap();
    assert!(get(&check, &["leaks"]).is_undefined(), "{}", json(&check));
}

/// The `code` of a thrown error (as JavaScript sees it), and its name.
fn code<T>(r: Result<T, QcowError>) -> (String, String) {
    let err: JsValue = r.err().expect("an error").into();
    assert!(err.is_instance_of::<js_sys::Error>(), "a JS Error");
    (
        get(&err, &["code"]).as_string().unwrap(),
        get(&err, &["name"]).as_string().unwrap(),
    )
}

#[wasm_bindgen_test]
fn host_layout_covers_the_file_and_names_what_each_cluster_holds() {
    let mut img = QcowImage::open(
        "demo.qcow2",
        Uint8Array::from(DEMO).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let runs = js_sys::Array::from(&img.host_layout().unwrap());
    let mut pos = 0.0;
    let mut kinds = std::collections::BTreeMap::new();
    let at = |offset: u64| -> String {
        runs.iter()
            .find(|r| {
                let s = num(r, "start").unwrap();
                s <= offset as f64 && (offset as f64) < s + num(r, "len").unwrap()
            })
            .map(|r| get(&r, &["kind"]).as_string().unwrap())
            .unwrap()
    };
    assert_eq!(at(0), "header");
    assert_eq!(at(be64(DEMO, 40)), "l1");
    assert_eq!(at(be64(DEMO, 48)), "refcount-table");
    assert_eq!(at(be64(DEMO, 64)), "snapshot-table");
    for r in runs.iter() {
        assert_eq!(num(&r, "start"), Some(pos), "runs are consecutive");
        let len = num(&r, "len").unwrap();
        *kinds
            .entry(get(&r, &["kind"]).as_string().unwrap())
            .or_insert(0.0) += len;
        pos += len;
    }
    assert_eq!(pos, DEMO.len() as f64, "runs cover the file");
    for k in [
        "l2",
        "refcount-block",
        "compressed",
        "bitmap",
        "snapshot-l1",
    ] {
        assert!(kinds.contains_key(k), "{k} in {kinds:?}");
    }
    assert!(!kinds.contains_key("leaked"), "{kinds:?}");

    // A writable image: what was written is flushed and described.
    let storage = memStorage(JsValue::UNDEFINED);
    create_image(storage.clone(), options(&[("size", "8M".into())])).unwrap();
    let mut w =
        QcowImage::open_writable("w.qcow2", storage, JsValue::UNDEFINED, JsValue::UNDEFINED)
            .unwrap();
    w.write(0.0, &[9u8; 3 * 65536]).unwrap();
    let runs = js_sys::Array::from(&w.host_layout().unwrap());
    let data: f64 = runs
        .iter()
        .filter(|r| get(r, &["kind"]).as_string().unwrap() == "data")
        .map(|r| num(&r, "len").unwrap())
        .sum();
    assert_eq!(data, 3.0 * 65536.0);
}

#[wasm_bindgen_test]
fn errors_are_js_errors_with_stable_codes() {
    let code_only = |r: (String, String)| r.0;
    assert_eq!(
        code_only(code(QcowImage::open(
            "x",
            Uint8Array::from(&b"not an image at all"[..]).into(),
            JsValue::UNDEFINED,
            JsValue::UNDEFINED
        ))),
        "format"
    );
    assert_eq!(
        code_only(code(QcowImage::open(
            "x",
            JsValue::from(42),
            JsValue::UNDEFINED,
            JsValue::UNDEFINED
        ))),
        "invalid-argument"
    );
    let top = create_image_bytes(options(&[
        ("size", "1M".into()),
        ("backing_file", "base.qcow2".into()),
    ]))
    .unwrap();
    assert_eq!(
        code_only(code(QcowImage::open(
            "top.qcow2",
            top.into(),
            JsValue::UNDEFINED,
            JsValue::UNDEFINED
        ))),
        "missing-backing"
    );
    let mut img = QcowImage::open(
        "demo.qcow2",
        Uint8Array::from(DEMO).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    assert_eq!(code_only(code(img.read(67108864.0, 1))), "out-of-bounds");
    assert_eq!(code_only(code(img.write(0.0, &[1]))), "read-only");
    assert_eq!(code_only(code(img.read(-1.0, 1))), "invalid-argument");
    assert_eq!(
        code_only(code(img.read(9_007_199_254_740_992.0, 1))),
        "invalid-argument"
    );
    assert_eq!(
        code_only(code(img.allocation(options(&[("end", 1e18.into())])))),
        "invalid-argument"
    );
    assert_eq!(
        code_only(code(
            img.allocation(options(&[("start", 67108865.0.into())]))
        )),
        "out-of-bounds"
    );
    assert_eq!(
        code_only(code(create_image_bytes(options(&[
            ("size", "1M".into()),
            ("cluster_size", 3000.into())
        ])))),
        "invalid-argument"
    );
    let mut w = QcowImage::open_writable(
        "r.qcow2",
        written_image(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    assert_eq!(code_only(code(w.delete_snapshot("none"))), "not-found");
    // A callback that throws an AbortError stops the work: code "aborted".
    let mut leaky = DEMO.to_vec();
    let block = (be64(&leaky, be64(&leaky, 48) as usize) & !511) as usize;
    leaky[block + 1] = 2;
    let mut leaky = QcowImage::open(
        "l",
        Uint8Array::from(&leaky[..]).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let (c, name) = code(leaky.check(Some(abort_thrower())));
    assert_eq!((c.as_str(), name.as_str()), ("aborted", "AbortError"));
    let sink = abort_thrower();
    assert_eq!(
        code(img.convert_to_raw(&sink, JsValue::UNDEFINED)).0,
        "aborted"
    );
    // A storage failure: "io"; one carrying one of our codes keeps it.
    let failing = failing_storage(DEMO.len() as f64, "");
    assert_eq!(
        code_only(code(QcowImage::open(
            "f",
            failing,
            JsValue::UNDEFINED,
            JsValue::UNDEFINED
        ))),
        "io"
    );
    let failing = failing_storage(DEMO.len() as f64, "busy");
    assert_eq!(
        code_only(code(QcowImage::open(
            "f",
            failing,
            JsValue::UNDEFINED,
            JsValue::UNDEFINED
        ))),
        "busy"
    );
}

#[wasm_bindgen(inline_js = r#"
export function abort_thrower() {
  return () => { const e = new Error("stop"); e.name = "AbortError"; throw e; };
}
export function failing_storage(size, code) {
  return {
    read() { const e = new Error("disk on fire"); if (code) e.code = code; throw e; },
    size() { return size; },
  };
}
export function far_storage(inner) {
  // Records every offset the wasm asks for.
  const seen = [];
  return { seen, read(o, n) { seen.push(o); return inner.read(o, n); }, size() { return inner.size(); } };
}
"#)]
extern "C" {
    fn abort_thrower() -> Function;
    fn failing_storage(size: f64, code: &str) -> JsValue;
    fn far_storage(inner: &JsValue) -> JsValue;
}

#[wasm_bindgen_test]
fn file_offsets_beyond_2_pow_53_are_refused_not_rounded() {
    // Guest cluster 0 of a small image pointed at host offset 2^54 + 65536
    // (valid qcow2; beyond what a JS number holds exactly).
    let storage = written_image();
    let mut bytes = storage_bytes(&storage);
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let far = (1u64 << 54) + 65536;
    bytes[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | far).to_be_bytes());
    let inner = memStorage(Uint8Array::from(&bytes[..]).into());
    let spy = far_storage(&inner);
    let mut img = QcowImage::open(
        "far.qcow2",
        spy.clone(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let (c, _) = code(img.read(0.0, 512));
    assert_eq!(c, "out-of-bounds");
    let seen = js_sys::Array::from(&get(&spy, &["seen"]));
    assert!(
        seen.iter()
            .all(|o| o.as_f64().unwrap() <= 9_007_199_254_740_991.0),
        "the storage never saw a rounded offset"
    );
    // qemu-img map's offset of that cluster is refused the same way.
    let err: JsValue = img.map().err().unwrap().into();
    assert_eq!(get(&err, &["code"]).as_string().unwrap(), "unsupported");
    let msg = get(&err, &["message"]).as_string().unwrap();
    assert!(msg.contains("18014398509547520"), "{msg}");
    assert!(msg.contains("MAX_SAFE_INTEGER"), "{msg}");
}

#[wasm_bindgen(inline_js = r#"
export function progress_log() {
  const got = [];
  const f = (done, total) => { got.push([done, total]); };
  f.got = got;
  return f;
}
"#)]
extern "C" {
    fn progress_log() -> Function;
}

#[wasm_bindgen_test]
fn conversions_into_qcow2_with_progress_read_back_the_same() {
    let mut img = QcowImage::open(
        "demo.qcow2",
        Uint8Array::from(DEMO).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let want = img.read(0.0, 8 << 20).unwrap().to_vec();
    // One call, zstd-compressed, 16 KiB clusters, extended L2.
    let target = memStorage(JsValue::UNDEFINED);
    let log = progress_log();
    img.convert_to_qcow2(
        target.clone(),
        options(&[
            ("compress", true.into()),
            ("compression_type", "zstd".into()),
            ("cluster_size", 16384.into()),
            ("extended_l2", true.into()),
            ("onProgress", log.clone().into()),
        ]),
    )
    .unwrap();
    let got = js_sys::Array::from(&get(&log, &["got"]));
    assert!(got.length() >= 2);
    assert_eq!(json(&got.get(0)), "[0,67108864]");
    assert_eq!(json(&got.get(got.length() - 1)), "[67108864,67108864]");
    let mut back =
        QcowImage::open("c.qcow2", target, JsValue::UNDEFINED, JsValue::UNDEFINED).unwrap();
    assert_eq!(back.read(0.0, 8 << 20).unwrap().to_vec(), want);
    let check = back.check(None).unwrap();
    assert!(num(&check, "compressed-clusters").unwrap() > 0.0);
    assert!(get(&check, &["corruptions"]).is_undefined());
    // In steps through a Qcow2Writer: copyFrom ranges, then write().
    let target = memStorage(JsValue::UNDEFINED);
    let mut w = qcowkit_wasm::Qcow2Writer::new(
        target.clone(),
        options(&[("size", "64M".into()), ("cluster_size", 65536.into())]),
    )
    .unwrap();
    assert_eq!(w.virtual_size().unwrap(), 67108864.0);
    let step = 6.0 * 1048576.0;
    let mut at = 0.0;
    while at < 67108864.0 {
        let end = f64::min(at + step, 67108864.0);
        w.copy_from(
            &mut img,
            options(&[("start", at.into()), ("end", end.into())]),
        )
        .unwrap();
        at = end;
    }
    w.write(65536.0, vec![0xee; 65536]).unwrap();
    assert_eq!(code(w.write(100.0, vec![1; 512])).0, "invalid-argument");
    w.finish().unwrap();
    let mut back =
        QcowImage::open("w.qcow2", target, JsValue::UNDEFINED, JsValue::UNDEFINED).unwrap();
    let mut expect = want.clone();
    expect[65536..131072].fill(0xee);
    assert_eq!(back.read(0.0, 8 << 20).unwrap().to_vec(), expect);
    assert!(get(&back.check(None).unwrap(), &["leaks"]).is_undefined());
    // Conversion options a standalone target cannot take are refused.
    assert_eq!(
        code(img.convert_to_qcow2(
            memStorage(JsValue::UNDEFINED),
            options(&[("backing_file", "b.qcow2".into())])
        ))
        .0,
        "invalid-argument"
    );
}
