//! Images made, read and checked with QEMU's tools: `qemu-img` and
//! `qemu-io`, run in a working directory.

use std::fmt::Display;
use std::path::Path;

use crate::{code, ok_in, output_text, run_in};

/// `qemu-img ARGS` in `cwd`, which must succeed; returns its standard output.
pub fn qemu_img(cwd: &Path, args: &[&str]) -> String {
    ok_in(cwd, "qemu-img", args)
}

/// `qemu-io -c CMD... IMAGE` in `cwd` (format qcow2), which must succeed
/// and report no error; returns its standard output.
pub fn qemu_io<S: AsRef<str>>(cwd: &Path, image: &str, cmds: &[S]) -> String {
    let cmds: Vec<&str> = cmds.iter().map(AsRef::as_ref).collect();
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
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

/// `qemu-img create -q -f qcow2 [-o OPTS] NAME SIZE` in `cwd` (no `-o` when
/// `opts` is empty).
pub fn qemu_create(cwd: &Path, name: &str, opts: &str, size: impl Display) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, &size]);
    qemu_img(cwd, &args);
}

/// An overlay: `qemu-img create -q -f qcow2 [-o OPTS] -b BACKING -F FORMAT
/// NAME [SIZE]` in `cwd`, where `backing` is (BACKING, FORMAT). Without a
/// size the overlay has its backing file's.
pub fn qemu_overlay(
    cwd: &Path,
    name: &str,
    opts: &str,
    (backing, format): (&str, &str),
    size: Option<&str>,
) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["-b", backing, "-F", format, name]);
    args.extend(size);
    qemu_img(cwd, &args);
}

/// Makes qcow2 image `name` in `cwd` with [`qemu_create`], writes it with
/// the qemu-io commands `cmds` (if any) and returns the file's bytes.
pub fn qemu_image<S: AsRef<str>>(
    cwd: &Path,
    name: &str,
    opts: &str,
    size: impl Display,
    cmds: &[S],
) -> Vec<u8> {
    qemu_create(cwd, name, opts, size);
    if !cmds.is_empty() {
        qemu_io(cwd, name, cmds);
    }
    std::fs::read(cwd.join(name)).expect("read the image qemu-img made")
}

/// `qemu-img convert -c -f raw -O qcow2 [-o OPTS] RAW NAME` in `cwd`: a
/// qcow2 image of the raw file `raw` with every cluster compressed that
/// compresses.
pub fn qemu_compressed(cwd: &Path, raw: &str, name: &str, opts: &str) {
    let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([raw, name]);
    qemu_img(cwd, &args);
}

/// Guest contents of the qcow2 image `img` in `cwd`, as QEMU reads them:
/// `qemu-img convert -f qcow2 -O raw` into a temporary file, read and
/// removed.
pub fn qemu_contents(cwd: &Path, img: &str) -> Vec<u8> {
    let raw = format!("{img}.contents.raw");
    qemu_img(cwd, &["convert", "-f", "qcow2", "-O", "raw", img, &raw]);
    let bytes = std::fs::read(cwd.join(&raw)).expect("read converted image");
    std::fs::remove_file(cwd.join(&raw)).expect("remove converted image");
    bytes
}

/// `qemu-img info --output=json IMG` in `cwd`, parsed.
pub fn qemu_info(cwd: &Path, img: &str) -> serde_json::Value {
    crate::json(&qemu_img(cwd, &["info", "--output=json", img]))
}

/// Runs `qemu-img ARGS` in `cwd`: Ok when it exits 0, else an error naming
/// it as `what` with the exit code and what it printed.
fn qemu_img_exits_0(cwd: &Path, args: &[&str], what: &str) -> Result<(), String> {
    let out = run_in(cwd, "qemu-img", args);
    if code(&out) == 0 {
        Ok(())
    } else {
        Err(format!(
            "qemu-img {what} exited {}: {}",
            code(&out),
            output_text(&out)
        ))
    }
}

/// `qemu-img check -f qcow2 IMG` in `cwd`: Ok when it exits 0 (a clean
/// image), else an error with the exit code and what it printed.
pub fn qemu_img_check(cwd: &Path, img: &str) -> Result<(), String> {
    let what = format!("check {img}");
    qemu_img_exits_0(cwd, &["check", "-f", "qcow2", img], &what)
}

/// [`qemu_img_check`], panicking with its error unless the image is clean.
pub fn assert_qemu_img_check(cwd: &Path, img: &str) {
    if let Err(e) = qemu_img_check(cwd, img) {
        panic!("{e}");
    }
}

/// `qemu-img compare -f FA -F FB A B` in `cwd`: Ok when it exits 0 (same
/// guest contents), else an error with the exit code and what it printed.
pub fn qemu_img_compare(cwd: &Path, a: &str, fa: &str, b: &str, fb: &str) -> Result<(), String> {
    let what = format!("compare {a} {b}");
    qemu_img_exits_0(cwd, &["compare", "-f", fa, "-F", fb, a, b], &what)
}

/// The entry of `qemu-img map --output=json`'s `map` (an array) covering
/// guest `offset`.
pub fn map_entry_at(map: &serde_json::Value, offset: u64) -> serde_json::Value {
    map.as_array()
        .expect("a map is an array")
        .iter()
        .find(|e| {
            let start = e["start"].as_u64().unwrap_or(u64::MAX);
            let len = e["length"].as_u64().unwrap_or(0);
            start <= offset && offset < start.saturating_add(len)
        })
        .cloned()
        .unwrap_or_else(|| panic!("no map entry covers {offset}: {map}"))
}
