//! Creating images, with qemu-img's option names (parsed by
//! `qcowkit-options`), LUKS-encrypted ones included (`encrypt`, with the
//! browser's `crypto.getRandomValues` for the keys and salts).

use js_sys::{Object, Uint8Array};
use qcowkit_core::luks::LuksOptions;
use qcowkit_core::{BlockWrite, CreateOptions, OpenOptions, WritableImage};
use qcowkit_options::OptionError;
use wasm_bindgen::prelude::*;

use crate::error::{Code, QcowError, Res};
use crate::secrets::secret_of;
use crate::{number_option, option, Storage};

/// Keys of option objects that are not qemu-img's `-o` creation options
/// (conversion flags, callbacks, the `encrypt` object), skipped by
/// [`create_options`].
const NOT_CREATION: [&str; 6] = [
    "compress",
    "onProgress",
    "chunkSize",
    "start",
    "end",
    "encrypt",
];

/// The keys of `encrypt` and qemu-img's `-o encrypt.*` names for them, in
/// the order they are applied (the IV generator before its hash).
const ENCRYPT_ALGORITHMS: [(&str, &str); 5] = [
    ("cipherAlg", "encrypt.cipher-alg"),
    ("cipherMode", "encrypt.cipher-mode"),
    ("ivgenAlg", "encrypt.ivgen-alg"),
    ("ivgenHashAlg", "encrypt.ivgen-hash-alg"),
    ("hashAlg", "encrypt.hash-alg"),
];

/// QEMU's default `encrypt.iter-time` (milliseconds).
const ITER_TIME_MS: u64 = 2000;

/// The `encrypt` option (`{ passphrase, cipherAlg, cipherMode, ivgenAlg,
/// ivgenHashAlg, hashAlg, iterations, iterTime }`) as LUKS options, with
/// qemu-img's defaults (aes-256, xts, plain64, sha256) and the PBKDF2
/// iterations given or measured for `iterTime`.
fn encrypt_options(v: &JsValue) -> Res<LuksOptions> {
    let obj: &Object = v
        .dyn_ref()
        .filter(|_| v.as_string().is_none())
        .ok_or_else(|| {
            QcowError::arg(
                "options.encrypt must be an object like { passphrase, cipherAlg: 'aes-256' }",
            )
        })?;
    let known = |k: &str| {
        ["passphrase", "iterations", "iterTime"].contains(&k)
            || ENCRYPT_ALGORITHMS.iter().any(|(key, _)| *key == k)
    };
    for key in Object::keys(obj).iter() {
        let key = key.as_string().unwrap_or_default();
        if !known(&key) {
            return Err(QcowError::arg(format!(
                "unknown option encrypt.{key} (passphrase, cipherAlg, cipherMode, ivgenAlg, ivgenHashAlg, hashAlg, iterations, iterTime)"
            )));
        }
    }
    let passphrase = option(v, "passphrase")?
        .ok_or_else(|| QcowError::arg("options.encrypt.passphrase is required"))?;
    let mut c = CreateOptions::default();
    let set = |c: &mut CreateOptions, key: &str, value: &str| {
        qcowkit_options::set(c, key, value).map_err(|e| {
            let why = match e {
                OptionError::InvalidValue { reason, .. } => reason,
                _ => "unknown option",
            };
            QcowError::arg(format!("invalid option {key}={value}: {why}"))
        })
    };
    set(&mut c, "encrypt.format", "luks")?;
    for (key, name) in ENCRYPT_ALGORITHMS {
        if let Some(value) = option(v, key)? {
            let value = value
                .as_string()
                .ok_or_else(|| QcowError::arg(format!("options.encrypt.{key} must be a string")))?;
            set(&mut c, name, &value)?;
        }
    }
    let mut e = c
        .encrypt
        .take()
        .unwrap_or_else(|| LuksOptions::new(Default::default()));
    e.passphrase = secret_of(&passphrase, "options.encrypt.passphrase")?;
    let iterations = number_option(v, "iterations")?;
    let iter_time = number_option(v, "iterTime")?;
    match (iterations, iter_time) {
        (Some(_), Some(_)) => {
            return Err(QcowError::arg(
                "options.encrypt: give iterations or iterTime, not both",
            ))
        }
        (Some(n), None) => {
            let n = u32::try_from(n)
                .ok()
                .filter(|n| *n >= 1000)
                .ok_or_else(|| {
                    QcowError::arg(format!(
                    "options.encrypt.iterations must be from 1000 (QEMU's minimum) to {}, not {n}",
                    u32::MAX
                ))
                })?;
            // The master key digest gets an eighth of a key slot's work, as QEMU gives it.
            e.slot_iterations = n;
            e.mk_iterations = (n / 8).max(1000);
        }
        (None, t) => {
            let t = t.unwrap_or(ITER_TIME_MS);
            if t == 0 || t > 3_600_000 {
                return Err(QcowError::arg(format!(
                    "options.encrypt.iterTime must be from 1 to 3600000 (milliseconds), not {t}"
                )));
            }
            (e.slot_iterations, e.mk_iterations) = iterations_for(&e, t);
        }
    }
    e.validate()
        .map_err(|err| QcowError::arg(format!("invalid encryption options: {err}")))?;
    Ok(e)
}

/// PBKDF2 iterations for a new LUKS header that take about `iter_time_ms`
/// milliseconds here to check a passphrase (qemu-img's
/// `encrypt.iter-time`): (key slot, master key digest), measured with the
/// options' hash and key length, at least 1000 each; the digest gets an
/// eighth of the time, as QEMU gives it.
fn iterations_for(o: &LuksOptions, iter_time_ms: u64) -> (u32, u32) {
    let rate = |out_len: usize| {
        let mut out = vec![0u8; out_len];
        let mut rounds = 1u32 << 10;
        loop {
            let t = js_sys::Date::now();
            o.hash.pbkdf2(b"benchmark", &[0u8; 32], rounds, &mut out);
            let ms = js_sys::Date::now() - t;
            if ms > 50.0 || rounds >= 1 << 26 {
                return f64::from(rounds) / ms.max(1.0);
            }
            rounds *= 4;
        }
    };
    let per_ms_slot = rate(o.master_key_len() as usize);
    let per_ms_mk = rate(20);
    let clamp = |x: f64| x.clamp(1000.0, f64::from(u32::MAX)) as u32;
    (
        clamp(per_ms_slot * iter_time_ms as f64),
        clamp(per_ms_mk * iter_time_ms as f64 / 8.0),
    )
}

#[wasm_bindgen]
extern "C" {
    /// The Web Crypto API's random bytes (browsers, workers, Node 19+).
    #[wasm_bindgen(js_namespace = crypto, js_name = getRandomValues, catch)]
    fn get_random_values(buf: &mut [u8]) -> Result<(), JsValue>;
}

/// Formats `io` with `c`: an encrypted image's LUKS header gets its keys,
/// salts and UUID from `crypto.getRandomValues` (refused when there is
/// none: never weaker randomness).
pub(crate) fn format(io: &mut Storage, c: &CreateOptions) -> Res<()> {
    if c.encrypt.is_none() {
        qcowkit_core::create::format(io, c)?;
        return Ok(());
    }
    let mut probe = [0u8; 16];
    get_random_values(&mut probe).map_err(|_| {
        QcowError::new(
            Code::Unsupported,
            "creating an encrypted image needs crypto.getRandomValues (Web Crypto), which this JavaScript environment lacks",
        )
    })?;
    let mut failed = false;
    let mut random = |buf: &mut [u8]| {
        // getRandomValues fills at most 65536 bytes a call.
        for piece in buf.chunks_mut(65536) {
            if get_random_values(piece).is_err() {
                failed = true;
            }
        }
    };
    qcowkit_core::create::format_with_random(&mut *io, c, &mut random)?;
    if failed {
        // Do not leave an image whose keys are not random.
        let _ = io.set_len(0);
        return Err(QcowError::new(
            Code::Internal,
            "crypto.getRandomValues failed while the encryption keys were made",
        ));
    }
    Ok(())
}

/// The open options of a new image: the backing file is recorded, not
/// opened; an encrypted image is unlocked with its passphrase.
pub(crate) fn creating(c: &CreateOptions) -> OpenOptions {
    OpenOptions {
        no_backing: true,
        passphrase: c.encrypt.as_ref().map(|e| e.passphrase.clone()),
        ..OpenOptions::default()
    }
}

/// qemu-img's creation options from an options object (`{ size: "1G",
/// cluster_size: 65536, extended_l2: true, ... }`); booleans are `on`/`off`.
pub(crate) fn create_options(options: &JsValue) -> Res<CreateOptions> {
    let mut c = CreateOptions::default();
    if options.is_undefined() || options.is_null() {
        return Ok(c);
    }
    let obj: &Object = options.dyn_ref().ok_or_else(|| {
        QcowError::arg("options must be an object like { size: '1G', cluster_size: 65536 }")
    })?;
    for entry in Object::entries(obj).iter() {
        let pair: js_sys::Array = entry.unchecked_into();
        let key = pair.get(0).as_string().unwrap_or_default();
        let v = pair.get(1);
        if NOT_CREATION.contains(&key.as_str()) || v.is_undefined() {
            continue;
        }
        if key.starts_with("encrypt.") {
            return Err(QcowError::arg(format!(
                "option {key}: give the encryption as options.encrypt = {{ passphrase, cipherAlg, cipherMode, ivgenAlg, ivgenHashAlg, hashAlg, iterations, iterTime }}"
            )));
        }
        let value = if let Some(b) = v.as_bool() {
            if b { "on" } else { "off" }.to_string()
        } else if let Some(n) = v.as_f64() {
            format!("{n}")
        } else if let Some(s) = v.as_string() {
            s
        } else {
            return Err(QcowError::arg(format!(
                "option {key} must be a string, number or boolean"
            )));
        };
        qcowkit_options::set(&mut c, &key, &value).map_err(|e| {
            let why = match e {
                OptionError::InvalidValue { reason, .. } => reason,
                _ => "unknown option",
            };
            QcowError::arg(format!("invalid option {key}={value}: {why}"))
        })?;
    }
    if let Some(e) = option(options, "encrypt")? {
        c.encrypt = Some(encrypt_options(&e)?);
    }
    Ok(c)
}

/// Creates a new qcow2 image in `target` (an OPFS handle or storage object)
/// with qemu-img's option names (`size`, `cluster_size`, `extended_l2`,
/// `compression_type`, ...).
#[wasm_bindgen(js_name = createImage)]
pub fn create_image(
    #[wasm_bindgen(unchecked_param_type = "Storage")] target: JsValue,
    #[wasm_bindgen(unchecked_param_type = "CreateOptions")] options: JsValue,
) -> Res<()> {
    let c = create_options(&options)?;
    let mut io = Storage::from_js(target)?;
    io.set_len(0)?;
    format(&mut io, &c)?;
    let mut img = WritableImage::open(io, &creating(&c))?;
    img.preallocate(c.preallocation)?;
    Ok(img.flush()?)
}

/// Creates a new qcow2 image in memory and returns its bytes.
#[wasm_bindgen(js_name = createImageBytes)]
pub fn create_image_bytes(
    #[wasm_bindgen(unchecked_param_type = "CreateOptions")] options: JsValue,
) -> Res<Uint8Array> {
    let c = create_options(&options)?;
    let mut io = Storage::Memory(Vec::new());
    format(&mut io, &c).map_err(|e| match e.code {
        Code::Format => QcowError::arg(e.message),
        _ => e,
    })?;
    let mut img = WritableImage::open(io, &creating(&c))?;
    img.preallocate(c.preallocation)?;
    img.flush()?;
    let out = img.into_inner().into_bytes().unwrap_or_default();
    Ok(Uint8Array::from(&out[..]))
}

#[wasm_bindgen(typescript_custom_section)]
const CREATE_TYPES: &'static str = r#"
/** qemu-img's creation options (`qemu-img create -o`), by qemu-img's names. */
export interface CreateOptions {
  /** Virtual size: bytes, or a string with a suffix (`"10G"`). */
  size?: number | string;
  /** Cluster size: 512 bytes to 2 MiB, a power of two (64 KiB by default). */
  cluster_size?: number | string;
  compat?: "0.10" | "1.1" | "v2" | "v3";
  refcount_bits?: 1 | 2 | 4 | 8 | 16 | 32 | 64;
  /** Extended L2 entries (subclusters). */
  extended_l2?: boolean;
  compression_type?: "zlib" | "zstd";
  preallocation?: "off" | "metadata" | "falloc" | "full";
  lazy_refcounts?: boolean;
  backing_file?: string;
  backing_fmt?: string;
  data_file?: string;
  data_file_raw?: boolean;
  /**
   * Encrypt the guest data with LUKS, as `qemu-img create -o encrypt.format=luks,...` (key slot 0
   * holds `passphrase`; keys, salts and the UUID come from `crypto.getRandomValues`).
   */
  encrypt?: EncryptOptions;
}
/** PBKDF2, anti-forensic split and ESSIV hashes. */
export type HashAlg = "sha1" | "sha224" | "sha256" | "sha384" | "sha512";
/** A new LUKS header, with qemu-img's `encrypt.*` options by their camel-case names. */
export interface EncryptOptions {
  /** The passphrase of key slot 0 (a string: its UTF-8 bytes). */
  passphrase: Passphrase;
  /** `"aes-256"` by default (`"aes-192"` needs the `"xts"` mode). */
  cipherAlg?: "aes-128" | "aes-192" | "aes-256";
  /** `"xts"` by default. */
  cipherMode?: "xts" | "cbc" | "ctr" | "ecb";
  /** `"plain64"` by default. */
  ivgenAlg?: "plain" | "plain64" | "essiv";
  /** ESSIV's hash (`"sha256"` by default; only with `ivgenAlg: "essiv"`). */
  ivgenHashAlg?: HashAlg;
  /** PBKDF2 and anti-forensic split hash, `"sha256"` by default. */
  hashAlg?: HashAlg;
  /**
   * PBKDF2 iterations of key slot 0 (at least 1000, QEMU's minimum); the master key digest gets
   * an eighth of them (at least 1000). Not with `iterTime`.
   */
  iterations?: number;
  /**
   * Milliseconds checking the passphrase should take (qemu-img's `encrypt.iter-time`, 2000 by
   * default): the iterations are measured here, as QEMU measures them.
   */
  iterTime?: number;
}
"#;
