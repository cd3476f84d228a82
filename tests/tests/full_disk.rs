//! A write workload that fills the file system midway: the command fails
//! cleanly, what completed stays durable and referenced (as QEMU's close
//! flushes), and the image is not corrupted.

use std::path::{Path, PathBuf};

use qcowkit_tests::*;

/// A small tmpfs, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let opts = format!("size={size}");
        let out = run_in(
            dir,
            "mount",
            &["-t", "tmpfs", "-o", &opts, "tmpfs", dir.to_str().unwrap()],
        );
        assert_eq!(code(&out), 0, "mount a tmpfs: {}", output_text(&out));
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = run_in(Path::new("/"), "umount", &[self.0.to_str().unwrap()]);
    }
}

#[test]
fn a_full_file_system_midway_leaves_a_clean_image_with_what_was_written() {
    let s = Scratch::new();
    let fs = SmallFs::mount(&s.path("small"), "3m");
    let d = fs.0.as_path();
    qemu_create(d, "img.qcow2", "", "64M");
    // 16 MiB of 4 KiB writes into 3 MiB: the file system fills midway.
    let out = ours(
        d,
        &[
            "bench",
            "-q",
            "-w",
            "-c",
            "4000",
            "-s",
            "4k",
            "--pattern=90",
            "img.qcow2",
        ],
    );
    assert_ne!(code(&out), 0, "bench -w cannot succeed");
    assert!(
        stderr_of(&out).contains("No space left"),
        "{}",
        stderr_of(&out)
    );
    // Not corrupted (leaks are allowed after a failure).
    let check = run_in(d, "qemu-img", &["check", "img.qcow2"]);
    assert!(
        code(&check) == 0 || code(&check) == 3,
        "qemu-img check: {}",
        output_text(&check)
    );
    // The first MiB completed before the disk filled: it was flushed when
    // the command failed, so it is there.
    let read = run_in(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 90 0 1M", "img.qcow2"],
    );
    let text = output_text(&read);
    assert!(
        code(&read) == 0 && !text.contains("failed"),
        "the completed writes are readable: {text}"
    );
}
