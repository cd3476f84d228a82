#!/usr/bin/env python3
"""Our NBD server (`qcow2 serve`) and qemu-nbd side by side on the same images.

Every row starts a server for each run (ours, qemu-nbd, ours, ...; one
untimed round first), waits until it listens, times only the client
(qemu-img bench, qemu-img convert out of and into the export, nbdcopy over
4 connections, TLS over TCP), then reads the server's peak memory (VmHWM)
and stops it with SIGTERM. Both servers get the same flags (-f qcow2 -x ''
--cache=writeback -t, plus the row's). What the clients read or wrote is
verified (cmp, qemu-img compare, qemu-img check). Prints median wall times,
the ratio (qemu-nbd's time over ours: above 1 means we are faster) and
each server's peak memory.

    scripts/bench-nbd.py [--size-mib N] [--runs N] [--only SUBSTRING]

The disk is bench.py's (N MiB, default 1024). Needs qemu-img, qemu-nbd,
nbdcopy, nbdinfo, openssl and /usr/bin/time (scripts/bench-nbd.sh installs
them). Not part of the test suite.
"""
import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "scripts", "bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
make_disk, run_timed, sh = bench.make_disk, bench.run_timed, bench.sh

# Seconds a server has to start listening, and to exit after SIGTERM.
LISTEN_DEADLINE = 30
EXIT_DEADLINE = 60


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unix_listening(path):
    """Whether a socket bound at path is listening (/proc/net/unix's flag
    __SO_ACCEPTCON), without connecting: a probing client would take one
    of the server's -e slots."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False


def tcp_listening(port):
    """Whether something listens on 127.0.0.1:port (/proc/net/tcp state 0A)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def vm_hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """One server process (ours or qemu-nbd) serving one image."""

    def __init__(self, tool, exe, image, flags, work, tls_dir=None):
        self.tool = tool
        self.log_path = os.path.join(work, f"server-{tool}.log")
        if tls_dir is None:
            self.sock = os.path.join(work, f"nbd-{tool}.sock")
            if os.path.exists(self.sock):
                os.remove(self.sock)
            where = ["-k", self.sock]
            self.uri = f"nbd+unix:///?socket={self.sock}"
            self.ready = lambda: unix_listening(self.sock)
        else:
            self.port = free_port()
            where = ["-b", "127.0.0.1", "-p", str(self.port)]
            if tls_dir:
                where += ["--object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server",
                          "--tls-creds", "tls0"]
            self.uri = f"nbd://127.0.0.1:{self.port}/"
            self.ready = lambda: tcp_listening(self.port)
        argv = [exe, "-f", "qcow2", "-x", "", "--cache=writeback", "-t"] + where + flags + [image]
        if tool == "ours":
            argv.insert(1, "serve")
        self.argv = argv
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + LISTEN_DEADLINE
        while not self.ready():
            if self.proc.poll() is not None:
                self.fail(f"exited {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                self.fail(f"not listening after {LISTEN_DEADLINE} s")
            time.sleep(0.005)

    def log_text(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def fail(self, why):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        sys.exit(f"{self.tool} server ({' '.join(self.argv)}) {why}; its output:\n{self.log_text()}")

    def stop(self):
        """SIGTERM, then waits; returns the peak memory (MiB) read before."""
        if self.proc.poll() is not None:
            self.fail(f"exited {self.proc.returncode} while serving")
        peak = vm_hwm_mib(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            self.fail(f"still running {EXIT_DEADLINE} s after SIGTERM")
        if rc not in (0, -signal.SIGTERM):
            self.fail(f"exited {rc} after SIGTERM")
        self.log.close()
        return peak

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def make_certs(d):
    """A CA, a server certificate (localhost, 127.0.0.1) and a client one,
    laid out as QEMU's tls-creds-x509 directories tls-server/ and tls-client/."""
    srv, cli = os.path.join(d, "tls-server"), os.path.join(d, "tls-client")
    os.makedirs(srv)
    os.makedirs(cli)
    def ssl(argv, cwd):
        proc = subprocess.run(["openssl"] + argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            sys.exit(f"openssl {' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    ssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench CA",
              "-keyout", "ca-key.pem", "-out", "ca-cert.pem"], d)
    for who, subj, ext in (
            ("server", "/CN=localhost",
             "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
             "keyUsage=digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"),
            ("client", "/CN=bench client",
             "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
             "basicConstraints=CA:FALSE\n")):
        with open(os.path.join(d, f"{who}.ext"), "w") as f:
            f.write(ext)
        ssl(["req", "-newkey", "rsa:2048", "-nodes", "-subj", subj,
                  "-keyout", f"{who}-key.pem", "-out", f"{who}.csr"], d)
        ssl(["x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                  "-CAcreateserial", "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}-cert.pem"], d)
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(os.path.join(d, name), srv)
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        shutil.copy(os.path.join(d, name), cli)
    return srv, cli


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "qcowkit-std"], cwd=ROOT, check=True)
    exes = {"ours": os.path.join(ROOT, "target/release/qcow2"), "qemu": "qemu-nbd"}
    work = tempfile.mkdtemp(prefix="qcowkit-bench-nbd-", dir=os.environ.get("BENCH_DIR"))
    live = []
    started = time.monotonic()
    try:
        d = work
        n = args.size_mib
        print(f"== preparing a {n} MiB disk in {d}", flush=True)
        make_disk(os.path.join(d, "disk.raw"), n)
        sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "disk.raw", "plain.qcow2"], d)
        sh(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
            "disk.raw", "zstd.qcow2"], d)
        # bench.py's 3-deep chain: the disk, then two overlays with writes.
        shutil.copy(os.path.join(d, "plain.qcow2"), os.path.join(d, "base.qcow2"))
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"], d)
        m = n // 16
        sh(["qemu-io", "-c", f"write -P 0x11 0 {m}M", "-c", f"write -z {4 * m}M {m}M", "mid.qcow2"], d)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"], d)
        sh(["qemu-io", "-c", f"write -P 0x22 {m // 2}M {m}M", "-c", f"write -P 0x33 {8 * m}M {m}M",
            "top.qcow2"], d)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "empty.qcow2", f"{n}M"], d)
        # What each source holds, as qemu-img reads the file itself.
        for src in ("plain", "zstd", "top"):
            sh(["qemu-img", "convert", "-O", "raw", f"{src}.qcow2", f"ref-{src}.raw"], d)
        srv_dir, cli_dir = make_certs(d)

        def raw_out(src):
            def verify(o, q):
                for f in (o, q):
                    sh(["cmp", f + ".raw", f"ref-{src}.raw"], d)
            return verify

        def into(o, q):
            for f in (o, q):
                sh(["qemu-img", "check", "-q", f + ".qcow2"], d)
                sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", "disk.raw", f + ".qcow2"], d)

        def same_image(o, q):
            for f in (o, q):
                sh(["qemu-img", "check", "-q", f + ".qcow2"], d)
            sh(["qemu-img", "compare", "-q", o + ".qcow2", q + ".qcow2"], d)

        tls_client = ["--object", f"tls-creds-x509,id=tls0,dir={cli_dir},endpoint=client"]

        def inet_opts(tls):
            return ("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export="
                    + (",tls-creds=tls0" if tls else ""))

        # (name, image served ("{out}.qcow2": the run's own copy of template),
        #  template, extra server flags, transport (None: Unix socket,
        #  "": TCP, a dir: TCP with TLS), client argv, verify)
        # In client argvs {uri} is the export, {port} the TCP port, {out}
        # out-ours or out-qemu.
        bench_r = ["qemu-img", "bench", "-q", "-f", "raw", "-d", "16"]
        bench_w = bench_r + ["-w", "--pattern=0xa5"]
        rows = [
            ("bench 4 KiB sequential reads, depth 16", "plain.qcow2", None, ["-r"], None,
             bench_r + ["-c", "100000", "-s", "4k", "{uri}"], None),
            ("bench 4 KiB reads at 64 KiB steps, depth 16", "plain.qcow2", None, ["-r"], None,
             bench_r + ["-c", "100000", "-s", "4k", "-S", "64k", "{uri}"], None),
            ("bench 64 KiB sequential reads, depth 16", "plain.qcow2", None, ["-r"], None,
             bench_r + ["-c", str(n * 16), "-s", "64k", "{uri}"], None),
            ("bench 4 KiB writes, each into a fresh cluster", "{out}.qcow2", "empty.qcow2", [], None,
             bench_w + ["-c", str(n * 16), "-s", "4k", "-S", "64k", "{uri}"], same_image),
            ("bench 4 KiB writes into allocated clusters", "{out}.qcow2", "plain.qcow2", [], None,
             bench_w + ["-c", str(n * 64), "-s", "4k", "-S", "16k", "{uri}"], same_image),
            ("convert out -> raw, plain", "plain.qcow2", None, ["-r"], None,
             ["qemu-img", "convert", "-f", "raw", "-O", "raw", "{uri}", "{out}.raw"], raw_out("plain")),
            ("convert out -> raw, zstd clusters", "zstd.qcow2", None, ["-r"], None,
             ["qemu-img", "convert", "-f", "raw", "-O", "raw", "{uri}", "{out}.raw"], raw_out("zstd")),
            ("convert out -> raw, 3-deep chain", "top.qcow2", None, ["-r"], None,
             ["qemu-img", "convert", "-f", "raw", "-O", "raw", "{uri}", "{out}.raw"], raw_out("top")),
            ("convert raw -> into an empty qcow2", "{out}.qcow2", "empty.qcow2", [], None,
             ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "disk.raw", "{uri}"], into),
            ("nbdcopy out, 4 connections (-r -e 4)", "plain.qcow2", None, ["-r", "-e", "4"], None,
             ["nbdcopy", "--connections=4", "{uri}", "{out}.raw"], raw_out("plain")),
            ("nbdcopy into an empty qcow2, 4 connections (-e 4)", "{out}.qcow2", "empty.qcow2", ["-e", "4"], None,
             ["nbdcopy", "--connections=4", "disk.raw", "{uri}"], into),
            ("convert out -> raw over TCP, plain", "plain.qcow2", None, ["-r"], "",
             ["qemu-img", "convert", "--image-opts", inet_opts(False), "-O", "raw", "{out}.raw"],
             raw_out("plain")),
            ("convert out -> raw over TCP with TLS, plain", "plain.qcow2", None, ["-r"], srv_dir,
             ["qemu-img", "convert"] + tls_client + ["--image-opts", inet_opts(True), "-O", "raw", "{out}.raw"],
             raw_out("plain")),
        ]
        print(f"{'work':52} {'ours s':>8} {'qemu s':>8} {'ratio':>7} {'best':>6} {'ours MiB':>9} {'qemu MiB':>9}",
              flush=True)
        for name, image, template, flags, transport, argv, verify in rows:
            if args.only and args.only not in name:
                continue
            times = {"ours": [], "qemu": []}
            peaks = {"ours": 0.0, "qemu": 0.0}
            notes = []
            for run in range(args.runs + 1):
                for tool in ("ours", "qemu"):
                    out = f"out-{tool}"
                    for ext in (".raw", ".qcow2"):
                        if os.path.exists(os.path.join(d, out + ext)):
                            os.remove(os.path.join(d, out + ext))
                    if template:
                        shutil.copy(os.path.join(d, template), os.path.join(d, out + ".qcow2"))
                    os.sync()
                    server = Server(tool, exes[tool], image.replace("{out}", out), flags, d, transport)
                    live.append(server)
                    cmd = [a.replace("{out}", out).replace("{uri}", server.uri)
                           .replace("{port}", str(getattr(server, "port", ""))) for a in argv]
                    if run == 0 and cmd[0] == "nbdcopy":
                        info = subprocess.run(["nbdinfo", "--json", server.uri], cwd=d, check=True,
                                              stdout=subprocess.PIPE).stdout
                        mc = json.loads(info)["exports"][0].get("can_multi_conn")
                        notes.append(f"{tool} can_multi_conn={mc}")
                    try:
                        wall, _ = run_timed(cmd, d)
                    except SystemExit as e:
                        sys.exit(f"{e}\n{tool} server's output:\n{server.log_text()}")
                    peak = server.stop()
                    live.remove(server)
                    if run > 0:
                        times[tool].append(wall)
                    peaks[tool] = max(peaks[tool], peak)
            if verify:
                verify(os.path.join(d, "out-ours"), os.path.join(d, "out-qemu"))
            o, q = statistics.median(times["ours"]), statistics.median(times["qemu"])
            best = min(times["qemu"]) / min(times["ours"])
            print(f"{name:52} {o:8.3f} {q:8.3f} {q / o:7.2f} {best:6.2f} {peaks['ours']:9.1f} {peaks['qemu']:9.1f}",
                  flush=True)
            if notes:
                print(f"  ({', '.join(notes)})", flush=True)
        print(f"(medians of {args.runs} alternating runs after an untimed one; ratio = qemu-nbd / ours of the"
              " medians, best = of the fastest runs; MiB = the server's peak (VmHWM); outputs verified)")
        print(f"total {time.monotonic() - started:.0f} s")
    finally:
        for server in live:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
