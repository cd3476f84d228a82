//! Helpers for the integration tests: temporary directories, running
//! `qemu-img`/`qemu-io` and our binaries, reading JSON, and the pieces the
//! test files share:
//!
//! - [`qemu`]: images made and checked with qemu-img and qemu-io;
//! - [`rng`]: small seeded generators and how randomised tests pick and
//!   print their seeds;
//! - [`mem`]: in-memory images and the [`Files`] opener;
//! - [`diff`]: describing where bytes and files differ;
//! - [`be`]: big-endian fields of a byte buffer (reading and patching);
//! - [`heap`]: a counting global allocator for tests that bound heap use;
//! - [`record`]: a storage recording every operation, for crash replays;
//! - [`contents`]: disks with partitions and file systems made by the
//!   real tools, and what those tools say about them;
//! - [`nbd`]: a test NBD client sending well-formed and malformed messages,
//!   and TLS certificates in QEMU's `tls-creds-x509` layout;
//! - [`serve`]: `qcow2 serve` run as a child process for the NBD tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod be;
pub mod contents;
pub mod diff;
pub mod heap;
pub mod mem;
pub mod nbd;
pub mod qemu;
pub mod record;
pub mod rng;
pub mod serve;

pub use be::{get16, get32, get64, put16, put32, put64, set_bits64};
pub use diff::{byte_diff, file_difference, first_difference, first_mismatch};
pub use mem::{new_disk, new_image, Files};
pub use qemu::{
    assert_qemu_img_check, map_entry_at, qemu_compressed, qemu_contents, qemu_create, qemu_image,
    qemu_img, qemu_img_check, qemu_img_compare, qemu_info, qemu_io, qemu_overlay,
};
pub use rng::{announce_seed, env_seed, seed_or, Rng, SplitMix64, XorShift64};

/// A temporary directory that lives as long as the value.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A new empty directory.
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::tempdir().expect("create temp dir"),
        }
    }

    /// Path of `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs a command in `cwd`, returning its output (never panics on a non-zero exit).
pub fn run_in(cwd: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs a command in `cwd` and panics with its stderr unless it succeeds.
pub fn ok_in(cwd: &Path, prog: &str, args: &[&str]) -> String {
    let out = run_in(cwd, prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}): {}",
        out.status,
        output_text(&out)
    );
    stdout_of(&out)
}

/// The standard output of a finished command, as text.
pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The standard error of a finished command, as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Standard output then standard error of a finished command, as text (for
/// failure messages).
pub fn output_text(out: &Output) -> String {
    format!("{}{}", stdout_of(out), stderr_of(out))
}

/// Path of one of this workspace's binaries (`qcow2`, `qcow2-info`), built
/// by cargo next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run the tests through cargo (it builds the workspace binaries)",
        p.display()
    );
    p
}

/// Runs our `qcow2` binary in `cwd`.
pub fn ours(cwd: &Path, args: &[&str]) -> Output {
    run_in(cwd, bin("qcow2").to_str().expect("utf-8 path"), args)
}

/// Runs our `qcow2` binary in `cwd` and returns stdout, panicking on failure.
pub fn ours_ok(cwd: &Path, args: &[&str]) -> String {
    ok_in(cwd, bin("qcow2").to_str().expect("utf-8 path"), args)
}

/// Runs `tool` in `cwd`: `"ours"` is our `qcow2` binary, anything else
/// the program of that name (e.g. `"qemu-img"`), with the same arguments.
pub fn run_tool(tool: &str, cwd: &Path, args: &[&str]) -> Output {
    if tool == "ours" {
        ours(cwd, args)
    } else {
        run_in(cwd, tool, args)
    }
}

/// Compares what one case gave with our tool and with qemu-img, adding a
/// problem naming the case and both results when they differ.
pub fn note_difference<T: PartialEq + std::fmt::Debug>(
    what: &str,
    ours: &T,
    qemu: &T,
    problems: &mut Vec<String>,
) {
    if ours != qemu {
        problems.push(format!("{what}: ours {ours:?}\n   qemu-img {qemu:?}"));
    }
}

/// Parses JSON, panicking with the text on failure.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

/// Exit code of a finished command (-1 when killed by a signal).
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Runs `qcow2 OURS_ARGS` and `qemu-img QEMU_ARGS` in `cwd` and compares
/// their exit codes, stdout and stderr (qemu-img's `qemu-img:` prefixes
/// read as `qcow2:`); `None` when they agree, else both outputs.
pub fn differs_from_qemu_img(cwd: &Path, ours_args: &[&str], qemu_args: &[&str]) -> Option<String> {
    let o = ours(cwd, ours_args);
    let q = run_in(cwd, "qemu-img", qemu_args);
    let qerr = stderr_of(&q).replace("qemu-img:", "qcow2:");
    if (code(&o), stdout_of(&o), stderr_of(&o)) == (code(&q), stdout_of(&q), qerr.clone()) {
        return None;
    }
    Some(format!(
        "ours (exit {}):\n{}{}\nqemu-img (exit {}):\n{}{}",
        code(&o),
        stdout_of(&o),
        stderr_of(&o),
        code(&q),
        stdout_of(&q),
        qerr
    ))
}
