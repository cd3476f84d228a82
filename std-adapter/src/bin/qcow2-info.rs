//! `qcow2-info`: a friendly summary of disk images.
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(qcowkit_std::cli::summary::run(std::env::args().skip(1)))
}
