//! Reports in qemu-img's JSON shapes (`info`, `map`, `check`), shared by
//! every host (CLI, browser) so that they print the same keys and values.
//! Plain string building: no serializer dependency in the core.

use alloc::string::String;
use core::fmt::Write;

use crate::check::CheckReport;
use crate::image::Image;
use crate::io::BlockRead;
use crate::map::BlockStatus;

/// A JSON object under construction.
struct Obj {
    out: String,
    first: bool,
}

fn escape(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl Obj {
    fn new() -> Self {
        Obj {
            out: String::from("{"),
            first: true,
        }
    }
    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push_str(", ");
        }
        self.first = false;
        escape(&mut self.out, k);
        self.out.push_str(": ");
    }
    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        escape(&mut self.out, v);
        self
    }
    fn num(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k);
        let _ = write!(self.out, "{v}");
        self
    }
    fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k);
        self.out.push_str(if v { "true" } else { "false" });
        self
    }
    fn raw(&mut self, k: &str, json: &str) -> &mut Self {
        self.key(k);
        self.out.push_str(json);
        self
    }
    fn finish(&mut self) -> String {
        self.out.push('}');
        core::mem::take(&mut self.out)
    }
}

/// Host facts `info` needs besides the image itself.
#[derive(Debug, Clone, Copy)]
pub struct InfoParams<'a> {
    /// The name the image was opened under.
    pub filename: &'a str,
    /// The backing file name resolved by the host's opener policy.
    pub full_backing_filename: Option<&'a str>,
    /// Bytes the image file occupies on its storage.
    pub actual_size: u64,
}

/// `qemu-img info --output=json` of a qcow2 image (one line).
pub fn info_json<R: BlockRead>(img: &Image<R>, p: &InfoParams<'_>) -> String {
    let h = img.header();
    let mut o = Obj::new();
    if let (Some(_), Some(f)) = (&h.backing_file, &h.backing_format) {
        o.str("backing-filename-format", f);
    }
    if !img.snapshots().is_empty() {
        let mut list = String::from("[");
        for (i, s) in img.snapshots().iter().enumerate() {
            if i > 0 {
                list.push_str(", ");
            }
            let mut so = Obj::new();
            if let Some(ic) = s.icount.filter(|i| *i != u64::MAX) {
                so.num("icount", ic);
            }
            so.num("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000)
                .str("name", &s.name)
                .num("date-sec", s.date_sec.into())
                .num("date-nsec", s.date_nsec.into())
                .num("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000)
                .str("id", &s.id)
                .num("vm-state-size", s.vm_state_size);
            list.push_str(&so.finish());
        }
        list.push(']');
        o.raw("snapshots", &list);
    }
    o.num("virtual-size", h.size)
        .str("filename", p.filename)
        .num("cluster-size", h.cluster_size())
        .str("format", "qcow2")
        .num("actual-size", p.actual_size);
    let mut d = Obj::new();
    if h.version == 2 {
        d.str("compat", "0.10")
            .str("compression-type", h.compression_type.name())
            .num("refcount-bits", h.refcount_bits().into());
    } else {
        d.str("compat", "1.1")
            .str("compression-type", h.compression_type.name())
            .bool("lazy-refcounts", h.lazy_refcounts());
        if h.bitmaps.is_some() {
            let mut list = String::from("[");
            for (i, b) in img.bitmaps().iter().enumerate() {
                if i > 0 {
                    list.push_str(", ");
                }
                let mut flags = String::from("[");
                for (j, f) in b.flag_names().enumerate() {
                    if j > 0 {
                        flags.push_str(", ");
                    }
                    escape(&mut flags, f);
                }
                flags.push(']');
                let mut bo = Obj::new();
                bo.raw("flags", &flags)
                    .str("name", &b.name)
                    .num("granularity", b.granularity());
                list.push_str(&bo.finish());
            }
            list.push(']');
            d.raw("bitmaps", &list);
        }
        d.num("refcount-bits", h.refcount_bits().into());
        if h.has_data_file() {
            if let Some(df) = &h.data_file {
                d.str("data-file", df);
            }
            d.bool("data-file-raw", h.data_file_raw());
        }
        d.bool("corrupt", h.corrupt())
            .bool("extended-l2", h.extended_l2());
    }
    let mut fs = Obj::new();
    fs.str("type", "qcow2").raw("data", &d.finish());
    o.raw("format-specific", &fs.finish());
    if let Some(b) = &h.backing_file {
        o.str(
            "full-backing-filename",
            p.full_backing_filename.unwrap_or(b),
        );
        o.str("backing-filename", b);
    }
    o.bool("dirty-flag", h.dirty());
    o.finish()
}

/// `qemu-img info --output=json` of a raw image (one line).
pub fn raw_info_json(filename: &str, size: u64, actual_size: u64) -> String {
    Obj::new()
        .num("virtual-size", size)
        .str("filename", filename)
        .str("format", "raw")
        .num("actual-size", actual_size)
        .bool("dirty-flag", false)
        .finish()
}

/// One entry of `qemu-img map --output=json`, in qemu-img's exact syntax.
pub fn map_entry_json(start: u64, length: u64, s: &BlockStatus) -> String {
    let mut line = String::new();
    let _ = write!(
        line,
        "{{ \"start\": {start}, \"length\": {length}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        s.depth, s.present, s.zero, s.data, s.compressed
    );
    if let Some(o) = s.offset {
        let _ = write!(line, ", \"offset\": {o}");
    }
    line.push('}');
    line
}

/// `qemu-img check --output=json` (one line).
pub fn check_json(r: &CheckReport, filename: &str) -> String {
    let mut o = Obj::new();
    o.num("image-end-offset", r.image_end_offset)
        .num("compressed-clusters", r.compressed_clusters)
        .num("total-clusters", r.total_clusters)
        .num("check-errors", r.check_errors);
    if r.leaks > 0 {
        o.num("leaks", r.leaks);
    }
    if r.corruptions > 0 {
        o.num("corruptions", r.corruptions);
    }
    o.num("allocated-clusters", r.allocated_clusters)
        .str("filename", filename)
        .str("format", "qcow2")
        .num("fragmented-clusters", r.fragmented_clusters);
    o.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_strings() {
        let mut s = String::new();
        escape(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u0001é\"");
    }

    #[test]
    fn raw_info_shape() {
        assert_eq!(
            raw_info_json("x.raw", 1024, 0),
            "{\"virtual-size\": 1024, \"filename\": \"x.raw\", \"format\": \"raw\", \"actual-size\": 0, \"dirty-flag\": false}"
        );
    }
}
