//! The test NBD client (`qcowkit_tests::nbd`) against the reference
//! server, qemu-nbd: the proof that the client speaks NBD as QEMU does,
//! so that what it finds in our server is our server's doing. Also that
//! the TLS directories it makes are what QEMU's `tls-creds-x509` reads.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use qcowkit_tests::nbd::*;
use qcowkit_tests::*;

/// Longest wait for qemu-nbd to listen, and to exit once told to.
const START_LIMIT: Duration = Duration::from_secs(20);

/// qemu-nbd running in a test directory, killed and reaped when dropped.
struct QemuNbd {
    child: Child,
    log: PathBuf,
}

impl QemuNbd {
    /// Starts `qemu-nbd ARGS` in `dir`, its output going to a log file.
    fn start(dir: &Path, args: &[&str]) -> QemuNbd {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let log = dir.join(format!("qemu-nbd-{n}.log"));
        let out = std::fs::File::create(&log).expect("create qemu-nbd log");
        let child = Command::new("qemu-nbd")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .expect("start qemu-nbd");
        QemuNbd { child, log }
    }

    /// Starts qemu-nbd on a free loopback port (`-b 127.0.0.1 -p PORT`
    /// then ARGS), picking another port if the first was taken meanwhile;
    /// returns it connected with a client, and the port.
    fn start_tcp(dir: &Path, args: &[&str]) -> (QemuNbd, Client, u16) {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let p = port.to_string();
            let mut all = vec!["-b", "127.0.0.1", "-p", &p];
            all.extend(args);
            let mut srv = QemuNbd::start(dir, &all);
            match srv.wait_connect(|| Client::tcp(("127.0.0.1", port))) {
                Ok(c) => return (srv, c, port),
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("qemu-nbd did not listen on {port}: {log}"),
            }
        }
        panic!("no free loopback port for qemu-nbd after 5 attempts")
    }

    /// What qemu-nbd printed so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects with `connect`, retrying every 2 ms while nobody listens,
    /// for at most [`START_LIMIT`]: Err(log) if qemu-nbd exits or the time
    /// runs out first.
    fn wait_connect(
        &mut self,
        mut connect: impl FnMut() -> std::io::Result<Client>,
    ) -> Result<Client, String> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("qemu-nbd exited ({status}): {}", self.log()));
            }
            match connect() {
                Ok(c) => return Ok(c),
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(format!("{e}; qemu-nbd says: {}", self.log())),
            }
        }
    }

    /// A client connected to the Unix socket `sock` (waiting for qemu-nbd
    /// to listen).
    fn connect(&mut self, sock: &Path) -> Client {
        self.wait_connect(|| Client::unix(sock))
            .unwrap_or_else(|e| panic!("cannot connect to qemu-nbd: {e}"))
    }

    /// SIGTERM, then waits (bounded) for qemu-nbd to exit.
    fn stop(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait qemu-nbd") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd still running {START_LIMIT:?} after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `path` as text.
fn text(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// The flags of the extent covering `offset` in `extents` (starting at
/// `start`).
fn flags_at(extents: &[(u32, u32)], start: u64, offset: u64) -> Option<u32> {
    let mut at = start;
    for &(len, flags) in extents {
        if offset < at + u64::from(len) {
            return Some(flags);
        }
        at += u64::from(len);
    }
    None
}

const MIB: u64 = 1 << 20;

/// A 4 MiB image with 64 KiB of 0xab at 1 MiB and 4 KiB of 0xcd at 3 MiB,
/// written by qemu-io; qemu-nbd serves it as `exp` on `sock`.
fn served_image(s: &Scratch, extra: &[&str]) -> (QemuNbd, PathBuf) {
    let d = s.dir();
    qemu_create(d, "img.qcow2", "", "4M");
    qemu_io(
        d,
        "img.qcow2",
        &["write -P 0xab 1M 64k", "write -P 0xcd 3M 4k"],
    );
    let sock = s.path("nbd.sock");
    let mut args = extra.to_vec();
    args.extend([
        "-k",
        text(&sock),
        "-x",
        "exp",
        "-t",
        "-f",
        "qcow2",
        "img.qcow2",
    ]);
    (QemuNbd::start(d, &args), sock)
}

#[test]
fn handshake_list_go_read_and_block_status() {
    let s = Scratch::new();
    let (mut srv, sock) = served_image(&s, &[]);
    let mut c = srv.connect(&sock);

    let hs = c.handshake().unwrap();
    assert_eq!(hs, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    assert_eq!(c.list().unwrap().unwrap(), vec!["exp".to_string()]);
    assert!(c.structured_reply().unwrap());

    let all = c.list_meta_context("exp", &[]).unwrap().unwrap();
    eprintln!("qemu-nbd lists the contexts {all:?}");
    let base = c.list_meta_context("exp", &["base:"]).unwrap().unwrap();
    assert_eq!(base, vec![(0, BASE_ALLOCATION.to_string())]);

    let unknown = c.info("nope", &[]).unwrap().unwrap_err();
    assert_eq!(unknown.reply_type, NBD_REP_ERR_UNKNOWN, "{unknown:?}");

    let info = c
        .info(
            "exp",
            &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
        )
        .unwrap()
        .unwrap();
    eprintln!("NBD_OPT_INFO: {info:?}");
    assert_eq!(info.size, 4 * MIB);
    info.check_block_sizes().unwrap();

    let ctx = c
        .set_meta_context("exp", &[BASE_ALLOCATION])
        .unwrap()
        .unwrap();
    assert_eq!(ctx.len(), 1);
    assert_eq!(ctx[0].1, BASE_ALLOCATION);

    let go = c.go("exp", &[NBD_INFO_BLOCK_SIZE]).unwrap().unwrap();
    eprintln!("NBD_OPT_GO: {go:?}");
    assert_eq!(go.size, 4 * MIB);
    let want = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
    assert_eq!(go.transmission_flags & want, want, "{go:?}");
    assert_eq!(go.transmission_flags & NBD_FLAG_READ_ONLY, 0);

    // Data written by qemu-io, holes around it.
    assert_eq!(c.read(MIB, 65536).unwrap().unwrap(), vec![0xab; 65536]);
    assert_eq!(c.read(0, 65536).unwrap().unwrap(), vec![0; 65536]);
    let across = c.read(MIB - 4096, 8192).unwrap().unwrap();
    assert_eq!(&across[..4096], &[0; 4096][..]);
    assert_eq!(&across[4096..], &[0xab; 4096][..]);
    let mut want3 = vec![0u8; 512];
    want3.extend([0xcd; 4096]);
    want3.extend([0; 512]);
    assert_eq!(c.read(3 * MIB - 512, 5120).unwrap().unwrap(), want3);
    assert_eq!(c.read(MIB + 1, 3).unwrap().unwrap(), vec![0xab; 3]);
    // The chunks of a read of the whole export, by the raw calls.
    let cookie = c.next_cookie();
    c.request(0, NBD_CMD_READ, cookie, 0, (4 * MIB) as u32)
        .unwrap();
    let mut chunks = Vec::new();
    loop {
        let r = c.read_reply().unwrap();
        assert_eq!(r.cookie(), cookie);
        let Reply::Chunk {
            flags,
            reply_type,
            payload,
            ..
        } = &r
        else {
            panic!("{r:?}")
        };
        let len = match *reply_type {
            NBD_REPLY_TYPE_OFFSET_DATA => payload.len() as u64 - 8,
            NBD_REPLY_TYPE_OFFSET_HOLE => u64::from(get32(payload, 8)),
            _ => 0,
        };
        let at = if payload.len() >= 8 {
            get64(payload, 0)
        } else {
            0
        };
        chunks.push((*reply_type, at, len, *flags));
        if r.is_done() {
            break;
        }
    }
    eprintln!("chunks (type, offset, length, flags) of a whole read: {chunks:?}");
    assert!(chunks.contains(&(NBD_REPLY_TYPE_OFFSET_DATA, MIB, 65536, 0)));
    let whole = c.read(0, (4 * MIB) as u32).unwrap().unwrap();
    assert_eq!(whole.len() as u64, 4 * MIB);
    assert!(whole[(MIB as usize)..(MIB as usize + 65536)]
        .iter()
        .all(|&b| b == 0xab));
    assert_eq!(
        c.read_with_flags(NBD_CMD_FLAG_DF, MIB - 4096, 8192)
            .unwrap()
            .unwrap(),
        across
    );

    // Block status: holes (and zeroes) where nothing was written.
    let bs = c.block_status(0, (4 * MIB) as u32, 0).unwrap().unwrap();
    eprintln!("block status of the whole export: {bs:?}");
    assert_eq!(bs.len(), 1);
    assert_eq!(bs[0].0, ctx[0].0);
    let ext = &bs[0].1;
    let hole = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(flags_at(ext, 0, 0), Some(hole));
    assert_eq!(flags_at(ext, 0, MIB - 1), Some(hole));
    assert_eq!(flags_at(ext, 0, MIB), Some(0));
    assert_eq!(flags_at(ext, 0, MIB + 65535), Some(0));
    assert_eq!(flags_at(ext, 0, MIB + 65536), Some(hole));
    assert_eq!(flags_at(ext, 0, 3 * MIB), Some(0));
    assert_eq!(flags_at(ext, 0, 4 * MIB - 1), Some(hole));
    let one = c
        .block_status(0, (4 * MIB) as u32, NBD_CMD_FLAG_REQ_ONE)
        .unwrap()
        .unwrap();
    assert_eq!(one, vec![(ctx[0].0, vec![(MIB as u32, hole)])]);
    let inside = c.block_status(MIB + 4096, 4096, 0).unwrap().unwrap();
    eprintln!("block status of 4 KiB inside data: {inside:?}");
    assert_eq!(flags_at(&inside[0].1, MIB + 4096, MIB + 4096), Some(0));

    // Refusals: out of range.
    let past = c.read(4 * MIB - 512, 1024).unwrap();
    eprintln!("read past the end: {past:?} ({:?})", c.last_error_message());
    assert_eq!(past, Err(NBD_EINVAL));
    let bs_past = c.block_status(4 * MIB, 512, 0).unwrap();
    eprintln!(
        "block status at the end: {bs_past:?} ({:?})",
        c.last_error_message()
    );
    assert_eq!(bs_past, Err(NBD_EINVAL));
    // The connection goes on after them.
    assert_eq!(c.read(MIB, 512).unwrap().unwrap(), vec![0xab; 512]);
    c.disconnect().unwrap();
}

#[test]
fn write_flush_read_then_qemu_sees_the_bytes() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "img.qcow2", "", "4M");
    let sock = s.path("nbd.sock");
    let mut srv = QemuNbd::start(
        d,
        &[
            "-k",
            text(&sock),
            "-x",
            "exp",
            "-t",
            "-f",
            "qcow2",
            "img.qcow2",
        ],
    );
    let mut c = srv.connect(&sock);
    c.handshake().unwrap();
    assert!(c.structured_reply().unwrap());
    let go = c.go("exp", &[NBD_INFO_BLOCK_SIZE]).unwrap().unwrap();
    let flags = go.transmission_flags;
    assert_ne!(flags & NBD_FLAG_SEND_WRITE_ZEROES, 0, "{go:?}");
    assert_ne!(flags & NBD_FLAG_SEND_CACHE, 0, "{go:?}");

    let mut want = vec![0u8; (4 * MIB) as usize];
    let mut put = |off: u64, bytes: &[u8]| {
        want[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
    };
    c.write(0, &[0x5a; 65536], false).unwrap().unwrap();
    put(0, &[0x5a; 65536]);
    c.write(3 * MIB + 512, &[0x17; 4096], true)
        .unwrap()
        .unwrap();
    put(3 * MIB + 512, &[0x17; 4096]);
    let odd: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    c.write(2 * MIB + 123, &odd, false).unwrap().unwrap();
    put(2 * MIB + 123, &odd);
    c.write_zeroes(4096, 4096, 0).unwrap().unwrap();
    put(4096, &[0; 4096]);
    c.write_zeroes(8192, 512, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA)
        .unwrap()
        .unwrap();
    put(8192, &[0; 512]);
    c.cache(0, 65536).unwrap().unwrap();
    // A trim of what was never written: it still reads as zeroes.
    c.trim(MIB, 65536).unwrap().unwrap();
    c.flush().unwrap().unwrap();

    assert_eq!(c.read(0, 65536).unwrap().unwrap(), &want[..65536]);
    assert_eq!(
        c.read(2 * MIB, 4096).unwrap().unwrap(),
        &want[(2 * MIB) as usize..(2 * MIB) as usize + 4096]
    );
    assert_eq!(
        c.read(3 * MIB, 8192).unwrap().unwrap(),
        &want[(3 * MIB) as usize..(3 * MIB) as usize + 8192]
    );
    // A write past the end is refused and changes nothing.
    let past = c.write(4 * MIB - 512, &[1; 1024], false).unwrap();
    eprintln!(
        "write past the end: {past:?} ({:?})",
        c.last_error_message()
    );
    // (qemu-nbd says EINVAL where the spec suggests ENOSPC.)
    assert_eq!(past, Err(NBD_EINVAL));
    c.disconnect().unwrap();
    let status = srv.stop();
    eprintln!("qemu-nbd after SIGTERM: {status}");

    std::fs::write(d.join("want.raw"), &want).unwrap();
    qemu_img_compare(d, "img.qcow2", "qcow2", "want.raw", "raw").unwrap();
    assert_qemu_img_check(d, "img.qcow2");
    qemu_io(
        d,
        "img.qcow2",
        &["read -P 0x17 3146240 4096", "read -P 0 4096 4608"],
    );
}

#[test]
fn tls_dirs_suit_qemu_and_a_plain_client_is_told_tls_is_required() {
    let s = Scratch::new();
    let d = s.dir();
    let started = Instant::now();
    let tls = make_tls_dirs(&s.path("tls")).unwrap();
    let foreign = make_foreign_client_dir(&s.path("tls"), &tls).unwrap();
    eprintln!("certificates made in {:?}", started.elapsed());
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        assert!(tls.server.join(f).is_file(), "{f}");
    }
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        assert!(tls.client.join(f).is_file(), "{f}");
        assert!(foreign.join(f).is_file(), "{f}");
    }
    let server_obj = tls_creds_object("tls0", &tls.server, "server");
    let (mut srv, sock) = served_image(&s, &["--object", &server_obj, "--tls-creds", "tls0"]);

    // Without TLS: every option but STARTTLS and ABORT is refused.
    let mut c = srv.connect(&sock);
    c.handshake().unwrap();
    let go = c.go("exp", &[]).unwrap().unwrap_err();
    assert_eq!(go.reply_type, NBD_REP_ERR_TLS_REQD, "{go:?}");
    let list = c.list().unwrap().unwrap_err();
    assert_eq!(list.reply_type, NBD_REP_ERR_TLS_REQD, "{list:?}");
    let info = c.info("exp", &[]).unwrap().unwrap_err();
    assert_eq!(info.reply_type, NBD_REP_ERR_TLS_REQD, "{info:?}");
    let abort = c.abort().unwrap();
    eprintln!("NBD_OPT_ABORT: {abort:?}");
    drop(c);

    // qemu-img and qemu-io with the client directory get in.
    let client_obj = tls_creds_object("tls0", &tls.client, "client");
    let opts = format!(
        "driver=nbd,path={},export=exp,tls-creds=tls0,tls-hostname=localhost",
        text(&sock)
    );
    let args = ["info", "--object", &client_obj, "--image-opts", &opts];
    let out = run_in(d, "qemu-img", &args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}\nqemu-nbd: {}",
        output_text(&out),
        srv.log()
    );
    assert!(
        stdout_of(&out).contains("virtual size: 4 MiB"),
        "{}",
        stdout_of(&out)
    );
    let io = run_in(
        d,
        "qemu-io",
        &[
            "--object",
            &client_obj,
            "--image-opts",
            &opts,
            "-c",
            "read -P 0xab 1M 64k",
            "-c",
            "read -P 0xcd 3M 4k",
        ],
    );
    assert!(
        io.status.success() && !output_text(&io).contains("fail"),
        "{}",
        output_text(&io)
    );

    // A client certificate from another CA is refused by the server.
    let foreign_obj = tls_creds_object("tls0", &foreign, "client");
    let args = ["info", "--object", &foreign_obj, "--image-opts", &opts];
    let out = run_in(d, "qemu-img", &args);
    assert!(
        !out.status.success(),
        "qemu-img with a foreign certificate got in"
    );
    let log = srv.log();
    assert!(log.contains("hasn't got a known issuer"), "qemu-nbd: {log}");
    eprintln!("foreign client: {}qemu-nbd: {log}", output_text(&out));
}

#[test]
fn tls_over_tcp_checks_the_address_and_refuses_plain_clients() {
    let s = Scratch::new();
    let d = s.dir();
    let tls = make_tls_dirs(&s.path("tls")).unwrap();
    qemu_create(d, "img.qcow2", "", "1M");
    let server_obj = tls_creds_object("tls0", &tls.server, "server");
    let (srv, mut c, port) = QemuNbd::start_tcp(
        d,
        &[
            "--object",
            &server_obj,
            "--tls-creds",
            "tls0",
            "-x",
            "exp",
            "-t",
            "-f",
            "qcow2",
            "img.qcow2",
        ],
    );
    c.handshake().unwrap();
    let go = c.go("exp", &[]).unwrap().unwrap_err();
    assert_eq!(go.reply_type, NBD_REP_ERR_TLS_REQD, "{go:?}");
    drop(c);
    let client_obj = tls_creds_object("tls0", &tls.client, "client");
    for host in ["127.0.0.1", "localhost"] {
        let opts = format!(
            "driver=nbd,server.type=inet,server.host={host},server.port={port},export=exp,tls-creds=tls0"
        );
        let args = ["info", "--object", &client_obj, "--image-opts", &opts];
        let out = run_in(d, "qemu-img", &args);
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}\nqemu-nbd: {}",
            output_text(&out),
            srv.log()
        );
    }
}

#[test]
fn simple_replies_export_name_and_malformed_messages() {
    let s = Scratch::new();
    let d = s.dir();
    qemu_create(d, "img.qcow2", "", "64M");
    qemu_io(d, "img.qcow2", &["write -P 0xab 1M 64k"]);
    let (srv, mut c, port) =
        QemuNbd::start_tcp(d, &["-x", "exp", "-t", "-f", "qcow2", "img.qcow2"]);
    let size = 64 * MIB;

    // Old-fashioned: no NO_ZEROES, NBD_OPT_EXPORT_NAME, simple replies.
    let hs = c.read_greeting().unwrap();
    assert_ne!(hs & NBD_FLAG_NO_ZEROES, 0);
    c.send_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE).unwrap();
    let (got_size, flags) = c.export_name("exp").unwrap();
    eprintln!("NBD_OPT_EXPORT_NAME: size {got_size}, flags {flags:#x}");
    assert_eq!(got_size, size);
    assert_eq!(flags & NBD_FLAG_SEND_DF, 0, "DF without structured replies");
    assert_eq!(c.read(MIB, 4096).unwrap().unwrap(), vec![0xab; 4096]);
    let past = c.read(size - 512, 1024).unwrap();
    eprintln!("simple read past the end: {past:?}");
    assert_eq!(past, Err(NBD_EINVAL));
    let unknown = c.command(0, 0x42, 0, 512).unwrap();
    eprintln!("unknown command 0x42: {unknown:?}");
    assert_eq!(unknown, Err(NBD_EINVAL));
    let bad_flag = c.command(1 << 10, NBD_CMD_FLUSH, 0, 0).unwrap();
    eprintln!("flush with unknown flag bit 10: {bad_flag:?}");
    assert_eq!(bad_flag, Err(NBD_EINVAL));
    // Block status without contexts, over simple replies.
    let bs = c.command(0, NBD_CMD_BLOCK_STATUS, 0, 512).unwrap();
    eprintln!("block status without a context: {bs:?}");
    assert_eq!(bs, Err(NBD_EINVAL));
    c.disconnect().unwrap();
    drop(c);

    // Options the server does not know or that are malformed.
    let mut c = Client::tcp(("127.0.0.1", port)).unwrap();
    c.handshake().unwrap();
    c.send_option(0x1234, b"junk").unwrap();
    let r = c.read_option_reply().unwrap();
    assert_eq!((r.opt, r.reply_type), (0x1234, NBD_REP_ERR_UNSUP), "{r:?}");
    let (_, r) = c.option(NBD_OPT_LIST, b"data").unwrap();
    assert_eq!(r.reply_type, NBD_REP_ERR_INVALID, "{r:?}");
    let mut short = encode_info_request("exp", &[]);
    short.truncate(5);
    let (_, r) = c.option(NBD_OPT_GO, &short).unwrap();
    assert_eq!(r.reply_type, NBD_REP_ERR_INVALID, "{r:?}");
    let r = c.set_meta_context("exp", &[BASE_ALLOCATION]).unwrap();
    eprintln!("NBD_OPT_SET_META_CONTEXT before structured replies: {r:?}");
    assert_eq!(r.unwrap_err().reply_type, NBD_REP_ERR_INVALID);
    assert!(c.structured_reply().unwrap());
    let again = c.option(NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
    eprintln!("a second NBD_OPT_STRUCTURED_REPLY: {again:?}");
    assert_eq!(again.1.reply_type, NBD_REP_ERR_INVALID);
    let go = c.go("exp", &[NBD_INFO_BLOCK_SIZE]).unwrap().unwrap();
    eprintln!("NBD_OPT_GO: {go:?}");
    let max = go.max_block.expect("qemu-nbd sends NBD_INFO_BLOCK_SIZE");
    assert_ne!(go.transmission_flags & NBD_FLAG_SEND_DF, 0);

    // Structured replies to errors, and a request over the maximum.
    let past = c.read(size - 512, 1024).unwrap();
    eprintln!(
        "structured read past the end: {past:?} ({:?})",
        c.last_error_message()
    );
    assert_eq!(past, Err(NBD_EINVAL));
    let big = c.read(0, max + 512).unwrap();
    eprintln!(
        "read of {} bytes: {big:?} ({:?})",
        max + 512,
        c.last_error_message()
    );
    assert!(big.is_err());
    let big_zero = c.write_zeroes(16 * MIB, max + 512, 0).unwrap();
    eprintln!("write zeroes of {} bytes: {big_zero:?}", max + 512);
    let fast = c
        .write_zeroes(2 * MIB, 65536, NBD_CMD_FLAG_FAST_ZERO)
        .unwrap();
    eprintln!(
        "fast zero over data: {fast:?} ({:?})",
        c.last_error_message()
    );
    assert_eq!(c.read(MIB, 512).unwrap().unwrap(), vec![0xab; 512]);

    // A bad request magic: qemu-nbd hangs up.
    let mut h = encode_request(0, NBD_CMD_READ, c.next_cookie(), 0, 512);
    h[0] ^= 0xff;
    c.send(&h).unwrap();
    // It answers with an error chunk for the cookie it read, then closes.
    let r = c.read_reply().unwrap();
    eprintln!("after a bad request magic: {r:?}");
    let Reply::Chunk {
        flags,
        reply_type,
        payload,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(
        (flags, reply_type),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR)
    );
    let e = parse_error_chunk(reply_type, &payload).unwrap();
    assert_eq!(e.error, NBD_EINVAL, "{e:?}");
    assert!(e.message.contains("invalid magic"), "{e:?}");
    assert_eq!(c.read_to_eof().unwrap(), b"");
    drop(c);

    // A write payload over the maximum: qemu-nbd hangs up too.
    let mut c = Client::tcp(("127.0.0.1", port)).unwrap();
    c.handshake().unwrap();
    assert!(c.structured_reply().unwrap());
    c.go("exp", &[]).unwrap().unwrap();
    let cookie = c.next_cookie();
    c.request(0, NBD_CMD_WRITE, cookie, 0, max + 512).unwrap();
    // An error chunk before the payload, then it closes.
    let after = c.read_reply().unwrap();
    eprintln!("header of a {}-byte write: {after:?}", max + 512);
    assert_eq!(after.cookie(), cookie);
    assert!(after.is_done());
    assert!(
        matches!(&after, Reply::Chunk { reply_type, payload, .. }
            if *reply_type == NBD_REPLY_TYPE_ERROR && get32(payload, 0) == NBD_EINVAL),
        "{after:?}"
    );
    assert_eq!(c.read_to_eof().unwrap(), b"");
    drop(c);

    // A bad option magic: qemu-nbd hangs up.
    let mut c = Client::tcp(("127.0.0.1", port)).unwrap();
    c.handshake().unwrap();
    c.send(&[0u8; 16]).unwrap();
    let r = c.read_option_reply();
    assert!(r.as_ref().is_err_and(is_hangup), "{r:?}");
    drop(c);

    // Unknown client flags: qemu-nbd hangs up.
    let mut c = Client::tcp(("127.0.0.1", port)).unwrap();
    c.read_greeting().unwrap();
    c.send_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | 1 << 7)
        .unwrap();
    let r = c.list();
    eprintln!("after unknown client flags: {r:?}");
    assert!(r.as_ref().is_err_and(is_hangup), "{r:?}");
    drop(c);

    // Still serving.
    let mut c = Client::tcp(("127.0.0.1", port)).unwrap();
    c.handshake().unwrap();
    c.go("exp", &[]).unwrap().unwrap();
    assert_eq!(c.read(MIB, 512).unwrap().unwrap(), vec![0xab; 512]);
    c.disconnect().unwrap();
    eprintln!("qemu-nbd: {}", srv.log());
}

/// A structured reply chunk as a server sends it.
fn chunk(flags: u16, reply_type: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend(flags.to_be_bytes());
    m.extend(reply_type.to_be_bytes());
    m.extend(cookie.to_be_bytes());
    m.extend((payload.len() as u32).to_be_bytes());
    m.extend(payload);
    m
}

/// An `NBD_REPLY_TYPE_OFFSET_DATA` chunk of `len` bytes of `byte`.
fn data(flags: u16, cookie: u64, offset: u64, len: usize, byte: u8) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend(vec![byte; len]);
    chunk(flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &p)
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
fn hole(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend(len.to_be_bytes());
    chunk(flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, &p)
}

/// A client whose "server" already sent `server_bytes` (then hung up when
/// `hang_up`), structured replies on.
fn scripted(server_bytes: &[u8], hang_up: bool) -> (Client, std::os::unix::net::UnixStream) {
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut b, server_bytes).unwrap();
    if hang_up {
        b.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut c = Client::over(Stream::Unix(a)).unwrap();
    // Everything is already sent: waiting longer would be a test bug.
    c.set_timeout(Duration::from_secs(5)).unwrap();
    c.set_structured_replies(true);
    (c, b)
}

/// The client's checks, against a scripted server (no qemu-nbd): what the
/// spec forbids a server is a protocol violation, not a panic, and what
/// it allows is accepted.
#[test]
fn the_client_catches_what_the_spec_forbids() {
    const K: u64 = 0x0123_4567_89ab_cdef;
    const DONE: u16 = NBD_REPLY_FLAG_DONE;
    let mut err_off = NBD_EIO.to_be_bytes().to_vec();
    err_off.extend(4u16.to_be_bytes());
    err_off.extend(b"oops");
    err_off.extend(100u64.to_be_bytes());
    let mut simple = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    simple.extend(0u32.to_be_bytes());
    simple.extend(K.to_be_bytes());
    let bad_reads: Vec<(&str, Vec<u8>)> = vec![
        (
            "overlap",
            [data(0, K, 0, 512, 1), data(DONE, K, 256, 768, 2)].concat(),
        ),
        ("outside", data(DONE, K, 1000, 100, 1)),
        ("short", data(DONE, K, 0, 512, 1)),
        ("cookie", data(DONE, K + 1, 0, 1024, 1)),
        ("magic", vec![0x12; 40]),
        (
            "empty hole",
            [hole(0, K, 0, 0), hole(DONE, K, 0, 1024)].concat(),
        ),
        ("simple", [simple.clone(), vec![0; 1024]].concat()),
        (
            "none not done",
            [
                chunk(0, NBD_REPLY_TYPE_NONE, K, &[]),
                data(DONE, K, 0, 1024, 1),
            ]
            .concat(),
        ),
        ("error 0", chunk(DONE, NBD_REPLY_TYPE_ERROR, K, &[0; 6])),
        (
            "message overrun",
            chunk(DONE, NBD_REPLY_TYPE_ERROR, K, &[0, 0, 0, 5, 0, 9, b'x']),
        ),
        ("unknown type", chunk(DONE, 77, K, &[])),
        (
            "block status",
            chunk(DONE, NBD_REPLY_TYPE_BLOCK_STATUS, K, &[0; 12]),
        ),
    ];
    for (what, bytes) in bad_reads {
        let (mut c, _peer) = scripted(&bytes, false);
        let r = c.finish_read(K, 0, 0, 1024);
        assert!(
            r.as_ref().is_err_and(is_protocol_violation),
            "{what}: {r:?}"
        );
    }

    // Allowed: chunks in any order, a final NONE, an error at an offset.
    let good = [
        data(0, K, 512, 512, 7),
        hole(0, K, 0, 512),
        chunk(DONE, NBD_REPLY_TYPE_NONE, K, &[]),
    ]
    .concat();
    let (mut c, _peer) = scripted(&good, false);
    let mut want = vec![0u8; 512];
    want.extend([7; 512]);
    assert_eq!(c.finish_read(K, 0, 0, 1024).unwrap(), Ok(want));
    let errs = [
        data(0, K, 0, 512, 7),
        chunk(DONE, NBD_REPLY_TYPE_ERROR_OFFSET, K, &err_off),
    ]
    .concat();
    let (mut c, _peer) = scripted(&errs, false);
    assert_eq!(c.finish_read(K, 0, 0, 1024).unwrap(), Err(NBD_EIO));
    assert_eq!(c.last_error_message(), Some("oops"));
    // Several content chunks under NBD_CMD_FLAG_DF are not.
    let two = [data(0, K, 0, 512, 1), data(DONE, K, 512, 512, 1)].concat();
    let (mut c, _peer) = scripted(&two, false);
    let r = c.finish_read(K, NBD_CMD_FLAG_DF, 0, 1024);
    assert!(r.as_ref().is_err_and(is_protocol_violation), "{r:?}");

    // A server hanging up mid-chunk, or saying nothing.
    let (mut c, _peer) = scripted(&data(DONE, K, 0, 1024, 1)[..100], true);
    let r = c.finish_read(K, 0, 0, 1024);
    assert!(r.as_ref().is_err_and(is_hangup), "{r:?}");
    let (mut c, _peer) = scripted(&[], false);
    c.set_timeout(Duration::from_millis(50)).unwrap();
    let r = c.read_reply();
    assert!(
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "{r:?}"
    );

    // Block status: one extent under REQ_ONE, known context ids only.
    let mut two_extents = 1u32.to_be_bytes().to_vec();
    two_extents.extend([0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0]);
    let (mut c, _peer) = scripted(
        &chunk(
            DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            0x5eed_0000_0000_0001,
            &two_extents,
        ),
        false,
    );
    c.set_contexts(vec![(1, BASE_ALLOCATION.into())]);
    let r = c.block_status(0, 4096, NBD_CMD_FLAG_REQ_ONE);
    assert!(r.as_ref().is_err_and(is_protocol_violation), "{r:?}");
    let (mut c, _peer) = scripted(
        &chunk(
            DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            0x5eed_0000_0000_0001,
            &two_extents,
        ),
        false,
    );
    c.set_contexts(vec![(1, BASE_ALLOCATION.into())]);
    assert_eq!(
        c.block_status(0, 4096, 0).unwrap(),
        Ok(vec![(1, vec![(512, 3), (512, 0)])])
    );
    let (mut c, _peer) = scripted(
        &chunk(
            DONE,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            0x5eed_0000_0000_0001,
            &two_extents,
        ),
        false,
    );
    c.set_contexts(vec![(2, BASE_ALLOCATION.into())]);
    let r = c.block_status(0, 4096, 0);
    assert!(r.as_ref().is_err_and(is_protocol_violation), "{r:?}");

    // Options: the reply magic, an ACK with data, a reply to another option.
    let rep = |magic: u64, opt: u32, t: u32, data: &[u8]| {
        let mut m = magic.to_be_bytes().to_vec();
        m.extend(opt.to_be_bytes());
        m.extend(t.to_be_bytes());
        m.extend((data.len() as u32).to_be_bytes());
        m.extend(data);
        m
    };
    for (what, bytes) in [
        (
            "magic",
            rep(NBD_REP_MAGIC + 1, NBD_OPT_LIST, NBD_REP_ACK, &[]),
        ),
        (
            "ack data",
            rep(NBD_REP_MAGIC, NBD_OPT_LIST, NBD_REP_ACK, b"x"),
        ),
        (
            "other option",
            rep(NBD_REP_MAGIC, NBD_OPT_GO, NBD_REP_ACK, &[]),
        ),
        (
            "server too long",
            [
                rep(
                    NBD_REP_MAGIC,
                    NBD_OPT_LIST,
                    NBD_REP_SERVER,
                    &[0, 0, 0, 9, b'a'],
                ),
                rep(NBD_REP_MAGIC, NBD_OPT_LIST, NBD_REP_ACK, &[]),
            ]
            .concat(),
        ),
    ] {
        let (mut c, _peer) = scripted(&bytes, false);
        let r = c.list();
        assert!(
            r.as_ref().is_err_and(is_protocol_violation),
            "{what}: {r:?}"
        );
    }
    let (mut c, _peer) = scripted(&rep(NBD_REP_MAGIC, NBD_OPT_GO, NBD_REP_ACK, &[]), false);
    let r = c.go("exp", &[]);
    assert!(
        r.as_ref().is_err_and(is_protocol_violation),
        "GO without NBD_INFO_EXPORT: {r:?}"
    );
}
