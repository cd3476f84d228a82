//! What is in the disk: partition tables made by sgdisk and sfdisk and file
//! systems made by their own tools (mkfs.*, mkswap, genisoimage,
//! cryptsetup; an LVM2 label from the specification's layout), converted
//! to qcow2 by qemu-img; `qcow2-info` (and the core's `partition` and
//! `signature` modules) must report what `sfdisk --json`, `blkid -p`,
//! `dumpe2fs`, `xfs_db` and `cryptsetup luksDump` say about the same bytes.

use std::collections::BTreeMap;
use std::path::Path;

use qcowkit_core::partition::PartitionTable;
use qcowkit_core::{signature, Image, OpenOptions};
use qcowkit_tests::contents::*;
use qcowkit_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// `qcow2-info --json IMG`'s `contents`.
fn contents_of(d: &Path, img: &str) -> Value {
    let out = ok_in(d, bin("qcow2-info").to_str().unwrap(), &["--json", img]);
    let v = json(&out);
    v[0]["contents"].clone()
}

/// `qcow2-info IMG`'s text.
fn text_of(d: &Path, img: &str) -> String {
    ok_in(d, bin("qcow2-info").to_str().unwrap(), &[img])
}

/// A file system or other content made in its own file by its tool.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fs {
    Vfat(&'static str, &'static str),
    Ext(&'static str, &'static str),
    Ext4InPlace(&'static str),
    Xfs(&'static str),
    Btrfs(&'static str),
    Swap(&'static str),
    Ntfs(&'static str),
    Exfat(&'static str),
    Luks1,
    Luks2(&'static str),
    Lvm,
    Iso(&'static str),
    BootableIso(&'static str),
    Qcow2,
    Nothing,
}

const LVM_UUID: &[u8; 32] = b"Z3xPqW7hT2kLmN4oP9rStUvWxYz012ab";

/// Makes `fs` in the `size`-byte file `file` in `d` (for `Ext4InPlace`,
/// directly in `disk` at `offset`).
fn make_fs(d: &Path, fs: Fs, file: &str, size: u64, disk: &str, offset: u64) {
    sparse_file(d, file, size);
    let kib = format!("{}k", size / 1024);
    match fs {
        Fs::Vfat(bits, label) => {
            tool(
                d,
                "mkfs.vfat",
                &["-F", bits, "-n", label, "-i", "1234ABCD", file],
            );
        }
        Fs::Ext(which, label) => {
            let prog = format!("mkfs.{which}");
            tool(d, &prog, &["-q", "-F", "-b", "2048", "-L", label, file]);
        }
        Fs::Ext4InPlace(label) => {
            let off = format!("offset={offset}");
            tool(
                d,
                "mkfs.ext4",
                &["-q", "-F", "-L", label, "-E", &off, disk, &kib],
            );
        }
        Fs::Xfs(label) => {
            tool(d, "mkfs.xfs", &["-q", "-f", "-L", label, file]);
        }
        Fs::Btrfs(label) => {
            tool(d, "mkfs.btrfs", &["-q", "-f", "-L", label, file]);
        }
        Fs::Swap(label) => {
            std::fs::set_permissions(
                d.join(file),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            tool(
                d,
                "mkswap",
                &[
                    "-L",
                    label,
                    "-U",
                    "5f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                    file,
                ],
            );
        }
        Fs::Ntfs(label) => {
            tool(d, "mkfs.ntfs", &["-q", "-F", "-Q", "-L", label, file]);
        }
        Fs::Exfat(label) => {
            tool(d, "mkfs.exfat", &["-L", label, file]);
        }
        Fs::Luks1 | Fs::Luks2(_) => {
            std::fs::write(d.join("key"), b"not a secret").unwrap();
            let mut args = vec![
                "luksFormat",
                "-q",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
                "key",
            ];
            match fs {
                Fs::Luks2(label) => {
                    args.extend(["--type", "luks2", "--pbkdf", "pbkdf2", "--label", label])
                }
                _ => args.extend(["--type", "luks1", "--cipher", "aes-cbc-essiv:sha256"]),
            }
            args.push(file);
            tool(d, "cryptsetup", &args);
        }
        Fs::Lvm => {
            std::fs::write(d.join(file), lvm2_pv_label(LVM_UUID, size)).unwrap();
        }
        Fs::Iso(label) | Fs::BootableIso(label) => {
            let dir = d.join("iso-tree");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("readme.txt"), b"hello from the disc\n").unwrap();
            let mut args = vec!["-quiet", "-V", label, "-o", file];
            if matches!(fs, Fs::BootableIso(_)) {
                // El Torito: a boot record among the volume descriptors.
                std::fs::write(dir.join("boot.bin"), [0x90u8; 2048]).unwrap();
                args.extend(["-b", "boot.bin", "-no-emul-boot", "-boot-load-size", "4"]);
            }
            args.push("iso-tree");
            tool(d, "genisoimage", &args);
        }
        Fs::Qcow2 => {
            std::fs::remove_file(d.join(file)).unwrap();
            qemu_img(d, &["create", "-q", "-f", "qcow2", file, "1G"]);
        }
        Fs::Nothing => {}
    }
    if !matches!(fs, Fs::Ext4InPlace(_) | Fs::Nothing) {
        place(d, disk, offset, file);
    }
}

/// The flags qcow2-info should print for sfdisk's `attrs` of a partition
/// of type `type_id`.
fn flags_of_attrs(attrs: &str, type_id: &str) -> Vec<String> {
    let ms_data = type_id == "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
    let mut bits: Vec<u32> = Vec::new();
    for a in attrs.split_whitespace() {
        match a {
            "RequiredPartition" => bits.push(0),
            "NoBlockIOProtocol" => bits.push(1),
            "LegacyBIOSBootable" => bits.push(2),
            _ => {
                let list = a
                    .strip_prefix("GUID:")
                    .unwrap_or_else(|| panic!("attr {a}"));
                bits.extend(list.split(',').map(|b| b.parse::<u32>().unwrap()));
            }
        }
    }
    bits.sort();
    bits.iter()
        .map(|b| match (b, ms_data) {
            (0, _) => "required".to_string(),
            (1, _) => "no block IO protocol".to_string(),
            (2, _) => "legacy BIOS bootable".to_string(),
            (60, true) => "read-only".to_string(),
            (61, true) => "shadow copy".to_string(),
            (62, true) => "hidden".to_string(),
            (63, true) => "no automount".to_string(),
            (b, _) => format!("attribute bit {b}"),
        })
        .collect()
}

/// Checks what qcow2-info says a volume holds against blkid's view of the
/// same bytes (`len` at `offset` of the raw disk).
fn check_against_blkid(d: &Path, raw: &str, offset: u64, len: u64, fs: &Value, what: &str) {
    let b = blkid(d, raw, offset, len);
    let s = |k: &str| fs[k].as_str().map(String::from);
    assert_eq!(
        b.get("TYPE").cloned(),
        s("blkid-type"),
        "{what}: blkid {b:?}, ours {fs}"
    );
    assert_eq!(
        b.get("LABEL").cloned(),
        s("label"),
        "{what}: label; blkid {b:?}, ours {fs}"
    );
    assert_eq!(
        b.get("UUID").cloned(),
        s("uuid"),
        "{what}: UUID; blkid {b:?}, ours {fs}"
    );
    let ty = s("type").unwrap();
    match b["TYPE"].as_str() {
        "vfat" => assert_eq!(b.get("VERSION"), Some(&ty), "{what}: FAT version"),
        "crypto_LUKS" | "swap" => {
            assert_eq!(b["VERSION"], fs["version"].to_string(), "{what}: version")
        }
        "exfat" => assert!(
            b["VERSION"].starts_with(&format!("{}.", fs["version"])),
            "{what}: exFAT version {} against {}",
            b["VERSION"],
            fs["version"]
        ),
        "LVM2_member" => assert_eq!(b["VERSION"], "LVM2 001", "{what}"),
        "ext2" | "ext3" | "ext4" | "iso9660" | "btrfs" => {
            assert_eq!(
                b["BLOCK_SIZE"],
                fs["block-size"].to_string(),
                "{what}: block size"
            )
        }
        _ => {}
    }
}

/// The GPT disk: 17 partitions, each holding something made by its tool.
struct Layout {
    parts: Vec<(&'static str, u64, &'static str, Fs)>,
}

fn gpt_layout() -> Layout {
    Layout {
        parts: vec![
            ("ef00", 40, "EFI system", Fs::Vfat("32", "ESP")),
            ("8300", 24, "root", Fs::Ext4InPlace("rootfs")),
            ("8300", 12, "legacy", Fs::Ext("ext3", "old3")),
            ("8300", 8, "", Fs::Ext("ext2", "old2")),
            ("8300", 300, "xfs", Fs::Xfs("xfsvol")),
            ("8300", 128, "btrfs", Fs::Btrfs("btr")),
            ("8200", 8, "swap", Fs::Swap("swp")),
            ("0700", 16, "windows", Fs::Ntfs("Windows")),
            ("0700", 16, "exchange", Fs::Exfat("EXF")),
            ("8309", 16, "vault1", Fs::Luks1),
            ("8309", 20, "vault2", Fs::Luks2("vault")),
            ("8e00", 8, "pv", Fs::Lvm),
            ("8300", 4, "disc", Fs::Iso("MYISO")),
            ("0700", 16, "fat16", Fs::Vfat("16", "SIXTEEN")),
            ("0700", 4, "fat12", Fs::Vfat("12", "TWELVE")),
            ("8300", 1, "nested", Fs::Qcow2),
            (
                "12345678-9ABC-DEF0-1234-56789ABCDEF0",
                1,
                "unknown type",
                Fs::Nothing,
            ),
        ],
    }
}

/// Makes the GPT disk `disk.raw` in `d` with sgdisk and fills its
/// partitions; returns sfdisk's JSON of its table.
fn make_gpt_disk(d: &Path, layout: &Layout) -> Value {
    let total: u64 = layout.parts.iter().map(|p| p.1).sum::<u64>() + 4;
    sparse_file(d, "disk.raw", total * MIB);
    let mut args: Vec<String> = Vec::new();
    for (i, (code, size, name, _)) in layout.parts.iter().enumerate() {
        let n = i + 1;
        args.push(format!("-n{n}:0:+{size}M"));
        args.push(format!("-t{n}:{code}"));
        if !name.is_empty() {
            args.push(format!("-c{n}:{name}"));
        }
    }
    // Attributes once every partition exists: required (ESP), legacy BIOS
    // bootable (root), hidden and no automount (NTFS, Microsoft basic data).
    args.extend(["-A1:set:0", "-A2:set:2", "-A8:set:62", "-A8:set:63"].map(String::from));
    args.push("disk.raw".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tool(d, "sgdisk", &args);
    let table = sfdisk_json(d, "disk.raw");
    let parts = table["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), layout.parts.len(), "{table}");
    for (i, (_, _, _, fs)) in layout.parts.iter().enumerate() {
        let p = &parts[i];
        let (start, size) = (
            p["start"].as_u64().unwrap() * 512,
            p["size"].as_u64().unwrap() * 512,
        );
        make_fs(d, *fs, &format!("p{}.img", i + 1), size, "disk.raw", start);
    }
    table
}

#[test]
fn gpt_disk_with_every_filesystem() {
    let s = Scratch::new();
    let d = s.dir();
    let layout = gpt_layout();
    let table = make_gpt_disk(d, &layout);
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "disk.raw",
            "disk.qcow2",
        ],
    );
    let c = contents_of(d, "disk.qcow2");

    // The table, against sfdisk.
    let pt = &c["partition-table"];
    assert_eq!(pt["type"], "gpt", "{c}");
    assert_eq!(pt["header"], "primary");
    assert_eq!(pt["sector-size"], 512);
    assert_eq!(pt["disk-guid"], table["id"], "{pt}");
    assert!(
        pt.get("primary-problem").is_none() && pt.get("backup-problem").is_none(),
        "{pt}"
    );
    let names = gpt_type_names(d);
    let ours = c["partitions"].as_array().unwrap();
    let theirs = table["partitions"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len(), "{c}");
    for (o, t) in ours.iter().zip(theirs) {
        let what = format!("partition {}", o["number"]);
        let node = t["node"].as_str().unwrap();
        assert_eq!(node, format!("disk.raw{}", o["number"]), "{what}");
        assert_eq!(o["start"], t["start"].as_u64().unwrap() * 512, "{what}");
        assert_eq!(o["size"], t["size"].as_u64().unwrap() * 512, "{what}");
        assert_eq!(o["type-id"], t["type"], "{what}");
        assert_eq!(o["uuid"], t["uuid"], "{what}");
        assert_eq!(
            o["name"].as_str().unwrap(),
            t["name"].as_str().unwrap_or(""),
            "{what}"
        );
        let type_id = t["type"].as_str().unwrap();
        // util-linux's words; gdisk's for Linux LUKS (8309), which
        // util-linux 2.38 does not name.
        let words = match names.get(type_id) {
            Some(n) => n.as_str(),
            None if type_id == "CA7D7CCB-63ED-4C53-861C-1742536059CC" => "Linux LUKS",
            None => type_id,
        };
        assert_eq!(o["type"], words, "{what}: type in words");
        let flags: Vec<String> = o["flags"]
            .as_array()
            .map(|a| a.iter().map(|f| f.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        assert_eq!(
            flags,
            flags_of_attrs(t["attrs"].as_str().unwrap_or(""), type_id),
            "{what}"
        );
    }
    assert_eq!(ours[0]["flags"], serde_json::json!(["required"]));
    assert_eq!(
        ours[7]["flags"],
        serde_json::json!(["hidden", "no automount"])
    );
    assert_eq!(ours[16]["type"], "12345678-9ABC-DEF0-1234-56789ABCDEF0");

    // What each partition holds, against blkid and the tools' own dumps.
    for (i, (_, _, _, fs)) in layout.parts.iter().enumerate() {
        let o = &ours[i];
        let what = format!("partition {} ({fs:?})", i + 1);
        let (start, size) = (o["start"].as_u64().unwrap(), o["size"].as_u64().unwrap());
        let f = &o["filesystem"];
        match fs {
            Fs::Nothing => {
                assert!(f.is_null(), "{what}: {o}");
                assert!(!blkid(d, "disk.raw", start, size).contains_key("TYPE"));
                continue;
            }
            Fs::Qcow2 => {
                let info = json(&qemu_img(d, &["info", "--output=json", "p16.img"]));
                assert_eq!(f["type"], "qcow2", "{what}: {o}");
                assert_eq!(f["version"], 3);
                assert_eq!(f["size"], info["virtual-size"], "{what}");
                assert_eq!(f["block-size"], info["cluster-size"], "{what}");
                continue;
            }
            _ => check_against_blkid(d, "disk.raw", start, size, f, &what),
        }
        let file = format!("p{}.img", i + 1);
        match fs {
            Fs::Ext(..) | Fs::Ext4InPlace(_) => {
                if matches!(fs, Fs::Ext4InPlace(_)) {
                    let (skip, count) = (
                        format!("skip={}", start / 512),
                        format!("count={}", size / 512),
                    );
                    ok_in(
                        d,
                        "dd",
                        &[
                            "if=disk.raw",
                            &format!("of={file}"),
                            "bs=512",
                            &skip,
                            &count,
                            "status=none",
                        ],
                    );
                }
                let features: Vec<String> = f["features"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect();
                assert_eq!(features, ext_features(d, &file), "{what}");
                assert_eq!(
                    f["size"], size,
                    "{what}: the file system fills the partition"
                );
            }
            Fs::Xfs(_) => {
                let db = tool(
                    d,
                    "xfs_db",
                    &[
                        "-r",
                        "-c",
                        "sb 0",
                        "-c",
                        "p blocksize",
                        "-c",
                        "p versionnum",
                        "-c",
                        "p dblocks",
                        &file,
                    ],
                );
                let field = |k: &str| {
                    db.lines()
                        .find_map(|l| l.strip_prefix(&format!("{k} = ")))
                        .unwrap_or_else(|| panic!("xfs_db: no {k}: {db}"))
                        .to_string()
                };
                assert_eq!(f["block-size"].to_string(), field("blocksize"), "{what}");
                let vn =
                    u32::from_str_radix(field("versionnum").trim_start_matches("0x"), 16).unwrap();
                assert_eq!(f["version"], vn & 0xf, "{what}");
                let blocks: u64 = field("dblocks").parse().unwrap();
                assert_eq!(
                    f["size"],
                    blocks * f["block-size"].as_u64().unwrap(),
                    "{what}"
                );
            }
            Fs::Luks1 => {
                assert_eq!(
                    f["cipher"].as_str().unwrap(),
                    luks_dump_field(d, &file, "Cipher name:")
                );
                assert_eq!(
                    f["cipher-mode"].as_str().unwrap(),
                    luks_dump_field(d, &file, "Cipher mode:")
                );
                assert_eq!(f["cipher-mode"], "cbc-essiv:sha256");
            }
            Fs::Luks2(_) => {
                let full = format!(
                    "{}-{}",
                    f["cipher"].as_str().unwrap(),
                    f["cipher-mode"].as_str().unwrap()
                );
                assert_eq!(full, luks_dump_field(d, &file, "cipher:"), "{what}");
            }
            Fs::Swap(_) | Fs::Btrfs(_) => {
                assert_eq!(f["size"], size, "{what}: the volume fills the partition")
            }
            Fs::Lvm => assert_eq!(f["size"], size, "{what}: the PV's device size"),
            _ => {}
        }
    }

    // The human text names them all.
    let t = text_of(d, "disk.qcow2");
    for want in [
        "GPT partition table, 512-byte sectors",
        "partition 1: 40 MiB at 1 MiB, EFI System, name \"EFI system\", required",
        "FAT32, label \"ESP\", UUID 1234-ABCD",
        "ext4, label \"rootfs\"",
        "ext3, label \"old3\"",
        "ext2, label \"old2\"",
        "XFS, label \"xfsvol\"",
        "Btrfs, label \"btr\"",
        "Linux swap, label \"swp\", UUID 5f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        "NTFS, label \"Windows\"",
        "exFAT, label \"EXF\"",
        "LUKS version 1, UUID",
        "cipher aes-cbc-essiv:sha256",
        "LUKS version 2, label \"vault\"",
        "LVM2 PV, UUID Z3xPqW-7hT2-kLmN-4oP9-rStU-vWxY-z012ab",
        "ISO 9660, label \"MYISO\"",
        "FAT16, label \"SIXTEEN\"",
        "FAT12, label \"TWELVE\"",
        "qcow2 version 3, virtual size 1 GiB",
        "partition 17: 1 MiB at",
        "no file system recognised",
    ] {
        assert!(t.contains(want), "qcow2-info: no {want:?} in:\n{t}");
    }

    // With 4 KiB clusters (an L2 table covers 2 MiB): the same report.
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "disk.raw",
            "small.qcow2",
        ],
    );
    assert_eq!(contents_of(d, "small.qcow2"), c, "4 KiB clusters");

    // The core's API on the guest view of the image, read in memory.
    let bytes = std::fs::read(d.join("small.qcow2")).unwrap();
    let mut img = Image::open(bytes, &OpenOptions::default()).unwrap();
    let size = img.size();
    let table = PartitionTable::read(&mut img, size).unwrap().unwrap();
    assert_eq!(table.partitions.len(), ours.len());
    for (p, o) in table.partitions.iter().zip(ours) {
        assert_eq!(
            (p.start, p.size),
            (o["start"].as_u64().unwrap(), o["size"].as_u64().unwrap())
        );
        let (off, len) = p.region(size);
        let found = signature::probe(&mut img, off, len).unwrap();
        assert_eq!(
            found.map(|f| f.kind.blkid_type()),
            o["filesystem"]["blkid-type"].as_str(),
            "partition {}",
            p.number
        );
    }
    // Nothing at the start of the whole disk.
    assert!(c.get("filesystem").is_none(), "{c}");
}

/// A 64 MiB GPT disk with an ext4 and a FAT16 partition.
fn small_gpt_disk(d: &Path) {
    sparse_file(d, "disk.raw", 64 * MIB);
    tool(
        d,
        "sgdisk",
        &[
            "-n1:1M:+20M",
            "-t1:8300",
            "-c1:data",
            "-n2:0:+16M",
            "-t2:0700",
            "-c2:win",
            "-n3:0:+8M",
            "-t3:8200",
            "disk.raw",
        ],
    );
    make_fs(
        d,
        Fs::Ext4InPlace("data"),
        "p1.img",
        20 * MIB,
        "disk.raw",
        MIB,
    );
    make_fs(
        d,
        Fs::Vfat("16", "WIN"),
        "p2.img",
        16 * MIB,
        "disk.raw",
        21 * MIB,
    );
}

/// Writes `bytes` at `offset` of `file` in `d`.
fn patch(d: &Path, file: &str, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join(file))
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn damaged_primary_gpt_reads_through_the_backup() {
    let s = Scratch::new();
    let d = s.dir();
    small_gpt_disk(d);
    let last = 64 * MIB - 512;
    let convert = |raw: &str, img: &str| {
        qemu_img(d, &["convert", "-q", "-f", "raw", "-O", "qcow2", raw, img]);
        contents_of(d, img)
    };
    let good = convert("disk.raw", "good.qcow2");
    assert_eq!(good["partition-table"]["header"], "primary", "{good}");
    assert_eq!(good["partitions"].as_array().unwrap().len(), 3);
    assert_eq!(good["partitions"][0]["filesystem"]["label"], "data");
    assert_eq!(good["partitions"][1]["filesystem"]["label"], "WIN");

    // The primary header zeroed (LBA 1), then its entry array damaged.
    let damages: [(&str, u64, &[u8], &str); 2] = [
        ("no-primary.raw", 512, &[0u8; 512], "Signature"),
        (
            "bad-array.raw",
            1024 + 40,
            &[0xff; 4],
            "PartitionEntryArrayCRC32",
        ),
    ];
    for (raw, at, bytes, field) in damages {
        std::fs::copy(d.join("disk.raw"), d.join(raw)).unwrap();
        patch(d, raw, at, bytes);
        let img = raw.replace(".raw", ".qcow2");
        let c = convert(raw, &img);
        let pt = &c["partition-table"];
        assert_eq!(pt["header"], "backup", "{raw}: {c}");
        let problem = pt["primary-problem"].as_str().unwrap();
        assert!(
            problem.starts_with(&format!("primary GPT header at LBA 1: {field} ")),
            "{raw}: {problem}"
        );
        assert_eq!(
            c["partitions"], good["partitions"],
            "{raw}: the same partitions"
        );
        // sfdisk reads the same partitions from the backup.
        let theirs = sfdisk_json(d, raw);
        assert_eq!(theirs["partitions"].as_array().unwrap().len(), 3);
        let t = text_of(d, &img);
        assert!(
            t.contains("backup header") && t.contains("the primary GPT header is damaged"),
            "{t}"
        );
    }

    // The backup header zeroed: the primary is used, the damage reported.
    std::fs::copy(d.join("disk.raw"), d.join("no-backup.raw")).unwrap();
    patch(d, "no-backup.raw", last, &[0u8; 512]);
    let c = convert("no-backup.raw", "no-backup.qcow2");
    assert_eq!(c["partition-table"]["header"], "primary");
    let problem = c["partition-table"]["backup-problem"].as_str().unwrap();
    assert!(
        problem.starts_with("backup GPT header at LBA 131071: Signature"),
        "{problem}"
    );
    assert_eq!(c["partitions"], good["partitions"]);

    // Both gone: an error naming the primary's problem, and qcow2-info
    // still succeeds.
    std::fs::copy(d.join("no-backup.raw"), d.join("none.raw")).unwrap();
    patch(d, "none.raw", 512, &[0u8; 512]);
    let c = convert("none.raw", "none.qcow2");
    let e = c["error"].as_str().unwrap();
    assert!(e.contains("primary GPT header at LBA 1: Signature"), "{c}");
    assert!(c.get("partitions").is_none(), "{c}");

    // Through a backing chain: an overlay changing nothing reads the same.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "good.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    assert_eq!(contents_of(d, "top.qcow2"), good);
    // ... and one whose write breaks the primary header falls back too.
    qemu_io(d, "top.qcow2", &["write -z 512 512"]);
    let c = contents_of(d, "top.qcow2");
    assert_eq!(c["partition-table"]["header"], "backup", "{c}");
    assert_eq!(c["partitions"], good["partitions"]);
}

#[test]
fn mbr_disk_with_logical_partitions() {
    let s = Scratch::new();
    let d = s.dir();
    sparse_file(d, "disk.raw", 128 * MIB);
    // Named partitions: 4 stays free, 5-7 are logical.
    let script = "label: dos\nlabel-id: 0x1234abcd\n\
        disk.raw1 : start=2048, size=16MiB, type=e, bootable\n\
        disk.raw2 : size=24MiB, type=83\n\
        disk.raw3 : size=48MiB, type=5\n\
        disk.raw5 : size=8MiB, type=82\n\
        disk.raw6 : size=12MiB, type=83\n\
        disk.raw7 : size=16MiB, type=7\n";
    tool_with_input(d, "sfdisk", &["-q", "disk.raw"], script);
    let table = sfdisk_json(d, "disk.raw");
    let parts = table["partitions"].as_array().unwrap().clone();
    assert_eq!(parts.len(), 6, "{table}");
    let fs = [
        Fs::Vfat("16", "BOOT"),
        Fs::Ext4InPlace("data"),
        Fs::Nothing,
        Fs::Swap("swap5"),
        Fs::Ext("ext2", "logical6"),
        Fs::Ntfs("Seven"),
    ];
    for (p, fs) in parts.iter().zip(fs) {
        let (start, size) = (
            p["start"].as_u64().unwrap() * 512,
            p["size"].as_u64().unwrap() * 512,
        );
        let n = p["node"].as_str().unwrap().trim_start_matches("disk.raw");
        make_fs(d, fs, &format!("p{n}.img"), size, "disk.raw", start);
    }
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "disk.raw",
            "disk.qcow2",
        ],
    );
    let c = contents_of(d, "disk.qcow2");
    assert_eq!(c["partition-table"]["type"], "mbr", "{c}");
    assert_eq!(c["partition-table"]["disk-id"], table["id"], "{c}");
    let ours = c["partitions"].as_array().unwrap();
    assert_eq!(ours.len(), 6, "{c}");
    let words = [
        "FAT16 (LBA)",
        "Linux",
        "Extended",
        "Linux swap",
        "Linux",
        "NTFS/exFAT",
    ];
    for ((o, t), words) in ours.iter().zip(&parts).zip(words) {
        let what = format!("partition {}", o["number"]);
        assert_eq!(
            t["node"].as_str().unwrap(),
            format!("disk.raw{}", o["number"]),
            "{what}"
        );
        assert_eq!(o["start"], t["start"].as_u64().unwrap() * 512, "{what}");
        assert_eq!(o["size"], t["size"].as_u64().unwrap() * 512, "{what}");
        assert_eq!(
            o["type-id"].as_str().unwrap(),
            format!(
                "{:#04x}",
                u8::from_str_radix(t["type"].as_str().unwrap(), 16).unwrap()
            ),
            "{what}"
        );
        assert_eq!(o["type"], words, "{what}");
        let bootable = t["bootable"].as_bool().unwrap_or(false);
        assert_eq!(
            o["flags"]
                .as_array()
                .is_some_and(|f| f.contains(&Value::from("bootable"))),
            bootable,
            "{what}"
        );
        assert_eq!(
            o["logical"].as_bool().unwrap_or(false),
            o["number"].as_u64().unwrap() >= 5,
            "{what}"
        );
        let (start, size) = (o["start"].as_u64().unwrap(), o["size"].as_u64().unwrap());
        if o["number"] == 3 {
            assert!(
                o["filesystem"].is_null(),
                "the extended partition is not probed: {o}"
            );
        } else {
            check_against_blkid(d, "disk.raw", start, size, &o["filesystem"], &what);
        }
    }
    let t = text_of(d, "disk.qcow2");
    for want in [
        "MBR partition table, disk id 0x1234abcd",
        "partition 1: 16 MiB at 1 MiB, FAT16 (LBA), bootable",
        "partition 5: 8 MiB at",
        "Linux swap (logical)",
        "NTFS, label \"Seven\"",
    ] {
        assert!(t.contains(want), "no {want:?} in:\n{t}");
    }

    // A loop in the chain of EBRs: the third EBR links back to the second.
    let raw = std::fs::read(d.join("disk.raw")).unwrap();
    let le32 = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap()) as u64;
    let ext = le32(446 + 2 * 16 + 8);
    let ebr2 = ext + le32(ext as usize * 512 + 446 + 16 + 8);
    let ebr3 = ext + le32(ebr2 as usize * 512 + 446 + 16 + 8);
    patch(d, "disk.raw", ebr3 * 512 + 446 + 16 + 4, &[0x05, 0, 0, 0]);
    patch(
        d,
        "disk.raw",
        ebr3 * 512 + 446 + 16 + 8,
        &((ebr2 - ext) as u32).to_le_bytes(),
    );
    patch(
        d,
        "disk.raw",
        ebr3 * 512 + 446 + 16 + 12,
        &2048u32.to_le_bytes(),
    );
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "disk.raw",
            "loop.qcow2",
        ],
    );
    let c = contents_of(d, "loop.qcow2");
    let e = c["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {c}"));
    assert!(
        e.contains(&format!("EBR at LBA {ebr2}: EBR LBA {ebr2}")) && e.contains("loops"),
        "{e}"
    );
}

#[test]
fn gpt_with_4096_byte_sectors() {
    let s = Scratch::new();
    let d = s.dir();
    sparse_file(d, "disk.raw", 48 * MIB);
    // fdisk -b 4096 (sfdisk 2.38 has no --sector-size): a GPT, a Linux
    // partition named "first" and a swap partition.
    let script = "g\nn\n1\n\n+16M\nn\n2\n\n+8M\nt\n2\nswap\nx\nn\n1\nfirst\nr\nw\n";
    tool_with_input(d, "fdisk", &["-b", "4096", "disk.raw"], script);
    let listing = tool(
        d,
        "fdisk",
        &[
            "-b",
            "4096",
            "-l",
            "-o",
            "Device,Start,Sectors,Type",
            "disk.raw",
        ],
    );
    assert!(listing.contains("Disklabel type: gpt"), "{listing}");
    let parts: Vec<(u64, u64, String)> = listing
        .lines()
        .filter(|l| l.starts_with("disk.raw"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (
                w[1].parse().unwrap(),
                w[2].parse().unwrap(),
                w[3..].join(" "),
            )
        })
        .collect();
    assert_eq!(parts.len(), 2, "{listing}");
    make_fs(
        d,
        Fs::Ext4InPlace("big-sectors"),
        "p1.img",
        parts[0].1 * 4096,
        "disk.raw",
        parts[0].0 * 4096,
    );
    qemu_img(
        d,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "disk.raw",
            "disk.qcow2",
        ],
    );
    let c = contents_of(d, "disk.qcow2");
    assert_eq!(c["partition-table"]["sector-size"], 4096, "{c}");
    let ours = c["partitions"].as_array().unwrap();
    assert_eq!(ours.len(), 2);
    for (o, (start, sectors, kind)) in ours.iter().zip(&parts) {
        assert_eq!(o["start"], start * 4096, "{c}");
        assert_eq!(o["size"], sectors * 4096, "{c}");
        assert_eq!(o["type"], kind.as_str(), "{c}");
    }
    assert_eq!(ours[0]["name"], "first");
    assert_eq!(ours[0]["filesystem"]["label"], "big-sectors");
    assert_eq!(ours[1]["type"], "Linux swap");
}

#[test]
fn whole_disk_volumes_without_a_partition_table() {
    let s = Scratch::new();
    let d = s.dir();
    let cases = [
        (Fs::Ext("ext4", "whole"), 16 * MIB),
        (Fs::Vfat("32", "WHOLEFAT"), 40 * MIB),
        (Fs::Exfat("WHOLEX"), 16 * MIB),
        (Fs::Ntfs("WholeNTFS"), 16 * MIB),
        (Fs::Iso("WHOLE_ISO"), 0),
        (Fs::BootableIso("BOOT_ISO"), 0),
        (Fs::Luks2("whole"), 20 * MIB),
    ];
    for (i, (fs, size)) in cases.into_iter().enumerate() {
        let raw = format!("w{i}.raw");
        sparse_file(d, &raw, size.max(MIB));
        make_fs(d, fs, &format!("w{i}.img"), size.max(MIB), &raw, 0);
        let len = std::fs::metadata(d.join(&raw)).unwrap().len();
        // qemu-img wants a multiple of 512 bytes.
        sparse_file_keep(d, &raw, len.div_ceil(512) * 512);
        let img = format!("w{i}.qcow2");
        qemu_img(
            d,
            &["convert", "-q", "-f", "raw", "-O", "qcow2", &raw, &img],
        );
        let c = contents_of(d, &img);
        assert!(c.get("partition-table").is_none(), "{fs:?}: {c}");
        assert!(c.get("error").is_none(), "{fs:?}: {c}");
        check_against_blkid(d, &raw, 0, len, &c["filesystem"], &format!("{fs:?}"));
        let t = text_of(d, &img);
        let line = t.lines().find(|l| l.contains("contents:")).unwrap();
        assert!(
            line.contains(c["filesystem"]["type"].as_str().unwrap()),
            "{t}"
        );
    }
}

/// Grows `name` to `size` bytes (keeping its contents).
fn sparse_file_keep(d: &Path, name: &str, size: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join(name))
        .unwrap();
    f.set_len(size).unwrap();
}

#[test]
fn every_tool_the_tests_need_is_installed() {
    // The tests above fail naming a missing tool when they reach it; this
    // one names them all at once.
    let missing: BTreeMap<&str, ()> = [
        "sfdisk",
        "sgdisk",
        "blkid",
        "mkswap",
        "mkfs.ext4",
        "dumpe2fs",
        "mkfs.vfat",
        "mkfs.exfat",
        "mkfs.ntfs",
        "mkfs.xfs",
        "xfs_db",
        "mkfs.btrfs",
        "genisoimage",
        "cryptsetup",
    ]
    .into_iter()
    .filter(|t| std::panic::catch_unwind(|| require(t)).is_err())
    .map(|t| (t, ()))
    .collect();
    assert!(
        missing.is_empty(),
        "missing tools: {:?}",
        missing.keys().collect::<Vec<_>>()
    );
}
