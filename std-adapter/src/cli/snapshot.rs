//! `qcow2 snapshot`: list, take, apply and delete internal snapshots
//! (qemu-img's flags, table and messages).

use std::path::Path;

use clap::Parser;

use super::{open_disk, parse_format};
use crate::{DiskImage, Follow};
use qcowkit_core::report::SnapshotInfo;
use qcowkit_core::OpenOptions;

/// Arguments of `qcow2 snapshot`.
#[derive(Debug, Parser)]
#[command(
    after_help = "Examples:\n  qcow2 snapshot -l vm.qcow2\n  qcow2 snapshot -c before-upgrade vm.qcow2\n  qcow2 snapshot -a before-upgrade vm.qcow2\n  qcow2 snapshot -d before-upgrade vm.qcow2"
)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["list", "create", "apply", "delete"])))]
pub struct Args {
    /// Image format (only qcow2 has snapshots).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// List the snapshots.
    #[arg(short = 'l')]
    pub list: bool,
    /// Take a snapshot of the disk as it is now, named NAME.
    #[arg(short = 'c', value_name = "NAME")]
    pub create: Option<String>,
    /// Revert the disk to the snapshot with ID or name SNAPSHOT.
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    pub apply: Option<String>,
    /// Delete the snapshot named NAME.
    #[arg(short = 'd', value_name = "NAME")]
    pub delete: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Take no locks (list the snapshots of an image in use).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub filename: String,
}

/// Runs `qcow2 snapshot`.
pub fn run(a: &Args) -> u8 {
    match snapshot(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("qcow2: {e}");
            1
        }
    }
}

fn snapshot(a: &Args) -> Result<(), String> {
    let fmt = parse_format(&a.format)?;
    if a.list {
        let opts = OpenOptions {
            no_backing: true,
            no_data_file: true,
            ..super::open_options()
        };
        let disk = open_disk(&a.filename, fmt, opts, a.force_share)
            .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
        if let DiskImage::Qcow2(img) = disk.image() {
            let snaps: Vec<SnapshotInfo> = img.snapshots().iter().map(SnapshotInfo::of).collect();
            if !snaps.is_empty() && !a.quiet {
                print!("Snapshot list:\n{}", super::info::snapshot_table(&snaps));
            }
        }
        return Ok(());
    }
    let mut img =
        crate::open_qcow2_rw_following(Path::new(&a.filename), &super::open_options(), Follow::Any)
            .map_err(|e| format!("Could not open '{}': {e}", a.filename))?;
    if let Some(name) = &a.apply {
        return match img.apply_snapshot(name) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"
            )),
            Err(qcowkit_core::Error::Unsupported(why)) => {
                Err(format!("Could not apply snapshot '{name}': {why}"))
            }
            Err(e) => Err(format!("Could not apply snapshot '{name}': {e}")),
        };
    }
    if let Some(name) = &a.delete {
        return match img.delete_snapshot(name) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "Could not delete snapshot '{name}': snapshot not found"
            )),
            Err(e) => Err(format!("Could not delete snapshot '{name}': {e}")),
        };
    }
    let name = a.create.as_deref().unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
    img.create_snapshot(name, secs, now.subsec_nanos())
        .map_err(|e| format!("Could not create snapshot '{name}': {e}"))?;
    Ok(())
}
