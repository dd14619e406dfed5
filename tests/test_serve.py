"""`finderpartner serve` as a real uvicorn server in its own process, answered over loopback by httpx: text and
image queries with filters on the FAISS store and on milvus-lite, every refusal (4xx, nothing changed), SIGTERM,
and a store updated on disk (adds, removals, a compaction) picked up while queries keep running, none failing."""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import launcher_env

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("faiss")

from PIL import Image  # noqa: E402

from finderpartner.embedding import Searcher  # noqa: E402
from finderpartner.model import load_model  # noqa: E402
from finderpartner.search import PhotoRow  # noqa: E402

pytestmark = pytest.mark.slow  # trains a model and starts processes (the fast subset: pytest -m 'not slow')

COLUMNS = {"color": "text", "number": "integer"}
TOKEN = "s3cret-token-for-tests"


def _gallery(small_data: Path) -> tuple[list[Path], dict[str, dict[str, object]]]:
    """The val images and attributes taken from their captions: color (the third word) and the file's number."""
    folder = small_data / "images" / "val"
    attrs: dict[str, dict[str, object]] = {}
    with open(small_data / "captions_val.csv", newline="") as f:
        for row in csv.DictReader(f):
            words = row["caption"].split()
            attrs.setdefault(row["filename"], {"color": words[2], "number": int(Path(row["filename"]).stem)})
    return sorted(folder.iterdir()), attrs


def _rows(paths: list[Path], attrs: dict[str, dict[str, object]]) -> list[PhotoRow]:
    return [PhotoRow(path=p.name, size=p.stat().st_size, attributes=attrs[p.name]) for p in paths]


@pytest.fixture(scope="module")
def searcher(trained_model: Path) -> Searcher:
    return Searcher(load_model(trained_model), device=torch.device("cpu"), precision="fp32", batch_size=8)


def _make_store(kind: str, where: Path, searcher: Searcher, paths: list[Path], attrs) -> str:  # type: ignore[no-untyped-def]
    vectors, failed = searcher.embed_paths(paths)
    assert not failed
    if kind == "faiss":
        from finderpartner.search.faiss_store import FaissStore

        with FaissStore.create(where / "store", dim=vectors.shape[1], fingerprint=searcher.fingerprint) as store:
            store.ensure_columns(COLUMNS)
            store.add(_rows(paths, attrs), vectors)
        return str(where / "store")
    from finderpartner.search.milvus_store import MilvusStore

    location = f"milvus:{where / 'photos.db'}"
    with MilvusStore.create(location, dim=vectors.shape[1], fingerprint=searcher.fingerprint, columns=COLUMNS) as store:
        store.add(_rows(paths, attrs), vectors)
    return location


class Server:
    """`finderpartner serve ... --port 0` in a subprocess; ``url`` from the line it prints when it listens."""

    def __init__(self, model: Path, store: str, *extra: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "finderpartner.cli", "serve", "--model", str(model), "--index", store]
        self.proc = subprocess.Popen(
            [*command, "--port", "0", "--device", "cpu", *extra],
            env=launcher_env(**(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = self._wait_listening()
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def _wait_listening(self, timeout: float = 180) -> str:
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                m = re.search(r" on (http://\S+) \(", line)
                if m and not found:
                    found.append(m.group(1))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.time() + timeout
        while not found:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            assert time.time() < deadline, "serve did not start listening"
            time.sleep(0.1)
        url = found[0]
        while True:  # the line comes just before uvicorn's loop starts: wait for an answer
            try:
                httpx.get(f"{url}/healthz", timeout=5)
                return url
            except httpx.TransportError:
                assert time.time() < deadline and self.proc.poll() is None, "serve stopped before answering"
                time.sleep(0.1)

    def stop(self) -> tuple[int, str]:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def served(request, trained_model: Path, small_data: Path, searcher: Searcher, tmp_path_factory) -> Iterator:  # type: ignore[no-untyped-def]
    paths, attrs = _gallery(small_data)
    store = _make_store(request.param, tmp_path_factory.mktemp(f"serve-{request.param}"), searcher, paths, attrs)
    server = Server(trained_model, store, "--max-upload-mb", "0.05", "--max-pixels", "250000")
    yield server, paths, attrs
    code, err = server.stop()
    assert code == 130 and "Traceback" not in err, err


def _check_top_k(hits: list[dict], searcher: Searcher, paths: list[Path], text: str, keep: list[bool], k: int) -> None:
    """``hits`` are the best ``k`` of the kept paths for ``text``: each score is the exact cosine (the FAISS store
    keeps float16 vectors: near ties may swap) and none left out scores clearly higher than the last one in."""
    vectors, _ = searcher.embed_paths(paths)
    scores = vectors @ searcher.embed_texts([text])[0]
    by_name = {p.name: float(s) for p, s, kept in zip(paths, scores, keep) if kept}
    assert len(hits) == min(k, len(by_name))
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for h in hits:
        assert h["score"] == pytest.approx(by_name[h["path"]], abs=2e-3), h
    left_out = [v for name, v in by_name.items() if name not in {h["path"] for h in hits}]
    assert not left_out or max(left_out) <= hits[-1]["score"] + 2e-3


def test_text_query_with_filter_matches_the_model(served, searcher: Searcher) -> None:  # type: ignore[no-untyped-def]
    server, paths, attrs = served
    r = server.client.post("/search", json={"text": "a large red circle on the left", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    _check_top_k(body["hits"], searcher, paths, "a large red circle on the left", [True] * len(paths), 5)
    assert body["hits"][0]["rank"] == 1 and body["hits"][0]["attributes"].keys() == COLUMNS.keys()
    where = "color in ('red', 'blue') and number >= 5"
    r = server.client.post("/search", json={"text": "a small blue star", "k": 4, "where": where})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    keep = [attrs[p.name]["color"] in ("red", "blue") and int(attrs[p.name]["number"]) >= 5 for p in paths]  # type: ignore[call-overload]
    _check_top_k(hits, searcher, paths, "a small blue star", keep, 4)
    assert all(h["attributes"]["color"] in ("red", "blue") for h in hits)


def test_image_query_finds_the_image_itself(served) -> None:  # type: ignore[no-untyped-def]
    server, paths, _ = served
    data = paths[3].read_bytes()
    r = server.client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["path"] == paths[3].name and hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    r = server.client.post(
        "/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "3", "where": f"number != {3}"}
    )
    assert r.status_code == 200 and paths[3].name not in [h["path"] for h in r.json()["hits"]]


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def test_bad_requests_get_a_clear_4xx_and_change_nothing(served) -> None:  # type: ignore[no-untyped-def]
    server, paths, _ = served
    before = server.client.get("/healthz").json()
    good = server.client.post("/search", json={"text": "a green square", "k": 5}).json()["hits"]
    cases = [
        ({"json": {"text": "x", "where": "color = 'red' and"}}, 400, "position 18"),
        ({"json": {"text": "x", "where": "colour = 'red'"}}, 400, "unknown column 'colour'"),
        ({"json": {"text": "x", "where": "number = 'five'"}}, 400, "holds numbers"),
        ({"json": {"text": "x", "k": 0}}, 400, "k must be"),
        ({"json": {"text": "x", "k": "many"}}, 400, "k must be"),
        ({"json": {"text": ""}}, 400, 'give "text"'),
        ({"json": {"txt": "x"}}, 400, "unknown field"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"x" * 60_000, "headers": {"content-type": "application/json"}}, 413, "accepts at most 51 KB"),
        ({"files": {"image": ("big.bin", os.urandom(60_000), "image/jpeg")}}, 413, "--max-upload-mb"),
        ({"files": {"image": ("notes.txt", b"hello, not an image", "text/plain")}}, 415, "not a readable image"),
        ({"files": {"image": ("bomb.png", _png(1000, 1000), "image/png")}}, 413, "over the limit of 250000"),
        ({"files": {"other": ("a.jpg", paths[0].read_bytes(), "image/jpeg")}}, 400, 'named "image"'),
        (  # a part without a name: the multipart parser refuses it (was a 500)
            {"content": b"--b\r\n\r\nx\r\n--b--\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}},
            400,
            "multipart body cannot be read",
        ),
        ({"content": b"text=x", "headers": {"content-type": "text/plain"}}, 415, "application/json"),
    ]
    for kwargs, status, words in cases:
        r = server.client.post("/search", **kwargs)
        assert r.status_code == status, (kwargs.keys(), r.status_code, r.text)
        assert words in r.json()["error"], (words, r.json())
    assert server.client.get("/search").status_code == 405
    assert server.client.get("/nowhere").json()["error"].startswith("no such endpoint")
    after = server.client.get("/healthz").json()
    assert after["count"] == before["count"] and after["generation"] == before["generation"]
    assert after["errors"]["client"] == before["errors"]["client"] + len(cases) + 2
    assert after["errors"]["server"] == 0
    assert server.client.post("/search", json={"text": "a green square", "k": 5}).json()["hits"] == good


def test_health_and_openapi(served) -> None:  # type: ignore[no-untyped-def]
    server, paths, _ = served
    health = server.client.get("/healthz").json()
    assert health["status"] == "ok" and health["count"] == len(paths) and health["dim"] == 32
    assert health["reloads"] == 0 and health["errors"]["server"] == 0
    schema = server.client.get("/openapi.json").json()
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert server.client.get("/docs").status_code == 200


def test_token_is_required_when_set(trained_model: Path, small_data: Path, searcher: Searcher, tmp_path: Path) -> None:
    paths, attrs = _gallery(small_data)
    store = _make_store("faiss", tmp_path, searcher, paths[:6], attrs)
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    server = Server(trained_model, store, "--token-file", str(token_file))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = server.client.post("/search", json={"text": "a red circle"}, headers=headers)
            assert r.status_code == 401 and "bearer token" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert server.client.get("/healthz").json() == {"status": "ok"}  # no details without the token
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = server.client.post("/search", json={"text": "a red circle", "k": 2}, headers=auth)
        assert r.status_code == 200 and len(r.json()["hits"]) == 2
        assert server.client.get("/healthz", headers=auth).json()["errors"] == {"client": 3, "server": 0}
    finally:
        code, err = server.stop()
    assert code == 130 and "Traceback" not in err and "serve stopped by SIGTERM" in err, err


def test_sigterm_during_a_request_answers_it_then_stops(
    trained_model: Path, small_data: Path, searcher: Searcher, tmp_path: Path
) -> None:
    paths, attrs = _gallery(small_data)
    store = _make_store("faiss", tmp_path, searcher, paths, attrs)
    server = Server(trained_model, store)
    results: list[int] = []

    def ask() -> None:
        for _ in range(20):
            try:
                results.append(server.client.post("/search", json={"text": "a red circle", "k": 3}).status_code)
            except httpx.TransportError:
                return  # the server has closed: requests after the signal may be refused, never half-answered

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(0.3)
    code, err = server.stop()
    thread.join()
    assert code == 130, err
    assert "Traceback" not in err and "serve stopped by SIGTERM" in err, err
    assert results and set(results) == {200}


def test_port_taken_is_a_clear_error(trained_model: Path, small_data: Path, searcher: Searcher, tmp_path: Path) -> None:
    import socket

    paths, attrs = _gallery(small_data)
    store = _make_store("faiss", tmp_path, searcher, paths[:4], attrs)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "finderpartner.cli", "serve", "--model", str(trained_model), "--index", store]
            + ["--port", str(port), "--device", "cpu"],
            env=launcher_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert out.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_store_updates_are_swapped_in_while_queries_run(
    trained_model: Path, small_data: Path, searcher: Searcher, tmp_path: Path
) -> None:
    """Adds, removals and a compaction by a writer beside the server: every query during them answered (200), and
    each change visible once the watcher has swapped the new version in."""
    from finderpartner.search.faiss_store import FaissStore
    from finderpartner.search.filters import parse

    paths, attrs = _gallery(small_data)
    first, later = paths[:16], paths[16:]
    store = _make_store("faiss", tmp_path, searcher, first, attrs)
    server = Server(trained_model, store, "--reload-interval", "0.1")
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                statuses.append(client.post("/search", json={"text": "a blue star", "k": 50}).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()

    def wait_for(check, what: str) -> dict:  # type: ignore[no-untyped-def]
        deadline = time.time() + 60
        while time.time() < deadline:
            health = server.client.get("/healthz").json()
            if check(health):
                return health
            time.sleep(0.05)
        raise AssertionError(f"the server never saw {what}: {health}")

    def served_paths() -> set[str]:
        return {h["path"] for h in server.client.post("/search", json={"text": "x", "k": 100}).json()["hits"]}

    try:
        vectors, _ = searcher.embed_paths(later)
        with FaissStore.open(Path(store), writable=True) as writer:
            writer.add(_rows(later, attrs), vectors)
        wait_for(lambda h: h["count"] == len(paths), "the added photos")
        assert served_paths() == {p.name for p in paths}
        with FaissStore.open(Path(store), writable=True) as writer:
            gone = writer.remove(where=parse("number < 10", writer.columns()))
        wait_for(lambda h: h["count"] == len(paths) - gone, "the removal")
        assert served_paths() == {p.name for p in paths if int(p.stem) >= 10}
        reloads = server.client.get("/healthz").json()["reloads"]
        with FaissStore.open(Path(store), writable=True) as writer:
            writer.compact()
        health = wait_for(lambda h: h["reloads"] > reloads, "the compaction")
        assert health["count"] == len(paths) - gone
        assert served_paths() == {p.name for p in paths if int(p.stem) >= 10}
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        health = server.client.get("/healthz").json()
        code, err = server.stop()
    assert len(statuses) > 20 and set(statuses) == {200}, (set(statuses), err[-6000:])
    assert health["errors"]["server"] == 0 and health["reload_error"] is None
    assert code == 130 and "Traceback" not in err, err


def test_accepted_connections_have_nagle_off() -> None:
    # asyncio turns Nagle off only on sockets whose proto is TCP; with proto 0, each two-part response waited for
    # the client's delayed ACK (40 ms a request with httpx on loopback)
    import socket

    from finderpartner.serve import bind

    with bind("127.0.0.1", 0) as listener, socket.create_connection(listener.getsockname()[:2]):
        conn, _ = listener.accept()
        with conn:
            assert conn.proto == socket.IPPROTO_TCP
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_the_onnx_backend_serves_the_hits_of_the_model(
    trained_model: Path, small_data: Path, searcher: Searcher, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from finderpartner.embedding import model_fingerprint
    from finderpartner.interop.export import export_onnx
    from finderpartner.interop.onnx_runtime import OnnxSearcher

    encoder = load_model(trained_model)
    export = tmp_path / "export"  # TorchScript: a second; test_export.py checks the default exporter's parity
    export_onnx(encoder, export, fingerprint=model_fingerprint(encoder.model), exporter="torchscript")
    # a server's onnxruntime threads sleep between queries instead of spinning on the cores the HTTP thread needs
    options = OnnxSearcher(export, spin=False).onnx.text_session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    paths, attrs = _gallery(small_data)
    server = Server(export, _make_store("faiss", tmp_path, searcher, paths, attrs), "--backend", "onnx")
    try:
        r = server.client.post("/search", json={"text": "a small blue star", "k": 5})
        assert r.status_code == 200, r.text
        _check_top_k(r.json()["hits"], searcher, paths, "a small blue star", [True] * len(paths), 5)
    finally:
        code, err = server.stop()
    assert code == 130 and "Traceback" not in err, err
