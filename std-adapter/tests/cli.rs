//! CLI contract checks that need no qemu: usage errors and exit codes.
//! (Having an integration test here also makes cargo build the binaries
//! that the workspace `tests/` crate runs.)

use std::process::Command;

fn qcow2(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn missing_file_is_exit_1_with_prefixed_message() {
    let out = qcow2(&["info", "/nonexistent/x.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("qcow2: Could not open '/nonexistent/x.qcow2': "),
        "{err}"
    );
}

#[test]
fn compare_errors_are_exit_2() {
    let out = qcow2(&["compare", "/nonexistent/a", "/nonexistent/b"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn qcow2_info_without_arguments_fails() {
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2-info"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn unknown_format_is_refused() {
    let out = qcow2(&["info", "-f", "vmdk", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown file format 'vmdk'"));
}
