//! Human-readable numbers as qemu-img prints them.

/// `size_to_str`: three significant digits with a binary unit, e.g. `384 KiB`.
pub fn size(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = val as f64 * 1024.0 / 1000.0;
    let exp = if scaled < 1.0 {
        0
    } else {
        scaled.log2().floor() as i64 + 1
    };
    let i = ((exp - 1) / 10).clamp(0, 6) as usize;
    let v = val as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", sig3(v), SUFFIXES[i])
}

/// `%0.3g` for values in [0, 1000).
fn sig3(v: f64) -> String {
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `YYYY-MM-DD HH:MM:SS` for seconds since the epoch (UTC).
pub fn date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `HHHH:MM:SS.mmm` for a guest clock in nanoseconds.
pub fn vm_clock(nsec: u64) -> String {
    let ms = nsec / 1_000_000;
    let secs = ms / 1000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(393216), "384 KiB");
        assert_eq!(size(10485760), "10 MiB");
        assert_eq!(size(200704), "196 KiB");
        assert_eq!(size(1000), "0.977 KiB");
        assert_eq!(size(3 << 29), "1.5 GiB");
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01 00:00:00");
        assert_eq!(date(1795691069), "2026-11-26 11:04:29");
        assert_eq!(vm_clock(3_723_004_000_000), "0001:02:03.004");
    }
}
