//! qemu-img's `-o key=value,...` creation options (parsed by
//! `qcowkit-options`) and the `Formatting ...` line `create` prints.

use qcowkit_core::{CreateOptions, Preallocation};

pub use qcowkit_options::{apply, split};

/// The `Formatting ...` line qemu-img prints.
pub fn describe(path: &str, c: &CreateOptions) -> String {
    let mut s = format!(
        "Formatting '{path}', fmt=qcow2 cluster_size={} extended_l2={} ",
        c.cluster_size,
        if c.extended_l2 { "on" } else { "off" }
    );
    if c.preallocation != Preallocation::Off {
        let p = qcowkit_options::preallocation_name(c.preallocation);
        s += &format!("preallocation={p} ");
    }
    s += &format!(
        "compression_type={} size={}",
        c.compression_type.name(),
        c.size
    );
    if !c.v3 {
        s += " compat=0.10";
    }
    if let Some(b) = &c.backing_file {
        s += &format!(" backing_file={b}");
    }
    if let Some(f) = &c.backing_format {
        s += &format!(" backing_fmt={f}");
    }
    if let Some(d) = &c.data_file {
        s += &format!(" data_file={d}");
    }
    if c.data_file_raw {
        s += " data_file_raw=on";
    }
    s += &format!(
        " lazy_refcounts={} refcount_bits={}",
        if c.lazy_refcounts { "on" } else { "off" },
        c.refcount_bits
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_like_qemu_img() {
        let mut c = CreateOptions::default();
        apply(&mut c, "size=1G,preallocation=metadata,compat=0.10").unwrap();
        assert_eq!(
            describe("a.qcow2", &c),
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=metadata compression_type=zlib size=1073741824 compat=0.10 lazy_refcounts=off refcount_bits=16"
        );
    }
}
