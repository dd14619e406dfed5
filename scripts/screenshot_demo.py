"""Start the demo (`finderpartner demo`) on a trained model and take a headless Chromium screenshot of the page.

    python scripts/screenshot_demo.py --model outputs/clip_tiny/best_model [--images DIR | --index INDEX] [--out DIR]

One PNG per tab (gallery.png, image.png, compare.png): each tab opens with a worked example, selected
through the demo's ``?tab=`` link.

Needs Chromium (Debian: `apt-get install chromium`). The demo runs as a real server on a free localhost
port and is stopped afterwards. Not part of the test suite: it checks what a person would see.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "outputs" / "clip_tiny" / "best_model")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--images", type=Path, help="gallery folder (default: the run's validation images)")
    where.add_argument("--index", type=Path, help="gallery index")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo_screenshots", help="folder for the PNGs")
    p.add_argument(
        "--tabs", nargs="+", default=["gallery", "image", "compare"], help="tabs, by the start of their title"
    )
    p.add_argument("--size", default="1280,1000", help="window size, WIDTH,HEIGHT")
    p.add_argument("--wait", type=float, default=120, help="seconds to wait for the demo to start")
    p.add_argument("--render-ms", type=int, default=5000, help="(virtual) time Chromium lets the page render")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the demo exited with code {proc.returncode} before it served {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the demo did not answer at {url} within {timeout:.0f} s")


def screenshot(chromium: str, url: str, out: Path, size: str, render_ms: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={out.resolve()}",
            f"--window-size={size}",
            f"--virtual-time-budget={render_ms}",
            url,
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=render_ms / 1000 + 120)
    if run.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed ({run.returncode}): {run.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.chromium).exists() and shutil.which(args.chromium) is None:
        raise SystemExit("Chromium not found: apt-get install chromium (or pass --chromium PATH)")
    port = free_port()
    gallery = ["--images", str(args.images)] if args.images else ["--index", str(args.index)] if args.index else []
    cmd = [
        sys.executable,
        "-m",
        "finderpartner.cli",
        "demo",
        "--model",
        str(args.model),
        "--port",
        str(port),
        "--precision",
        "fp32",
        *gallery,
    ]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT / "src")}
    demo = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_up(url, demo, args.wait)
        for tab in args.tabs:
            screenshot(args.chromium, f"{url}?tab={tab}", args.out / f"{tab}.png", args.size, args.render_ms)
            print(f"screenshot: {args.out / f'{tab}.png'}")
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
