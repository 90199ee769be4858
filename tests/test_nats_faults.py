"""Fault test: two gateways, a 3-node R3 stream and two archivers, with things killed.

Thousands of distinct events (the corpus flows under fresh ids) are posted through
two real `callgate serve --log nats://…` gunicorn servers while a chaos thread
SIGKILLs a NATS server (and restarts it), one gateway, and the active archiver
(and starts it again as the new standby). Senders post each flow's events in
order, one at a time, moving to the other gateway on a refused connection or a
503, exactly as a load balancer and EnableX's retries would. Afterwards every
event that got a 2xx must be in the SQLite archive exactly once, each flow's
events in the order they were posted, the chain must verify, and the projections
must equal a rebuild. Then, with two of the three servers down, no post gets a 2xx.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from analytics import projector
from gateway.db import connect
from gateway.log import eventlog
from gateway.log.nats_local import LocalCluster
from tests.conftest import CALLGATE, RunningServer, dedup_key_of, server_env
from tests.helpers_analytics import _rename_ids, corpus, snapshot
from tests.servers import Subprocess

COPIES = int(os.environ.get("CALLGATE_FAULT_COPIES", "320"))  # ~3,000 events
SENDERS = 16


def _flows(copies: int, seed: int = 20) -> list[list[dict[str, Any]]]:
    """The corpus flows `copies` times over, each copy under fresh call ids."""
    rng = random.Random(seed)
    templates = [flow.events for flow in corpus()]
    out = []
    for index in range(copies):
        ids: dict[str, str] = {}
        out.append([_rename_ids(raw, ids, rng) for raw in templates[index % len(templates)]])
    return out


class Driver:
    """Senders posting each flow's events in order, failing over between gateways."""

    def __init__(
        self, gateways: list[str], flows: list[list[dict[str, Any]]], dedup_key: bytes
    ) -> None:
        self.gateways = gateways
        self.dedup_key = dedup_key  # the archive's: acked events are named by its hashes
        self.flows = flows
        self.total = sum(len(flow) for flow in flows)
        self.posted = 0  # requests answered 2xx
        self.acked: dict[int, list[str]] = {}
        self.duplicates = 0
        self.unavailable = 0  # 503s
        self.refused = 0  # connection errors (a gateway down)
        self.bad: list[str] = []
        self.phase = "start"  # what the chaos thread did last
        self.unavailable_by_phase: dict[str, int] = {}
        self._lock = threading.Lock()
        self._gate = threading.Condition(self._lock)
        self.allowed = 1.0  # senders take no new flow past this progress (see hold_at)
        self._next = 0

    def progress(self) -> float:
        return self.posted / self.total

    def hold_at(self, fraction: float) -> None:
        """Start no new flow once `fraction` of the posts are answered, until raised: the
        chaos thread's next fault then lands mid-drive however long the last one took."""
        with self._gate:
            self.allowed = fraction
            self._gate.notify_all()

    def run(self, senders: int) -> None:
        threads = [threading.Thread(target=self._sender, args=(n,)) for n in range(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _take(self) -> int | None:
        with self._gate:
            while self._next < len(self.flows) and self.posted / self.total >= self.allowed:
                self._gate.wait(0.05)
            if self._next >= len(self.flows):
                return None
            self._next += 1
            return self._next - 1

    def _sender(self, number: int) -> None:
        with httpx.Client(timeout=10) as client:
            while (index := self._take()) is not None:
                acked: list[str] = []
                for raw in self.flows[index]:
                    self._post(client, number, raw, acked)
                with self._lock:
                    self.acked[index] = acked

    def _post(
        self, client: httpx.Client, number: int, raw: dict[str, Any], acked: list[str]
    ) -> None:
        body = json.dumps(raw).encode()
        gateway = number % len(self.gateways)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                answer = client.post(
                    self.gateways[gateway] + "/webhooks/enablex",
                    content=body,
                    headers={"content-type": "application/json"},
                )
            except httpx.HTTPError:
                with self._lock:
                    self.refused += 1
                gateway = (gateway + 1) % len(self.gateways)
                time.sleep(0.05)
                continue
            if answer.status_code == 503:
                assert answer.headers.get("retry-after")
                with self._lock:
                    self.unavailable += 1
                    by_phase = self.unavailable_by_phase
                    by_phase[self.phase] = by_phase.get(self.phase, 0) + 1
                gateway = (gateway + 1) % len(self.gateways)
                time.sleep(0.1)
                continue
            if answer.status_code != 200:
                self.bad.append(f"{answer.status_code} {answer.text[:200]}")
                return
            digest = eventlog.content_hash(raw, self.dedup_key)
            with self._lock:
                self.posted += 1
                self.duplicates += bool(answer.json()["duplicate"])
            if digest not in acked:
                acked.append(digest)
            return
        self.bad.append("no 2xx within 120 s")


class Archivers:
    """`callgate archive --follow` processes on one archive file: one active, one standby."""

    def __init__(self, url: str, db: str, directory: Path, env: dict[str, str]) -> None:
        self.url, self.db, self.directory, self.env = url, db, directory, env
        self.parts: list[Subprocess] = []

    def start(self) -> Subprocess:
        part = Subprocess(self.directory / f"archiver-{len(self.parts)}.log", self.env)
        part.launch([CALLGATE, "archive", "--log", self.url, "--db", self.db, "--follow",
                     "--lock-ttl", "2", "--purge-after", "0"])
        self.parts.append(part)
        return part

    def active(self) -> Subprocess:
        """The live process whose log says it holds the lock, last claim wins."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            best = None
            for part in self.parts:
                text = part.log_path.read_text()
                claimed, lost = text.rfind("archive: active"), text.rfind("lock lost")
                if part.running and claimed > lost:
                    best = part
            if best is not None:
                return best
            time.sleep(0.1)
        raise TimeoutError("no active archiver")

    def stop(self) -> None:
        for part in self.parts:
            part.stop(grace=15)


def _wait_until(fraction: float, driver: Driver, done: threading.Event) -> bool:
    driver.hold_at(fraction)
    while driver.progress() < fraction and not done.is_set():
        time.sleep(0.02)
    return not done.is_set()


def test_nothing_acknowledged_is_lost_or_doubled_through_kills(tmp_path: Path) -> None:
    run_fault_test(tmp_path, COPIES)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("CALLGATE_SOAK"), reason="soak: set CALLGATE_SOAK=1")
def test_nats_fault_soak(tmp_path: Path) -> None:
    run_fault_test(tmp_path, COPIES * 10)


def run_fault_test(tmp_path: Path, copies: int) -> None:
    """Drive `copies` corpus flows through the kills; assert and print what the note reports."""
    cluster = LocalCluster(tmp_path / "nats").start()
    env = server_env(CALLGATE_NATS_TIMEOUT="1.5")
    db = str(tmp_path / "archive.db")
    dedup_key = dedup_key_of(db)  # the archive's key store, made before its archivers start
    gateways = [
        RunningServer(str(tmp_path / f"gw{n}.db"), env, workers=1,
                      log_path=tmp_path / f"gateway-{n}.log",
                      args=("--log", cluster.url, "--threads", "8", "--no-cpu-affinity"))
        for n in range(2)
    ]
    archivers = Archivers(cluster.url, db, tmp_path, env)
    kills = {"nats": 0, "gateway": 0, "archiver": 0}
    try:
        for gateway in gateways:
            gateway.start()
        archivers.start()
        archivers.active()
        archivers.start()  # the standby
        flows = _flows(copies)
        driver = Driver([g.url for g in gateways], flows, dedup_key)
        done = threading.Event()

        def faults() -> None:
            if _wait_until(0.10, driver, done):
                cluster.kill_node(0)
                driver.phase = "nats n1 killed"
                kills["nats"] += 1
            if _wait_until(0.25, driver, done):
                cluster.start_node(0)
                driver.phase = "nats n1 back"
            if _wait_until(0.35, driver, done):
                gateways[0].kill()
                driver.phase = "gateway killed"
                kills["gateway"] += 1
            if _wait_until(0.45, driver, done):
                archivers.active().kill()
                kills["archiver"] += 1
                driver.phase = "archiver killed"
            if _wait_until(0.55, driver, done):
                archivers.start()
                driver.phase = "archiver restarted"
            if _wait_until(0.65, driver, done):
                cluster.kill_node(1)
                driver.phase = "nats n2 killed"
                kills["nats"] += 1
            if _wait_until(0.80, driver, done):
                cluster.start_node(1)
                driver.phase = "nats n2 back"

        def chaos() -> None:
            try:
                faults()
            finally:
                driver.hold_at(1.0)  # the rest of the drive runs free

        chaos_thread = threading.Thread(target=chaos)
        chaos_thread.start()
        started = time.monotonic()
        driver.run(SENDERS)
        drive_seconds = time.monotonic() - started
        done.set()
        chaos_thread.join()
        assert not driver.bad, driver.bad[:5]

        wanted = {digest for acked in driver.acked.values() for digest in acked}
        conn = connect(db)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            have = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            if have >= len(wanted):
                break
            time.sleep(0.2)
        rows = conn.execute("SELECT seq, content_hash FROM events ORDER BY seq").fetchall()
        seq_of = {row[1]: row[0] for row in rows}
        lost = [digest for digest in wanted if digest not in seq_of]
        doubled = len(rows) - len(seq_of)
        extra = [digest for digest in seq_of if digest not in wanted]
        out_of_order = [
            index for index, acked in driver.acked.items()
            if [seq_of.get(d, 0) for d in acked] != sorted(seq_of.get(d, 0) for d in acked)
        ]
        positions = dict(conn.execute(
            "SELECT kind, count(*) FROM archive_positions GROUP BY kind").fetchall())
        print(
            f"\nfault test: {driver.total} posts of {len(wanted)} distinct events "
            f"in {drive_seconds:.1f} s through 2 gateways; kills {kills}; "
            f"2xx {driver.posted} (duplicate:true {driver.duplicates}), "
            f"503 {driver.unavailable} {driver.unavailable_by_phase}, "
            f"refused connections {driver.refused}; "
            f"archived {len(rows)}, lost {len(lost)}, duplicated {doubled}, "
            f"stream messages by kind {positions}"
        )
        assert kills == {"nats": 2, "gateway": 1, "archiver": 1}
        assert not lost and not doubled and not extra
        assert not out_of_order, out_of_order[:5]

        verify = subprocess.run([CALLGATE, "verify", "--db", db], env=env,
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stderr
        archivers.stop()
        projector.project_all(conn)
        live = snapshot(conn)
        projector.rebuild(conn)
        assert snapshot(conn) == live

        # Two of three servers down: no quorum, so no post may be acknowledged.
        cluster.kill_node(1)
        cluster.kill_node(2)
        fresh = _flows(4, seed=99)
        answers: list[int] = []

        def post(raw: dict[str, Any]) -> None:
            try:
                answers.append(httpx.post(
                    gateways[1].url + "/webhooks/enablex", json=raw, timeout=10).status_code)
            except httpx.HTTPError:
                answers.append(0)

        threads = [threading.Thread(target=post, args=(flow[0],)) for flow in fresh]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(f"with 2 of 3 servers down: answers {answers}")
        assert answers and all(status == 503 for status in answers)
        conn.close()
    finally:
        archivers.stop()
        for gateway in gateways:
            gateway.stop()
        cluster.stop()
