//! Unit tests of the header decoder and encoder.

use super::*;
use alloc::string::ToString;

/// A valid v3 header for a 1 MiB image with 64 KiB clusters.
pub(crate) fn sample() -> Header {
    Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 16,
        size: 1 << 20,
        crypt_method: CryptMethod::None,
        l1_size: 1,
        l1_table_offset: 0x30000,
        refcount_table_offset: 0x10000,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: CompressionType::Zlib,
        backing_file: None,
        backing_format: None,
        data_file: None,
        feature_names: Vec::new(),
        bitmaps: None,
        bitmaps_inconsistent: false,
        crypto: None,
        unknown_extensions: Vec::new(),
    }
}

fn encode(h: &Header) -> Vec<u8> {
    let mut b = h.encode_fixed();
    b.extend(h.encode_extensions());
    b
}

#[test]
fn round_trip_v3_with_extensions() {
    let mut h = sample();
    h.backing_format = Some("qcow2".into());
    h.feature_names.push(FeatureName {
        kind: 0,
        bit: 4,
        name: "extended L2 entries".into(),
    });
    h.unknown_extensions.push(UnknownExtension {
        kind: 0x1234,
        data: alloc::vec![1, 2, 3],
    });
    let b = encode(&h);
    assert_eq!(Header::parse(&b).unwrap(), h);
}

#[test]
fn round_trip_v2() {
    let mut h = sample();
    h.version = 2;
    h.header_length = 72;
    let b = encode(&h);
    assert_eq!(Header::parse(&b).unwrap(), h);
}

#[test]
fn rejects_bad_fields() {
    type Mutation = fn(&mut Header);
    let cases: &[(Mutation, &str)] = &[
        (|h| h.cluster_bits = 22, "invalid cluster_bits 22"),
        (|h| h.cluster_bits = 8, "invalid cluster_bits 8"),
        (|h| h.refcount_order = 7, "invalid refcount_order 7"),
        (|h| h.l1_table_offset = 0x30001, "invalid l1_table_offset"),
        (|h| h.l1_size = 0, "invalid l1_size 0"),
        (|h| h.l1_size = 5_000_000, "invalid l1_size 5000000"),
        (
            |h| h.refcount_table_clusters = 200,
            "invalid refcount_table_clusters 200",
        ),
        (|h| h.nb_snapshots = 70000, "invalid nb_snapshots 70000"),
        (
            |h| h.incompatible_features = 1 << 40,
            "unsupported incompatible features 0x10000000000",
        ),
        (|h| h.incompatible_features = incompat::EXTL2, "invalid"),
    ];
    for (mutate, want) in cases {
        let mut h = sample();
        mutate(&mut h);
        if want == &"invalid" {
            // extended L2 with 64 KiB clusters is valid
            assert!(Header::parse(&encode(&h)).is_ok());
            continue;
        }
        let err = Header::parse(&encode(&h)).unwrap_err().to_string();
        assert!(err.contains(want), "{err} should contain {want}");
    }
}

#[test]
fn unknown_feature_named_from_table() {
    let mut h = sample();
    h.incompatible_features = 1 << 9;
    h.feature_names.push(FeatureName {
        kind: 0,
        bit: 9,
        name: "future thing".into(),
    });
    let err = Header::parse(&encode(&h)).unwrap_err().to_string();
    assert!(err.contains("future thing"), "{err}");
}

proptest::proptest! {
    #[test]
    fn random_headers_never_panic(mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1024), cb in 9u32..=21, version in 2u32..=3) {
        // Mostly-valid prefix so that parsing goes deep, random rest.
        if bytes.len() >= 24 {
            bytes[0..4].copy_from_slice(&MAGIC.to_be_bytes());
            bytes[4..8].copy_from_slice(&version.to_be_bytes());
            bytes[20..24].copy_from_slice(&cb.to_be_bytes());
        }
        let _ = Header::parse(&bytes);
    }

    #[test]
    fn mutated_valid_headers_never_panic(pos in 0usize..200, val: u8) {
        let mut h = sample();
        h.backing_format = Some("qcow2".into());
        let mut b = encode(&h);
        b.resize(4096, 0);
        b[pos] = val;
        if let Ok(parsed) = Header::parse(&b) {
            // Whatever is accepted re-encodes and parses the same.
            let again = Header::parse(&encode(&parsed));
            proptest::prop_assert!(again.is_ok());
        }
    }
}

#[test]
fn push_decimal_works() {
    let mut s = String::new();
    push_decimal(&mut s, 0);
    s.push(' ');
    push_decimal(&mut s, u64::MAX);
    assert_eq!(s, "0 18446744073709551615");
}
