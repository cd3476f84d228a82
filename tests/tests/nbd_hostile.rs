//! `qcow2 serve` against clients that break the rules, stall or vanish,
//! and a server killed mid-workload, through the tests' own NBD client
//! (`qcowkit_tests::nbd`, proven against qemu-nbd in
//! `nbd_client_selftest.rs`). Each case ends with qemu-img judging the
//! image: nothing written that the protocol did not ask for, at worst
//! leaked clusters after a crash, every flushed write kept.

use std::time::{Duration, Instant};

use qcowkit_tests::nbd::*;
use qcowkit_tests::serve::{On, Served};
use qcowkit_tests::*;

fn connect(srv: &Served) -> Client {
    match (&srv.socket, srv.port) {
        (Some(s), _) => Client::unix(s).expect("connect"),
        (None, Some(p)) => Client::tcp(("127.0.0.1", p)).expect("connect"),
        _ => unreachable!(),
    }
}

/// A client through the handshake with structured replies and the
/// contexts `queries`, on export `name`.
fn ready(srv: &Served, name: &str, queries: &[&str]) -> Client {
    let mut c = connect(srv);
    c.handshake().unwrap();
    assert!(c.structured_reply().unwrap());
    if !queries.is_empty() {
        let got = c.set_meta_context(name, queries).unwrap().unwrap();
        assert_eq!(got.len(), queries.len(), "{got:?}");
    }
    c.go(name, &[NBD_INFO_BLOCK_SIZE]).unwrap().unwrap();
    c
}

/// A 16 MiB image with data at 0 (1 MiB of 0x5a), zeros at 4 MiB, and its
/// pristine copy `orig.qcow2`.
fn image(s: &Scratch) {
    qemu_create(s.dir(), "a.qcow2", "", "16M");
    qemu_io(
        s.dir(),
        "a.qcow2",
        &[
            "write -P 0x5a 0 1M",
            "write -z 4M 1M",
            "write -P 0x6b 8M 64k",
        ],
    );
    std::fs::copy(s.path("a.qcow2"), s.path("orig.qcow2")).unwrap();
}

/// The seed of randomised test `test`: QCOWKIT_SEED, else the clock
/// (announced either way).
fn seed(test: &str) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    seed_or(test, "QCOWKIT_SEED", now)
}

/// A new client gets through the handshake and reads.
fn still_serves(srv: &Served) {
    let mut c = ready(srv, "", &[]);
    assert!(c.read(0, 512).unwrap().is_ok());
    c.disconnect().unwrap();
}

fn assert_unchanged(s: &Scratch) {
    assert_qemu_img_check(s.dir(), "a.qcow2");
    qemu_img_compare(s.dir(), "a.qcow2", "qcow2", "orig.qcow2", "qcow2")
        .unwrap_or_else(|e| panic!("the image changed: {e}"));
}

#[test]
fn the_handshake_answers_as_the_specification_says() {
    let s = Scratch::new();
    image(&s);
    let srv = Served::ours(
        s.dir(),
        On::Unix,
        "vm",
        &["-t", "-A", "-D", "desc"],
        "a.qcow2",
    );
    let mut c = connect(&srv);
    assert_eq!(
        c.handshake().unwrap(),
        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
    );
    assert_eq!(c.list().unwrap().unwrap(), vec!["vm".to_string()]);
    let all = c.list_meta_context("vm", &[]).unwrap().unwrap();
    let names: Vec<&str> = all.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["base:allocation", "qemu:allocation-depth"]);
    let base = c.list_meta_context("vm", &["base:"]).unwrap().unwrap();
    assert_eq!(base.len(), 1);
    // Refusals that leave the negotiation going.
    let (_, r) = c.option(NBD_OPT_LIST, b"junk").unwrap();
    assert_eq!(r.reply_type, NBD_REP_ERR_INVALID);
    let (_, r) = c
        .option(
            NBD_OPT_SET_META_CONTEXT,
            &encode_meta_context_request("vm", &[BASE_ALLOCATION]),
        )
        .unwrap();
    assert_eq!(
        r.reply_type, NBD_REP_ERR_INVALID,
        "before structured replies"
    );
    let (_, r) = c.option(99, b"whatever").unwrap();
    assert_eq!(r.reply_type, NBD_REP_ERR_UNSUP);
    let (_, r) = c.option(NBD_OPT_STARTTLS, &[]).unwrap();
    assert_eq!(r.reply_type, NBD_REP_ERR_POLICY, "no TLS configured");
    let mut truncated = encode_info_request("vm", &[NBD_INFO_NAME]);
    truncated.pop();
    let (_, r) = c.option(NBD_OPT_GO, &truncated).unwrap();
    assert_eq!(r.reply_type, NBD_REP_ERR_INVALID);
    assert_eq!(
        c.go("other", &[]).unwrap().unwrap_err().reply_type,
        NBD_REP_ERR_UNKNOWN
    );
    // An option longer than the server reads (100 KiB): skipped, refused.
    let (_, r) = c.option(NBD_OPT_LIST, &vec![0u8; 100 << 10]).unwrap();
    assert_eq!(r.reply_type, NBD_REP_ERR_TOO_BIG);
    assert!(c.structured_reply().unwrap());
    let (_, r) = c.option(NBD_OPT_STRUCTURED_REPLY, &[]).unwrap();
    assert_eq!(r.reply_type, NBD_REP_ERR_INVALID, "a second time");
    let ctx = c
        .set_meta_context(
            "vm",
            &[BASE_ALLOCATION, "qemu:allocation-depth", "qemu:nope"],
        )
        .unwrap()
        .unwrap();
    assert_eq!(ctx.len(), 2);
    let info = c
        .info(
            "vm",
            &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
        )
        .unwrap()
        .unwrap();
    assert_eq!(info.name.as_deref(), Some("vm"));
    assert_eq!(info.description.as_deref(), Some("desc"));
    info.check_block_sizes().unwrap();
    let info = c.go("vm", &[NBD_INFO_BLOCK_SIZE]).unwrap().unwrap();
    assert_eq!(info.size, 16 << 20);
    assert_eq!(
        (info.min_block, info.preferred_block, info.max_block),
        (Some(1), Some(65536), Some(32 << 20))
    );
    // Reads, with and without DF, aligned or not.
    assert!(c.read(1, 4095).unwrap().unwrap().iter().all(|b| *b == 0x5a));
    let r = c
        .read_with_flags(NBD_CMD_FLAG_DF, (1 << 20) - 100, 300)
        .unwrap()
        .unwrap();
    assert!(r[..100].iter().all(|b| *b == 0x5a) && r[100..].iter().all(|b| *b == 0));
    // Block status, both contexts; REQ_ONE gives one extent.
    let bs = c.block_status(0, 16 << 20, 0).unwrap().unwrap();
    assert_eq!(bs.len(), 2);
    let base = &bs.iter().find(|(id, _)| *id == ctx[0].0).unwrap().1;
    assert_eq!(base[0], (1 << 20, 0), "data first: {base:?}");
    assert_eq!(base[1].1, NBD_STATE_HOLE | NBD_STATE_ZERO);
    let one = c
        .block_status(0, 16 << 20, NBD_CMD_FLAG_REQ_ONE)
        .unwrap()
        .unwrap();
    assert!(one.iter().all(|(_, e)| e.len() == 1), "{one:?}");
    c.disconnect().unwrap();
}

#[test]
fn broken_handshakes_end_that_connection_only() {
    let s = Scratch::new();
    image(&s);
    let srv = Served::ours(s.dir(), On::Unix, "vm", &["-t", "-e", "0"], "a.qcow2");
    // No fixed newstyle, unknown client flags, a bad option magic, an
    // unknown export through NBD_OPT_EXPORT_NAME: each is hung up on.
    for (what, flags, after) in [
        ("no fixed newstyle", 0u32, Vec::new()),
        (
            "unknown client flags",
            NBD_FLAG_C_FIXED_NEWSTYLE | 0x80,
            Vec::new(),
        ),
        ("bad option magic", NBD_FLAG_C_FIXED_NEWSTYLE, {
            let mut o = encode_option(NBD_OPT_LIST, &[]);
            o[0] ^= 0xff;
            o
        }),
        (
            "unknown export",
            NBD_FLAG_C_FIXED_NEWSTYLE,
            encode_option(NBD_OPT_EXPORT_NAME, b"nope"),
        ),
    ] {
        let mut c = connect(&srv);
        c.read_greeting().unwrap();
        c.send_client_flags(flags).unwrap();
        c.send(&after).unwrap();
        let rest = c.read_to_eof().unwrap_or_default();
        assert!(
            rest.is_empty(),
            "{what}: {} bytes before the hang-up",
            rest.len()
        );
    }
    // A flood of connections that go away at once, or mid-greeting.
    for i in 0..100 {
        let mut c = connect(&srv);
        if i % 2 == 0 {
            c.read_greeting().unwrap();
        }
    }
    // The server still serves, and nothing was written.
    let mut c = ready(&srv, "vm", &[]);
    assert!(c
        .read(0, 1 << 20)
        .unwrap()
        .unwrap()
        .iter()
        .all(|b| *b == 0x5a));
    c.disconnect().unwrap();
    drop(srv);
    assert_unchanged(&s);
}

#[test]
fn malformed_requests_get_errors_and_change_nothing() {
    let s = Scratch::new();
    image(&s);
    let srv = Served::ours(s.dir(), On::Tcp, "", &["-t", "-e", "2"], "a.qcow2");
    let mut c = ready(&srv, "", &[]);
    let size = 16u64 << 20;
    assert_eq!(
        c.read(size - 10, 20).unwrap(),
        Err(NBD_EINVAL),
        "read past the end"
    );
    assert_eq!(
        c.write(size, &[1], false).unwrap(),
        Err(NBD_EINVAL),
        "write past the end"
    );
    assert_eq!(
        c.write_zeroes(u64::MAX - 10, 20, 0).unwrap(),
        Err(NBD_EINVAL),
        "offset overflow"
    );
    assert_eq!(c.trim(size - 1, 2).unwrap(), Err(NBD_EINVAL));
    assert_eq!(
        c.read(0, (32 << 20) + 1).unwrap(),
        Err(NBD_EOVERFLOW),
        "over the maximum block size"
    );
    assert_eq!(
        c.command(0, 42, 0, 512).unwrap(),
        Err(NBD_EINVAL),
        "unknown command"
    );
    assert_eq!(
        c.command(NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, 0, 0)
            .unwrap(),
        Err(NBD_EINVAL),
        "a flag the command does not take"
    );
    assert_eq!(
        c.block_status(0, 4096, 0).unwrap(),
        Err(NBD_EINVAL),
        "no context selected"
    );
    // A write longer than the maximum: its 33 MiB payload is read and
    // dropped, the request refused, the connection goes on.
    let cookie = c.next_cookie();
    let big = vec![0xeeu8; (33 << 20) as usize];
    c.request_with_payload(0, NBD_CMD_WRITE, cookie, 0, &big)
        .unwrap();
    assert_eq!(
        c.finish_command(cookie, NBD_CMD_WRITE).unwrap(),
        Err(NBD_EOVERFLOW)
    );
    // FAST_ZERO: refused where zeroing would write data.
    assert_eq!(
        c.write_zeroes(100, 4096, NBD_CMD_FLAG_FAST_ZERO).unwrap(),
        Err(NBD_ENOTSUP)
    );
    assert!(c
        .read(0, 1 << 20)
        .unwrap()
        .unwrap()
        .iter()
        .all(|b| *b == 0x5a));
    // A second client meanwhile, then a request with a bad magic: only
    // that connection ends.
    let mut other = ready(&srv, "", &[]);
    let mut req = encode_request(0, NBD_CMD_READ, 7, 0, 512);
    req[0] ^= 1;
    c.send(&req).unwrap();
    let _ = c.read_to_eof();
    assert!(other
        .read(8 << 20, 65536)
        .unwrap()
        .unwrap()
        .iter()
        .all(|b| *b == 0x6b));
    other.disconnect().unwrap();
    drop(srv);
    assert_unchanged(&s);

    // A read-only export refuses changes with EPERM (a write's payload is
    // still read: the connection goes on).
    let srv = Served::ours(s.dir(), On::Unix, "ro", &["-r", "-t"], "a.qcow2");
    let mut c = ready(&srv, "ro", &[]);
    assert_eq!(c.write(0, &[1; 4096], true).unwrap(), Err(NBD_EPERM));
    assert_eq!(c.write_zeroes(0, 4096, 0).unwrap(), Err(NBD_EPERM));
    assert_eq!(c.trim(0, 4096).unwrap(), Err(NBD_EPERM));
    assert_eq!(c.flush().unwrap(), Ok(()));
    assert!(c.read(0, 4096).unwrap().unwrap().iter().all(|b| *b == 0x5a));
    c.disconnect().unwrap();
    drop(srv);
    assert_unchanged(&s);
}

#[test]
fn silent_clients_are_dropped_after_the_handshake_limit() {
    let s = Scratch::new();
    image(&s);
    let srv = Served::ours(
        s.dir(),
        On::Unix,
        "",
        &["-t", "--handshake-limit", "1"],
        "a.qcow2",
    );
    let start = Instant::now();
    let mut idle = connect(&srv);
    idle.read_greeting().unwrap();
    // It says nothing more: the server hangs up after about a second.
    let rest = idle.read_to_eof().unwrap_or_default();
    assert!(rest.is_empty());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(20),
        "hung up after {took:?}"
    );
    // With its slot free again (-e 1), the next client is served.
    still_serves(&srv);
}

#[test]
fn clients_past_the_limit_wait_for_a_free_slot() {
    let s = Scratch::new();
    image(&s);
    let srv = Served::ours(s.dir(), On::Unix, "", &["-t", "-e", "2"], "a.qcow2");
    let mut a = ready(&srv, "", &[]);
    let b = ready(&srv, "", &[]);
    // The third waits in the backlog: no greeting while both are served.
    let mut third = connect(&srv);
    third.set_timeout(Duration::from_millis(300)).unwrap();
    let early = third.read_greeting();
    assert!(
        early.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        )),
        "greeted while two clients are served: {early:?}"
    );
    drop(b);
    third.set_timeout(Duration::from_secs(30)).unwrap();
    third.read_greeting().unwrap();
    assert!(a.read(0, 512).unwrap().is_ok());
    a.disconnect().unwrap();
}

/// VmHWM of a process, in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_client_that_stops_reading_stalls_only_itself() {
    let s = Scratch::new();
    qemu_create(s.dir(), "a.qcow2", "", "64M");
    qemu_io(s.dir(), "a.qcow2", &["write -P 0x3c 0 64M"]);
    let srv = Served::ours(s.dir(), On::Unix, "", &["-r", "-t", "-e", "3"], "a.qcow2");
    // 300 reads of 32 MiB (9.4 GiB of replies) sent, none read.
    let mut greedy = ready(&srv, "", &[]);
    let mut all = Vec::new();
    for i in 0..300u64 {
        all.extend_from_slice(&encode_request(
            0,
            NBD_CMD_READ,
            i,
            (i % 2) * (32 << 20),
            32 << 20,
        ));
    }
    greedy.send(&all).unwrap();
    // Others are served in full meanwhile.
    let out = s.path("out.raw");
    let start = Instant::now();
    qemu_img(
        s.dir(),
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &srv.uri,
            out.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&out).unwrap().iter().all(|b| *b == 0x3c));
    assert!(start.elapsed() < Duration::from_secs(120));
    // The stalled client's buffers stay within its budget: the server's
    // peak is far below the replies it was asked for.
    let peak = peak_kib(srv.pid());
    assert!(peak < 400 << 10, "server peak {peak} KiB");
    greedy.shutdown().unwrap();
    still_serves(&srv);
}

#[test]
fn a_client_vanishing_mid_write_leaves_the_image_as_it_was() {
    let s = Scratch::new();
    image(&s);
    let srv = Served::ours(s.dir(), On::Unix, "", &["-t", "-e", "2"], "a.qcow2");
    for cut in [0usize, 1, 4096, (512 << 10) + 3] {
        let mut c = ready(&srv, "", &[]);
        let req = encode_request(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 1, 2 << 20, 1 << 20);
        c.send(&req).unwrap();
        c.send(&vec![0x99u8; cut]).unwrap();
        c.shutdown().unwrap();
    }
    // Also a header cut short.
    let mut c = ready(&srv, "", &[]);
    c.send(&encode_request(0, NBD_CMD_WRITE, 1, 0, 4096)[..10])
        .unwrap();
    c.shutdown().unwrap();
    let mut c = ready(&srv, "", &[]);
    assert!(c
        .read(2 << 20, 1 << 20)
        .unwrap()
        .unwrap()
        .iter()
        .all(|b| *b == 0));
    c.flush().unwrap().unwrap();
    c.disconnect().unwrap();
    drop(srv);
    assert_unchanged(&s);
}

/// What a 4 KiB block may hold after a crash: what it held at the last
/// completed flush, or what any write since then put there.
#[derive(Clone)]
struct Block {
    durable: u8,
    since: Vec<u8>,
}

#[test]
fn a_server_killed_mid_workload_keeps_every_flushed_write() {
    let seed = seed("nbd kill -9");
    let mut rng = SplitMix64::new(seed);
    const BLOCK: u64 = 4096;
    const BLOCKS: u64 = 2048; // 8 MiB
    for (round, opts) in [
        "",
        "extended_l2=on",
        "cluster_size=4k",
        "compat=0.10",
        "",
        "refcount_bits=1",
    ]
    .iter()
    .enumerate()
    {
        let s = Scratch::new();
        qemu_create(s.dir(), "k.qcow2", opts, BLOCKS * BLOCK);
        let srv_args: &[&str] = if round % 2 == 0 {
            &["--discard=unmap"]
        } else {
            &[]
        };
        let mut srv = Served::ours(s.dir(), On::Unix, "", srv_args, "k.qcow2");
        let mut c = ready(&srv, "", &[]);
        let mut model = vec![
            Block {
                durable: 0,
                since: Vec::new()
            };
            BLOCKS as usize
        ];
        let ops = 50 + rng.below(250);
        for op in 0..ops {
            let start = rng.below(BLOCKS);
            let n = (1 + rng.below(48)).min(BLOCKS - start);
            let kind = rng.below(10);
            let pattern = 1 + (op % 250) as u8;
            let (offset, len) = (start * BLOCK, (n * BLOCK) as u32);
            let value = match kind {
                0 => {
                    c.write_zeroes(offset, len, 0).unwrap().unwrap();
                    0
                }
                1 if round % 2 == 0 => {
                    // Trims with --discard=unmap, of whole 64 KiB (so whole
                    // clusters, whatever their size): zeros afterwards.
                    let start = start - start % 16;
                    let n = 16 * (1 + rng.below(4)).min((BLOCKS - start) / 16);
                    c.trim(start * BLOCK, (n * BLOCK) as u32).unwrap().unwrap();
                    for b in start..start + n {
                        model[b as usize].since.push(0);
                    }
                    continue;
                }
                2 => {
                    c.flush().unwrap().unwrap();
                    for m in model.iter_mut() {
                        if let Some(v) = m.since.last() {
                            m.durable = *v;
                        }
                        m.since.clear();
                    }
                    continue;
                }
                _ => {
                    c.write(offset, &vec![pattern; len as usize], rng.below(8) == 0)
                        .unwrap()
                        .unwrap();
                    pattern
                }
            };
            for b in start..start + n {
                model[b as usize].since.push(value);
            }
        }
        // Requests in flight when the server dies.
        for i in 0..8u64 {
            let start = rng.below(BLOCKS - 16);
            let payload = vec![0xf0 + i as u8; 16 * BLOCK as usize];
            c.request_with_payload(0, NBD_CMD_WRITE, 1000 + i, start * BLOCK, &payload)
                .unwrap();
            for b in start..start + 16 {
                model[b as usize].since.push(0xf0 + i as u8);
            }
        }
        srv.kill9();
        let check = run_in(s.dir(), "qemu-img", &["check", "k.qcow2"]);
        let code = check.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "round {round} ({opts}), seed {seed}: qemu-img check exit {code:?}: {}",
            output_text(&check)
        );
        qemu_img(s.dir(), &["convert", "-O", "raw", "k.qcow2", "k.raw"]);
        let got = std::fs::read(s.path("k.raw")).unwrap();
        for (i, m) in model.iter().enumerate() {
            let block = &got[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            let ok = [m.durable]
                .iter()
                .chain(&m.since)
                .any(|v| block.iter().all(|b| b == v));
            assert!(
                ok,
                "round {round} ({opts}), seed {seed}: block {i} holds {:#04x}.., durable {:#04x}, since {:?}",
                block[0], m.durable, m.since
            );
        }
    }
}

#[test]
fn zeroing_flags_and_cache_do_what_they_say() {
    let s = Scratch::new();
    qemu_create(s.dir(), "z.qcow2", "", "4M");
    qemu_io(s.dir(), "z.qcow2", &["write -P 0x11 0 4M"]);
    let srv = Served::ours(s.dir(), On::Unix, "", &["-t"], "z.qcow2");
    let mut c = ready(&srv, "", &[BASE_ALLOCATION]);
    // NO_HOLE: the host clusters stay; without it they are freed.
    c.write_zeroes(0, 128 << 10, NBD_CMD_FLAG_NO_HOLE)
        .unwrap()
        .unwrap();
    c.write_zeroes(1 << 20, 128 << 10, 0).unwrap().unwrap();
    // FAST_ZERO: whole clusters are fast; a partial one would write data.
    c.write_zeroes(2 << 20, 64 << 10, NBD_CMD_FLAG_FAST_ZERO)
        .unwrap()
        .unwrap();
    assert_eq!(
        c.write_zeroes((3 << 20) + 512, 4096, NBD_CMD_FLAG_FAST_ZERO)
            .unwrap(),
        Err(NBD_ENOTSUP)
    );
    assert_eq!(c.cache(0, 4 << 20).unwrap(), Ok(()));
    let bs = c.block_status(0, 4 << 20, 0).unwrap().unwrap();
    assert_eq!(
        bs[0].1[0],
        (128 << 10, NBD_STATE_HOLE | NBD_STATE_ZERO),
        "{bs:?}"
    );
    c.flush().unwrap().unwrap();
    c.disconnect().unwrap();
    drop(srv);
    assert_qemu_img_check(s.dir(), "z.qcow2");
    let map = json(&qemu_img(s.dir(), &["map", "--output=json", "z.qcow2"]));
    let at = |offset: u64| map_entry_at(&map, offset);
    assert!(
        at(0)["offset"].is_u64() && at(0)["zero"] == true,
        "{}",
        at(0)
    );
    assert!(at(1 << 20).get("offset").is_none() && at(1 << 20)["zero"] == true);
    assert!(
        at(3 << 20)["data"] == true,
        "the refused zeroing wrote nothing"
    );
    qemu_io(
        s.dir(),
        "z.qcow2",
        &[
            "read -P 0 0 128k",
            "read -P 0 1M 128k",
            "read -P 0 2M 64k",
            "read -P 0x11 3M 1M",
        ],
    );
}

/// Multi-conn: a flush on one connection makes the completed writes of
/// every connection durable, even if the server is killed right after.
#[test]
fn a_flush_on_one_connection_covers_the_writes_of_all() {
    let s = Scratch::new();
    qemu_create(s.dir(), "m.qcow2", "", "8M");
    let mut srv = Served::ours(s.dir(), On::Unix, "", &["-e", "3"], "m.qcow2");
    let mut a = ready(&srv, "", &[]);
    let mut b = ready(&srv, "", &[]);
    let info = b.export().unwrap().transmission_flags;
    assert!(info & NBD_FLAG_CAN_MULTI_CONN != 0);
    a.write(0, &[0xa1; 65536 * 3], false).unwrap().unwrap();
    b.write(1 << 20, &[0xb2; 4096], false).unwrap().unwrap();
    b.flush().unwrap().unwrap();
    srv.kill9();
    assert_qemu_img_check(s.dir(), "m.qcow2");
    qemu_io(
        s.dir(),
        "m.qcow2",
        &["read -P 0xa1 0 192k", "read -P 0xb2 1M 4k"],
    );
}

/// Random bytes after the greeting, in random amounts, on many
/// connections (seeded): each connection ends or is refused, the server
/// goes on serving, and the image is unchanged.
#[test]
fn garbage_sessions_leave_the_server_serving() {
    let seed = seed("nbd garbage");
    let mut rng = SplitMix64::new(seed);
    let s = Scratch::new();
    image(&s);
    let srv = Served::ours(
        s.dir(),
        On::Unix,
        "",
        &["-t", "-e", "0", "-r", "--handshake-limit", "2"],
        "a.qcow2",
    );
    for round in 0..200 {
        let mut c = connect(&srv);
        c.set_timeout(Duration::from_secs(5)).unwrap();
        c.read_greeting().unwrap();
        // Half the rounds speak valid newstyle first, then garbage: options
        // with random numbers and lengths, or raw bytes.
        if round % 2 == 0 {
            c.send_client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
                .unwrap();
            if round % 4 == 0 {
                let opt = rng.below(16) as u32;
                let n = rng.index(300);
                let data = rng.bytes(n);
                let _ = c.send(&encode_option(opt, &data));
            } else {
                let _ = c.go("", &[]);
            }
        }
        let n = rng.index(2000);
        let _ = c.send(&rng.bytes(n));
        let _ = c.shutdown_write();
        // The server answers or hangs up within the handshake limit; it
        // never hangs.
        let _ = c.read_to_eof();
    }
    let mut c = ready(&srv, "", &[]);
    assert!(
        c.read(0, 1 << 20)
            .unwrap()
            .unwrap()
            .iter()
            .all(|b| *b == 0x5a),
        "seed {seed}"
    );
    c.disconnect().unwrap();
    drop(srv);
    assert_unchanged(&s);
}

/// Four clients at once, each with its own region and its own model of
/// it, through random writes (unaligned), zeroing with and without
/// NO_HOLE, aligned trims, reads checked against the model and flushes
/// (seeded): every read matches, and the image qemu-img reads afterwards
/// holds every model's bytes.
#[test]
fn concurrent_clients_each_see_their_own_writes() {
    let seed = seed("nbd concurrent");
    const REGION: u64 = 4 << 20;
    for opts in ["", "extended_l2=on,cluster_size=128k"] {
        let s = Scratch::new();
        qemu_create(s.dir(), "c.qcow2", opts, 4 * REGION);
        let mut srv = Served::ours(
            s.dir(),
            On::Unix,
            "",
            &["-t", "-e", "4", "--discard=unmap"],
            "c.qcow2",
        );
        let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4u64)
                .map(|k| {
                    let srv = &srv;
                    scope.spawn(move || {
                        let mut rng = SplitMix64::new(seed ^ (k + 1).wrapping_mul(0x9e37_79b9));
                        let base = k * REGION;
                        let mut model = vec![0u8; REGION as usize];
                        let mut c = ready(srv, "", &[]);
                        for op in 0..250u32 {
                            let at = rng.below(REGION - 1);
                            let n = (1 + rng.below(300 << 10)).min(REGION - at);
                            let (a, e) = (at as usize, (at + n) as usize);
                            match rng.below(10) {
                                0 | 1 => {
                                    let got = c.read(base + at, n as u32).unwrap().unwrap();
                                    assert!(
                                        got == model[a..e],
                                        "seed {seed}, client {k}, op {op}: read {n} at {at}"
                                    );
                                }
                                2 => {
                                    let flags = if rng.below(2) == 0 {
                                        NBD_CMD_FLAG_NO_HOLE
                                    } else {
                                        0
                                    };
                                    c.write_zeroes(base + at, n as u32, flags).unwrap().unwrap();
                                    model[a..e].fill(0);
                                }
                                3 => {
                                    let at = at - at % (128 << 10);
                                    let n = (128 << 10).min(REGION - at);
                                    c.trim(base + at, n as u32).unwrap().unwrap();
                                    model[at as usize..(at + n) as usize].fill(0);
                                }
                                4 => c.flush().unwrap().unwrap(),
                                _ => {
                                    let data = rng.bytes(n as usize);
                                    c.write(base + at, &data, rng.below(6) == 0)
                                        .unwrap()
                                        .unwrap();
                                    model[a..e].copy_from_slice(&data);
                                }
                            }
                        }
                        let all = c.read(base, REGION as u32).unwrap().unwrap();
                        assert!(all == model, "seed {seed}, client {k}: final read");
                        c.disconnect().unwrap();
                        model
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(srv.stop().success());
        assert_qemu_img_check(s.dir(), "c.qcow2");
        qemu_img(s.dir(), &["convert", "-O", "raw", "c.qcow2", "c.raw"]);
        let got = std::fs::read(s.path("c.raw")).unwrap();
        for (k, m) in models.iter().enumerate() {
            let r = k * REGION as usize..(k + 1) * REGION as usize;
            assert!(got[r] == m[..], "seed {seed} ({opts}): region {k} on disk");
        }
    }
}
