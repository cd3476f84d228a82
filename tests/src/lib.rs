//! Helpers for the integration tests: temporary directories, running
//! `qemu-img`/`qemu-io` and our binaries, reading JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        "{prog} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS` in `cwd`, which must succeed.
pub fn qemu_img(cwd: &Path, args: &[&str]) -> String {
    ok_in(cwd, "qemu-img", args)
}

/// `qemu-io -c CMD... IMAGE` in `cwd` (format qcow2), which must succeed
/// and report no error.
pub fn qemu_io(cwd: &Path, image: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    let out = ok_in(cwd, "qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {cmds:?} reported: {out}"
    );
    out
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

/// Parses JSON, panicking with the text on failure.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

/// Exit code of a finished command (-1 when killed by a signal).
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}
