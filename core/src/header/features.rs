//! Feature bits of the header (incompatible, compatible, autoclear) and
//! the feature name table that names them.

use alloc::string::String;
use alloc::vec::Vec;

use super::Header;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is corrupt and must not be written.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// A non-zlib compression type is used.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTL2: u64 = 1 << 4;
    /// All bits this implementation knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts may be used.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// All bits this implementation knows.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number within the feature bitmap.
    pub bit: u8,
    /// Name (up to 46 bytes).
    pub name: String,
}

impl Header {
    /// Names of the feature bits in `bits` of feature type `kind`, from the
    /// image's feature name table (bits without a name are shown as `bit N`).
    pub fn feature_names_for(&self, kind: u8, bits: u64) -> String {
        let mut out = String::new();
        for bit in 0..64u8 {
            if bits & (1u64 << bit) == 0 {
                continue;
            }
            if !out.is_empty() {
                out.push_str(", ");
            }
            match self
                .feature_names
                .iter()
                .find(|f| f.kind == kind && f.bit == bit)
            {
                Some(f) => out.push_str(&f.name),
                None => {
                    out.push_str("bit ");
                    push_decimal(&mut out, bit.into());
                }
            }
        }
        out
    }
}

/// Appends the decimal form of `v` to `out` (no_std, no `format!` needed).
pub(crate) fn push_decimal(out: &mut String, v: u64) {
    let mut digits = [0u8; 20];
    let mut n = v;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[i..] {
        out.push(char::from(*d));
    }
}

/// The feature name table QEMU writes into new version 3 images.
pub fn default_feature_names() -> Vec<FeatureName> {
    let f = |kind: u8, bit: u8, name: &str| FeatureName {
        kind,
        bit,
        name: String::from(name),
    };
    alloc::vec![
        f(0, 0, "dirty bit"),
        f(0, 1, "corrupt bit"),
        f(0, 2, "external data file"),
        f(0, 3, "compression type"),
        f(0, 4, "extended L2 entries"),
        f(1, 0, "lazy refcounts"),
        f(2, 0, "bitmaps"),
        f(2, 1, "raw external data"),
    ]
}
