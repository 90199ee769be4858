"""Nothing secret or personal reaches an anonymous reader (issue 16): the corpus database,
served by a real Datasette, crawled page by page like a visitor (or a scraper) would.

Every table and view as HTML, JSON (`_size=max`), CSV (and streamed CSV), its row pages
(all of them for every table with personal data), every canned query (call_timeline for
every call), the dashboards and their chart SQL, Datasette's own /-/ pages, then every
link those pages lead to. No anonymous page may hold the corpus app id, a full phone
number of the corpus, a digit string of 4+ keys the corpus callers keyed in, a
recognised speech text, or the database's file path. The same pages fetched with the
operator token do show the full numbers, digits and texts: the data is there, just not
for everyone.

The forbidden strings are read straight from the corpus files, not from callgate's code.
"""

from __future__ import annotations

import html
import json
import re
import sqlite3
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import httpx
import pytest
import yaml
from datasette.utils import tilde_encode

from analytics.datasette_app import rendered_metadata_path
from tests.corpus import APP_ID, ROOT, cases, flows
from tests.test_datasette_helpers import OPERATOR_TOKEN, Built, Datasette, wait_until

MAX_PAGES = 4000  # a runaway crawl fails instead of running for ever
VARIANTS_PER_PATH = 1  # followed links: query-string variants (sorts, facets) per path
# Row pages per table: every row of every table holding personal data (the corpus has
# at most 37), the first ones of the big aggregate/log tables (lateness_histogram, events).
ROW_PAGES_PER_TABLE = 60
_HREF = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
_SKIP_PREFIXES = ("/-/static", "/-/static-plugins")
BRIDGE_STATES = frozenset({"bridging", "bridged", "bridge_disconnected"})


@dataclass(frozen=True)
class Secrets:
    """What the corpus holds that no anonymous page may show."""

    app_id: str
    numbers: frozenset[str]
    digits: frozenset[str]  # digit strings of 4+ keys, as keyed
    speech: frozenset[str]

    def pattern(self) -> re.Pattern[str]:
        """One regex for all of them (a page is searched once, lower-cased): a number not in a
        longer digit run; keyed digits not inside a run of digits or letters (12345 is a
        PIN, the tail of 919820012345 is not, nor is a stretch of a hex hash)."""
        keyed = {"".join(ch for ch in d if ch.isdigit()) for d in self.digits}
        alternatives = [re.escape(self.app_id.lower())]
        alternatives += [rf"(?<!\d){re.escape(n)}(?!\d)" for n in sorted(self.numbers)]
        alternatives += [rf"(?<![0-9a-z]){re.escape(d)}(?![0-9a-z])" for d in sorted(keyed)]
        alternatives += [re.escape(t.lower()) for t in sorted(self.speech)]
        return re.compile("|".join(alternatives))  # matched against lower-cased text


def _numbers_in(raw: dict[str, Any]) -> Iterable[str]:
    for key in ("from", "to", "transfer_to"):
        if isinstance(raw.get(key), str) and raw[key]:
            yield raw[key]
    for item in raw.get("broadcast_call_info") or ():
        if isinstance(item, dict) and isinstance(item.get("to"), str):
            yield item["to"]


def corpus_raws() -> list[dict[str, Any]]:
    """Every event of the corpus flows and edge cases, as EnableX sent it."""
    raws = [raw for flow in flows() for raw in flow.events]
    return raws + [case["expect"]["event"] for case in cases("edge")]


def corpus_secrets() -> Secrets:
    raws = corpus_raws()
    numbers = {n for raw in raws for n in _numbers_in(raw)}
    digits = {
        str(raw[key])
        for raw in raws
        for key in ("digits", "digit")
        if raw.get(key) is not None and len(str(raw[key])) >= 4
    }
    speech = {
        str(raw[key]).strip()
        for raw in raws
        for key in ("text", "recognized_phrase")
        if isinstance(raw.get(key), str) and raw[key].strip()
    }
    app_id = json.loads((ROOT / "manifest.json").read_text())["app_id"]
    assert app_id == APP_ID and numbers and digits and speech  # the corpus has all kinds
    return Secrets(app_id, frozenset(numbers), frozenset(digits), frozenset(speech))


def findings(text: str, pattern: re.Pattern[str], hidden_path: str) -> list[str]:
    """Every forbidden thing in one page's text (raw and HTML-unescaped)."""
    seen = (text + "\n" + html.unescape(text) if "&" in text else text).lower()
    found = sorted({m.group(0) for m in pattern.finditer(seen)})
    if hidden_path.lower() in seen:
        found.append("the database path")
    return found


@dataclass
class Crawl:
    """Pages fetched: path?query -> (status, text)."""

    pages: dict[str, tuple[int, str]] = field(default_factory=dict)

    def ok(self, url: str) -> bool:
        return self.pages.get(url, (0, ""))[0] == 200


def _url(path: str, **params: str) -> str:
    return path + ("?" + urlencode(params) if params else "")


class Crawler:
    def __init__(self, ds: Datasette, token: str | None, follow_links: bool = True) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.ds = ds
        self.client = httpx.Client(base_url=ds.url, headers=headers, timeout=30)
        self.crawl = Crawl()
        self.variants: dict[str, int] = {}
        self.follow_links = follow_links

    def fetch_all(self, urls: Iterable[str]) -> list[str]:
        """Fetch the URLs not fetched yet (4 at a time); returns them."""
        todo = [u for u in dict.fromkeys(urls) if u not in self.crawl.pages]
        assert len(self.crawl.pages) + len(todo) <= MAX_PAGES, "crawl ran away"

        def get(url: str) -> tuple[str, int, str]:
            response = self.client.get(url)
            return url, response.status_code, response.text

        with ThreadPoolExecutor(max_workers=4) as pool:
            for url, status, text in pool.map(get, todo):
                assert status < 500, (url, status, text[:300])
                self.crawl.pages[url] = (status, text)
        return todo

    def json(self, url: str) -> Any:
        self.fetch_all([url])
        status, text = self.crawl.pages[url]
        return json.loads(text) if status == 200 else None

    def links(self, urls: Iterable[str]) -> list[str]:
        """Same-site links of the fetched HTML pages, new ones only."""
        found = []
        for url in urls:
            status, text = self.crawl.pages[url]
            if status != 200 or text.lstrip()[:1] in ("{", "["):
                continue
            for href in _HREF.findall(text):
                target = urlsplit(urljoin(self.ds.url + url, html.unescape(href)))
                if target.netloc != urlsplit(self.ds.url).netloc:
                    continue
                path = target.path or "/"
                if path.startswith(_SKIP_PREFIXES) or path.endswith((".js", ".css", ".png")):
                    continue
                if path.count("/") >= 3 and path.endswith((".json", ".csv")):
                    continue  # a row page's own data again: its HTML page is crawled
                link = path + (f"?{target.query}" if target.query else "")
                if link in self.crawl.pages or link in found:
                    continue
                if self.variants.get(path, 0) >= VARIANTS_PER_PATH:
                    continue
                self.variants[path] = self.variants.get(path, 0) + 1
                found.append(link)
        return found

    def run(self, db_file: str) -> Crawl:
        name = self.ds.name
        metadata = yaml.safe_load(
            json.dumps(json.loads(rendered_metadata_path(db_file).read_text()))
        )
        conn = sqlite3.connect(db_file)
        every = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        voice_ids = [r[0] for r in conn.execute("SELECT voice_id FROM calls ORDER BY voice_id")]
        conn.close()
        seeds = [
            "/", "/.json", f"/{name}", f"/{name}.json", "/-/metadata.json", "/-/databases",
            "/-/databases.json", "/-/plugins.json", "/-/versions.json", "/-/settings.json",
            "/-/actor.json", "/-/threads.json", "/-/dashboards",
        ]  # fmt: skip
        for table in every:  # forbidden ones too: their 403 page must not leak either
            base = f"/{name}/{tilde_encode(table)}"
            seeds += [
                base, _url(base + ".json", _size="max"), _url(base + ".csv", _size="max"),
                _url(base + ".csv", _stream="on"),
            ]  # fmt: skip
        for query in metadata["databases"][name]["queries"]:
            base = f"/{name}/{query}"
            seeds += [base, _url(base + ".json", _size="max"), base + ".csv"]
        seeds += [
            _url(f"/{name}/call_timeline{suffix}", voice_id=voice_id)
            for voice_id in voice_ids
            for suffix in ("", ".json", ".csv")
        ]
        for slug, dashboard in metadata["plugins"]["datasette-dashboards"].items():
            seeds.append(f"/-/dashboards/{slug}")
            for chart_slug, chart in dashboard["charts"].items():
                seeds.append(f"/-/dashboards/{slug}/{chart_slug}")
                seeds.append(_url(f"/{name}.json", sql=chart["query"], _shape="array"))
        fetched = self.fetch_all(seeds)
        # Every row page of every table this actor may read (their JSON is the table's).
        rows = []
        for table in every:
            listing = self.json(_url(f"/{name}/{tilde_encode(table)}.json", _size="max"))
            if not listing or not listing.get("primary_keys"):
                continue  # refused, or a view (no row pages)
            columns, keys = listing["columns"], listing["primary_keys"]
            for row in listing["rows"][:ROW_PAGES_PER_TABLE]:
                values = [row[columns.index(k)] for k in keys]
                path = f"/{name}/{tilde_encode(table)}/" + ",".join(
                    tilde_encode(str(v)) for v in values
                )
                rows.append(path)
        fetched += self.fetch_all(rows)
        while fetched and self.follow_links:  # whatever those pages link to, till none is new
            fetched = self.fetch_all(self.links(fetched))
        self.client.close()
        return self.crawl


@pytest.fixture(scope="module")
def secrets() -> Secrets:
    return corpus_secrets()


@pytest.fixture(scope="module")
def anonymous(ds: Datasette, built: Built) -> Crawl:
    return Crawler(ds, token=None).run(built.db)


def test_anonymous_crawl_finds_nothing_secret_or_personal(
    anonymous: Crawl, secrets: Secrets, built: Built, ds: Datasette
) -> None:
    pattern, hidden = secrets.pattern(), str(Path(built.db).resolve().parent)
    leaks = {
        url: found
        for url, (_, text) in anonymous.pages.items()
        if (found := findings(text, pattern, hidden))
    }
    assert not leaks, leaks
    # Nor where the server is installed (/-/threads showed the interpreter's path).
    installed = {sys.prefix, sys.base_prefix}
    assert not [url for url, (_, text) in anonymous.pages.items()
                if any(path in text for path in installed)]
    # The crawl really covered the data: every public table, view and query answered.
    name = ds.name
    for table in ("calls", "plays", "recordings", "dtmf", "speech", "broadcasts", "timeline"):
        for url in (f"/{name}/{table}", _url(f"/{name}/{table}.json", _size="max"),
                    _url(f"/{name}/{table}.csv", _size="max")):  # fmt: skip
            assert anonymous.ok(url), url
    assert anonymous.ok(f"/{name}/calls/{tilde_encode(next(iter(built.reference.calls)))}")
    assert anonymous.ok("/-/dashboards/calls-overview")
    assert sum(status == 200 for status, _ in anonymous.pages.values()) > 300
    # The masked forms are there instead of nothing: numbers keep country code and tail.
    calls = anonymous.pages[_url(f"/{name}/calls.json", _size="max")][1]
    assert re.search(r"\+91\*{7}\d{3}", calls)
    assert "/recording/app-" in calls
    # Refused, not just unlinked: the cleartext tables answer 403.
    for table in ("calls_private", "dtmf_private", "speech_private", "timeline_private"):
        assert anonymous.pages[f"/{name}/{table}"][0] == 403, table


def test_operator_crawl_finds_the_cleartext(
    ds: Datasette, built: Built, secrets: Secrets
) -> None:
    # The same pages as the anonymous crawl (and the operator-only tables'), without
    # following links: only to show the data is there for the operator.
    crawl = Crawler(ds, token=OPERATOR_TOKEN, follow_links=False).run(built.db)
    shown = "\n".join(text for _, text in crawl.pages.values())
    # Bridge legs' numbers are in no projection (the call keeps its own numbers), and the
    # log holds them sealed: every other number must be there in full.
    kept = {
        n for raw in corpus_raws() if str(raw.get("state")) not in BRIDGE_STATES
        for n in _numbers_in(raw)
    }  # fmt: skip
    assert secrets.numbers - kept == {"919811122233"}  # the one bridge target
    missing = [n for n in kept if n not in shown]
    assert not missing, missing
    assert all(d in shown for d in secrets.digits)
    assert all(t in html.unescape(shown) for t in secrets.speech)
    assert secrets.app_id in shown  # the real recording URLs, in the operator's tables


def test_databases_list_hides_file_paths(ds: Datasette, built: Built) -> None:
    for path in ("/-/databases.json", "/-/databases"):
        listed = ds.get(path).json()
        assert [d["name"] for d in listed] == [ds.name]
        assert "path" not in listed[0] and str(Path(built.db).parent) not in json.dumps(listed)
        assert listed[0]["is_mutable"] is True


def test_non_ascii_bearer_token_is_a_400_not_a_500(ds: Datasette) -> None:
    """datasette-auth-tokens compared str with secrets.compare_digest: TypeError, 500."""
    for value in ("Bearer t\u00e9st-token", "Bearer \u00ff" * 3):
        response = httpx.get(
            f"{ds.url}/{ds.name}/calls.json",
            headers=[("authorization", value.encode("latin-1"))],
            timeout=10,
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "bad_authorization"
    assert ds.get(f"/{ds.name}/events.json", token=OPERATOR_TOKEN).status_code == 200


def test_non_ascii_cookie_is_a_400_not_a_500(ds: Datasette) -> None:
    """The CSRF middleware decoded cookies strictly: UnicodeDecodeError, 500."""
    response = httpx.get(f"{ds.url}/{ds.name}/calls", timeout=10,
                         headers=[("cookie", b"ds_actor=\xff\xfe")])
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_authorization"


def test_no_path_redirects_to_another_site(ds: Datasette) -> None:
    """Datasette's trailing-slash redirect sent `/\\evil.com/` to `/\\evil.com`, which a
    browser reads as //evil.com: an open redirect on the public port."""
    import socket

    for path in ("/\\evil.com/", "//evil.com/", "/%5Cevil.com/", "http://evil.com/a/"):
        with socket.create_connection(("127.0.0.1", ds.port), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert b"evil.com" not in head, (path, head)
        assert not head.startswith((b"http/1.1 30",)), (path, head)


def test_the_access_log_keeps_no_query_string(ds: Datasette, secrets: Secrets) -> None:
    """An operator's number search travels in the query string; uvicorn's access log wrote
    it to stdout in the clear. The log now keeps the path and `?…` only."""
    number = sorted(secrets.numbers)[0]
    response = ds.get(f"/{ds.name}/find_calls.json", token=OPERATOR_TOKEN, number=number)
    assert response.status_code == 200 and number in response.text
    assert wait_until(
        lambda: f"/{ds.name}/find_calls.json" in ds.server.log_path.read_text("utf-8", "replace")
    )
    text = ds.server.log_path.read_text("utf-8", "replace")
    assert not secrets.pattern().search(text.lower()), secrets.pattern().search(text.lower())
    assert "?sql=" not in text and "number=" not in text
    assert f"/{ds.name}/find_calls.json?…" in text


def test_odd_requests_get_a_4xx_not_a_500(ds: Datasette) -> None:
    """Found by an anonymous crawl: each of these made Datasette answer 500."""
    probes = [
        ("GET", f"/{ds.name}/calls.json?_sort=no_such_column", {}, 400),
        ("GET", f"/{ds.name}/calls?_sort_desc=no_such_column", {}, 400),
        ("GET", f"/{ds.name}/plays/a", {}, 404),
        ("GET", f"/{ds.name}/plays/a.json", {}, 404),
        ("POST", f"/{ds.name}/call_timeline", {"voice_id": "x"}, 405),
    ]
    failed = []
    for method, path, form, expected in probes:
        response = httpx.request(method, ds.url + path, data=form or None, timeout=10)
        if response.status_code != expected:
            failed.append((method, path, response.status_code, response.text[:200]))
        if expected == 405:
            assert response.headers["allow"] == "GET, HEAD, OPTIONS"
    assert not failed, failed
