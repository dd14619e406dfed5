"""Start TensorBoard on a run folder and take a headless Chromium screenshot of its Images tab at actual size.

    python scripts/screenshot_tensorboard.py --logdir outputs/clip_tiny [--out docs/tensorboard_retrievals.png]

docs/tensorboard_retrievals.png was made so, from a 4-minute run of the tiny preset on the sample data
(`finderpartner sample-data`, then `finderpartner train --config configs/clip_tiny.yaml --set
train.time_budget=4m`). The Images tab scales a picture down to its card unless "Show actual image size" is ticked,
which only a click does: Chromium is driven over its DevTools pipe (standard library only) to tick it, then to take
the screenshot. Needs Chromium (Debian: `apt-get install chromium`). TensorBoard runs as a real server on a free
localhost port and is stopped afterwards. Not part of the test suite: it checks what a person would see.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

# Finds TensorBoard's "Show actual image size" checkbox (inside Polymer shadow roots), ticks it, says if it is ticked.
TICK_ACTUAL_SIZE = """(() => {
  const find = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.tagName === 'PAPER-CHECKBOX' && el.textContent.includes('Show actual image size')) return el;
      if (el.shadowRoot) { const found = find(el.shadowRoot); if (found) return found; }
    }
    return null;
  };
  const box = find(document);
  if (box && !box.checked) box.click();
  return Boolean(box && box.checked);
})()"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", type=Path, required=True, help="a run folder (or its tensorboard/ folder)")
    p.add_argument("--out", type=Path, default=Path("docs/tensorboard_retrievals.png"))
    p.add_argument("--size", default="1400,1000", help="window size, WIDTH,HEIGHT")
    p.add_argument("--wait", type=float, default=60, help="seconds to wait for TensorBoard and for the page")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > end:
                raise SystemExit(f"TensorBoard did not answer at {url} within {seconds:.0f} s") from None
            time.sleep(0.5)


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe``: JSON commands on fd 3, answers on fd 4, each
    message ended by a NUL byte (the DevTools protocol without a websocket)."""

    def __init__(self, executable: str, profile: str):
        to_chrome, self._commands = os.pipe()
        self._answers, from_chrome = os.pipe()
        high = [os.dup(fd) for fd in (to_chrome, from_chrome)]  # out of the way of 3 and 4

        def pipes_at_3_and_4() -> None:
            for fd, target in zip(high, (3, 4)):
                os.dup2(fd, target)
                os.set_inheritable(target, True)

        self._process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
            + ["--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=pipes_at_3_and_4,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (to_chrome, from_chrome, *high):
            os.close(fd)
        self._buffer, self._id = b"", 0

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode("utf-8") + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._answers, 1 << 16)
                if not chunk:
                    raise SystemExit("Chromium closed its DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:  # events and other answers are skipped
                if "error" in answer:
                    raise SystemExit(f"Chromium: {method} failed: {answer['error']}")
                return answer["result"]

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self._process.wait(timeout=30)
        finally:
            if self._process.poll() is None:
                self._process.kill()
            os.close(self._commands)
            os.close(self._answers)


def screenshot(executable: str, url: str, out: Path, width: int, height: int, wait: float) -> None:
    with tempfile.TemporaryDirectory() as profile:
        chromium = Chromium(executable, profile)
        try:
            target = chromium.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            page = chromium.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            size = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            chromium.call("Emulation.setDeviceMetricsOverride", size, page)
            chromium.call("Page.navigate", {"url": url}, page)
            end = time.monotonic() + wait
            tick = {"expression": TICK_ACTUAL_SIZE, "returnByValue": True}
            while not chromium.call("Runtime.evaluate", tick, page)["result"].get("value"):
                if time.monotonic() > end:
                    raise SystemExit(f"no 'Show actual image size' checkbox on {url} within {wait:.0f} s")
                time.sleep(0.5)
            time.sleep(3)  # the images load at their new size
            png = chromium.call("Page.captureScreenshot", {"format": "png"}, page)["data"]
            out.write_bytes(base64.b64decode(png))
        finally:
            chromium.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    executable = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if executable is None:
        raise SystemExit("needs Chromium: apt-get install chromium")
    width, height = (int(x) for x in args.size.split(","))
    port = free_port()
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), "--host", "127.0.0.1"]
        + ["--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/data/runs", args.wait)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(executable, f"http://127.0.0.1:{port}/?darkMode=false#images", args.out, width, height, args.wait)
    finally:
        board.terminate()
        try:
            board.wait(timeout=10)
        except subprocess.TimeoutExpired:
            board.kill()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
