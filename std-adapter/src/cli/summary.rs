//! `qcow2-info`: a friendly summary of images, using only the read path.

use std::path::Path;

use serde::Serialize;

use super::human;
use crate::{Disk, DiskImage, DiskOptions, FileIo};
use qcowkit_core::map::Allocation;
use qcowkit_core::partition;
use qcowkit_core::{Backing, BlockRead, Image, OpenOptions};

/// Allocation statistics of the whole disk, in the core's categories.
pub fn allocation(disk: &mut Disk) -> Result<Allocation, crate::DiskError> {
    let size = disk.size();
    Allocation::of(0, size, |pos, len| disk.block_status(pos, len))
}

fn features(img: &Image<FileIo>) -> Vec<String> {
    let h = img.header();
    let mut f = Vec::new();
    if h.extended_l2() {
        f.push(format!(
            "extended L2 entries (32 subclusters of {})",
            human::size(h.cluster_size() / 32)
        ));
    }
    f.push(format!("{} compression", h.compression_type.name()));
    if h.lazy_refcounts() {
        f.push("lazy refcounts".into());
    }
    if h.dirty() {
        f.push("DIRTY (refcounts need repair before writing)".into());
    }
    if h.corrupt() {
        f.push("CORRUPT (marked corrupt; read-only)".into());
    }
    if h.has_data_file() {
        f.push(if h.data_file_raw() {
            "external data file (raw, usable on its own)".into()
        } else {
            "external data file".into()
        });
    }
    if h.bitmaps.is_some() || h.bitmaps_inconsistent {
        f.push(if h.bitmaps_inconsistent {
            "persistent bitmaps (stale)".into()
        } else {
            "persistent bitmaps".into()
        });
    }
    f
}

fn pct(part: u64, total: u64) -> String {
    if total == 0 {
        return "0%".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / total as f64)
}

/// What `qcow2-info --json` shows of one image.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Summary {
    /// The path given.
    pub filename: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// qcow2 version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Cluster size in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Refcount width in bits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refcount_bits: Option<u32>,
    /// Features in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<String>>,
    /// The backing chain, top first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_chain: Option<Vec<String>>,
    /// Why the backing chain could not be opened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// External data file name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// Internal snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotRef>>,
    /// Persistent bitmaps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapRef>>,
    /// Allocation statistics (when the chain could be opened).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Allocation>,
    /// What the guest disk holds: partitions and file systems (when the
    /// chain could be opened).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contents: Option<Contents>,
}

pub use qcowkit_core::contents::{DiskContents as Contents, FilesystemRef, PartitionRef, TableRef};

/// One line for a file system: `ext4, label "root", UUID ..., block size 4 KiB, ...`.
fn fs_text(fs: &FilesystemRef) -> String {
    let mut t = fs.kind.to_string();
    if let Some(v) = fs.version {
        if fs.kind == "LUKS" || fs.kind == "qcow2" {
            t += &format!(" version {v}");
        }
    }
    if let Some(l) = &fs.label {
        t += &format!(", label {l:?}");
    }
    if let Some(u) = &fs.uuid {
        t += &format!(", UUID {u}");
    }
    if let (Some(c), Some(m)) = (&fs.cipher, &fs.cipher_mode) {
        t += &format!(", cipher {c}-{m}");
    }
    if let Some(s) = fs.size {
        let what = if fs.kind == "qcow2" {
            "virtual size"
        } else {
            "size"
        };
        t += &format!(", {what} {}", human::size(s));
    }
    if let Some(b) = fs.block_size {
        let what = match fs.kind {
            "FAT12" | "FAT16" | "FAT32" | "exFAT" | "NTFS" | "qcow2" => "cluster size",
            "Linux swap" => "page size",
            "Btrfs" => "sector size",
            _ => "block size",
        };
        t += &format!(", {what} {}", human::size(b.into()));
    }
    if let Some(f) = &fs.features {
        t += &format!(", features: {}", f.join(" "));
    }
    t
}

/// Reads the partition table and probes the disk and each partition
/// (the core's report); a read error while doing so is the report's
/// `error`.
pub fn contents(disk: &mut Disk) -> Contents {
    let size = disk.size();
    let mut io = partition::from_fn(|off: u64, buf: &mut [u8]| disk.read_at(off, buf));
    qcowkit_core::contents::disk_contents(&mut io, size).unwrap_or_else(|e| Contents {
        error: Some(format!("cannot read the disk: {e}")),
        ..Contents::default()
    })
}

/// The contents in lines of the human summary.
fn contents_text(c: &Contents) -> String {
    let mut t = String::new();
    match &c.partition_table {
        Some(p) if p.kind == "gpt" => {
            t += &format!(
                "  contents:      GPT partition table, {}-byte sectors, disk GUID {}, {} header
",
                p.sector_size,
                p.disk_guid.as_deref().unwrap_or(""),
                p.header.unwrap_or("")
            );
            if let Some(pp) = &p.primary_problem {
                t += &format!(
                    "    the primary GPT header is damaged ({pp}): read from the backup
"
                );
            }
            if let Some(bp) = &p.backup_problem {
                t += &format!(
                    "    the backup GPT header is damaged ({bp})
"
                );
            }
        }
        Some(p) => {
            t += &format!(
                "  contents:      MBR partition table, disk id {}
",
                p.disk_id.as_deref().unwrap_or("")
            );
        }
        None => match (&c.error, &c.filesystem) {
            (Some(e), _) => {
                t += &format!(
                    "  contents:      {e}
"
                )
            }
            (None, Some(f)) => {
                t += &format!(
                    "  contents:      {}
",
                    fs_text(f)
                )
            }
            (None, None) => {
                t += "  contents:      no partition table or file system recognised
"
            }
        },
    }
    if c.partition_table.is_some() {
        if let Some(f) = &c.filesystem {
            t += &format!(
                "    whole disk: {}
",
                fs_text(f)
            );
        }
    }
    for p in &c.partitions {
        let mut line = format!(
            "    partition {}: {} at {}, {}",
            p.number,
            human::size(p.size),
            human::size(p.start),
            p.kind
        );
        if p.logical {
            line += " (logical)";
        }
        if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
            line += &format!(", name {n:?}");
        }
        if !p.flags.is_empty() {
            line += &format!(", {}", p.flags.join(", "));
        }
        t += &line;
        t += "
";
        let indent = " ".repeat(6);
        match &p.filesystem {
            Some(f) => {
                t += &format!(
                    "{indent}{}
",
                    fs_text(f)
                )
            }
            None if p.extended => {}
            None => {
                t += &format!(
                    "{indent}no file system recognised
"
                )
            }
        }
    }
    if c.omitted_partitions > 0 {
        t += &format!(
            "    ({} more partitions not shown)
",
            c.omitted_partitions
        );
    }
    t
}

/// A snapshot in a [`Summary`].
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRef {
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
}

/// A bitmap in a [`Summary`].
#[derive(Debug, Clone, Serialize)]
pub struct BitmapRef {
    /// Name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
}

/// Describes one image as (text, summary).
pub fn describe(
    path: &str,
    force_share: bool,
    follow: crate::Follow,
) -> Result<(String, Summary), crate::DiskError> {
    let opts = DiskOptions {
        force_share,
        follow,
        ..DiskOptions::default()
    };
    let opened = Disk::open(Path::new(path), &opts);
    let (mut disk, backing_problem) = match opened {
        Ok(d) => (d, None),
        Err(
            e @ (qcowkit_core::Error::Open { .. }
            | qcowkit_core::Error::Backing { .. }
            | qcowkit_core::Error::BackingLoop { .. }
            | qcowkit_core::Error::BackingTooDeep { .. }
            | qcowkit_core::Error::UnsupportedBackingFormat(_)),
        ) => {
            let opts = DiskOptions {
                format: None,
                qcow2: OpenOptions {
                    no_backing: true,
                    no_data_file: true,
                    ..super::open_options()
                },
                follow: crate::Follow::None,
                force_share,
                ..DiskOptions::default()
            };
            (Disk::open(Path::new(path), &opts)?, Some(e.to_string()))
        }
        Err(e) => return Err(e),
    };
    let size = disk.size();
    let alloc = if backing_problem.is_none() {
        Some(allocation(&mut disk)?)
    } else {
        None
    };
    let mut t = format!("{path}\n");
    let mut j = Summary {
        filename: path.to_string(),
        virtual_size: size,
        ..Summary::default()
    };
    t += &format!("  virtual size:  {} ({} bytes)\n", human::size(size), size);
    match disk.image_mut() {
        DiskImage::Raw(raw) => {
            t += "  format:        raw\n";
            j.format = "raw";
            if let Ok(Some(a)) = raw.io.allocated_size() {
                t += &format!("  disk usage:    {}\n", human::size(a));
            }
        }
        DiskImage::Qcow2(img) => {
            let h = img.header().clone();
            let compat = if h.version == 2 { "0.10" } else { "1.1" };
            t += &format!(
                "  format:        qcow2 version {} (compat {compat})\n",
                h.version
            );
            t += &format!(
                "  cluster size:  {} ({} bytes)\n",
                human::size(h.cluster_size()),
                h.cluster_size()
            );
            t += &format!("  refcounts:     {}-bit\n", h.refcount_bits());
            let feats = features(img);
            t += &format!("  features:      {}\n", feats.join(", "));
            j.format = "qcow2";
            j.version = Some(h.version);
            j.cluster_size = Some(h.cluster_size());
            j.refcount_bits = Some(h.refcount_bits());
            j.features = Some(feats);
            if let Ok(Some(a)) = img.allocated_size() {
                t += &format!("  disk usage:    {}\n", human::size(a));
            }
            // Backing chain.
            let mut chain = Vec::new();
            let mut cur: &Image<FileIo> = img;
            loop {
                match cur.backing() {
                    Some(Backing::Qcow2(b)) => {
                        chain.push(format!("{} (qcow2)", b.name()));
                        cur = b;
                    }
                    Some(b @ Backing::Raw { .. }) => {
                        chain.push(format!("{} (raw)", b.name()));
                        break;
                    }
                    None => break,
                }
            }
            if let Some(b) = &h.backing_file {
                if chain.is_empty() {
                    chain.push(format!("{b} (not opened)"));
                }
                t += &format!("  backing chain: {}\n", chain.join(" -> "));
                j.backing_chain = Some(chain);
            }
            if let Some(p) = &backing_problem {
                t += &format!("  problem:       {p}\n");
                j.problem = Some(p.clone());
            }
            if let Some(df) = &h.data_file {
                t += &format!("  data file:     {df}\n");
                j.data_file = Some(df.clone());
            }
            let snaps = img.snapshots();
            if snaps.is_empty() {
                t += "  snapshots:     none\n";
            } else {
                t += &format!("  snapshots:     {}\n", snaps.len());
                for s in snaps {
                    t += &format!(
                        "    [{}] {}  taken {}  vm state {}\n",
                        s.id,
                        s.name,
                        human::date(s.date_sec.into()),
                        human::size(s.vm_state_size)
                    );
                }
            }
            j.snapshots = Some(
                snaps
                    .iter()
                    .map(|s| SnapshotRef {
                        id: s.id.clone(),
                        name: s.name.clone(),
                    })
                    .collect(),
            );
            let bms = img.bitmaps();
            if !bms.is_empty() {
                t += &format!("  bitmaps:       {}\n", bms.len());
                for b in bms {
                    let flags: Vec<_> = b.flag_names().collect();
                    t += &format!(
                        "    {}  granularity {}{}\n",
                        b.name,
                        human::size(b.granularity()),
                        if flags.is_empty() {
                            String::new()
                        } else {
                            format!("  ({})", flags.join(", "))
                        }
                    );
                }
            }
            j.bitmaps = Some(
                bms.iter()
                    .map(|b| BitmapRef {
                        name: b.name.clone(),
                        granularity: b.granularity(),
                    })
                    .collect(),
            );
        }
    }
    if let Some(a) = alloc {
        t += &format!(
            "  allocation:    data {} ({}), compressed {} ({}), zero {} ({}), from backing {} ({}), unallocated {} ({})\n",
            pct(a.data, size),
            human::size(a.data),
            pct(a.compressed, size),
            human::size(a.compressed),
            pct(a.zero, size),
            human::size(a.zero),
            pct(a.backing, size),
            human::size(a.backing),
            pct(a.unallocated, size),
            human::size(a.unallocated)
        );
        j.allocation = Some(a);
        // What the guest disk holds (only with the whole chain open: without
        // it the guest view is incomplete).
        let c = contents(&mut disk);
        t += &contents_text(&c);
        j.contents = Some(c);
    }
    Ok((t, j))
}

/// Runs `qcow2-info [--json] IMAGE...`.
pub fn run(args: impl IntoIterator<Item = String>) -> u8 {
    let mut json_out = false;
    let mut force_share = false;
    let mut follow = crate::Follow::Any;
    let mut paths = Vec::new();
    for a in args {
        match a.as_str() {
            "--json" => json_out = true,
            "-U" | "--force-share" => force_share = true,
            "--no-follow" => follow = crate::Follow::None,
            "-h" | "--help" => {
                println!("usage: qcow2-info [--json] [-U] [--no-follow] IMAGE...\n\nA friendly summary of qcow2 and raw disk images.\n-U, --force-share: read images other processes are writing (no locks).\n--no-follow: open no file an image names (backing or data files).");
                return 0;
            }
            "-V" | "--version" => {
                println!("qcow2-info {}", env!("CARGO_PKG_VERSION"));
                return 0;
            }
            _ => paths.push(a),
        }
    }
    if paths.is_empty() {
        eprintln!("qcow2-info: missing image: usage: qcow2-info [--json] IMAGE...");
        return 1;
    }
    let mut status = 0;
    let mut texts = Vec::new();
    let mut values = Vec::new();
    for p in &paths {
        match describe(p, force_share, follow) {
            Ok((t, v)) => {
                texts.push(t);
                values.push(v);
            }
            Err(e) => {
                eprintln!("qcow2-info: {p}: {e}");
                status = 1;
            }
        }
    }
    if json_out {
        println!("{}", super::json_text(&values));
    } else {
        print!("{}", texts.join("\n"));
    }
    status
}
