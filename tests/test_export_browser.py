"""The ONNX export in a web page: transformers.js (v4) loads it in Debian's headless Chromium with its defaults and
embeds texts and images as PyTorch does.

Everything is served from loopback by this test (the machine is offline): the export, tests/browser/page.html,
transformers.js from tests/browser/node_modules (`make browser-deps`: npm ci there) and onnxruntime-web's
WebAssembly, which transformers.js would otherwise fetch from a CDN. The page posts its embeddings back; they are
compared with PyTorch's by cosine, row by row. Skipped, with the reason, when Chromium or the npm package is absent;
with FINDERPARTNER_REQUIRE_BROWSER=1 (.ci/run) their absence fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from finderpartner.data.dataset import read_split
from finderpartner.embedding import model_fingerprint
from finderpartner.interop import export as export_module
from finderpartner.interop.export import export_onnx
from finderpartner.interop.verify import compare, preprocess_images
from finderpartner.model import encode_image, encode_text, load_model

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

BROWSER_DIR = Path(__file__).parent / "browser"
LIBRARY = BROWSER_DIR / "node_modules" / "@huggingface" / "transformers" / "dist"
RUNTIME = BROWSER_DIR / "node_modules" / "onnxruntime-web" / "dist"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
# Debian's headless Chromium, quiet and offline: no GPU, no QUIC, no background or component updates, own profile
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_SECONDS = 180  # a cold Chromium plus WebAssembly compilation on a loaded 2-core machine


def _missing() -> str | None:
    if CHROMIUM is None:
        return "Chromium is not installed (Debian: apt-get install chromium; `make browser-deps` does it as root)"
    if not (LIBRARY / "transformers.js").is_file() or not RUNTIME.is_dir():
        return "transformers.js is not installed in tests/browser/node_modules (`make browser-deps`: npm ci there)"
    return None


if (reason := _missing()) is not None:
    if os.environ.get("FINDERPARTNER_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"FINDERPARTNER_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)

MIME = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}


@dataclass
class Site:
    """What the loopback server serves: URL prefix -> folder, the case as JSON, and the page's answer."""

    folders: dict[str, Path]
    case: dict[str, Any]
    answer: dict[str, Any] = field(default_factory=dict)
    answered: threading.Event = field(default_factory=threading.Event)


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet; failures show in the page's answer
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                return self._send((BROWSER_DIR / "page.html").read_bytes(), "text/html")
            if path == "/case.json":
                return self._send(json.dumps(site.case).encode(), "application/json")
            for prefix, folder in site.folders.items():
                if path.startswith(prefix):
                    file = (folder / path[len(prefix) :]).resolve()
                    if file.is_file() and file.is_relative_to(folder.resolve()):
                        return self._send(file.read_bytes(), MIME.get(file.suffix, "application/octet-stream"))
            self.send_error(404)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            site.answer.update(json.loads(body))
            site.answered.set()
            self._send(b"{}", "application/json")

        def _send(self, data: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def run_page(export_dir: Path, case: dict[str, Any], images: list[Path], tmp_path: Path) -> dict[str, Any]:
    """Serve the export and the page on loopback, open it in headless Chromium, return what the page posted."""
    site = Site({"/model/": export_dir, "/lib/": LIBRARY, "/ort/": RUNTIME, "/images/": images[0].parent}, case)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    site.case["images"] = [f"{url}images/{p.name}" for p in images]
    profile = tmp_path / "chromium-profile"
    log = tmp_path / "chromium.log"
    with open(log, "wb") as out:
        browser = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        if not site.answered.wait(PAGE_SECONDS):
            tail = log.read_text(errors="replace")[-2000:]
            pytest.fail(f"the page posted nothing within {PAGE_SECONDS} s; Chromium's log ends:\n{tail}")
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=30)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()
        server.shutdown()
        server.server_close()
    assert site.answer.get("ok"), f"the page failed: {site.answer.get('error')}"
    return site.answer["results"]


@pytest.fixture(scope="module")
def encoder(trained_model: Path):
    return load_model(trained_model)


@pytest.fixture(scope="module")
def inputs(encoder, small_data: Path) -> Iterator[tuple[list[str], list[Path], dict[str, np.ndarray]]]:
    """Captions and images of the val split, and PyTorch's embeddings of them (the reference)."""
    table, _ = read_split(small_data, "val")
    texts = list(dict.fromkeys(table.captions))[:6] + ["star", "a large red circle on the left of a blue one"]
    images = sorted((small_data / "images" / "val").glob("*.jpg"))[:5]
    pixels = preprocess_images(encoder, images)
    tokens = encoder.tokenize(texts)
    with torch.no_grad():
        reference = {
            "text": encode_text(encoder.model, tokens["input_ids"], tokens["attention_mask"]).numpy(),
            "image": encode_image(encoder.model, pixels).numpy(),
            "pixels": pixels.numpy(),
            "input_ids": tokens["input_ids"].numpy(),
        }
    yield texts, images, reference


def _case(texts: list[str], reference: dict[str, np.ndarray], loads: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pixels = reference["pixels"]
    return {"texts": texts, "pixels": pixels.ravel().tolist(), "pixel_shape": list(pixels.shape), "loads": loads}


def _cosines(result: dict[str, Any], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """min cosine per embedding kind against PyTorch's; the page's token ids must be PyTorch's exactly."""
    ids = reference["input_ids"]
    assert result["input_ids"] == ids.tolist(), "transformers.js tokenised the texts differently"
    return {
        kind: compare(reference[ref], np.asarray(result[kind], np.float32))[1]
        for kind, ref in (("text", "text"), ("image", "image"), ("image_from_files", "image"))
    }


@pytest.mark.slow
def test_transformers_js_loads_the_export_in_a_page_with_its_defaults(
    encoder, trained_model: Path, inputs, tmp_path: Path
) -> None:
    """An export with the int8 variant: a page's default (q8: *_quantized.onnx) and fp32 (`{dtype: 'fp32'}`)."""
    texts, images, reference = inputs
    out = tmp_path / "export"
    export_onnx(encoder, out, fingerprint=model_fingerprint(encoder.model), int8=True, source=str(trained_model))
    results = run_page(out, _case(texts, reference, {"default": {}, "fp32": {"dtype": "fp32"}}), images, tmp_path)
    default, fp32 = _cosines(results["default"], reference), _cosines(results["fp32"], reference)
    print(f"transformers.js in Chromium vs PyTorch, min cosine: fp32 {fp32}, default (q8, int8 graphs) {default}")
    assert results["default"]["dtype"] == "q8" and results["fp32"]["dtype"] == "fp32"
    assert fp32["text"] >= 0.9999 and fp32["image"] >= 0.9999
    assert default["text"] >= 0.99 and default["image"] >= 0.99  # int8 weights: close, not equal
    # the page's own JPEG decoding and resizing (not PIL's) moves the pixels a little, not the meaning
    assert fp32["image_from_files"] >= 0.99


@pytest.mark.slow
def test_a_graph_too_large_to_hold_its_weights_loads_from_data_files_named_after_it(
    encoder, trained_model: Path, inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above INLINE_MAX_BYTES (2 GB for real; a few KB here) each graph reads <graph>.onnx_data, _1, ... (each under
    DATA_CHUNK_BYTES), as config.json's use_external_data_format tells transformers.js; without the int8 variant
    the config names fp32, so a page loads it with no option at all."""
    texts, images, reference = inputs
    largest = max(p.numel() * p.element_size() for p in encoder.model.parameters())  # a tensor is never split
    monkeypatch.setattr(export_module, "INLINE_MAX_BYTES", 4096)
    monkeypatch.setattr(export_module, "DATA_CHUNK_BYTES", largest)
    out = tmp_path / "export"
    export_onnx(encoder, out, fingerprint=model_fingerprint(encoder.model), source=str(trained_model))
    js_config = json.loads((out / "config.json").read_text())["transformers.js_config"]
    assert js_config["dtype"] == "fp32" and js_config["use_external_data_format"]["text_model.onnx"] >= 2
    data = sorted(p.name for p in (out / "onnx").glob("*_data*"))
    assert "text_model.onnx_data_1" in data and "model.onnx_data" in data
    results = run_page(out, _case(texts, reference, {"default": {}}), images, tmp_path)
    cosines = _cosines(results["default"], reference)
    print(f"transformers.js in Chromium vs PyTorch (data files), min cosine: {cosines}")
    assert results["default"]["dtype"] == "fp32"
    assert cosines["text"] >= 0.9999 and cosines["image"] >= 0.9999
