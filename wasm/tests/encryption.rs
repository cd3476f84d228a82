//! Encrypted images through the JS API (run in Node): LUKS images made by
//! `createImageBytes({ encrypt })` opened without a passphrase (metadata),
//! with a wrong one and with the right one (string or bytes, or stored in
//! a `Passphrases` object), backing files with their own passphrases,
//! conversions into encrypted images, and the options refused. Images made
//! by qemu-img are judged in `judge.mjs`.

use js_sys::{Map, Object, Reflect, Uint8Array};
use qcowkit_wasm::{
    convert_raw_to_qcow2, create_image_bytes, Passphrases, Qcow2Writer, QcowError, QcowImage,
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
export function storageBytes(s) { return s.bytes(); }
"#)]
extern "C" {
    fn memStorage(initial: JsValue) -> JsValue;
    fn storageBytes(storage: &JsValue) -> Uint8Array;
}

const PASS: &str = "correct horse";

fn obj(pairs: &[(&str, JsValue)]) -> JsValue {
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

fn code<T>(r: Result<T, QcowError>) -> (String, String) {
    match r {
        Ok(_) => ("no error".into(), String::new()),
        Err(e) => (e.code.as_str().to_string(), e.message),
    }
}

/// `{ passphrase }` (a string or bytes).
fn with(passphrase: JsValue) -> JsValue {
    obj(&[("passphrase", passphrase)])
}

/// Fast LUKS options: QEMU's minimum of PBKDF2 iterations.
fn luks(passphrase: &str, extra: &[(&str, JsValue)]) -> JsValue {
    let mut pairs = vec![
        ("passphrase", JsValue::from_str(passphrase)),
        ("iterations", JsValue::from_f64(1000.0)),
    ];
    pairs.extend(extra.iter().cloned());
    obj(&pairs)
}

/// A new 4 MiB LUKS image (`extra`: more creation options).
fn encrypted_image(passphrase: &str, extra: &[(&str, JsValue)]) -> Vec<u8> {
    let mut pairs = vec![
        ("size", JsValue::from_str("4M")),
        ("encrypt", luks(passphrase, &[])),
    ];
    pairs.extend(extra.iter().cloned());
    create_image_bytes(obj(&pairs)).unwrap().to_vec()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn mem(bytes: &[u8]) -> JsValue {
    memStorage(Uint8Array::from(bytes).into())
}

#[wasm_bindgen_test]
fn without_a_passphrase_an_encrypted_image_opens_for_its_metadata() {
    let storage = mem(&encrypted_image(PASS, &[]));
    let mut w = QcowImage::open_writable(
        "e.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        with(PASS.into()),
    )
    .unwrap();
    w.write(0.0, &pattern(65536, 1)).unwrap();
    w.flush().unwrap();
    drop(w);
    let bytes = storageBytes(&storage).to_vec();
    let mut img = QcowImage::open(
        "e.qcow2",
        Uint8Array::from(&bytes[..]).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let info = img.info().unwrap();
    assert_eq!(get(&info, &["encrypted"]).as_bool(), Some(true));
    let e = get(&info, &["format-specific", "data", "encrypt"]);
    let s = |k: &str| get(&e, &[k]).as_string();
    assert_eq!(s("format").as_deref(), Some("luks"));
    assert_eq!(s("cipher-alg").as_deref(), Some("aes-256"));
    assert_eq!(s("cipher-mode").as_deref(), Some("xts"));
    assert_eq!(s("ivgen-alg").as_deref(), Some("plain64"));
    assert_eq!(s("hash-alg").as_deref(), Some("sha256"));
    assert!(get(&e, &["ivgen-hash-alg"]).is_undefined());
    assert_eq!(s("uuid").map(|u| u.len()), Some(36));
    assert_eq!(get(&e, &["master-key-iters"]).as_f64(), Some(1000.0));
    let slots = js_sys::Array::from(&get(&e, &["slots"]));
    assert_eq!(slots.length(), 8);
    assert_eq!(get(&slots.get(0), &["active"]).as_bool(), Some(true));
    assert_eq!(get(&slots.get(0), &["iters"]).as_f64(), Some(1000.0));
    assert_eq!(get(&slots.get(0), &["stripes"]).as_f64(), Some(4000.0));
    for i in 1..8 {
        let slot = slots.get(i);
        assert_eq!(get(&slot, &["active"]).as_bool(), Some(false));
        assert!(get(&slot, &["iters"]).is_undefined());
        assert!(get(&slot, &["key-offset"]).as_f64().unwrap() > 0.0);
    }
    // The metadata works; the data needs the passphrase.
    assert_eq!(
        get(&img.check(None).unwrap(), &["check-errors"]).as_f64(),
        Some(0.0)
    );
    let (c, m) = code(img.read(0.0, 512));
    assert_eq!(c, "passphrase-required");
    assert!(m.contains("a passphrase is required"), "{m}");
    assert_eq!(code(img.contents()).0, "passphrase-required");
    let (c, _) = code(QcowImage::open_writable(
        "e.qcow2",
        mem(&bytes),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    ));
    assert_eq!(c, "passphrase-required");
}

#[wasm_bindgen_test]
fn a_wrong_passphrase_is_refused_and_the_right_one_reads_and_writes() {
    let bytes = encrypted_image(PASS, &[]);
    for wrong in [
        JsValue::from_str("wrong horse"),
        JsValue::from_str(""),
        Uint8Array::from(&b"correct horsE"[..]).into(),
    ] {
        let (c, m) = code(QcowImage::open(
            "e.qcow2",
            mem(&bytes),
            JsValue::UNDEFINED,
            with(wrong),
        ));
        assert_eq!(c, "invalid-passphrase");
        assert_eq!(m, "Invalid password, cannot unlock any keyslot");
    }
    let storage = mem(&bytes);
    let mut w = QcowImage::open_writable(
        "e.qcow2",
        storage.clone(),
        JsValue::UNDEFINED,
        with(PASS.into()),
    )
    .unwrap();
    assert_eq!(w.read(0.0, 4096).unwrap().to_vec(), vec![0u8; 4096]);
    let data = pattern(100_000, 7);
    w.write(12345.0, &data).unwrap();
    w.flush().unwrap();
    drop(w);
    let file = storageBytes(&storage).to_vec();
    // Encrypted on disk: the pattern is nowhere in the file.
    assert!(!file.windows(64).any(|win| win == &data[..64]));
    // The passphrase as bytes (its UTF-8) opens it the same.
    let mut r = QcowImage::open(
        "e.qcow2",
        mem(&file),
        JsValue::UNDEFINED,
        with(Uint8Array::from(PASS.as_bytes()).into()),
    )
    .unwrap();
    assert_eq!(r.read(12345.0, 100_000).unwrap().to_vec(), data);
    assert_eq!(r.read(0.0, 12345).unwrap().to_vec(), vec![0u8; 12345]);
    assert_eq!(
        get(&r.check(None).unwrap(), &["check-errors"]).as_f64(),
        Some(0.0)
    );
}

#[wasm_bindgen_test]
fn passphrases_objects_open_more_than_once() {
    let bytes = encrypted_image(PASS, &[]);
    let keys = Passphrases::new(with(PASS.into())).unwrap();
    let storage = mem(&bytes);
    let mut w = keys
        .open_writable("e.qcow2", storage.clone(), JsValue::UNDEFINED)
        .unwrap();
    w.write(0.0, &[0x5a; 4096]).unwrap();
    w.flush().unwrap();
    drop(w);
    let mut r = keys
        .open("e.qcow2", storage.clone(), JsValue::UNDEFINED)
        .unwrap();
    assert_eq!(r.read(0.0, 4096).unwrap().to_vec(), vec![0x5a; 4096]);
    let wrong = Passphrases::new(with("nope".into())).unwrap();
    assert_eq!(
        code(wrong.open("e.qcow2", storage, JsValue::UNDEFINED)).0,
        "invalid-passphrase"
    );
}

#[wasm_bindgen_test]
fn backing_files_are_unlocked_with_their_own_passphrases() {
    // base.qcow2 (passphrase "base pass") <- top.qcow2 (its own passphrase).
    let base_storage = mem(&encrypted_image("base pass", &[]));
    let mut b = QcowImage::open_writable(
        "base.qcow2",
        base_storage.clone(),
        JsValue::UNDEFINED,
        with("base pass".into()),
    )
    .unwrap();
    b.write(0.0, &pattern(1 << 20, 3)).unwrap();
    b.flush().unwrap();
    drop(b);
    let base = storageBytes(&base_storage).to_vec();
    let top = encrypted_image(
        PASS,
        &[
            ("backing_file", "base.qcow2".into()),
            ("backing_fmt", "qcow2".into()),
        ],
    );
    let files = || obj(&[("base.qcow2", mem(&base))]);
    let open = |backing: JsValue| {
        QcowImage::open(
            "top.qcow2",
            mem(&top),
            files(),
            obj(&[("passphrase", PASS.into()), ("backingPassphrases", backing)]),
        )
    };
    // By the name the top image stores (a plain object or a Map).
    let mut img = open(obj(&[("base.qcow2", "base pass".into())])).unwrap();
    assert_eq!(
        img.read(0.0, 1 << 20).unwrap().to_vec(),
        pattern(1 << 20, 3)
    );
    let map = Map::new();
    map.set(
        &"base.qcow2".into(),
        &Uint8Array::from(&b"base pass"[..]).into(),
    );
    let mut img = open(map.into()).unwrap();
    assert_eq!(
        img.read(4096.0, 512).unwrap().to_vec(),
        pattern(1 << 20, 3)[4096..4608]
    );
    // Without it: the top opens, reading through to the base says which file needs one.
    let mut img = open(obj(&[])).unwrap();
    let (c, m) = code(img.read(0.0, 512));
    assert_eq!(c, "passphrase-required");
    assert!(m.contains("base.qcow2"), "{m}");
    // The top's passphrase is not the base's; a wrong one names the base.
    let (c, m) = code(open(obj(&[("base.qcow2", PASS.into())])));
    assert_eq!(c, "invalid-passphrase");
    assert!(
        m.contains("base.qcow2") && m.contains("Invalid password"),
        "{m}"
    );
}

#[wasm_bindgen_test]
fn conversions_write_encrypted_images() {
    let raw = pattern(3 << 20, 11);
    let target = memStorage(JsValue::UNDEFINED);
    convert_raw_to_qcow2(
        mem(&raw),
        target.clone(),
        obj(&[(
            "encrypt",
            luks(
                PASS,
                &[
                    ("cipherAlg", "aes-128".into()),
                    ("cipherMode", "cbc".into()),
                    ("ivgenAlg", "essiv".into()),
                    ("ivgenHashAlg", "sha256".into()),
                    ("hashAlg", "sha1".into()),
                ],
            ),
        )]),
    )
    .unwrap();
    let out = storageBytes(&target).to_vec();
    let mut img =
        QcowImage::open("c.qcow2", mem(&out), JsValue::UNDEFINED, with(PASS.into())).unwrap();
    let e = get(
        &img.info().unwrap(),
        &["format-specific", "data", "encrypt"],
    );
    assert_eq!(
        get(&e, &["cipher-alg"]).as_string().as_deref(),
        Some("aes-128")
    );
    assert_eq!(
        get(&e, &["cipher-mode"]).as_string().as_deref(),
        Some("cbc")
    );
    assert_eq!(
        get(&e, &["ivgen-alg"]).as_string().as_deref(),
        Some("essiv")
    );
    assert_eq!(
        get(&e, &["ivgen-hash-alg"]).as_string().as_deref(),
        Some("sha256")
    );
    assert_eq!(get(&e, &["hash-alg"]).as_string().as_deref(), Some("sha1"));
    assert_eq!(img.read(0.0, raw.len() as u32).unwrap().to_vec(), raw);
    // An encrypted image into another one, with another passphrase (and iterTime).
    let again = memStorage(JsValue::UNDEFINED);
    img.convert_to_qcow2(
        again.clone(),
        obj(&[(
            "encrypt",
            obj(&[
                ("passphrase", "other".into()),
                ("iterTime", JsValue::from_f64(10.0)),
            ]),
        )]),
    )
    .unwrap();
    let mut copy = QcowImage::open(
        "d.qcow2",
        mem(&storageBytes(&again).to_vec()),
        JsValue::UNDEFINED,
        with("other".into()),
    )
    .unwrap();
    assert_eq!(copy.read(0.0, raw.len() as u32).unwrap().to_vec(), raw);
    let e = get(
        &copy.info().unwrap(),
        &["format-specific", "data", "encrypt"],
    );
    assert!(get(&e, &["slots", "0", "iters"]).as_f64().unwrap() >= 1000.0);
    // Qcow2Writer, in steps.
    let w_target = memStorage(JsValue::UNDEFINED);
    let mut w = Qcow2Writer::new(
        w_target.clone(),
        obj(&[
            ("size", JsValue::from_f64(raw.len() as f64)),
            ("cluster_size", JsValue::from_f64(4096.0)),
            ("encrypt", luks(PASS, &[])),
        ]),
    )
    .unwrap();
    w.write(0.0, raw[..1 << 20].to_vec()).unwrap();
    w.copy_from(&mut img, obj(&[("start", JsValue::from_f64(1048576.0))]))
        .unwrap();
    w.finish().unwrap();
    drop(w);
    let mut back = QcowImage::open(
        "w.qcow2",
        mem(&storageBytes(&w_target).to_vec()),
        JsValue::UNDEFINED,
        with(PASS.into()),
    )
    .unwrap();
    assert_eq!(back.read(0.0, raw.len() as u32).unwrap().to_vec(), raw);
}

#[wasm_bindgen_test]
fn bad_options_are_refused_without_echoing_a_passphrase() {
    let bytes = encrypted_image(PASS, &[]);
    let open = |options: JsValue| {
        code(QcowImage::open(
            "e.qcow2",
            mem(&bytes),
            JsValue::UNDEFINED,
            options,
        ))
    };
    let (c, m) = open(obj(&[("password", "hunter2".into())]));
    assert_eq!(c, "invalid-argument");
    assert!(m.contains("password") && !m.contains("hunter2"), "{m}");
    let (c, m) = open(with(JsValue::from_f64(271828.0)));
    assert_eq!(c, "invalid-argument");
    assert!(!m.contains("271828"), "{m}");
    let (c, _) = open(obj(&[("backingPassphrases", "hunter2".into())]));
    assert_eq!(c, "invalid-argument");
    let (c, m) = open(obj(&[(
        "backingPassphrases",
        obj(&[("base.qcow2", JsValue::from_f64(4242.0))]),
    )]));
    assert_eq!(c, "invalid-argument");
    assert!(m.contains("base.qcow2") && !m.contains("4242"), "{m}");
    assert_eq!(open(JsValue::from_str("hunter2")).0, "invalid-argument");

    let create = |encrypt: JsValue, extra: &[(&str, JsValue)]| {
        let mut pairs = vec![("size", JsValue::from_str("1M")), ("encrypt", encrypt)];
        pairs.extend(extra.iter().cloned());
        code(create_image_bytes(obj(&pairs)))
    };
    let refused = |r: (String, String), what: &str| {
        assert_eq!(r.0, "invalid-argument", "{what}: {}", r.1);
        assert!(!r.1.contains("s3cret"), "{what}: {}", r.1);
        r.1
    };
    let m = refused(create(obj(&[]), &[]), "no passphrase");
    assert!(m.contains("passphrase is required"), "{m}");
    refused(
        create(luks("s3cret", &[("cipherAlg", "des".into())]), &[]),
        "cipher",
    );
    refused(
        create(
            luks(
                "s3cret",
                &[
                    ("cipherAlg", "aes-192".into()),
                    ("cipherMode", "cbc".into()),
                ],
            ),
            &[],
        ),
        "aes-192 without xts",
    );
    refused(
        create(luks("s3cret", &[("cipherMode", "gcm".into())]), &[]),
        "mode",
    );
    refused(
        create(luks("s3cret", &[("hashAlg", "md5".into())]), &[]),
        "hash",
    );
    refused(
        create(luks("s3cret", &[("colour", "red".into())]), &[]),
        "unknown key",
    );
    refused(
        create(
            obj(&[
                ("passphrase", "s3cret".into()),
                ("iterations", JsValue::from_f64(999.0)),
            ]),
            &[],
        ),
        "iterations below 1000",
    );
    refused(
        create(
            luks("s3cret", &[("iterTime", JsValue::from_f64(10.0))]),
            &[],
        ),
        "iterations and iterTime",
    );
    refused(create("s3cret".into(), &[]), "encrypt as a string");
    // The flat qemu-img names are not a way around the encrypt object.
    let (c, m) = code(create_image_bytes(obj(&[
        ("size", "1M".into()),
        ("encrypt.format", "luks".into()),
    ])));
    assert_eq!(c, "invalid-argument");
    assert!(m.contains("options.encrypt"), "{m}");
    // Compression and encryption, as qemu-img refuses them.
    let target = memStorage(JsValue::UNDEFINED);
    let (c, m) = code(convert_raw_to_qcow2(
        mem(&[1u8; 65536]),
        target,
        obj(&[("compress", true.into()), ("encrypt", luks("s3cret", &[]))]),
    ));
    assert_eq!(c, "invalid-argument");
    assert_eq!(
        m,
        "Compression and encryption not supported at the same time"
    );
}
