"""Loading the EnableX sample traffic copied into tests/fixtures (data only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent / "fixtures" / "enablex" / "corpus"
APP_ID = json.loads((ROOT / "manifest.json").read_text())["app_id"]


@dataclass(frozen=True)
class WireRequest:
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Flow:
    name: str
    expect: dict[str, Any]
    events: list[dict[str, Any]]
    wire: list[WireRequest]


def _request(record: dict[str, Any]) -> WireRequest:
    headers = {k: v for k, v in record["headers"].items() if k.lower() != "content-length"}
    return WireRequest(headers, record["body"].encode())


def flows() -> list[Flow]:
    found = []
    for path in sorted((ROOT / "flows").glob("*.json")):
        data = json.loads(path.read_text())
        wire_path = ROOT / "wire" / (path.stem + ".jsonl")
        wire = [_request(json.loads(line)) for line in wire_path.read_text().splitlines() if line]
        found.append(Flow(data["name"], data["expect"], data["events"], wire))
    return found


def cases(kind: str) -> list[dict[str, Any]]:
    """bad/ or edge/ cases as {name, request: WireRequest, expect}."""
    found = []
    for path in sorted((ROOT / kind).glob("*.json")):
        data = json.loads(path.read_text())
        body = data["request"]["body"]
        if "generator" in data:
            gen = data["generator"]["body"]
            body = gen["prefix"] + gen["repeat"] * gen["times"] + gen["suffix"]
        request = _request({"headers": data["request"]["headers"], "body": body})
        found.append({"name": data["name"], "request": request, "expect": data["expect"]})
    return found


def all_wire_requests() -> list[WireRequest]:
    return [request for flow in flows() for request in flow.wire]
