//! Passphrases of encrypted images (LUKS, the legacy AES method): read
//! from an options object into the core's `Secret`s, which are wiped from
//! the wasm memory when dropped. A passphrase is never part of a message:
//! errors about one name the option, never its value.

use js_sys::{Object, Uint8Array};
use qcowkit_core::luks::Secret;
use qcowkit_core::OpenOptions;
use wasm_bindgen::prelude::*;

use crate::error::{QcowError, Res};
use crate::{open_image, option, QcowImage};

/// A passphrase given as a string (its UTF-8 bytes, as qemu-img takes a
/// `secret` object's `data`) or as bytes.
pub(crate) fn secret_of(v: &JsValue, what: &str) -> Res<Secret> {
    if let Some(s) = v.as_string() {
        // The string's bytes become the secret as they are (no copy left behind).
        return Ok(Secret::from(s.into_bytes()));
    }
    if let Some(bytes) = v.dyn_ref::<Uint8Array>() {
        return Ok(Secret::from(bytes.to_vec()));
    }
    Err(QcowError::arg(format!(
        "{what} must be a string or a Uint8Array"
    )))
}

/// The passphrases of one open: the image's own and its backing files'
/// (by the name the naming image stores, or the name of the file
/// supplied for it).
#[derive(Default)]
pub(crate) struct Keys {
    passphrase: Option<Secret>,
    backing: Vec<(String, Secret)>,
}

/// The keys an open takes (anything else is refused: a misspelt
/// `passphrase` must not open the image locked without a word).
const OPEN_KEYS: [&str; 2] = ["passphrase", "backingPassphrases"];

impl Keys {
    /// Reads `{ passphrase, backingPassphrases }` (absent, `undefined` or
    /// `null`: none).
    pub(crate) fn from_options(options: &JsValue) -> Res<Keys> {
        let mut keys = Keys::default();
        if options.is_undefined() || options.is_null() {
            return Ok(keys);
        }
        let obj: &Object = options.dyn_ref().ok_or_else(|| {
            QcowError::arg("open options must be an object like { passphrase, backingPassphrases }")
        })?;
        for key in Object::keys(obj).iter() {
            let key = key.as_string().unwrap_or_default();
            if !OPEN_KEYS.contains(&key.as_str()) {
                return Err(QcowError::arg(format!(
                    "unknown open option {key} (the options are passphrase and backingPassphrases)"
                )));
            }
        }
        if let Some(p) = option(options, "passphrase")? {
            keys.passphrase = Some(secret_of(&p, "options.passphrase")?);
        }
        if let Some(b) = option(options, "backingPassphrases")? {
            let what = |name: &str| format!("options.backingPassphrases[\"{name}\"]");
            if let Some(map) = b.dyn_ref::<js_sys::Map>() {
                let mut err = None;
                map.for_each(&mut |value, key| {
                    if err.is_some() || value.is_undefined() || value.is_null() {
                        return;
                    }
                    let Some(name) = key.as_string() else {
                        err = Some(QcowError::arg(
                            "options.backingPassphrases: the keys must be file names (strings)",
                        ));
                        return;
                    };
                    match secret_of(&value, &what(&name)) {
                        Ok(s) => keys.backing.push((name, s)),
                        Err(e) => err = Some(e),
                    }
                });
                if let Some(e) = err {
                    return Err(e);
                }
            } else if let Some(obj) = b.dyn_ref::<Object>().filter(|_| !b.is_function()) {
                for entry in Object::entries(obj).iter() {
                    let pair: js_sys::Array = entry.unchecked_into();
                    let name = pair.get(0).as_string().unwrap_or_default();
                    let value = pair.get(1);
                    if value.is_undefined() || value.is_null() {
                        continue;
                    }
                    let s = secret_of(&value, &what(&name))?;
                    keys.backing.push((name, s));
                }
            } else {
                return Err(QcowError::arg(
                    "options.backingPassphrases must be an object or a Map from backing file name to passphrase",
                ));
            }
        }
        Ok(keys)
    }

    /// The core's open options with these passphrases (copies, each wiped
    /// when the options are dropped).
    pub(crate) fn open_options(&self) -> OpenOptions {
        OpenOptions {
            passphrase: self.passphrase.clone(),
            backing_passphrases: self.backing.clone(),
            ..OpenOptions::default()
        }
    }
}

/// Passphrases kept in the wasm memory (wiped by `free()`), to open
/// encrypted images more than once without keeping the passphrases in
/// JavaScript: made from the same object as `QcowImage.open`'s options,
/// which the caller can then drop (and wipe, for `Uint8Array`s).
///
/// ```js
/// const keys = new Passphrases({ passphrase: form.passphrase.value });
/// form.passphrase.value = "";
/// const img = keys.open("vm.qcow2", file);           // as QcowImage.open(name, file, undefined, { passphrase })
/// const rw = keys.openWritable("vm.qcow2", handle);  // later, with the same passphrase
/// keys.free();                                       // wiped
/// ```
#[wasm_bindgen]
pub struct Passphrases {
    keys: Keys,
}

#[wasm_bindgen]
impl Passphrases {
    /// Copies `{ passphrase, backingPassphrases }` into the wasm memory.
    #[wasm_bindgen(constructor)]
    pub fn new(
        #[wasm_bindgen(unchecked_param_type = "OpenOptions")] options: JsValue,
    ) -> Res<Passphrases> {
        Ok(Passphrases {
            keys: Keys::from_options(&options)?,
        })
    }

    /// `QcowImage.open(name, storage, files)` with these passphrases.
    pub fn open(
        &self,
        name: &str,
        #[wasm_bindgen(unchecked_param_type = "Storage")] storage: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "NamedFiles")] files: JsValue,
    ) -> Res<QcowImage> {
        open_image(name, storage, files, &self.keys, false)
    }

    /// `QcowImage.openWritable(name, storage, files)` with these passphrases.
    #[wasm_bindgen(js_name = openWritable)]
    pub fn open_writable(
        &self,
        name: &str,
        #[wasm_bindgen(unchecked_param_type = "Storage")] storage: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "NamedFiles")] files: JsValue,
    ) -> Res<QcowImage> {
        open_image(name, storage, files, &self.keys, true)
    }
}

#[wasm_bindgen(typescript_custom_section)]
const OPEN_TYPES: &'static str = r#"
/**
 * A passphrase: a string (its UTF-8 bytes, as qemu-img's `--object secret,data=...`) or bytes.
 */
export type Passphrase = string | Uint8Array;
/** Options of `QcowImage.open` and `openWritable` (and of `new Passphrases`). */
export interface OpenOptions {
  /**
   * The passphrase of an encrypted image (LUKS, or the legacy AES method). Without it an encrypted
   * image still opens for its metadata (`info()`, `check()`, `map()`, ...); reading its data throws
   * `"passphrase-required"`, and a wrong one makes the open throw `"invalid-passphrase"`.
   */
  passphrase?: Passphrase;
  /**
   * Passphrases of encrypted backing files, each by the backing file name the image naming it
   * stores, or by the name it was supplied under in `files`.
   */
  backingPassphrases?: Record<string, Passphrase> | Map<string, Passphrase>;
}
"#;
