//! `-p` progress bars on stderr.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar over `total` bytes, hidden unless `show`.
pub fn bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("    ({percent:>3}.00/100%) [{bar:40}] {bytes}/{total_bytes}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// A progress bar over `total` steps, shown as qemu-img shows progress
/// (`    (NN.00/100%)`), hidden unless `show`.
pub fn steps(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total.max(1)), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("    ({percent:>3}.00/100%)") {
        pb.set_style(style);
    }
    pb
}
