//! Reports as Rust types, in the shapes of qemu-img's JSON (`info`,
//! `map`, `check`): every host builds them the same way and serialises
//! them its own way (with the `serde` feature, field names and order are
//! qemu-img's: the CLI prints them with serde_json, wasm hands JavaScript
//! objects of the same content).

use alloc::string::String;
use alloc::vec::Vec;

use crate::check::CheckReport;
use crate::image::Image;
use crate::io::BlockRead;
use crate::map::BlockStatus;
use crate::snapshot::Snapshot;

#[cfg(feature = "serde")]
use serde::Serialize;

/// Host facts `info` needs besides the image itself.
#[derive(Debug, Clone, Copy)]
pub struct InfoParams<'a> {
    /// The name the image was opened under.
    pub filename: &'a str,
    /// The backing file name resolved by the host's opener policy.
    pub full_backing_filename: Option<&'a str>,
    /// The external data file name resolved by the host's opener policy.
    pub full_data_filename: Option<&'a str>,
    /// Bytes the image file occupies on its storage.
    pub actual_size: u64,
}

/// `qemu-img info` of one image (qcow2 or raw).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct Info {
    /// Format of the backing file, as the image records it.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub backing_filename_format: Option<String>,
    /// Internal snapshots.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
    pub snapshots: Vec<SnapshotInfo>,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// The name the image was opened under.
    pub filename: String,
    /// Cluster size in bytes (qcow2 only).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub cluster_size: Option<u64>,
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// Bytes the file occupies on its storage.
    pub actual_size: u64,
    /// qcow2 facts.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub format_specific: Option<FormatSpecific>,
    /// The backing file name resolved by the host.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub full_backing_filename: Option<String>,
    /// The backing file name as stored.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub backing_filename: Option<String>,
    /// The image is encrypted (absent when it is not).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub encrypted: Option<bool>,
    /// The dirty bit (lazy refcounts in use).
    pub dirty_flag: bool,
    /// The files this image names that opening it would open (not a
    /// qemu-img key; absent when it names none).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
    pub files_to_open: Vec<NamedFile>,
}

/// A file an image names (see [`Info::files_to_open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct NamedFile {
    /// `backing` or `data-file`.
    pub role: &'static str,
    /// The name as the image stores it.
    pub name: String,
    /// The name the host would open (resolved by its opener's rules).
    pub path: String,
}

/// One internal snapshot in [`Info`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct SnapshotInfo {
    /// Instruction count (record/replay), when recorded.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub icount: Option<u64>,
    /// Guest clock, nanoseconds part.
    pub vm_clock_nsec: u64,
    /// Name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u64,
    /// Guest clock, whole seconds.
    pub vm_clock_sec: u64,
    /// Unique ID string.
    pub id: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
}

impl SnapshotInfo {
    /// The report of one snapshot.
    pub fn of(s: &Snapshot) -> Self {
        SnapshotInfo {
            icount: s.icount.filter(|i| *i != u64::MAX),
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            name: s.name.clone(),
            date_sec: s.date_sec.into(),
            date_nsec: s.date_nsec.into(),
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            id: s.id.clone(),
            vm_state_size: s.vm_state_size,
        }
    }
}

/// `format-specific` of [`Info`]: `{ "type": "qcow2", "data": ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct FormatSpecific {
    /// Always `qcow2`.
    #[cfg_attr(feature = "serde", serde(rename = "type"))]
    pub kind: &'static str,
    /// The qcow2 facts.
    pub data: Qcow2Info,
}

/// The qcow2 facts of [`Info`] (fields absent from version 2 images are
/// `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct Qcow2Info {
    /// `0.10` (version 2) or `1.1` (version 3).
    pub compat: &'static str,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// Lazy refcounts (version 3).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub lazy_refcounts: Option<bool>,
    /// Persistent bitmaps (version 3, when the extension is present).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub bitmaps: Option<Vec<BitmapInfo>>,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The encryption (LUKS facts, or the legacy AES method).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub encrypt: Option<EncryptInfo>,
    /// External data file name, when recorded.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub data_file: Option<String>,
    /// Whether the external data file is a consistent raw image.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub data_file_raw: Option<bool>,
    /// The corrupt bit (version 3).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub corrupt: Option<bool>,
    /// Extended L2 entries (version 3).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub extended_l2: Option<bool>,
}

/// The encryption facts of [`Qcow2Info`], in qemu-img's key order (only
/// `format` for the legacy AES method).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct EncryptInfo {
    /// IV generator (`plain`, `plain64`, `essiv`).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub ivgen_alg: Option<String>,
    /// Whether the LUKS header is detached (never, inside qcow2).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub detached_header: Option<bool>,
    /// PBKDF2 and anti-forensic hash.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub hash_alg: Option<String>,
    /// Cipher with its key size (`aes-256`).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub cipher_alg: Option<String>,
    /// The LUKS volume UUID.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub uuid: Option<String>,
    /// ESSIV's hash.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub ivgen_hash_alg: Option<String>,
    /// `luks` or `aes`.
    pub format: &'static str,
    /// Cipher mode (`xts`, `cbc`, ...).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub cipher_mode: Option<String>,
    /// The eight key slots.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub slots: Option<Vec<SlotInfo>>,
    /// Payload offset in bytes.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub payload_offset: Option<u64>,
    /// PBKDF2 iterations of the master key digest.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub master_key_iters: Option<u32>,
}

/// One LUKS key slot of [`EncryptInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct SlotInfo {
    /// The slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations (active slots).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub iters: Option<u32>,
    /// Offset of its key material in bytes.
    pub key_offset: u64,
    /// Anti-forensic stripes (active slots).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub stripes: Option<u32>,
}

impl EncryptInfo {
    /// The facts of a LUKS header.
    pub fn luks(h: &crate::luks::LuksHeader) -> EncryptInfo {
        let (mode, rest) = h
            .cipher_mode
            .split_once('-')
            .unwrap_or((&h.cipher_mode, ""));
        let (ivgen, ivhash) = match rest.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let xts = mode == "xts";
        let key_bits = u64::from(h.key_bytes) * 8 / if xts { 2 } else { 1 };
        EncryptInfo {
            ivgen_alg: Some(String::from(ivgen)),
            detached_header: Some(false),
            hash_alg: Some(h.hash_spec.clone()),
            cipher_alg: Some(alloc::format!("{}-{key_bits}", h.cipher_name)),
            uuid: Some(h.uuid.clone()),
            ivgen_hash_alg: ivhash.filter(|_| ivgen == "essiv").map(String::from),
            format: "luks",
            cipher_mode: Some(String::from(mode)),
            slots: Some(
                h.slots
                    .iter()
                    .map(|s| SlotInfo {
                        active: s.active,
                        iters: s.active.then_some(s.iterations),
                        key_offset: u64::from(s.key_offset_sector) * 512,
                        stripes: s.active.then_some(s.stripes),
                    })
                    .collect(),
            ),
            payload_offset: Some(u64::from(h.payload_offset_sector) * 512),
            master_key_iters: Some(h.mk_iterations),
        }
    }
}

/// One persistent bitmap in [`Qcow2Info`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct BitmapInfo {
    /// Flag names (`in-use`, `auto`).
    pub flags: Vec<&'static str>,
    /// Name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
}

impl Info {
    /// `qemu-img info` of a qcow2 image.
    pub fn of<R: BlockRead>(img: &Image<R>, p: &InfoParams<'_>) -> Info {
        let h = img.header();
        let v3 = h.version != 2;
        let data = Qcow2Info {
            compat: if v3 { "1.1" } else { "0.10" },
            compression_type: h.compression_type.name(),
            lazy_refcounts: v3.then(|| h.lazy_refcounts()),
            bitmaps: (v3 && h.bitmaps.is_some()).then(|| {
                img.bitmaps()
                    .iter()
                    .map(|b| BitmapInfo {
                        flags: b.flag_names().collect(),
                        name: b.name.clone(),
                        granularity: b.granularity(),
                    })
                    .collect()
            }),
            refcount_bits: h.refcount_bits(),
            encrypt: match h.crypt_method {
                crate::header::CryptMethod::None => None,
                crate::header::CryptMethod::Aes => Some(EncryptInfo {
                    format: "aes",
                    ..EncryptInfo::default()
                }),
                crate::header::CryptMethod::Luks => img.luks_header().map(EncryptInfo::luks),
            },
            data_file: h.data_file.clone().filter(|_| v3 && h.has_data_file()),
            data_file_raw: (v3 && h.has_data_file()).then(|| h.data_file_raw()),
            corrupt: v3.then(|| h.corrupt()),
            extended_l2: v3.then(|| h.extended_l2()),
        };
        Info {
            backing_filename_format: h
                .backing_format
                .clone()
                .filter(|_| h.backing_file.is_some()),
            snapshots: img.snapshots().iter().map(SnapshotInfo::of).collect(),
            virtual_size: h.size,
            filename: String::from(p.filename),
            cluster_size: Some(h.cluster_size()),
            format: "qcow2",
            actual_size: p.actual_size,
            format_specific: Some(FormatSpecific {
                kind: "qcow2",
                data,
            }),
            full_backing_filename: h
                .backing_file
                .as_deref()
                .map(|b| String::from(p.full_backing_filename.unwrap_or(b))),
            backing_filename: h.backing_file.clone(),
            encrypted: (h.crypt_method != crate::header::CryptMethod::None).then_some(true),
            dirty_flag: h.dirty(),
            files_to_open: files_to_open(h, p),
        }
    }

    /// `qemu-img info` of a raw image.
    pub fn raw(filename: &str, size: u64, actual_size: u64) -> Info {
        Info {
            backing_filename_format: None,
            snapshots: Vec::new(),
            virtual_size: size,
            filename: String::from(filename),
            cluster_size: None,
            format: "raw",
            actual_size,
            format_specific: None,
            full_backing_filename: None,
            backing_filename: None,
            encrypted: None,
            dirty_flag: false,
            files_to_open: Vec::new(),
        }
    }
}

/// The backing and data files `h` names, with the host's resolution.
fn files_to_open(h: &crate::header::Header, p: &InfoParams<'_>) -> Vec<NamedFile> {
    let mut out = Vec::new();
    if let Some(b) = &h.backing_file {
        out.push(NamedFile {
            role: "backing",
            name: b.clone(),
            path: String::from(p.full_backing_filename.unwrap_or(b)),
        });
    }
    if let Some(d) = h.data_file.as_ref().filter(|_| h.has_data_file()) {
        out.push(NamedFile {
            role: "data-file",
            name: d.clone(),
            path: String::from(p.full_data_filename.unwrap_or(d)),
        });
    }
    out
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer where the state was found (0 is the image itself).
    pub depth: u32,
    /// Allocated at that layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Host offset of the data, when it has one.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub offset: Option<u64>,
}

impl MapEntry {
    /// The entry of the range `[start, start + length)` with status `s`.
    pub fn new(start: u64, length: u64, s: &BlockStatus) -> Self {
        MapEntry {
            start,
            length,
            depth: s.depth,
            present: s.present,
            zero: s.zero,
            data: s.data,
            compressed: s.compressed,
            offset: s.offset,
        }
    }
}

/// `qemu-img check --output=json`: the counters of a [`CheckReport`], in
/// qemu-img's key order; a counter that is 0 is left out (`None`), as
/// qemu-img does, except `check-errors`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub struct CheckSummary {
    /// End of the last cluster in use.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub image_end_offset: Option<u64>,
    /// Compressed clusters in the active L1 table.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub compressed_clusters: Option<u64>,
    /// Guest clusters of the virtual disk.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub total_clusters: Option<u64>,
    /// Corruptions left.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub corruptions: Option<u64>,
    /// Corruptions a repair fixed.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub corruptions_fixed: Option<u64>,
    /// Errors that stopped part of the check.
    pub check_errors: u64,
    /// Leaked clusters left.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub leaks: Option<u64>,
    /// Leaked clusters a repair freed.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub leaks_fixed: Option<u64>,
    /// Guest clusters allocated in the active L1 table.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub allocated_clusters: Option<u64>,
    /// The name the image was opened under.
    pub filename: String,
    /// Always `qcow2`.
    pub format: &'static str,
    /// Allocated clusters not contiguous with their predecessor.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub fragmented_clusters: Option<u64>,
}

impl CheckSummary {
    /// The summary of `r` for the image named `filename`.
    pub fn of(r: &CheckReport, filename: &str) -> Self {
        let some = |n: u64| (n > 0).then_some(n);
        CheckSummary {
            image_end_offset: some(r.image_end_offset),
            compressed_clusters: some(r.compressed_clusters),
            total_clusters: some(r.total_clusters),
            corruptions: some(r.corruptions),
            corruptions_fixed: some(r.corruptions_fixed),
            check_errors: r.check_errors,
            leaks: some(r.leaks),
            leaks_fixed: some(r.leaks_fixed),
            allocated_clusters: some(r.allocated_clusters),
            filename: String::from(filename),
            format: "qcow2",
            fragmented_clusters: some(r.fragmented_clusters),
        }
    }
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use super::*;

    #[test]
    fn raw_info_shape() {
        assert_eq!(
            serde_json::to_string(&Info::raw("x.raw", 1024, 0)).unwrap(),
            "{\"virtual-size\":1024,\"filename\":\"x.raw\",\"format\":\"raw\",\"actual-size\":0,\"dirty-flag\":false}"
        );
    }

    #[test]
    fn check_summary_has_qemus_key_order_and_omits_zeros() {
        let r = CheckReport {
            leaks: 2,
            total_clusters: 16,
            ..CheckReport::default()
        };
        let text = serde_json::to_string(&CheckSummary::of(&r, "a.qcow2")).unwrap();
        assert_eq!(
            text,
            "{\"total-clusters\":16,\"check-errors\":0,\"leaks\":2,\"filename\":\"a.qcow2\",\"format\":\"qcow2\"}"
        );
        let all = CheckReport {
            corruptions: 1,
            leaks: 2,
            check_errors: 3,
            total_clusters: 4,
            allocated_clusters: 5,
            fragmented_clusters: 6,
            compressed_clusters: 7,
            image_end_offset: 8,
            leaks_fixed: 9,
            corruptions_fixed: 10,
            ..CheckReport::default()
        };
        let text = serde_json::to_string(&CheckSummary::of(&all, "b")).unwrap();
        let keys: Vec<&str> = text.split('"').skip(1).step_by(2).collect();
        assert_eq!(
            keys,
            [
                "image-end-offset",
                "compressed-clusters",
                "total-clusters",
                "corruptions",
                "corruptions-fixed",
                "check-errors",
                "leaks",
                "leaks-fixed",
                "allocated-clusters",
                "filename",
                "b",
                "format",
                "qcow2",
                "fragmented-clusters"
            ]
        );
    }
}
