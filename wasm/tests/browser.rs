//! The browser storages, in a dedicated worker of headless Chromium: OPFS
//! synchronous access handles (read-write) and `Blob`s read with
//! `FileReaderSync`. Run by `cargo test --target wasm32-unknown-unknown`
//! with `CHROMEDRIVER` set.

use js_sys::{Array, Reflect, Uint8Array};
use qcowkit_wasm::{create_image, QcowImage};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;
use web_sys::{
    FileSystemDirectoryHandle, FileSystemFileHandle, FileSystemGetFileOptions,
    FileSystemSyncAccessHandle,
};

wasm_bindgen_test_configure!(run_in_dedicated_worker);

const DEMO: &[u8] = include_bytes!("../../examples/demo.qcow2");

async fn opfs_handle(name: &str) -> FileSystemSyncAccessHandle {
    let scope: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
    let dir: FileSystemDirectoryHandle =
        JsFuture::from(scope.navigator().storage().get_directory())
            .await
            .unwrap()
            .unchecked_into();
    let opts = FileSystemGetFileOptions::new();
    opts.set_create(true);
    let file: FileSystemFileHandle = JsFuture::from(dir.get_file_handle_with_options(name, &opts))
        .await
        .unwrap()
        .unchecked_into();
    JsFuture::from(file.create_sync_access_handle())
        .await
        .unwrap()
        .unchecked_into()
}

fn get(v: &JsValue, path: &[&str]) -> JsValue {
    let mut cur = v.clone();
    for p in path {
        cur = Reflect::get(&cur, &JsValue::from_str(p)).unwrap();
    }
    cur
}

#[wasm_bindgen_test]
async fn opfs_images_are_created_written_and_converted() {
    let handle = opfs_handle("test.qcow2").await;
    let opts = js_sys::Object::new();
    Reflect::set(&opts, &"size".into(), &"16M".into()).unwrap();
    Reflect::set(&opts, &"cluster_size".into(), &"16k".into()).unwrap();
    Reflect::set(&opts, &"extended_l2".into(), &true.into()).unwrap();
    create_image(handle.clone().into(), opts.into()).unwrap();
    let mut img = QcowImage::open_writable(
        "test.qcow2",
        handle.clone().into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    img.write(5000.0, &[0x5a; 70000]).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut img = QcowImage::open(
        "test.qcow2",
        handle.clone().into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let back = img.read(4096.0, 80000).unwrap().to_vec();
    assert!(back[..904].iter().all(|b| *b == 0));
    assert!(back[904..904 + 70000].iter().all(|b| *b == 0x5a));
    let check = img.check(None).unwrap();
    assert_eq!(get(&check, &["check-errors"]).as_f64(), Some(0.0));
    assert!(get(&check, &["corruptions"]).is_undefined());

    let raw = opfs_handle("test.raw").await;
    img.convert_to_raw_storage(raw.clone().into(), JsValue::UNDEFINED)
        .unwrap();
    assert_eq!(raw.get_size().unwrap(), 16.0 * 1024.0 * 1024.0);
    let mut buf = vec![0u8; 16];
    let ro = web_sys::FileSystemReadWriteOptions::new();
    ro.set_at(5000.0);
    raw.read_with_u8_array_and_options(&mut buf, &ro).unwrap();
    assert_eq!(buf, [0x5a; 16]);
    raw.close();
    handle.close();
}

#[wasm_bindgen_test]
fn blobs_are_read_with_file_reader_sync() {
    let parts = Array::of1(&Uint8Array::from(DEMO));
    let blob = web_sys::Blob::new_with_u8_array_sequence(&parts).unwrap();
    let mut img = QcowImage::open(
        "demo.qcow2",
        blob.into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let info = img.info().unwrap();
    assert_eq!(get(&info, &["virtual-size"]).as_f64(), Some(67108864.0));
    let mbr = img.read(0.0, 512).unwrap().to_vec();
    assert_eq!(&mbr[510..], &[0x55, 0xaa]);
    // What the disk holds, read from the Blob: an MBR with one Linux partition.
    let c = img.contents().unwrap();
    assert_eq!(
        get(&c, &["partition-table", "type"]).as_string().unwrap(),
        "mbr"
    );
    let first = Reflect::get(&get(&c, &["partitions"]), &0.into()).unwrap();
    assert_eq!(get(&first, &["start"]).as_f64(), Some(1048576.0));
    assert_eq!(get(&first, &["type"]).as_string().unwrap(), "Linux");
    // Blobs are read-only.
    let parts = Array::of1(&Uint8Array::from(DEMO));
    let blob = web_sys::Blob::new_with_u8_array_sequence(&parts).unwrap();
    let written = QcowImage::open_writable(
        "demo.qcow2",
        blob.into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .and_then(|mut i| i.write(0.0, &[1]).and_then(|_| i.flush()));
    assert!(written.is_err());
}

/// The demo image with one leaked cluster: the header cluster's 16-bit
/// refcount raised from 1 to 2.
fn leaky_demo() -> Vec<u8> {
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let mut bytes = DEMO.to_vec();
    let table = be(&bytes, 48) as usize;
    let block = (be(&bytes, table) & !511) as usize;
    assert_eq!(&bytes[block..block + 2], &[0, 1]);
    bytes[block + 1] = 2;
    bytes
}

#[wasm_bindgen_test]
async fn opfs_images_are_repaired_resized_and_snapshotted() {
    let handle = opfs_handle("maint.qcow2").await;
    let opts = js_sys::Object::new();
    Reflect::set(&opts, &"size".into(), &"64M".into()).unwrap();
    create_image(handle.clone().into(), opts.into()).unwrap();
    let want: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let mut img = QcowImage::open_writable(
        "maint.qcow2",
        handle.clone().into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    img.write(0.0, &want).unwrap();
    img.flush().unwrap();
    drop(img);
    // One leak: the header cluster's 16-bit refcount raised to 2.
    let at = |offset: u64| {
        let o = web_sys::FileSystemReadWriteOptions::new();
        o.set_at(offset as f64);
        o
    };
    let mut b8 = [0u8; 8];
    handle
        .read_with_u8_array_and_options(&mut b8, &at(48))
        .unwrap();
    let table = u64::from_be_bytes(b8);
    handle
        .read_with_u8_array_and_options(&mut b8, &at(table))
        .unwrap();
    let block = u64::from_be_bytes(b8) & !511;
    handle
        .write_with_u8_array_and_options(&[0, 2], &at(block))
        .unwrap();

    let mut img = QcowImage::open_for_repair("maint.qcow2", handle.clone().into()).unwrap();
    let r = img.repair("leaks", None).unwrap();
    assert_eq!(get(&r, &["leaks-fixed"]).as_f64(), Some(1.0));
    assert!(get(&r, &["leaks"]).is_undefined());
    drop(img);

    let mut img = QcowImage::open_writable(
        "maint.qcow2",
        handle.clone().into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    assert_eq!(img.create_snapshot("before").unwrap(), "1");
    let grown = img.resize("+64M".into(), JsValue::UNDEFINED).unwrap();
    assert_eq!(grown, 128.0 * 1048576.0);
    img.write(100.0 * 1048576.0, &[0x33; 65536]).unwrap();
    let file_before = handle.get_size().unwrap();
    let shrink = js_sys::Object::new();
    Reflect::set(&shrink, &"shrink".into(), &true.into()).unwrap();
    let size = img.resize("2M".into(), shrink.into()).unwrap();
    assert_eq!(size, 2.0 * 1048576.0);
    assert!(
        handle.get_size().unwrap() <= file_before,
        "the file's tail is cut"
    );
    assert_eq!(img.read(0.0, 1 << 20).unwrap().to_vec(), want);
    let check = img.check(None).unwrap();
    assert!(get(&check, &["corruptions"]).is_undefined());
    assert!(get(&check, &["leaks"]).is_undefined());
    img.apply_snapshot("before").unwrap();
    assert_eq!(img.virtual_size().unwrap(), 64.0 * 1048576.0);
    assert_eq!(img.read(0.0, 1 << 20).unwrap().to_vec(), want);
    drop(img);
    let mut img = QcowImage::open(
        "maint.qcow2",
        handle.clone().into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let snaps = Array::from(&img.snapshots().unwrap());
    assert_eq!(snaps.length(), 1);
    assert_eq!(get(&snaps.get(0), &["name"]).as_string().unwrap(), "before");
    assert_eq!(img.read(0.0, 1 << 20).unwrap().to_vec(), want);
    let check = img.check(None).unwrap();
    assert!(get(&check, &["corruptions"]).is_undefined());
    assert!(get(&check, &["leaks"]).is_undefined());
    handle.close();
}

#[wasm_bindgen_test]
fn a_blob_is_checked_but_not_repaired() {
    let blob = |bytes: &[u8]| {
        let parts = Array::of1(&Uint8Array::from(bytes));
        web_sys::Blob::new_with_u8_array_sequence(&parts).unwrap()
    };
    // Nothing to fix: nothing written, the check's result.
    let mut img = QcowImage::open_for_repair("demo.qcow2", blob(DEMO).into()).unwrap();
    let r = img.repair("all", None).unwrap();
    assert!(get(&r, &["leaks-fixed"]).is_undefined());
    assert_eq!(get(&r, &["rebuilt"]).as_bool(), Some(false));
    // A leak to free: the Blob cannot be written.
    let mut img = QcowImage::open_for_repair("leak.qcow2", blob(&leaky_demo()).into()).unwrap();
    let err: JsValue = img.repair("leaks", None).err().unwrap().into();
    let msg = get(&err, &["message"]).as_string().unwrap();
    assert!(msg.contains("read-only"), "{msg}");
}

#[wasm_bindgen_test]
async fn opfs_targets_of_the_converters_and_error_codes_in_a_worker() {
    let mut img = QcowImage::open(
        "demo.qcow2",
        Uint8Array::from(DEMO).into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    let want = img.read(0.0, 4 << 20).unwrap().to_vec();
    // A Qcow2Writer into an OPFS handle, in steps.
    let handle = opfs_handle("writer.qcow2").await;
    let opts = js_sys::Object::new();
    Reflect::set(&opts, &"size".into(), &"64M".into()).unwrap();
    Reflect::set(&opts, &"compress".into(), &true.into()).unwrap();
    let mut w = qcowkit_wasm::Qcow2Writer::new(handle.clone().into(), opts.into()).unwrap();
    for step in 0..8 {
        let range = js_sys::Object::new();
        Reflect::set(&range, &"start".into(), &(step as f64 * 8388608.0).into()).unwrap();
        Reflect::set(
            &range,
            &"end".into(),
            &((step + 1) as f64 * 8388608.0).into(),
        )
        .unwrap();
        w.copy_from(&mut img, range.into()).unwrap();
    }
    w.finish().unwrap();
    drop(w);
    let mut back = QcowImage::open(
        "writer.qcow2",
        handle.clone().into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .unwrap();
    assert_eq!(back.read(0.0, 4 << 20).unwrap().to_vec(), want);
    let check = back.check(None).unwrap();
    assert!(get(&check, &["compressed-clusters"]).as_f64().unwrap() > 0.0);
    // Its layout covers the OPFS file, compressed clusters included.
    let runs = Array::from(&back.host_layout().unwrap());
    let total: f64 = runs
        .iter()
        .map(|r| get(&r, &["len"]).as_f64().unwrap())
        .sum();
    assert_eq!(total, handle.get_size().unwrap());
    assert!(runs
        .iter()
        .any(|r| get(&r, &["kind"]).as_string().unwrap() == "compressed"));
    drop(back);
    handle.close();
    // A closed handle fails with code "io"; a Blob is read-only.
    let err: JsValue = QcowImage::open(
        "closed",
        handle.into(),
        JsValue::UNDEFINED,
        JsValue::UNDEFINED,
    )
    .err()
    .unwrap()
    .into();
    assert_eq!(get(&err, &["code"]).as_string().unwrap(), "io");
    let parts = Array::of1(&Uint8Array::from(DEMO));
    let blob = web_sys::Blob::new_with_u8_array_sequence(&parts).unwrap();
    let mut ro = QcowImage::open_for_repair("demo.qcow2", blob.into()).unwrap();
    let err: JsValue = ro.create_snapshot("x").err().unwrap().into();
    assert_eq!(get(&err, &["code"]).as_string().unwrap(), "read-only");
}

#[wasm_bindgen_test]
async fn luks_images_are_created_in_opfs_with_the_workers_random_bytes() {
    // crypto.getRandomValues of the worker makes the keys; the image is
    // written through the OPFS handle, then read back from a Blob.
    let handle = opfs_handle("luks.qcow2").await;
    let encrypt = js_sys::Object::new();
    Reflect::set(&encrypt, &"passphrase".into(), &"in a worker".into()).unwrap();
    Reflect::set(&encrypt, &"iterations".into(), &1000.into()).unwrap();
    let opts = js_sys::Object::new();
    Reflect::set(&opts, &"size".into(), &"2M".into()).unwrap();
    Reflect::set(&opts, &"encrypt".into(), &encrypt).unwrap();
    create_image(handle.clone().into(), opts.into()).unwrap();
    let with = |p: &str| {
        let o = js_sys::Object::new();
        Reflect::set(&o, &"passphrase".into(), &p.into()).unwrap();
        JsValue::from(o)
    };
    let mut img = QcowImage::open_writable(
        "luks.qcow2",
        handle.clone().into(),
        JsValue::UNDEFINED,
        with("in a worker"),
    )
    .unwrap();
    img.write(1000.0, &[0x5a; 5000]).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut bytes = vec![0u8; handle.get_size().unwrap() as usize];
    let from0 = web_sys::FileSystemReadWriteOptions::new();
    from0.set_at(0.0);
    handle
        .read_with_u8_array_and_options(&mut bytes, &from0)
        .unwrap();
    handle.close();
    // Two images made alike get different keys (random master key, salts, UUID).
    let other = qcowkit_wasm::create_image_bytes({
        let opts = js_sys::Object::new();
        Reflect::set(&opts, &"size".into(), &"2M".into()).unwrap();
        Reflect::set(&opts, &"encrypt".into(), &encrypt).unwrap();
        opts.into()
    })
    .unwrap()
    .to_vec();
    let uuid = |b: &[u8]| {
        let mut i = QcowImage::open(
            "x.qcow2",
            Uint8Array::from(b).into(),
            JsValue::UNDEFINED,
            JsValue::UNDEFINED,
        )
        .unwrap();
        get(
            &i.info().unwrap(),
            &["format-specific", "data", "encrypt", "uuid"],
        )
        .as_string()
        .unwrap()
    };
    assert_ne!(uuid(&bytes), uuid(&other));
    let parts = Array::of1(&Uint8Array::from(&bytes[..]));
    let blob = web_sys::Blob::new_with_u8_array_sequence(&parts).unwrap();
    let wrong = QcowImage::open(
        "luks.qcow2",
        blob.clone().into(),
        JsValue::UNDEFINED,
        with("no"),
    );
    assert_eq!(wrong.err().unwrap().code.as_str(), "invalid-passphrase");
    let mut img = QcowImage::open(
        "luks.qcow2",
        blob.into(),
        JsValue::UNDEFINED,
        with("in a worker"),
    )
    .unwrap();
    let back = img.read(0.0, 8192).unwrap().to_vec();
    assert!(back[..1000].iter().all(|b| *b == 0));
    assert!(back[1000..6000].iter().all(|b| *b == 0x5a));
    assert!(back[6000..].iter().all(|b| *b == 0));
}
