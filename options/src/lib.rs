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
use qcowkit_core::luks::{CipherMode, HashAlg, IvGen, LuksOptions, Secret};
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

/// Parses a size the way qemu-img does (QEMU's `qemu_strtosz`): a decimal
/// number with an optional `b`/`k`/`M`/`G`/`T`/`P`/`E` suffix (bytes and
/// powers of 1024, either case), or `0x` hexadecimal without a suffix. A
/// decimal fraction needs a suffix other than `b` and is rounded to the
/// nearest byte (`1.5k` is 1536, `12.345M` 12944671). Leading whitespace
/// and a `+` sign are accepted; anything after the suffix is not.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim_start();
    let s = s.strip_prefix('+').unwrap_or(s);
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
    let whole_len = digits(s);
    let (whole, rest) = s.split_at(whole_len);
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(r) => {
            let n = digits(r);
            (Some(&r[..n]), &r[n..])
        }
        None => (None, rest),
    };
    if whole.is_empty() && frac.is_none_or(str::is_empty) {
        return None;
    }
    let mult: u64 = match rest {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return None,
    };
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let value = whole.checked_mul(mult)?;
    let Some(frac) = frac else {
        return Some(value);
    };
    if mult == 1 {
        return None; // a fraction of a byte
    }
    // The fraction times the multiplier, rounded; digits beyond the 20th
    // cannot change the result for multipliers up to 2^60.
    let frac = &frac[..frac.len().min(20)];
    if frac.is_empty() {
        return Some(value);
    }
    let num: u128 = frac.parse().ok()?;
    let denom = 10u128.pow(u32::try_from(frac.len()).ok()?);
    let scaled = (num * u128::from(mult) + denom / 2) / denom;
    value.checked_add(u64::try_from(scaled).ok()?)
}

/// Parses a number the way qemu-img's `strtoul` with base 0 does (e.g.
/// `--pattern`): decimal, `0x` hexadecimal or `0` octal, no suffix.
pub fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim_start();
    let s = s.strip_prefix('+').unwrap_or(s);
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if s.len() > 1 && s.starts_with('0') {
        return u64::from_str_radix(&s[1..], 8).ok();
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
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
        "encrypt.format" => match value {
            "luks" => {
                if c.encrypt.is_none() {
                    c.encrypt = Some(LuksOptions::new(Secret::default()));
                }
            }
            "aes" => {
                return Err(invalid(
                    "images of the legacy AES method are read only (use encrypt.format=luks)",
                ))
            }
            _ => return Err(invalid("invalid encryption format (luks)")),
        },
        "encryption" => {
            return Err(invalid(
                "images of the legacy AES method are read only (use encrypt.format=luks)",
            ))
        }
        "encrypt.cipher-alg"
        | "encrypt.cipher-mode"
        | "encrypt.ivgen-alg"
        | "encrypt.ivgen-hash-alg"
        | "encrypt.hash-alg" => {
            let e = c
                .encrypt
                .get_or_insert_with(|| LuksOptions::new(Secret::default()));
            match key {
                "encrypt.cipher-alg" => {
                    e.key_bytes = match value {
                        "aes-128" => 16,
                        "aes-192" => 24,
                        "aes-256" => 32,
                        _ => {
                            return Err(invalid("cipher not supported (aes-128, aes-192, aes-256)"))
                        }
                    }
                }
                "encrypt.cipher-mode" => {
                    e.mode = CipherMode::parse(value)
                        .ok_or_else(|| invalid("invalid cipher mode (xts, cbc, ctr, ecb)"))?
                }
                "encrypt.ivgen-alg" => {
                    let hash = match e.ivgen {
                        IvGen::Essiv(h) => h,
                        _ => HashAlg::Sha256,
                    };
                    e.ivgen = match value {
                        "plain" => IvGen::Plain,
                        "plain64" => IvGen::Plain64,
                        "essiv" => IvGen::Essiv(hash),
                        _ => return Err(invalid("invalid IV generator (plain, plain64, essiv)")),
                    }
                }
                "encrypt.ivgen-hash-alg" => {
                    let h = HashAlg::parse(value).ok_or_else(|| invalid("hash not supported"))?;
                    if let IvGen::Essiv(_) = e.ivgen {
                        e.ivgen = IvGen::Essiv(h);
                    }
                }
                _ => {
                    e.hash = HashAlg::parse(value).ok_or_else(|| {
                        invalid("hash not supported (sha1, sha224, sha256, sha384, sha512)")
                    })?
                }
            }
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
        // qemu-img's answers (qemu-img create, 10.0).
        for (text, want) in [
            ("0x100000", Some(1 << 20)),
            ("0X100000", Some(1 << 20)),
            ("1.0001k", Some(1024)),
            ("12.345M", Some(12_944_671)),
            ("08k", Some(8192)),
            (" 64k", Some(65536)),
            ("+5k", Some(5120)),
            ("1.k", Some(1024)),
            (".5k", Some(512)),
            ("5B", Some(5)),
            ("1e3", None),
            ("0x10k", None),
            ("64kB", None),
            ("64k ", None),
            ("0x", None),
            ("-1", None),
            ("1.5", None),
            ("1.5b", None),
            ("0x1.8", None),
            ("0b11", None),
            (".k", None),
            ("", None),
        ] {
            assert_eq!(parse_size(text), want, "{text:?}");
        }
        assert_eq!(parse_number("0xa5"), Some(165));
        assert_eq!(parse_number("0245"), Some(165));
        assert_eq!(parse_number("165"), Some(165));
        assert_eq!(parse_number("0"), Some(0));
        assert_eq!(parse_number("09"), None);
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number("5k"), None);
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
