"""The Gradio demo as a real server on localhost, called tab by tab through gradio_client."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from finderpartner.embedding import Searcher
from finderpartner.index import index_folder
from finderpartner.model import load_model

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("faiss")

TEXTS = ["a large red circle on the left", "small blue star, center", "a small green square on the right side"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def searcher(trained_model: Path) -> Searcher:
    return Searcher(load_model(trained_model), device=torch.device("cpu"), precision="fp32", batch_size=8)


@pytest.fixture(scope="module")
def index(searcher: Searcher, small_data: Path, tmp_path_factory: pytest.TempPathFactory):
    gallery, _ = index_folder(searcher, small_data / "images" / "val", tmp_path_factory.mktemp("demo") / "idx")
    return gallery


@pytest.fixture(scope="module")
def server(searcher: Searcher, index):  # type: ignore[no-untyped-def]
    """The demo served on a free localhost port, with a 1 MB upload limit; closed after the module."""
    from finderpartner.demo import launch_demo

    port = _free_port()
    demo = launch_demo(searcher, index, port=port, max_upload_mb=1, prevent_thread_lock=True)
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield demo, client, port
    client.close() if hasattr(client, "close") else None
    demo.close()


def test_demo_binds_localhost_and_names_its_endpoints(server, index) -> None:  # type: ignore[no-untyped-def]
    demo, client, port = server
    assert demo.server_name == "127.0.0.1" and demo.server_port == port
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/search", "/image_texts", "/text_matrix"} <= set(endpoints)
    # parameters a client can read (and pass by name)
    names = {name: [p["parameter_name"] for p in endpoints[name]["parameters"]] for name in endpoints}
    assert names["/search"] == ["prompt", "top_k"]
    assert names["/image_texts"] == ["image", "texts"] and names["/text_matrix"] == ["texts"]
    # the page names the gallery folder, not where it lies on the server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as response:
        page = response.read().decode("utf-8")
    assert f"images in `{index.root.name}`" in page and str(index.root) not in page


def test_image_against_texts_tab(server, searcher: Searcher, small_data: Path) -> None:  # type: ignore[no-untyped-def]
    _, client, _ = server
    image = sorted((small_data / "images" / "val").glob("*.jpg"))[3]
    label, table = client.predict(
        gradio_client.handle_file(str(image)), "\n".join(TEXTS + [TEXTS[0], "  "]), api_name="/image_texts"
    )
    probs = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert set(probs) == set(TEXTS) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)  # blank and repeat dropped
    # the same numbers as the searcher gives directly
    cosines = searcher.embed_texts(TEXTS) @ searcher.embed_paths([image])[0][0]
    expected = np.exp(searcher.logit_scale * cosines) / np.exp(searcher.logit_scale * cosines).sum()
    assert table["headers"] == ["text", "cosine", "probability"]
    rows = {r[0]: r for r in table["data"]}
    for i, text in enumerate(TEXTS):
        assert rows[text][1] == pytest.approx(cosines[i], abs=1e-3) and probs[text] == pytest.approx(
            expected[i], abs=1e-4
        )
    assert [r[1] for r in table["data"]] == sorted((r[1] for r in table["data"]), reverse=True)
    assert label["label"] == TEXTS[int(np.argmax(cosines))]


def test_text_comparison_tab(server, searcher: Searcher) -> None:  # type: ignore[no-untyped-def]
    _, client, _ = server
    table = client.predict(texts="\n".join(TEXTS), api_name="/text_matrix")
    assert table["headers"] == ["text", "#1", "#2", "#3"]
    matrix = np.array([row[1:] for row in table["data"]], dtype=float)
    emb = searcher.embed_texts(TEXTS)
    assert np.allclose(matrix, emb @ emb.T, atol=1e-3) and np.allclose(np.diag(matrix), 1.0, atol=1e-3)
    assert np.allclose(matrix, matrix.T)


def test_gallery_search_tab(server, searcher: Searcher, index) -> None:  # type: ignore[no-untyped-def]
    _, client, _ = server
    gallery, table = client.predict(prompt=TEXTS[1], top_k=5, api_name="/search")
    hits = index.search(searcher.embed_texts([TEXTS[1]]), 5)[0]
    assert [r[2] for r in table["data"]] == [h.path.name for h in hits]
    assert np.allclose([r[1] for r in table["data"]], [h.score for h in hits], atol=1e-3)
    assert len(gallery) == 5
    for item, hit in zip(gallery, hits):
        assert item["caption"].endswith(hit.path.name) and Path(item["image"]).is_file()  # a thumbnail, downloaded
    with pytest.raises(Exception, match="describe who or what"):
        client.predict("   ", 5, api_name="/search")


def test_demo_serves_no_gallery_file_and_limits_uploads(server, small_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, client, port = server
    original = min((small_data / "images" / "val").glob("*.jpg"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/file={original}", timeout=10)
    assert refused.value.code == 403
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(2 * 1024 * 1024))  # over the 1 MB limit
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client reads the limit from the app
        client.predict(gradio_client.handle_file(str(big)), TEXTS[0], api_name="/image_texts")
    import httpx

    with open(big, "rb") as f:  # and the server enforces it for any other client
        response = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": ("big.png", f)}, timeout=30)
    assert response.status_code == 413
