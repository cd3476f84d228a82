//! # qcowkit-options
//!
//! qemu-img's command-line syntax for creating qcow2 images, shared by the
//! hosts (the `qcow2` CLI, the wasm package): `-o key=value,...` lists, the
//! option names and values of `qemu-img create -f qcow2`, and sizes with
//! suffixes (`64k`, `1.5G`). The format crate (`qcowkit-core`) only knows
//! [`CreateOptions`] as a typed struct; this crate turns text into it.
//! `no_std` with `alloc`.
//!
//! ```
//! use qcowkit_core::CreateOptions;
//!
//! let mut c = CreateOptions::default();
//! let size_given = qcowkit_options::apply(&mut c, "cluster_size=4k,size=1G").unwrap();
//! assert!(size_given);
//! assert_eq!((c.cluster_size, c.size), (4096, 1 << 30));
//! assert_eq!(
//!     qcowkit_options::apply(&mut c, "bogus=1").unwrap_err().to_string(),
//!     "Invalid parameter 'bogus'"
//! );
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use qcowkit_core::header::CompressionType;
use qcowkit_core::{CreateOptions, Preallocation};

/// A creation option that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OptionError {
    /// No option has this name.
    Unknown {
        /// The name given.
        key: String,
    },
    /// The value is not valid for the option.
    InvalidValue {
        /// The option's name.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionError::Unknown { key } => write!(f, "Invalid parameter '{key}'"),
            OptionError::InvalidValue { key, value, reason } => {
                write!(f, "Invalid value '{value}' for '{key}': {reason}")
            }
        }
    }
}

impl core::error::Error for OptionError {}

/// Parses a size with an optional `k`/`M`/`G`/`T`/`P`/`E` suffix (powers of
/// 1024) or `b` (bytes), like qemu-img; decimal fractions are accepted when
/// the result is a whole number of bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    // "1.5G": whole part and fraction, in integer arithmetic.
    let (whole, frac) = num.split_once('.')?;
    if frac.is_empty() || frac.len() > 18 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let frac_num: u128 = frac.parse().ok()?;
    let denom: u128 = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    let frac_bytes = frac_num.checked_mul(u128::from(mult))?;
    if frac_bytes % denom != 0 {
        return None;
    }
    let frac_bytes = u64::try_from(frac_bytes / denom).ok()?;
    whole.checked_mul(mult)?.checked_add(frac_bytes)
}

/// Splits `a=b,c=d` into pairs (a doubled comma is a literal comma, as in
/// qemu-img; a key without `=` means `on`).
pub fn split(opts: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = opts.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(core::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|it| match it.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (it, "on".to_string()),
        })
        .collect()
}

fn on_off(v: &str) -> Result<bool, &'static str> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err("expects 'on' or 'off'"),
    }
}

/// Parses qemu-img's preallocation mode names (`off`, `metadata`,
/// `falloc`, `full`).
pub fn parse_preallocation(s: &str) -> Option<Preallocation> {
    match s {
        "off" => Some(Preallocation::Off),
        "metadata" => Some(Preallocation::Metadata),
        "falloc" => Some(Preallocation::Falloc),
        "full" => Some(Preallocation::Full),
        _ => None,
    }
}

/// qemu-img's name of a preallocation mode.
pub fn preallocation_name(p: Preallocation) -> &'static str {
    match p {
        Preallocation::Off => "off",
        Preallocation::Metadata => "metadata",
        Preallocation::Falloc => "falloc",
        Preallocation::Full => "full",
    }
}

/// Sets one option of `c` by its qemu-img name (`size`, `cluster_size`,
/// `compat`, `refcount_bits`, `extended_l2`, `compression_type`,
/// `backing_file`, `backing_fmt`, `data_file`, `data_file_raw`,
/// `preallocation`, `lazy_refcounts`).
pub fn set(c: &mut CreateOptions, key: &str, value: &str) -> Result<(), OptionError> {
    let invalid = |reason| OptionError::InvalidValue {
        key: key.to_string(),
        value: value.to_string(),
        reason,
    };
    let size = |what| parse_size(value).ok_or_else(|| invalid(what));
    match key {
        "size" => c.size = size("invalid size")?,
        "cluster_size" => c.cluster_size = size("invalid cluster size")?,
        "compat" => {
            c.v3 = match value {
                "0.10" | "v2" => false,
                "1.1" | "v3" => true,
                _ => return Err(invalid("invalid compatibility level (0.10 or 1.1)")),
            }
        }
        "refcount_bits" => {
            c.refcount_bits = value
                .parse()
                .map_err(|_| invalid("invalid refcount width"))?
        }
        "extended_l2" => c.extended_l2 = on_off(value).map_err(invalid)?,
        "lazy_refcounts" => c.lazy_refcounts = on_off(value).map_err(invalid)?,
        "data_file_raw" => c.data_file_raw = on_off(value).map_err(invalid)?,
        "compression_type" => {
            c.compression_type = match value {
                "zlib" => CompressionType::Zlib,
                "zstd" => CompressionType::Zstd,
                _ => return Err(invalid("invalid compression type (zlib or zstd)")),
            }
        }
        "backing_file" => c.backing_file = Some(value.to_string()),
        "backing_fmt" => c.backing_format = Some(value.to_string()),
        "data_file" => c.data_file = Some(value.to_string()),
        "preallocation" => {
            c.preallocation = parse_preallocation(value).ok_or_else(|| {
                invalid("invalid preallocation mode (off, metadata, falloc, full)")
            })?
        }
        "encryption" | "encrypt.format" => {
            return Err(invalid("encrypted images cannot be created yet"))
        }
        _ => {
            return Err(OptionError::Unknown {
                key: key.to_string(),
            })
        }
    }
    Ok(())
}

/// Applies a `-o` list (`key=value,...`) to `c`. Returns whether it gave
/// the size.
pub fn apply(c: &mut CreateOptions, opts: &str) -> Result<bool, OptionError> {
    let mut size_given = false;
    for (k, v) in split(opts) {
        set(c, &k, &v)?;
        size_given |= k == "size";
    }
    Ok(size_given)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("0.5k"), Some(512));
        assert_eq!(parse_size("0.3"), None);
        assert_eq!(parse_size("2T"), Some(2 << 40));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999E"), None);
    }

    #[test]
    fn splits_and_applies() {
        assert_eq!(
            split("a=1,,2,b"),
            vec![("a".into(), "1,2".into()), ("b".into(), "on".into())]
        );
        let mut c = CreateOptions::default();
        let given = apply(
            &mut c,
            "cluster_size=4k,compat=0.10,size=1G,extended_l2=off",
        )
        .unwrap();
        assert!(given);
        assert_eq!(c.cluster_size, 4096);
        assert!(!c.v3);
        assert_eq!(c.size, 1 << 30);
        assert_eq!(
            apply(&mut c, "bogus=1"),
            Err(OptionError::Unknown {
                key: "bogus".into()
            })
        );
        assert_eq!(
            apply(&mut c, "extended_l2=maybe").unwrap_err().to_string(),
            "Invalid value 'maybe' for 'extended_l2': expects 'on' or 'off'"
        );
        set(&mut c, "preallocation", "falloc").unwrap();
        assert_eq!(preallocation_name(c.preallocation), "falloc");
    }
}
