//! `qcow2`: a qemu-img compatible subset (see `qcow2 --help`).
fn main() -> std::process::ExitCode {
    qcowkit_std::cli::run(std::env::args_os())
}
