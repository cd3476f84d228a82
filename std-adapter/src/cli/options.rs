//! qemu-img's `-o key=value,...` creation options.

use qcowkit_core::{CreateOptions, Preallocation};

/// Splits `a=b,c=d` (a doubled comma is a literal comma, as in qemu-img).
pub fn split(opts: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = opts.chars().peekable();
    let mut items = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    for it in items.into_iter().filter(|s| !s.is_empty()) {
        match it.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => out.push((it, "on".to_string())),
        }
    }
    out
}

/// Applies `-o` options to `c`. Returns whether `size` was given.
pub fn apply(c: &mut CreateOptions, opts: &str) -> Result<bool, String> {
    let mut size_given = false;
    for (k, v) in split(opts) {
        c.set(&k, &v).map_err(|why| match why {
            "unknown option" => format!("Invalid parameter '{k}'"),
            why => format!("Invalid value '{v}' for '{k}': {why}"),
        })?;
        size_given |= k == "size";
    }
    Ok(size_given)
}

/// The `Formatting ...` line qemu-img prints.
pub fn describe(path: &str, c: &CreateOptions) -> String {
    let mut s = format!(
        "Formatting '{path}', fmt=qcow2 cluster_size={} extended_l2={} ",
        c.cluster_size,
        if c.extended_l2 { "on" } else { "off" }
    );
    if c.preallocation != Preallocation::Off {
        let p = match c.preallocation {
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
            Preallocation::Off => "off",
        };
        s += &format!("preallocation={p} ");
    }
    s += &format!(
        "compression_type={} size={}",
        c.compression_type.name(),
        c.rounded_size().unwrap_or(c.size)
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
        assert!(apply(&mut c, "bogus=1").is_err());
        assert!(apply(&mut c, "extended_l2=maybe").is_err());
    }
}
