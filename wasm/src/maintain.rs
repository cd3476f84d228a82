//! Maintenance of an image, as qemu-img does it: `check -r` (repair),
//! `resize` and `snapshot` (list, take, delete, apply).

use js_sys::{Function, Reflect};
use qcowkit_core::report::{CheckSummary, SnapshotInfo};
use qcowkit_core::{Image, OpenOptions, Preallocation, RepairMode, WritableImage};
use wasm_bindgen::prelude::*;

use crate::error::{Code, CoreError, QcowError, Res};
use crate::reports::{offset_arg, safe_number, to_js};
use crate::{option, with_lines, Access, QcowImage, Storage};

/// qemu-img's sentence alone for a refused value (the CLI prints it so).
fn core_err(e: CoreError) -> QcowError {
    match e {
        CoreError::Format(qcowkit_core::FormatError::InvalidOption { reason, .. }) => {
            QcowError::arg(reason)
        }
        CoreError::NeedsRebuild => QcowError::new(
            Code::Corrupt,
            "the refcount structure must be rebuilt: repair with mode \"all\" (qemu-img check -r all)",
        ),
        e => e.into(),
    }
}

/// A new size as `qemu-img resize` takes it: bytes as a number, or a
/// string with an optional suffix (`"10G"`) and an optional sign for a
/// size relative to `current` (`"+1G"`, `"-512M"`).
fn new_size(size: &JsValue, current: u64) -> Res<u64> {
    let total = if let Some(n) = size.as_f64() {
        Some(offset_arg("size", n)?)
    } else if let Some(text) = size.as_string() {
        let text = text.trim();
        let (sign, number) = match text.as_bytes().first() {
            Some(b'+') => (1i8, &text[1..]),
            Some(b'-') => (-1, &text[1..]),
            _ => (0, text),
        };
        let n = qcowkit_options::parse_size(number).ok_or_else(|| {
            QcowError::arg(format!(
                "invalid size '{text}': expected bytes, or a number with an optional suffix k, M, G, T, P or E, optionally preceded by + or -"
            ))
        })?;
        match sign {
            1 => current.checked_add(n),
            -1 => current.checked_sub(n),
            _ => Some(n),
        }
    } else {
        return Err(QcowError::arg(
            "size must be a number of bytes or a string like '10G', '+1G' or '-512M'",
        ));
    };
    total
        .filter(|t| *t > 0)
        .ok_or_else(|| QcowError::arg("New image size must be positive"))
}

/// The image, for changing its structure: opened for writing or for a
/// repair.
fn maintainer(img: &mut QcowImage) -> Res<&mut WritableImage<Storage>> {
    match &mut img.img {
        Access::Write(w) | Access::Repair(w) => Ok(w),
        Access::Read(_) => Err(CoreError::ReadOnly(
            "opened read-only (open it with openForRepair or openWritable)",
        )
        .into()),
    }
}

#[wasm_bindgen]
impl QcowImage {
    /// Opens `storage` for a repair (`repair()`), as `qemu-img check -r`
    /// opens an image: any qcow2 image, also one that `openWritable`
    /// refuses (marked corrupt) or would change as it opens (dirty: lazy
    /// refcounts left by a crash). No backing or data file is opened, so only
    /// the image's metadata is read; `info()` and `check()` work, but the
    /// image cannot be written through `write`, `resize` or the snapshot
    /// methods (reopen it with `openWritable` after the repair).
    ///
    /// ```js
    /// const img = QcowImage.openForRepair("vm.qcow2", opfsHandle);
    /// const r = img.repair("all");   // like `qemu-img check -r all --output=json`
    /// console.log(r["leaks-fixed"], r["corruptions-fixed"], r.corruptions ?? 0);
    /// img.free();
    /// ```
    #[wasm_bindgen(js_name = openForRepair)]
    pub fn open_for_repair(
        name: &str,
        #[wasm_bindgen(unchecked_param_type = "Storage")] storage: JsValue,
    ) -> Res<QcowImage> {
        let io = Storage::from_js(storage)?;
        let opts = OpenOptions {
            no_backing: true,
            no_data_file: true,
            check_mode: true,
            ..OpenOptions::default()
        };
        let img = Image::open(io, &opts)?;
        let w = WritableImage::for_repair(img)?;
        Ok(QcowImage {
            img: Access::Repair(Box::new(w)),
            name: name.to_string(),
        })
    }

    /// Repairs the image, as `qemu-img check -r leaks|all` does, and
    /// returns the check made after the repair (the `check()` result, with
    /// `"leaks-fixed"` and `"corruptions-fixed"` counting what was fixed
    /// and `leaks`/`corruptions` what is left), plus `found`, the check
    /// before it, and `rebuilt`, whether the refcount structure was rebuilt.
    /// `"leaks"` frees leaked clusters; `"all"` also raises refcounts that
    /// are too low, fixes COPIED flags and rebuilds a broken refcount
    /// structure (`"leaks"` throws when that is needed). The corrupt and
    /// dirty bits are cleared once nothing is left to fix. Guest data is
    /// never changed. `onProblem` gets every problem and `Repairing ...`
    /// line as `qemu-img check -r` prints them on stderr.
    ///
    /// The image must be opened with `openForRepair` (any image) or
    /// `openWritable` (an image that opens for writing).
    #[wasm_bindgen(unchecked_return_type = "RepairResult")]
    pub fn repair(
        &mut self,
        #[wasm_bindgen(unchecked_param_type = "RepairMode")] mode: &str,
        #[wasm_bindgen(js_name = onProblem, unchecked_optional_param_type = "(line: string) => void")]
        on_problem: Option<Function>,
    ) -> Res<JsValue> {
        let mode = match mode {
            "leaks" => RepairMode::Leaks,
            "all" => RepairMode::All,
            other => {
                return Err(QcowError::arg(format!(
                    "repair mode must be \"leaks\" or \"all\", not \"{other}\""
                )))
            }
        };
        let name = self.name.clone();
        let img = maintainer(self)?;
        let report = with_lines(on_problem.as_ref(), |sink| {
            img.repair(mode, sink).map_err(core_err)
        })?;
        img.flush()?;
        let out = to_js(&CheckSummary::of(&report.left, &name))?;
        let found = to_js(&CheckSummary::of(&report.found, &name))?;
        let set = |k: &str, v: &JsValue| -> Res<()> {
            Reflect::set(&out, &JsValue::from_str(k), v)?;
            Ok(())
        };
        set("found", &found)?;
        set("rebuilt", &JsValue::from_bool(report.rebuilt))?;
        Ok(out)
    }

    /// Changes the guest disk's size, as `qemu-img resize` does, and
    /// returns the new size in bytes. `size`: bytes, or a string like
    /// `"10G"`, `"+1G"` (grow by) or `"-512M"` (shrink by); the result must
    /// be a multiple of 512. Shrinking deletes the data past the new end
    /// and is refused unless `options.shrink` is true.
    /// `options.preallocation` (`"off"`, `"metadata"`, `"falloc"`,
    /// `"full"`) preallocates a grown range. Refused for a version 2 image
    /// with snapshots and for an image with persistent bitmaps.
    ///
    /// ```js
    /// img.resize("+1G");
    /// img.resize(64 << 20, { shrink: true });
    /// ```
    pub fn resize(
        &mut self,
        #[wasm_bindgen(unchecked_param_type = "number | string")] size: JsValue,
        #[wasm_bindgen(unchecked_optional_param_type = "ResizeOptions")] options: JsValue,
    ) -> Res<f64> {
        let shrink = match option(&options, "shrink")? {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| QcowError::arg("options.shrink must be a boolean"))?,
        };
        let prealloc = match option(&options, "preallocation")? {
            None => Preallocation::Off,
            Some(v) => {
                let p = v.as_string().unwrap_or_default();
                qcowkit_options::parse_preallocation(&p)
                    .ok_or_else(|| QcowError::arg(format!("Invalid preallocation mode '{p}'")))?
            }
        };
        let img = self.writer()?;
        let current = img.size();
        let total = new_size(&size, current)?;
        if total <= current && prealloc != Preallocation::Off {
            return Err(QcowError::arg(
                "Preallocation can only be used for growing images",
            ));
        }
        if total < current && !shrink {
            return Err(QcowError::arg(
                "Use the shrink: true option to perform a shrink operation.\nShrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
            ));
        }
        img.resize(total, prealloc).map_err(core_err)?;
        img.flush()?;
        safe_number("the new size", img.size())
    }

    /// The internal snapshots, as `qemu-img snapshot -l` lists them (and
    /// `info().snapshots` has them): ID, name, VM state size, date, VM
    /// clock and instruction count of each, in the image's order.
    #[wasm_bindgen(unchecked_return_type = "SnapshotInfo[]")]
    pub fn snapshots(&self) -> Res<JsValue> {
        let list: Vec<SnapshotInfo> = self
            .image()
            .snapshots()
            .iter()
            .map(SnapshotInfo::of)
            .collect();
        to_js(&list)
    }

    /// Takes an internal snapshot of the disk as it is now named `name`
    /// (`qemu-img snapshot -c`), dated now (`Date.now()`), without VM
    /// state; returns its ID (the next free number). The image must be
    /// opened with `openWritable`.
    #[wasm_bindgen(js_name = createSnapshot)]
    pub fn create_snapshot(&mut self, name: &str) -> Res<String> {
        let now = js_sys::Date::now();
        let secs = (now / 1000.0).floor();
        let nsecs = ((now - secs * 1000.0) * 1_000_000.0) as u32;
        let img = self.writer()?;
        let id = img
            .create_snapshot(name, secs as u32, nsecs.min(999_999_999))
            .map_err(|e| {
                let code = Code::of(&e);
                QcowError::new(code, format!("Could not create snapshot '{name}': {e}"))
            })?;
        img.flush()?;
        Ok(id)
    }

    /// Deletes the first snapshot named `name` (`qemu-img snapshot -d`);
    /// throws when there is none. The image must be opened with
    /// `openWritable`.
    #[wasm_bindgen(js_name = deleteSnapshot)]
    pub fn delete_snapshot(&mut self, name: &str) -> Res<()> {
        let img = self.writer()?;
        match img.delete_snapshot(name) {
            Ok(true) => Ok(img.flush()?),
            Ok(false) => Err(QcowError::new(
                Code::NotFound,
                format!("Could not delete snapshot '{name}': snapshot not found"),
            )),
            Err(e) => Err(QcowError::new(
                Code::of(&e),
                format!("Could not delete snapshot '{name}': {e}"),
            )),
        }
    }

    /// Reverts the disk to the snapshot with ID, or else name, `idOrName`
    /// (`qemu-img snapshot -a`): the disk's contents and size become the
    /// snapshot's; the snapshot stays. Throws when there is no such
    /// snapshot. The image must be opened with `openWritable`.
    #[wasm_bindgen(js_name = applySnapshot)]
    pub fn apply_snapshot(
        &mut self,
        #[wasm_bindgen(js_name = idOrName)] id_or_name: &str,
    ) -> Res<()> {
        let img = self.writer()?;
        match img.apply_snapshot(id_or_name) {
            Ok(true) => Ok(img.flush()?),
            Ok(false) => Err(QcowError::new(
                Code::NotFound,
                format!("Could not apply snapshot '{id_or_name}': Failed to load snapshot: No such file or directory"),
            )),
            Err(e) => Err(QcowError::new(
                Code::of(&e),
                format!("Could not apply snapshot '{id_or_name}': {e}"),
            )),
        }
    }
}

#[wasm_bindgen(typescript_custom_section)]
const MAINTENANCE_TYPES: &'static str = r#"
/** What `repair` may fix: `"leaks"` (`qemu-img check -r leaks`) or `"all"` (`-r all`). */
export type RepairMode = "leaks" | "all";
/**
 * `repair()`: the check after the repair, as `qemu-img check -r MODE --output=json`
 * prints it (`"leaks-fixed"`/`"corruptions-fixed"`: what was fixed; `leaks`/`corruptions`:
 * what is left), with the check before it and whether the refcount structure was rebuilt.
 */
export interface RepairResult extends CheckResult {
  /** The check before the repair. */
  found: CheckResult;
  /** Whether the refcount structure was rebuilt (only with `"all"`). */
  rebuilt: boolean;
}
/** Options of `resize()` (qemu-img resize's `--shrink` and `--preallocation`). */
export interface ResizeOptions {
  /** Allow the new size to be smaller (the data past it is deleted). */
  shrink?: boolean;
  /** Preallocate a grown range. */
  preallocation?: "off" | "metadata" | "falloc" | "full";
}
"#;
