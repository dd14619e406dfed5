"""Gradio web demo over a searcher (``embedding.Searcher`` or ``onnx_runtime.OnnxSearcher``) and an optional gallery index.

Three tabs, each also a named API endpoint (``gradio_client`` calls them by ``api_name``, with named parameters):

- ``/search`` (``prompt``, ``top_k``): gallery search by a text description, thumbnails with scores (what
  FinderPartner is for);
- ``/image_texts`` (``image``, ``texts``): an uploaded image against several texts, one per line: probabilities
  and cosines (a softmax over the texts for CLIP; for a SigLIP model one sigmoid per text, independent of the others);
- ``/text_matrix`` (``texts``): several texts against each other: the cosine similarity matrix.

The server binds 127.0.0.1 unless told otherwise, limits uploads, and serves no file of the gallery itself:
results are sent as thumbnails that Gradio writes to its own cache.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data.transforms import DECODE_ERRORS, load_image, unidentified_message
from .errors import FinderPartnerError
from .index import GalleryIndex

log = logging.getLogger(__name__)

MAX_TEXTS = 32  # per request: the pairwise matrix grows quadratically
MAX_RESULTS = 48
DEFAULT_RESULTS = 12
THUMBNAIL_PX = 256
EXAMPLE_TEXTS = "a large red circle on the left\na small blue star in the center\na large green square on the right"
EXAMPLE_PROMPT = "a large red circle on the left"


def _gradio() -> Any:
    try:
        import gradio
    except ImportError:
        raise FinderPartnerError("the web demo needs Gradio: pip install 'finderpartner[demo]'") from None
    return gradio


def user_error(message: str) -> Exception:
    """A message for the person using the page (not a server fault: no traceback in the server's log)."""
    gr = _gradio()
    try:
        return gr.Error(message, print_exception=False)
    except TypeError:  # Gradio < 5 has no print_exception and never prints these
        return gr.Error(message)


def parse_texts(text: str | None) -> list[str]:
    """Non-empty lines, stripped, duplicates dropped (first kept), at most MAX_TEXTS."""
    lines = list(dict.fromkeys(line.strip() for line in (text or "").splitlines() if line.strip()))
    if not lines:
        raise user_error("enter at least one text (one per line)")
    if len(lines) > MAX_TEXTS:
        raise user_error(f"at most {MAX_TEXTS} texts at once (got {len(lines)})")
    return lines


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # no overflow warning for large negative logits


def probabilities(cosines: np.ndarray, scale: float, bias: float | None) -> np.ndarray:
    """What the model was trained to output for an image against texts: CLIP's softmax over exp(scale) * cos, or,
    with SigLIP's ``bias``, sigmoid(exp(scale) * cos + bias) per text (independent, need not sum to 1)."""
    if bias is None:
        return softmax(scale * cosines)
    return sigmoid(scale * cosines + bias)


def probability_label(searcher: Any) -> str:
    if searcher.logit_bias is None:
        return "Probabilities (softmax over the texts)"
    return "Probabilities (SigLIP: a sigmoid per text, independent of the others; they need not sum to 1)"


# --------------------------------------------------------------------------------------------------------------
# The three functions behind the tabs (plain Python: the server and the tests call the same code)


def image_text_scores(
    searcher: Any, image_path: str | None, texts: str | None
) -> tuple[dict[str, float], list[list[Any]]]:
    """({text: probability}, rows [text, cosine, probability]) of an image against several texts, best first."""
    if not image_path:
        raise user_error("upload an image first")
    lines = parse_texts(texts)
    vectors, failed = searcher.embed_paths([Path(image_path)])
    if failed:
        reason = failed[0][1].split(": ", 1)[-1]  # without the exception's type
        raise user_error(f"the upload is not a readable image: {reason}")
    cosines = searcher.embed_texts(lines) @ vectors[0]
    probs = probabilities(cosines, searcher.logit_scale, searcher.logit_bias)
    order = np.argsort(-cosines, kind="stable")
    rows = [[lines[i], round(float(cosines[i]), 4), round(float(probs[i]), 4)] for i in order]
    return {lines[i]: float(probs[i]) for i in order}, rows


def text_similarity(searcher: Any, texts: str | None) -> dict[str, Any]:
    """Pairwise cosine similarity of several texts, as a table: one row per text, columns #1..#n."""
    lines = parse_texts(texts)
    emb = searcher.embed_texts(lines)
    sims = np.clip(emb @ emb.T, -1.0, 1.0)
    headers = ["text", *(f"#{i + 1}" for i in range(len(lines)))]
    data = [[f"#{i + 1} {line}", *(round(float(v), 4) for v in sims[i])] for i, line in enumerate(lines)]
    return {"headers": headers, "data": data}


def gallery_search(
    searcher: Any, index: GalleryIndex | None, prompt: str | None, k: float
) -> tuple[list[Any], list[list[Any]]]:
    """(thumbnails with captions, rows [rank, score, file]) of the gallery images best matching ``prompt``."""
    if index is None or len(index) == 0:
        raise user_error("no gallery loaded: start the demo with --index INDEX or --images DIR")
    if not prompt or not prompt.strip():
        raise user_error("describe who or what you are looking for")
    k = int(min(max(1, k), MAX_RESULTS))
    hits = index.search(searcher.embed_texts([prompt.strip()]), k)[0]
    items, rows = [], []
    for hit in hits:
        name = hit.path.relative_to(index.root).as_posix()
        items.append((_thumbnail(hit.path), f"{hit.score:.3f} · {name}"))
        rows.append([hit.rank, round(hit.score, 4), name])
    return items, rows


def _thumbnail(path: Path) -> Any:
    """A small copy of a gallery image (the server never hands out the original file), grey if unreadable."""
    try:
        img = load_image(path, max_pixels=100_000_000)
    except DECODE_ERRORS as e:  # changed on disk since indexing: show a placeholder, the ranking is still right
        log.warning("cannot show %s: %s", path, e)
        return Image.new("RGB", (THUMBNAIL_PX, THUMBNAIL_PX), (200, 200, 200))
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return img


# --------------------------------------------------------------------------------------------------------------
# The app


def build_demo(searcher: Any, index: GalleryIndex | None = None, *, title: str = "FinderPartner") -> Any:
    """The Gradio app: three tabs, each wired to a named API endpoint, each opening with a worked example."""
    gr = _gradio()
    gallery_note = (  # the folder's name only: the page is no place for the server's file system layout
        f"Gallery: {len(index)} images in `{index.root.name}`"
        if index is not None
        else "No gallery loaded (start with `--index INDEX` or `--images DIR`)."
    )
    has_gallery = index is not None and len(index) > 0
    example = gallery_search(searcher, index, EXAMPLE_PROMPT, DEFAULT_RESULTS) if has_gallery else ([], [])
    example_image = index.root / example[1][0][2] if has_gallery else None
    with gr.Blocks(title=title, analytics_enabled=False, **_blocks_js(gr)) as demo:
        gr.Markdown(
            f"# {title}\nDescribe who or what you are looking for and get the best-matching photos. "
            f"Model `{searcher.fingerprint[:12]}`. {gallery_note}"
        )
        with gr.Tabs():
            with gr.Tab("Gallery search"):
                _search_tab(gr, searcher, index, example)
            with gr.Tab("Image vs texts"):
                _image_texts_tab(gr, searcher, example_image)
            with gr.Tab("Compare texts"):
                _text_matrix_tab(gr, searcher)
    return demo


def _search_tab(gr: Any, searcher: Any, index: GalleryIndex | None, example: tuple[list[Any], list[list[Any]]]) -> None:
    with gr.Row():
        prompt = gr.Textbox(label="Description", value=EXAMPLE_PROMPT, scale=4)
        k = gr.Slider(1, MAX_RESULTS, value=DEFAULT_RESULTS, step=1, label="Results", scale=1)
    button = gr.Button("Search", variant="primary")
    gallery = gr.Gallery(
        example[0], label="Best matches (score · file)", columns=6, height="auto", object_fit="contain"
    )
    table = gr.Dataframe(
        example[1] or None, headers=["rank", "score", "file"], label="Scores (cosine similarity)", interactive=False
    )

    def search(prompt: str, top_k: float) -> tuple[list[Any], list[list[Any]]]:  # names: the API's parameters
        return gallery_search(searcher, index, prompt, top_k)

    button.click(search, inputs=[prompt, k], outputs=[gallery, table], api_name="search")
    prompt.submit(search, inputs=[prompt, k], outputs=[gallery, table], api_name=False)


def _image_texts_tab(gr: Any, searcher: Any, example: Path | None) -> None:
    scores, rows = image_text_scores(searcher, str(example), EXAMPLE_TEXTS) if example else (None, None)
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                _thumbnail(example) if example else None,
                type="filepath",
                label="Image",
                sources=["upload", "clipboard"],
                height=320,
            )
            _explain_unreadable(image)
            texts = gr.Textbox(label="Texts, one per line", value=EXAMPLE_TEXTS, lines=6)
            button = gr.Button("Score", variant="primary")
        with gr.Column():
            label = gr.Label(scores, label=probability_label(searcher), num_top_classes=10)
            table = gr.Dataframe(rows, headers=["text", "cosine", "probability"], label="Scores", interactive=False)

    def score(image: str | None, texts: str) -> tuple[dict[str, float], list[list[Any]]]:  # the API's parameters
        return image_text_scores(searcher, image, texts)

    button.click(score, inputs=[image, texts], outputs=[label, table], api_name="image_texts")


def _explain_unreadable(image: Any) -> None:
    """Gradio opens an upload itself before our function sees it, and its error shows the server's temporary path
    and its internals. Say instead that the file is not a readable image, and which formats are."""
    gr, preprocess = _gradio(), image.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except DECODE_ERRORS:  # what opening a file that is not an image raises, in PIL or in Gradio's checks
            path, name = getattr(payload, "path", None), getattr(payload, "orig_name", None)
            detail = unidentified_message(path, name or Path(path or "upload").name) if path else "empty upload"
            raise user_error(f"the upload is not a readable image: {detail}") from None

    image.preprocess = checked


def _text_matrix_tab(gr: Any, searcher: Any) -> None:
    texts = gr.Textbox(label="Texts, one per line", value=EXAMPLE_TEXTS, lines=6)
    button = gr.Button("Compare", variant="primary")
    table = gr.Dataframe(
        text_similarity(searcher, EXAMPLE_TEXTS), label="Cosine similarity between the texts", interactive=False
    )

    def compare(texts: str) -> dict[str, Any]:  # the API's parameter: texts
        return text_similarity(searcher, texts)

    button.click(compare, inputs=[texts], outputs=[table], api_name="text_matrix")


# Opens the tab named by ?tab=<start of its title> (e.g. /?tab=compare): links straight to a tab.
_TAB_FROM_URL = """() => {
  const want = new URLSearchParams(window.location.search).get("tab");
  if (!want) return;
  const pick = () => [...document.querySelectorAll('button[role="tab"]')]
    .find(b => b.textContent.trim().toLowerCase().startsWith(want.toLowerCase()));
  const tryClick = (n) => { const b = pick(); if (b) b.click(); else if (n > 0) setTimeout(() => tryClick(n - 1), 100); };
  tryClick(50);
}"""


def _blocks_js(gr: Any) -> dict[str, Any]:
    """Gradio < 6 takes the page script in Blocks(), Gradio 6 in launch()."""
    import inspect

    return {"js": _TAB_FROM_URL} if "js" in inspect.signature(gr.Blocks.__init__).parameters else {}


def _launch_options(demo: Any) -> dict[str, Any]:
    import inspect

    params = inspect.signature(demo.launch).parameters
    options: dict[str, Any] = {"js": _TAB_FROM_URL} if "js" in params else {}
    if "ssr_mode" in params:
        options["ssr_mode"] = False  # server-side rendering needs Node.js; the plain app does not
    return options


def launch_demo(
    searcher: Any,
    index: GalleryIndex | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mb: float = 10.0,
    prevent_thread_lock: bool = False,
) -> Any:
    """Serve the demo. Blocks until interrupted unless ``prevent_thread_lock`` (then returns the running app)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the demo is reachable from other machines at %s:%d; it has no authentication", host, port)
    demo = build_demo(searcher, index)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            max_file_size=int(max_upload_mb * 1024 * 1024),
            allowed_paths=[],  # results are thumbnails in Gradio's cache: no gallery folder needs serving
            prevent_thread_lock=prevent_thread_lock,
            show_error=True,
            quiet=prevent_thread_lock,
            **_launch_options(demo),
        )
    except OSError as e:
        raise FinderPartnerError(f"cannot serve the demo on {host}:{port} ({e}); choose another --port") from None
    return demo
