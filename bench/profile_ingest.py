"""Where a loaded `callgate serve` spends its CPU, per request: by thread and by kind of work.

Starts the server as bench/ingest.py does (B: `callgate serve` on a fresh database,
unique encrypted events; or `--side a`, the minimal Flask app), drives it closed loop
with wrk (else the Python client) and meanwhile

  * reads every worker thread's CPU time and context switches from /proc, and divides
    them by the requests answered: µs of CPU per request, by thread kind;
  * samples the thread holding the GIL with py-spy (`record --gil --nonblocking`, so
    the server is never paused) and sorts the samples into kinds of work by their
    innermost recognisable frame: HTTP/Flask/gunicorn, decrypt, validate, hash, SQLite,
    hand-off (queueing for and waiting on the group commit), metrics, logging.

CPU spent without the GIL (the kernel's side of fsync, sockets, futex wake-ups and
context switches) is in the first figure, not in the samples; the difference between
the two is reported as "outside the GIL". Figures only, nothing asserted.

    pip install py-spy            # optional: without it only the /proc figures print
    .venv/bin/python bench/profile_ingest.py [--side a|b] [--duration 12] [--rate 200]
                                             [--perf] [--functions 40] [--syscalls] [--keep]

`--functions N` lists the N functions that held the GIL longest, callees included (a
flat view of the same samples); `--syscalls` counts the workers' system calls by name and
their context switches per request with perf stat, instead of the py-spy samples; `--keep`
keeps the raw py-spy stacks and perf.data.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import ingest  # noqa: E402
from loadgen import LoadResult, run_python, run_wrk, wrk_path  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CONNECTIONS = 32

# Innermost frame first: the first rule a frame matches names the sample's kind.
RULES: tuple[tuple[str, str], ...] = (
    (r"_Job\.|BatchWriter\.(submit|_gather|_take|_lead|_for_this|admitted)|_wake_gatherer|"
     r"WriterLock|_flock_until|_Admission|_ThreadAdmission", "hand-off (group commit queue/wait)"),
    (r"decrypt_event|wire/crypto\.py", "decrypt"),
    (r"wire/schemas\.py|marshmallow/|parse_strict_json|_parse_body", "validate (JSON + schema)"),
    (r"content_hash|row_hash|canonical_json|_prepare \(", "hash + canonical JSON"),
    (r"append_batch|_logged|log_head|connected_before|refine_leg|gateway/db\.py", "SQLite"),
    (r"Checkpointer", "checkpointer"),
    (r"prometheus_client|web/metrics\.py", "metrics"),
    (r"logging/", "logging"),
    (r"ThreadWorker\.run|selectors\.py|murder_keepalived|WorkerTmp|\.accept \(|"
     r"on_client_socket_readable|enqueue_req|Arbiter", "gunicorn event loop"),
    (r"_worker \(concurrent/futures/thread\.py", "thread pool hand-off"),
    (r"flask/|werkzeug/|gunicorn/|web/app\.py|web/worker\.py|wire/ingest\.py|log/intake\.py|"
     r"threading\.py|concurrent/futures|minimal_app\.py", "HTTP / Flask / gunicorn"),
)


def classify(frames: list[str]) -> str:
    for frame in reversed(frames):
        for pattern, kind in RULES:
            if re.search(pattern, frame):
                return kind
    return "other"


def workers_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def threads_of(pid: int) -> dict[int, tuple[float, int, int]]:
    """tid -> (CPU seconds, voluntary, involuntary context switches)."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        vol = re.search(r"\bvoluntary_ctxt_switches:\s+(\d+)", status)
        invol = re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", status)
        found[int(tid)] = (
            (int(stat[11]) + int(stat[12])) / CLOCK_TICKS,
            int(vol.group(1)) if vol else 0,
            int(invol.group(1)) if invol else 0,
        )
    return found


def thread_names(pyspy: str | None, pid: int) -> dict[int, str]:
    """Python thread names by OS thread id (py-spy dump); Python 3.11 sets no OS names."""
    if not pyspy:
        return {}
    out = subprocess.run([pyspy, "dump", "--pid", str(pid)], capture_output=True, text=True)
    return {int(m[1]): m[2] for m in re.finditer(r"Thread (\d+) \([^)]*\): \"([^\"]*)\"",
                                                 out.stdout)}


def kind_of(tid: int, pid: int, name: str) -> str:
    if tid == pid:
        return "gunicorn main thread (poll, accept)"
    if name.startswith("callgate-writer"):
        return "writer thread"
    if name.startswith("callgate-checkpointer"):
        return "checkpointer thread"
    if name.startswith("ThreadPoolExecutor") or not name:
        return "request threads"
    return f"other ({name})"


def inclusive_shares(stacks: list[tuple[list[str], int]]) -> collections.Counter[str]:
    """Samples per function, counted once per stack it is on (its own time and its callees')."""
    shares: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        for name in {re.sub(r":\d+\)$", ")", frame) for frame in frames}:
            shares[name] += count
    return shares


def perf_report(data: Path, sort: str) -> list[tuple[float, str]]:
    """(percent, name) rows of `perf report --sort <sort>`, self time, no call graph."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
         "--sort", sort, "--percent-limit", "1"],
        capture_output=True, text=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
        if match:
            rows.append((float(match.group(1)), re.sub(r"\s+", " ", match.group(2))))
    return rows


def print_perf(data: Path, cpu_us: float) -> None:
    """The workers' CPU by shared object, then the hottest symbols (perf, cpu-clock)."""
    print(f"perf (cpu-clock, all worker threads; µs of the {cpu_us:.0f} per request):")
    for percent, name in perf_report(data, "dso"):
        print(f"  {name:38s} {percent:5.1f}%  ~{percent / 100 * cpu_us:5.0f} µs")
    print("  hottest symbols:")
    for percent, name in perf_report(data, "dso,sym")[:15]:
        print(f"    {percent:5.1f}%  {name[:90]}")


# The system calls a group commit is made of, counted per request with `--syscalls`.
SYSCALLS = ("futex", "pwrite64", "pread64", "fdatasync", "fcntl", "flock", "clock_nanosleep",
            "recvfrom", "sendto", "epoll_wait", "getpid", "getrandom")


def start_syscall_count(workers: list[int], seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """`perf stat` of the workers' context switches and system calls by name (tracepoints:
    needs root or a low perf_event_paranoid)."""
    events = ["context-switches", *(f"syscalls:sys_enter_{name}" for name in SYSCALLS)]
    return subprocess.Popen(
        ["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(events),
         "-p", ",".join(str(w) for w in workers), "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def print_syscalls(out: Path, requests_in_window: float) -> None:
    print("system calls and switches of the workers, per request (perf stat):")
    for line in out.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].strip().isdigit():
            name = fields[2].removeprefix("syscalls:sys_enter_")
            print(f"  {name:38s} {int(fields[0]) / requests_in_window:6.2f}")
        elif len(fields) > 2 and "not supported" in fields[0]:
            print(f"  {fields[2]:38s} not available here")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=("a", "b"), default="b", help="b: callgate serve (default)")
    p.add_argument("--duration", type=float, default=12.0, help="seconds of measured load")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--serve-args", default="", help="extra arguments for the server")
    p.add_argument("--tmp-dir", default=None, help="where the database goes (a real disk)")
    p.add_argument("--perf", action="store_true",
                   help="also sample the workers with Debian's perf: CPU by library, and the "
                        "hottest kernel and C symbols")
    p.add_argument("--functions", type=int, default=0, metavar="N",
                   help="also list the N functions with the most GIL time, callees included")
    p.add_argument("--syscalls", action="store_true",
                   help="count the workers' system calls by name and context switches with "
                        "perf stat instead of sampling with py-spy (needs root for the syscall "
                        "tracepoints)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (py-spy's raw stacks, perf.data, server log)")
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or (
        str(Path(sys.executable).with_name("py-spy"))
        if Path(sys.executable).with_name("py-spy").exists() else None
    )
    if args.syscalls:
        pyspy = None  # its sampling would add switches and system calls of its own
    workdir = Path(tempfile.mkdtemp(prefix="callgate-profile-", dir=args.tmp_dir))
    db = workdir / "callgate.db"
    port = ingest.free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"ENABLEX_APP_ID": ingest.APP_ID, "CALLGATE_DB": str(db)})
    if args.side == "a":
        cmd = [sys.executable, str(BENCH / "minimal_app.py"), "--port", str(port)]
    else:
        cmd = [ingest.callgate_executable(), "serve", "--db", str(db), "--port", str(port)]
    server = ingest.start_server(args.side, [*cmd, *args.serve_args.split()], port, workdir, env)
    bodies = ingest.EventBodies(ingest.APP_ID)

    def leg(path: Path, seconds: float) -> LoadResult:
        if wrk_path():
            return run_wrk(server.url, path, seconds, CONNECTIONS, 1)
        return run_python(server.url, path, seconds, CONNECTIONS, 1)

    print(f"machine: {ingest.machine()}")
    print(f"side {args.side.upper()}: {' '.join(cmd[1:2] if args.side == 'a' else cmd[:2])} "
          f"{args.serve_args}; load: {'wrk' if wrk_path() else 'python'}, {CONNECTIONS} "
          f"keep-alive connections; py-spy: "
          f"{'off (--syscalls)' if args.syscalls else pyspy or 'not installed'}")
    try:
        server.wait_ready()
        workers = workers_of(server.proc.pid)
        warm = leg(bodies.write(workdir / "warm.txt", 20_000), 3)
        names = {w: thread_names(pyspy, w) for w in workers}
        load_file = bodies.write(
            workdir / "load.txt", int(max(warm.rps, 1000) * args.duration * 2) + 1000
        )
        got: dict[str, LoadResult] = {}
        loader = threading.Thread(target=lambda: got.update(r=leg(load_file, args.duration)))
        before = {w: threads_of(w) for w in workers}
        loader.start()
        time.sleep(1)
        spies = [
            subprocess.Popen(
                [pyspy, "record", "--gil", "--nonblocking", "-t", "-r", str(args.rate), "-f", "raw",
                 "-d", str(max(1, int(args.duration - 2))), "-p", str(w),
                 "-o", str(workdir / f"pyspy-{w}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for w in workers
        ] if pyspy else []
        perf = (
            subprocess.Popen(
                ["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-g",
                 "-p", ",".join(str(w) for w in workers), "-o", str(workdir / "perf.data"),
                 "--", "sleep", str(max(1, int(args.duration - 2)))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if args.perf and shutil.which("perf") else None
        )
        counted_s = max(1, int(args.duration - 2))
        counter = (
            start_syscall_count(workers, counted_s, workdir / "syscalls.txt")
            if args.syscalls and shutil.which("perf") else None
        )
        loader.join()
        if perf is not None:
            perf.wait()
        if counter is not None:
            counter.wait()
        after = {w: threads_of(w) for w in workers}
        for spy in spies:
            spy.wait()
        result = got["r"]
        requests = result.requests
        print(f"load: {result.rps:.0f} req/s over {result.duration_s:.1f} s, "
              f"p99 {result.p99_ms:.1f} ms, non-2xx {result.non2xx}")
        cpu: collections.Counter[str] = collections.Counter()
        vol: collections.Counter[str] = collections.Counter()
        invol: collections.Counter[str] = collections.Counter()
        for w in workers:
            for tid, (seconds, v, i) in after[w].items():
                s0, v0, i0 = before[w].get(tid, (0.0, 0, 0))
                kind = kind_of(tid, w, names[w].get(tid, ""))
                cpu[kind] += seconds - s0
                vol[kind] += v - v0
                invol[kind] += i - i0
        total = sum(cpu.values())
        print(f"worker CPU: {total / requests * 1e6:.0f} µs per request "
              f"({sum(vol.values()) / requests:.2f} voluntary + "
              f"{sum(invol.values()) / requests:.2f} involuntary context switches)")
        for kind, seconds in cpu.most_common():
            print(f"  {kind:38s} {seconds / requests * 1e6:6.0f} µs  "
                  f"switches {vol[kind] / requests:5.2f} + {invol[kind] / requests:5.2f}")
        samples: collections.Counter[str] = collections.Counter()
        stacks: list[tuple[list[str], int]] = []
        for w in workers:
            path = workdir / f"pyspy-{w}.txt"
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                stack, _, n = line.rpartition(" ")
                if n.isdigit():
                    frames = stack.split(";")[1:]
                    samples[classify(frames)] += int(n)
                    stacks.append((frames, int(n)))
        if samples:
            held = sum(samples.values())
            sampled_s = max(1, int(args.duration - 2))
            # Each worker's samples cover `sampled_s` seconds at `rate` per second.
            gil_share = held / (args.rate * sampled_s * len(workers))
            gil_us = gil_share * sampled_s * len(workers) / (result.rps * sampled_s) * 1e6
            print(f"GIL held {gil_share:.0%} of the time per worker: ~{gil_us:.0f} µs per "
                  f"request in Python; outside the GIL (kernel, SQLite/fsync, switches) "
                  f"~{max(0.0, total / requests * 1e6 - gil_us):.0f} µs")
            for kind, n in samples.most_common():
                print(f"  {kind:38s} {n / held:6.1%}  ~{n / held * gil_us:5.0f} µs")
            if args.functions:
                print(f"  the {args.functions} functions with the most GIL time, callees "
                      f"included (µs per request):")
                for name, n in inclusive_shares(stacks).most_common(args.functions):
                    print(f"    {n / held * gil_us:6.0f}  {name[:100]}")
        if (workdir / "syscalls.txt").exists():
            print_syscalls(workdir / "syscalls.txt", result.rps * counted_s)
        if (workdir / "perf.data").exists():
            print_perf(workdir / "perf.data", total / requests * 1e6)
    finally:
        server.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
