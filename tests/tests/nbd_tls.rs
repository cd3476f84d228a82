//! `qcow2 serve` with TLS as qemu-nbd offers it (`--object
//! tls-creds-x509,...,endpoint=server --tls-creds ID`), certificates made
//! at test time: qemu-img and libnbd as TLS clients over TCP and Unix
//! sockets, plain clients and clients with a certificate of another
//! authority refused.

use qcowkit_tests::nbd::*;
use qcowkit_tests::serve::{On, Served};
use qcowkit_tests::*;

fn served_with_tls(s: &Scratch, on: On, tls: &TlsDirs, extra: &str) -> Served {
    let object = format!("{}{extra}", tls_creds_object("tls0", &tls.server, "server"));
    Served::ours(
        s.dir(),
        on,
        "vm",
        &["-t", "-e", "4", "--object", &object, "--tls-creds", "tls0"],
        "a.qcow2",
    )
}

/// qemu-img's `--image-opts` for the export over TLS with the client
/// credentials in `dir`.
fn opts(srv: &Served) -> String {
    match (&srv.socket, srv.port) {
        (Some(sock), _) => format!(
            "driver=nbd,server.type=unix,server.path={},export=vm,tls-creds=tls0,tls-hostname=localhost",
            sock.display()
        ),
        (None, Some(p)) => format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={p},export=vm,tls-creds=tls0"
        ),
        _ => unreachable!(),
    }
}

fn qemu_img_tls(s: &Scratch, client_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let object = tls_creds_object("tls0", client_dir, "client");
    let mut all = vec![args[0], "--object", &object];
    all.extend(&args[1..]);
    run_in(s.dir(), "qemu-img", &all)
}

#[test]
fn qemu_img_and_libnbd_read_and_write_over_tls() {
    let s = Scratch::new();
    let tls = make_tls_dirs(&s.path("pki")).unwrap();
    qemu_create(s.dir(), "a.qcow2", "", "32M");
    qemu_io(
        s.dir(),
        "a.qcow2",
        &["write -P 0x42 1M 3M", "write -c -P 0x43 16M 64k"],
    );
    let mut expected = {
        qemu_img(
            s.dir(),
            &["convert", "-O", "raw", "a.qcow2", "expected.raw"],
        );
        std::fs::read(s.path("expected.raw")).unwrap()
    };
    for on in [On::Tcp, On::Unix] {
        let srv = served_with_tls(&s, on, &tls, "");
        // qemu-img converts out bit-exactly.
        let out = qemu_img_tls(
            &s,
            &tls.client,
            &[
                "convert",
                "--image-opts",
                &opts(&srv),
                "-O",
                "raw",
                "out.raw",
            ],
        );
        assert!(out.status.success(), "{on:?}: {}", output_text(&out));
        let got = std::fs::read(s.path("out.raw")).unwrap();
        assert_eq!(got.len(), expected.len(), "{on:?}");
        if let Some(at) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!(
                "{on:?}: byte {at}: {:#04x} != {:#04x}",
                got[at], expected[at]
            );
        }
        // qemu-io writes and reads back through the TLS session.
        let object = tls_creds_object("tls0", &tls.client, "client");
        let out = run_in(
            s.dir(),
            "qemu-io",
            &[
                "--object",
                &object,
                "--image-opts",
                "-c",
                "write -P 0x44 8M 1M",
                "-c",
                "read -P 0x44 8M 1M",
                "-c",
                "read -P 0x42 1M 3M",
                &opts(&srv),
            ],
        );
        let text = output_text(&out);
        assert!(
            out.status.success() && !text.contains("fail"),
            "{on:?}: {text}"
        );
        expected[8 << 20..9 << 20].fill(0x44);
        // The plain protocol is refused before anything else.
        let mut plain = match (&srv.socket, srv.port) {
            (Some(sock), _) => Client::unix(sock).unwrap(),
            (None, Some(p)) => Client::tcp(("127.0.0.1", p)).unwrap(),
            _ => unreachable!(),
        };
        plain.handshake().unwrap();
        assert_eq!(
            plain.go("vm", &[]).unwrap().unwrap_err().reply_type,
            NBD_REP_ERR_TLS_REQD
        );
        assert_eq!(
            plain.list().unwrap().unwrap_err().reply_type,
            NBD_REP_ERR_TLS_REQD
        );
        let plain_img = run_in(s.dir(), "qemu-img", &["info", &srv.uri]);
        assert!(!plain_img.status.success(), "qemu-img without TLS got in");
        // libnbd's nbdinfo with the same client directory.
        if let Some(p) = srv.port {
            let uri = format!(
                "nbds://127.0.0.1:{p}/vm?tls-certificates={}",
                tls.client.display()
            );
            let info = json(&ok_in(s.dir(), "nbdinfo", &["--json", &uri]));
            assert_eq!(info["TLS"], true);
            assert_eq!(info["exports"][0]["export-size"], 32u64 << 20);
        }
    }
    assert_qemu_img_check(s.dir(), "a.qcow2");
    qemu_io(s.dir(), "a.qcow2", &["read -P 0x44 8M 1M"]);
}

#[test]
fn a_client_certificate_of_another_authority_is_refused() {
    let s = Scratch::new();
    let tls = make_tls_dirs(&s.path("pki")).unwrap();
    let foreign = make_foreign_client_dir(&s.path("pki"), &tls).unwrap();
    qemu_create(s.dir(), "a.qcow2", "", "1M");
    let srv = served_with_tls(&s, On::Tcp, &tls, "");
    let out = qemu_img_tls(&s, &foreign, &["info", "--image-opts", &opts(&srv)]);
    assert!(!out.status.success(), "a foreign certificate got in");
    // The server goes on: a good client gets in afterwards.
    let out = qemu_img_tls(&s, &tls.client, &["info", "--image-opts", &opts(&srv)]);
    assert!(out.status.success(), "{}", output_text(&out));
    drop(srv);

    // verify-peer=off: no client certificate needed (only the CA, to
    // check the server).
    let ca_only = s.path("ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(&tls.ca_cert, ca_only.join("ca-cert.pem")).unwrap();
    let srv = served_with_tls(&s, On::Tcp, &tls, ",verify-peer=off");
    let out = qemu_img_tls(&s, &ca_only, &["info", "--image-opts", &opts(&srv)]);
    assert!(out.status.success(), "{}", output_text(&out));
    drop(srv);
    let srv = served_with_tls(&s, On::Tcp, &tls, "");
    let out = qemu_img_tls(&s, &ca_only, &["info", "--image-opts", &opts(&srv)]);
    assert!(
        !out.status.success(),
        "verify-peer=on let a client without a certificate in"
    );
}

#[test]
fn bad_credentials_are_named() {
    let s = Scratch::new();
    qemu_create(s.dir(), "a.qcow2", "", "1M");
    let qcow2 = bin("qcow2").display().to_string();
    let out = run_in(
        s.dir(),
        &qcow2,
        &[
            "serve",
            "-k",
            "x.sock",
            "--object",
            "tls-creds-x509,id=tls0,dir=/nonexistent,endpoint=server",
            "--tls-creds",
            "tls0",
            "a.qcow2",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output_text(&out).contains("/nonexistent/server-cert.pem"),
        "{}",
        output_text(&out)
    );
    let out = run_in(
        s.dir(),
        &qcow2,
        &["serve", "-k", "x.sock", "--tls-creds", "nope", "a.qcow2"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        output_text(&out).contains("No TLS credentials with id 'nope'"),
        "{}",
        output_text(&out)
    );
}
