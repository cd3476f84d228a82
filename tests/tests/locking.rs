//! Our tools and QEMU exclude each other like two QEMUs do: the same
//! byte-range locks, in both directions; `-U` reads anyway.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qcowkit_core::OpenOptions;
use qcowkit_tests::*;

/// Waits (polling, bounded) until someone holds QEMU's locks on `path`.
fn wait_until_locked(path: &std::path::Path, child: &mut Child) {
    let file = std::fs::File::open(path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !qcowkit_std::lock::in_use(&file).unwrap() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "qemu-io exited before locking"
        );
        assert!(Instant::now() < deadline, "qemu-io never locked the image");
        std::thread::yield_now();
    }
}

#[test]
fn a_running_qemu_io_keeps_our_tools_out() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "busy.qcow2", "", "1M");
    // qemu-io holds the image open for writing while it sleeps.
    let mut child = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 4k",
            "-c",
            "sleep 30000",
            "busy.qcow2",
        ])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-io");
    wait_until_locked(&d.join("busy.qcow2"), &mut child);

    let bench = ours(d, &["bench", "-q", "-w", "-c", "1", "busy.qcow2"]);
    let info = ours(d, &["info", "busy.qcow2"]);
    let forced = ours(d, &["info", "-U", "busy.qcow2"]);
    let lib = qcowkit_std::open_qcow2_rw(&d.join("busy.qcow2"), &OpenOptions::default());
    child.kill().unwrap();
    child.wait().unwrap();

    assert_ne!(code(&bench), 0);
    assert!(
        stderr_of(&bench).contains("Failed to get \"write\" lock"),
        "{}",
        stderr_of(&bench)
    );
    assert_ne!(code(&info), 0);
    assert!(
        stderr_of(&info).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr_of(&info)
    );
    assert_eq!(code(&forced), 0, "{}", stderr_of(&forced));
    assert!(stdout_of(&forced).contains("virtual size: 1 MiB"));
    assert!(lib.is_err());
    // Once qemu-io is gone, we write.
    ours_ok(d, &["bench", "-q", "-w", "-c", "1", "busy.qcow2"]);
}

#[test]
fn our_writer_keeps_qemu_out() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "ours.qcow2", "", "1M");
    let mut img =
        qcowkit_std::open_qcow2_rw(&d.join("ours.qcow2"), &OpenOptions::default()).unwrap();
    img.write_at(0, &[9; 4096]).unwrap();
    img.flush().unwrap();

    let write = run_in(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 512", "ours.qcow2"],
    );
    assert!(
        output_text(&write).contains("Failed to get \"write\" lock"),
        "{}",
        output_text(&write)
    );
    let info = run_in(d, "qemu-img", &["info", "ours.qcow2"]);
    assert_ne!(code(&info), 0);
    assert!(
        output_text(&info).contains("Failed to get shared \"write\" lock"),
        "{}",
        output_text(&info)
    );
    let forced = run_in(d, "qemu-img", &["info", "-U", "ours.qcow2"]);
    assert_eq!(code(&forced), 0, "{}", output_text(&forced));
    // A second writer of ours is refused too.
    assert!(qcowkit_std::open_qcow2_rw(&d.join("ours.qcow2"), &OpenOptions::default()).is_err());

    drop(img);
    qemu_io(d, "ours.qcow2", &["write -P 1 0 512"]);
    assert_qemu_img_check(d, "ours.qcow2");
}
