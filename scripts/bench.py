#!/usr/bin/env python3
"""Our qcow2 tool and qemu-img side by side on the same images.

Every row runs both tools in turn (ours, qemu-img, ours, ...) so the
machine's drift hits both alike, verifies what each wrote (cmp, qemu-img
compare, qemu-img check) and prints median wall times, the ratio (qemu-img's
time over ours: above 1 means we are faster) and each tool's peak memory.

    scripts/bench.py [--size-mib N] [--runs N] [--only SUBSTRING]

The disk is N MiB (default 1024): per 64 KiB cluster, 60% random bytes,
10% text, 30% zeros (fixed seed). Not part of the test suite.
"""
import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_timed(argv, cwd):
    """Runs argv; returns (wall seconds, peak RSS MiB); fails on a non-zero
    exit. The peak is GNU time's (the process's own, not the forking
    Python's)."""
    peak_file = os.path.join(cwd, ".peak")
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", peak_file] + argv, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    with open(peak_file) as f:
        peak_kib = int(f.read().split()[-1])
    return wall, peak_kib / 1024


def sh(argv, cwd):
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def make_disk(path, size_mib, seed=1):
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    text = b" ".join(rng.choice(words) for _ in range(20000))
    cluster = 65536
    with open(path, "wb") as f:
        for i in range(size_mib * 1024 * 1024 // cluster):
            r = rng.random()
            if r < 0.6:
                f.write(os.urandom(cluster))
            elif r < 0.7:
                at = rng.randrange(len(text) - cluster)
                f.write(text[at:at + cluster])
            else:
                f.write(bytes(cluster))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "qcowkit-std"], cwd=ROOT, check=True)
    ours = os.path.join(ROOT, "target/release/qcow2")
    work = tempfile.mkdtemp(prefix="qcowkit-bench-", dir=os.environ.get("BENCH_DIR"))
    try:
        d = work
        print(f"== preparing a {args.size_mib} MiB disk in {d}", flush=True)
        make_disk(os.path.join(d, "disk.raw"), args.size_mib)
        sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "disk.raw", "plain.qcow2"], d)
        sh(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "disk.raw", "zlib.qcow2"], d)
        sh(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
            "disk.raw", "zstd.qcow2"], d)
        sh(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k",
            "disk.raw", "extl2.qcow2"], d)
        # A 3-deep chain: the disk, then two overlays with writes.
        shutil.copy(os.path.join(d, "plain.qcow2"), os.path.join(d, "base.qcow2"))
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"], d)
        m = args.size_mib // 16
        sh(["qemu-io", "-c", f"write -P 0x11 0 {m}M", "-c", f"write -z {4 * m}M {m}M", "mid.qcow2"], d)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"], d)
        sh(["qemu-io", "-c", f"write -P 0x22 {m // 2}M {m}M", "-c", f"write -P 0x33 {8 * m}M {m}M",
            "top.qcow2"], d)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "huge.qcow2", "64T"], d)
        sh(["qemu-io", "-c", "write -P 7 0 64k", "-c", "write -P 8 70368744112128 64k", "huge.qcow2"], d)
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "empty.qcow2", f"{args.size_mib}M"], d)
        # LUKS (qemu-img's default cipher, aes-256-xts-plain64), the same
        # command line for both tools (qemu-img's --object/--image-opts).
        secret = "secret,id=s,data=bench"
        luks_opts = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10"
        sh(["qemu-img", "convert", "--object", secret, "-f", "raw", "-O", "qcow2", "-o", luks_opts,
            "disk.raw", "luks.qcow2"], d)

        def luks_out(ours_file, qemu_file, src_raw):
            for f in (ours_file, qemu_file):
                sh(["qemu-img", "compare", "-q", "--object", secret, "--image-opts",
                    "driver=raw,file.filename=" + src_raw,
                    "driver=qcow2,file.filename=" + f + ",encrypt.key-secret=s"], d)

        def raw_out(ours_file, qemu_file, src):
            # Both outputs hold exactly the source's guest contents.
            sh(["cmp", ours_file, qemu_file], d)
            sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", ours_file, src], d)

        def qcow2_out(ours_file, qemu_file, src_raw):
            sh(["qemu-img", "check", "-q", ours_file], d)
            sh(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", src_raw, ours_file], d)
            sh(["qemu-img", "compare", "-q", ours_file, qemu_file], d)

        def same_image(ours_file, qemu_file, _):
            sh(["qemu-img", "check", "-q", ours_file], d)
            sh(["qemu-img", "compare", "-q", ours_file, qemu_file], d)

        n = args.size_mib
        rows = [
            ("convert qcow2 -> raw, plain", ["convert", "-O", "raw", "plain.qcow2", "{out}.raw"], None,
             lambda o, q: raw_out(o + ".raw", q + ".raw", "plain.qcow2")),
            ("convert qcow2 -> raw, zstd clusters", ["convert", "-O", "raw", "zstd.qcow2", "{out}.raw"], None,
             lambda o, q: raw_out(o + ".raw", q + ".raw", "zstd.qcow2")),
            ("convert qcow2 -> raw, zlib clusters", ["convert", "-O", "raw", "zlib.qcow2", "{out}.raw"], None,
             lambda o, q: raw_out(o + ".raw", q + ".raw", "zlib.qcow2")),
            ("convert qcow2 -> raw, extended L2", ["convert", "-O", "raw", "extl2.qcow2", "{out}.raw"], None,
             lambda o, q: raw_out(o + ".raw", q + ".raw", "extl2.qcow2")),
            ("convert qcow2 -> raw, 3-deep chain", ["convert", "-O", "raw", "top.qcow2", "{out}.raw"], None,
             lambda o, q: raw_out(o + ".raw", q + ".raw", "top.qcow2")),
            ("convert raw -> qcow2", ["convert", "-f", "raw", "-O", "qcow2", "disk.raw", "{out}.qcow2"], None,
             lambda o, q: qcow2_out(o + ".qcow2", q + ".qcow2", "disk.raw")),
            ("convert raw -> qcow2 -c (zstd)",
             ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", "disk.raw", "{out}.qcow2"],
             None, lambda o, q: qcow2_out(o + ".qcow2", q + ".qcow2", "disk.raw")),
            ("convert raw -> qcow2 -c (zlib)", ["convert", "-c", "-f", "raw", "-O", "qcow2", "disk.raw", "{out}.qcow2"],
             None, lambda o, q: qcow2_out(o + ".qcow2", q + ".qcow2", "disk.raw")),
            ("convert qcow2 -> raw, LUKS aes-256-xts",
             ["convert", "--object", secret, "--image-opts",
              "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s", "-O", "raw", "{out}.raw"], None,
             lambda o, q: sh(["cmp", o + ".raw", q + ".raw"], d)),
            ("convert raw -> qcow2, LUKS aes-256-xts",
             ["convert", "--object", secret, "-f", "raw", "-O", "qcow2", "-o", luks_opts, "disk.raw", "{out}.qcow2"],
             None, lambda o, q: luks_out(o + ".qcow2", q + ".qcow2", "disk.raw")),
            ("bench 4 KiB reads", ["bench", "-q", "-c", "200000", "plain.qcow2"], None, None),
            ("bench 4 KiB writes into allocated clusters",
             ["bench", "-q", "-w", "-c", str(n * 64), "-d", "1", "-S", "16k", "--pattern=0xa5", "{out}.qcow2"],
             "plain.qcow2", lambda o, q: same_image(o + ".qcow2", q + ".qcow2", None)),
            ("bench 4 KiB writes, each into a fresh 64 KiB cluster",
             ["bench", "-q", "-w", "-c", str(n * 16), "-d", "1", "-S", "64k", "--pattern=0xa5", "{out}.qcow2"],
             "empty.qcow2", lambda o, q: same_image(o + ".qcow2", q + ".qcow2", None)),
            ("info, 64 TiB image", ["info", "huge.qcow2"], None, None),
            ("map, 64 TiB image", ["map", "--output=json", "huge.qcow2"], None, None),
        ]
        print(f"{'work':55} {'ours s':>8} {'qemu s':>8} {'ratio':>7} {'best':>6} {'ours MiB':>9} {'qemu MiB':>9}")
        results = []
        for name, argv, template, verify in rows:
            if args.only and args.only not in name:
                continue
            times = {"ours": [], "qemu": []}
            peaks = {"ours": 0.0, "qemu": 0.0}
            # One untimed round first: what the row reads is then in the page
            # cache for both tools, whatever the row before left there.
            for run in range(args.runs + 1):
                for tool in ("ours", "qemu"):
                    out = f"out-{tool}"
                    for ext in (".raw", ".qcow2"):
                        if os.path.exists(os.path.join(d, out + ext)):
                            os.remove(os.path.join(d, out + ext))
                    if template:
                        shutil.copy(os.path.join(d, template), os.path.join(d, out + ".qcow2"))
                    cmd = [ours if tool == "ours" else "qemu-img"] + [a.replace("{out}", out) for a in argv]
                    # Write-back of what earlier runs wrote must not land
                    # on this one.
                    os.sync()
                    wall, peak = run_timed(cmd, d)
                    if run > 0:
                        times[tool].append(wall)
                    peaks[tool] = max(peaks[tool], peak)
            if verify:
                verify(os.path.join(d, "out-ours"), os.path.join(d, "out-qemu"))
            o, q = statistics.median(times["ours"]), statistics.median(times["qemu"])
            best = min(times["qemu"]) / min(times["ours"])
            results.append((name, o, q))
            print(f"{name:55} {o:8.3f} {q:8.3f} {q / o:7.2f} {best:6.2f} {peaks['ours']:9.1f} {peaks['qemu']:9.1f}",
                  flush=True)
        print(f"(medians of {args.runs} alternating runs after an untimed one; ratio = qemu-img / ours of the medians, best = of the"
              " fastest runs; outputs verified)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
