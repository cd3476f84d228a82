//! The `qcow2` command line: a qemu-img compatible subset.
//!
//! Every subcommand returns its exit status; errors are printed as
//! `qcow2: <what>: <why>` on stderr.

use std::fmt::Display;
use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{Disk, DiskError, DiskOptions, Format};

pub mod amend;
pub mod bench;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod human;
pub mod info;
pub mod map;
pub mod measure;
pub mod options;
pub mod progress;
pub mod rebase;
pub mod resize;
pub mod serve;
pub mod snapshot;
pub mod summary;

/// `qcow2`: inspect, check and convert qcow2 images (a qemu-img compatible subset).
#[derive(Debug, Parser)]
#[command(
    name = "qcow2",
    version,
    about = "QEMU disk image utility for qcow2 and raw images (qemu-img's commands, flags, JSON and exit codes)",
    after_help = "Run `qcow2 COMMAND --help` for a command's options and an example."
)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
    /// The passphrase of encrypted images (LUKS or the legacy AES
    /// method), read from FILE: its whole contents, a trailing newline
    /// included, as qemu-img's `--object secret,file=FILE` reads it.
    #[arg(long = "passphrase-file", global = true, value_name = "FILE")]
    pub passphrase_file: Option<std::path::PathBuf>,
    /// The passphrase of the encrypted backing file NAME (as the image
    /// names it), read from FILE; repeatable.
    #[arg(
        long = "backing-passphrase-file",
        global = true,
        value_name = "NAME=FILE"
    )]
    pub backing_passphrase_files: Vec<String>,
    /// qemu-img's secret objects: `secret,id=ID,data=TEXT` or
    /// `secret,id=ID,file=FILE` (the file's whole contents), named by
    /// `-o encrypt.key-secret=ID` when creating an encrypted image; and
    /// `tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=off]`
    /// (TLS of `serve`, named by `--tls-creds ID`).
    #[arg(long = "object", global = true, value_name = "OBJECTDEF")]
    pub objects: Vec<String>,
}

/// The passphrases given on the command line: the images' own, and
/// those of named backing files.
type Secrets = (
    Option<qcowkit_core::luks::Secret>,
    Vec<(String, qcowkit_core::luks::Secret)>,
    Vec<(String, qcowkit_core::luks::Secret)>,
);

/// The passphrases given on the command line.
static SECRETS: std::sync::OnceLock<Secrets> = std::sync::OnceLock::new();

/// Reads the passphrase files of the command line once.
fn load_secrets(cli: &Cli, key_secrets: &KeySecrets) -> Result<(), String> {
    let read = |f: &std::path::Path| {
        std::fs::read(f)
            .map(qcowkit_core::luks::Secret::from)
            .map_err(|e| format!("Could not read the passphrase file '{}': {e}", f.display()))
    };
    let top = cli.passphrase_file.as_deref().map(read).transpose()?;
    let mut backing = Vec::new();
    for b in &cli.backing_passphrase_files {
        let (name, file) = b.split_once('=').ok_or(format!(
            "--backing-passphrase-file expects NAME=FILE, got '{b}'"
        ))?;
        backing.push((name.to_string(), read(std::path::Path::new(file))?));
    }
    let mut objects = Vec::new();
    let mut creds = Vec::new();
    for o in &cli.objects {
        if let Some(props) = o.strip_prefix("tls-creds-x509,") {
            creds.push(crate::nbd::tls::X509Creds::parse(props)?);
            continue;
        }
        let mut parts = o.split(',');
        if parts.next() != Some("secret") {
            return Err(format!(
                "Unsupported object '{o}' (only secret and tls-creds-x509 objects)"
            ));
        }
        let (mut id, mut value) = (None, None);
        for p in parts {
            match p.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("data", v)) => {
                    if value.is_some() {
                        return Err("'file' and 'data' are mutually exclusive".into());
                    }
                    value = Some(qcowkit_core::luks::Secret::from(v));
                }
                Some(("file", f)) => {
                    if value.is_some() {
                        return Err("'file' and 'data' are mutually exclusive".into());
                    }
                    value = Some(read(std::path::Path::new(f))?);
                }
                Some(("format", "raw")) => {}
                _ => return Err(format!("Unsupported secret property '{p}'")),
            }
        }
        let id = id.ok_or("Parameter 'id' is missing")?;
        let value = value.ok_or("Either 'file' or 'data' must be provided")?;
        objects.push((id, value));
    }
    let find = |id: &str| {
        objects
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, v)| v.clone())
            .ok_or(format!("No secret with id '{id}'"))
    };
    let mut top = top;
    for (which, id) in key_secrets {
        let value = find(id)?;
        match which {
            None => top = Some(value),
            Some(name) => backing.push((name.clone(), value)),
        }
    }
    let _ = SECRETS.set((top, backing, objects));
    let _ = TLS_CREDS.set(creds);
    Ok(())
}

/// The `tls-creds-x509` objects given on the command line.
static TLS_CREDS: std::sync::OnceLock<Vec<crate::nbd::tls::X509Creds>> = std::sync::OnceLock::new();

/// The `--object tls-creds-x509,id=ID,...` named `id`.
pub fn tls_creds(id: &str) -> Result<crate::nbd::tls::X509Creds, String> {
    TLS_CREDS
        .get()
        .and_then(|c| c.iter().find(|c| c.id == id))
        .cloned()
        .ok_or(format!("No TLS credentials with id '{id}'"))
}

/// The secret object `id` (`--object secret,id=ID,...`).
pub fn secret(id: &str) -> Result<qcowkit_core::luks::Secret, String> {
    SECRETS
        .get()
        .and_then(|s| s.2.iter().find(|(i, _)| i == id))
        .map(|(_, v)| v.clone())
        .ok_or(format!("No secret with id '{id}'"))
}

/// The passphrase of `--passphrase-file`, if given.
pub fn passphrase() -> Option<qcowkit_core::luks::Secret> {
    SECRETS.get().and_then(|s| s.0.clone())
}

/// Default open options with the passphrases given on the command line.
pub fn open_options() -> qcowkit_core::OpenOptions {
    let mut o = qcowkit_core::OpenOptions::default();
    if let Some((top, backing, _)) = SECRETS.get() {
        o.passphrase = top.clone();
        o.backing_passphrases = backing.clone();
    }
    o
}

/// Output format of `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Text for people.
    Human,
    /// JSON with qemu-img's keys.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Update format-specific options of the image.
    Amend(amend::Args),
    /// Run simple image benchmark (qemu-img bench's flags, plus --random).
    Bench(bench::Args),
    /// Create and format new image file.
    Create(create::Args),
    /// Display information about image.
    Info(info::Args),
    /// Copy one image to another (raw or qcow2) with optional compression.
    Convert(convert::Args),
    /// Dump image metadata (which guest ranges hold data, zeros or nothing).
    Map(map::Args),
    /// Check if two images have the same contents.
    Compare(compare::Args),
    /// Check basic image integrity, and repair it with -r.
    Check(check::Args),
    /// Commit the changes recorded in the image into its backing file.
    Commit(commit::Args),
    /// Calculate file size required for a new image.
    Measure(measure::Args),
    /// Change the backing file of the image.
    Rebase(rebase::Args),
    /// Resize the image to the new size.
    Resize(resize::Args),
    /// Serve the image over NBD (qemu-nbd's flags): to qemu-img, qemu-io,
    /// QEMU's nbd drives, nbd-client and libnbd.
    Serve(serve::Args),
    /// List or manipulate snapshots within image.
    Snapshot(snapshot::Args),
    /// Copy input to output with optional format conversion (dd-style `key=value` arguments).
    #[command(
        after_help = "Examples:\n  qcow2 dd if=vm.qcow2 of=first-mib.raw bs=1M count=1\n  qcow2 dd -O qcow2 if=disk.raw of=vm.qcow2 bs=64k"
    )]
    Dd {
        /// Arguments: `if=IMAGE of=OUT [bs=N] [count=N] [skip=N] [-f FMT] [-O FMT]
        /// [--no-follow | --follow=any|inside|none]`.
        #[arg(allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
}

/// Which files named by an image to open (`--no-follow`, `--follow`).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct FollowArgs {
    /// Refuse to open backing and data files the image names (for
    /// untrusted images); the same as `--follow none`.
    #[arg(long = "no-follow")]
    pub no_follow: bool,
    /// Which files named by the image to open: `any` (the default, like
    /// qemu-img), `inside` (relative names inside the image's directory) or
    /// `none`.
    #[arg(long = "follow", value_enum)]
    pub follow: Option<crate::Follow>,
}

impl FollowArgs {
    /// The policy asked for.
    pub fn policy(&self) -> crate::Follow {
        if self.no_follow {
            crate::Follow::None
        } else {
            self.follow.unwrap_or_default()
        }
    }
}

/// Prints `qcow2: <what>: <why>` on stderr.
pub fn report(what: impl Display, why: impl Display) {
    eprintln!("qcow2: {what}: {why}");
}

/// Secrets named by `--image-opts` option strings: (backing file, the
/// secret's id); `None` for the image itself, `Some("")` for its backing
/// file.
type KeySecrets = Vec<(Option<String>, String)>;

/// qemu-img's `--image-opts`: every image argument after it is an option
/// string (`driver=qcow2,file.filename=PATH,encrypt.key-secret=ID,
/// backing.encrypt.key-secret=ID`); it is replaced by its file name and the
/// secrets it names are returned. Options other than those (and
/// `encrypt.format`, `file.driver=file`) are refused.
fn image_opts(
    args: Vec<std::ffi::OsString>,
) -> Result<(Vec<std::ffi::OsString>, KeySecrets), String> {
    if !args.iter().any(|a| a == "--image-opts") {
        return Ok((args, Vec::new()));
    }
    let mut out = Vec::new();
    let mut secrets = Vec::new();
    for a in args {
        if a == "--image-opts" {
            continue;
        }
        let text = a.to_string_lossy();
        if !(text.starts_with("driver=") || text.contains("file.filename=")) {
            out.push(a);
            continue;
        }
        let mut file = None;
        for (k, v) in qcowkit_options::split(&text) {
            match k.as_str() {
                "driver" if v == "qcow2" || v == "raw" => {}
                "file.filename" | "filename" => file = Some(v),
                "file.driver" if v == "file" => {}
                "encrypt.format" if v == "luks" || v == "aes" => {}
                "encrypt.key-secret" => secrets.push((None, v)),
                "backing.encrypt.key-secret" => secrets.push((Some(String::new()), v)),
                _ => return Err(format!("Unsupported image option '{k}={v}'")),
            }
        }
        out.push(
            file.ok_or(format!("'{text}' names no file (file.filename=...)"))?
                .into(),
        );
    }
    Ok((out, secrets))
}

/// Runs the `qcow2` command line with `args` (including the program name).
pub fn run(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let (args, key_secrets) = match image_opts(args.into_iter().collect()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qcow2: {e}");
            return ExitCode::from(1);
        }
    };
    let is_compare = args.get(1).is_some_and(|a| a == "compare");
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let code = if !e.use_stderr() {
                0
            } else if is_compare {
                2
            } else {
                1
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Err(e) = load_secrets(&cli, &key_secrets) {
        eprintln!("qcow2: {e}");
        return ExitCode::from(1);
    }
    let code = match cli.command {
        Command::Amend(a) => amend::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Create(a) => create::run(&a),
        Command::Info(a) => info::run(&a),
        Command::Convert(a) => convert::run(&a),
        Command::Map(a) => map::run(&a),
        Command::Compare(a) => compare::run(&a),
        Command::Check(a) => check::run(&a),
        Command::Commit(a) => commit::run(&a),
        Command::Measure(a) => measure::run(&a),
        Command::Rebase(a) => rebase::run(&a),
        Command::Resize(a) => resize::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Snapshot(a) => snapshot::run(&a),
        Command::Dd { args } => dd::run(&args),
    };
    ExitCode::from(code)
}

/// Open options with an optional `--l2-cache-size` value applied.
pub fn cache_options(l2_cache_size: &Option<String>) -> Result<qcowkit_core::OpenOptions, String> {
    let mut opts = open_options();
    if let Some(s) = l2_cache_size {
        opts.l2_cache_bytes =
            Some(parse_size(s).ok_or_else(|| format!("invalid l2-cache-size '{s}'"))?);
    }
    Ok(opts)
}

/// Parses a `-f`/`-O` format name, reporting unknown ones.
pub fn parse_format(s: &Option<String>) -> Result<Option<Format>, String> {
    match s {
        None => Ok(None),
        Some(f) => Format::parse(f)
            .map(Some)
            .ok_or_else(|| format!("Unknown file format '{f}'")),
    }
}

/// Opens `path` as a disk, printing a qemu-img style error on failure.
pub fn open_disk(
    path: &str,
    format: Option<Format>,
    opts: qcowkit_core::OpenOptions,
    force_share: bool,
) -> Result<Disk, DiskError> {
    open_disk_with(path, format, opts, crate::Follow::Any, force_share)
}

/// Like [`open_disk`], opening the files the image names as `follow`
/// allows; `force_share` (`-U`) takes no locks.
pub fn open_disk_with(
    path: &str,
    format: Option<Format>,
    opts: qcowkit_core::OpenOptions,
    follow: crate::Follow,
    force_share: bool,
) -> Result<Disk, DiskError> {
    Disk::open(
        Path::new(path),
        &DiskOptions {
            format,
            qcow2: opts,
            follow,
            force_share,
            ..DiskOptions::default()
        },
    )
}

/// `value` as JSON the way qemu-img prints it: one member per line,
/// indented by 4 spaces.
pub fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    match value.serialize(&mut ser) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Parses a size with an optional k/M/G/T/P/E suffix (qemu-img's rules).
pub fn parse_size(s: &str) -> Option<u64> {
    qcowkit_options::parse_size(s)
}
