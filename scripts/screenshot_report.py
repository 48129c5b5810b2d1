"""Take a full-page screenshot of a saved HTML report in headless Chromium (Debian's).

    .venv/bin/python scripts/screenshot_report.py runs/demo/report.html /tmp/report.png
    .venv/bin/python scripts/screenshot_report.py report.html shot.png --width 800

Two runs of ``/usr/bin/chromium --headless`` (install it with ``apt-get install
chromium``), both offline (every host name resolves to nothing): the first loads a
temporary copy of the page with one added script that writes the laid-out page height
into the DOM and dumps the DOM; the second screenshots the page itself at that height.
Rows of plain background left at the bottom are cropped (Pillow). Prints one JSON
object: ``path``, ``width``, ``height``, ``mean_luminance`` (0-255),
``non_background`` (fraction of pixels unlike the most common colour) and
``page_height`` (as measured in the page); exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

_MEASURE = (
    "<script>window.addEventListener('load', function () { setTimeout(function () {"
    " var d = document.documentElement, b = document.body;"
    " d.setAttribute('data-page-height', String(Math.ceil(Math.max(d.scrollHeight,"
    " b ? b.scrollHeight : 0, d.getBoundingClientRect().height)))); }, 1000); });</script>"
)


def find_chromium(explicit: str | None) -> str | None:
    """The Chromium binary: ``explicit``, else ``/usr/bin/chromium`` or one on the PATH."""
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = name if Path(name).is_file() else shutil.which(name)
        if found:
            return found
    return None


def _run(chromium: str, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="piggyback-chromium-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no host name resolves
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            "--virtual-time-budget=10000",
            *args,
        ]
        # its own process group, so that a timeout ends Chromium's helper processes too
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(command, proc.returncode, out, err)


def page_height(chromium: str, html: Path, width: int, timeout: float) -> int | None:
    """The page's laid-out height in CSS pixels at ``width``, or None if not measured."""
    text = html.read_text("utf-8")
    cut = text.lower().rfind("</body>")
    probe = text[:cut] + _MEASURE + text[cut:] if cut >= 0 else text + _MEASURE
    with tempfile.TemporaryDirectory(prefix="piggyback-measure-") as tmp:
        copy = Path(tmp) / html.name
        copy.write_text(probe, "utf-8")
        done = _run(chromium, [f"--window-size={width},900", "--dump-dom", copy.as_uri()], timeout)
    found = re.search(r'data-page-height="(\d+)"', done.stdout)
    return int(found.group(1)) if found else None


def crop_background(image: Image.Image, keep: int = 24) -> Image.Image:
    """Drop rows at the bottom that are all the colour of the last row's first pixel,
    keeping ``keep`` of them as a margin."""
    px = np.asarray(image.convert("RGB"))
    blank = (px == px[-1, 0]).all(axis=(1, 2))
    rows = len(blank)
    while rows > 1 and blank[rows - 1]:
        rows -= 1
    return image.crop((0, 0, image.width, min(len(blank), rows + keep)))


def pixel_stats(image: Image.Image) -> dict[str, float]:
    """Mean luminance and the fraction of pixels unlike the most common colour."""
    rgb = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.int64)
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    codes = rgb @ np.array([65536, 256, 1])
    values, counts = np.unique(codes, return_counts=True)
    background = values[counts.argmax()]
    return {
        "mean_luminance": round(float(lum.mean()), 2),
        "non_background": round(float((codes != background).mean()), 4),
        "background": f"#{int(background):06x}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the report's HTML file")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1280, help="window width in pixels")
    parser.add_argument("--max-height", type=int, default=30000, help="crop taller pages")
    parser.add_argument("--chromium", default=None, help="the Chromium binary to use")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per browser run")
    args = parser.parse_args()

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(
            "screenshot_report: no Chromium found (looked for /usr/bin/chromium); "
            "install it with: apt-get install chromium",
            file=sys.stderr,
        )
        return 1
    html = args.html.resolve()
    if not html.is_file():
        print(f"screenshot_report: no such file: {html}", file=sys.stderr)
        return 1
    try:
        return _shoot(chromium, html, args)
    except subprocess.TimeoutExpired:
        print(
            f"screenshot_report: Chromium did not finish within {args.timeout} s", file=sys.stderr
        )
        return 1


def _shoot(chromium: str, html: Path, args: argparse.Namespace) -> int:
    measured = page_height(chromium, html, args.width, args.timeout)
    # unmeasured: shoot tall and crop the blank rows below the page
    height = min(args.max_height, (measured + 40) if measured else args.max_height)
    out = args.png.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="piggyback-shot-") as tmp:
        raw = Path(tmp) / "shot.png"
        done = _run(
            chromium,
            [f"--screenshot={raw}", f"--window-size={args.width},{height}", html.as_uri()],
            args.timeout,
        )
        if not raw.is_file():
            print(
                f"screenshot_report: Chromium wrote no screenshot:\n{done.stderr[-3000:]}",
                file=sys.stderr,
            )
            return 1
        with Image.open(raw) as shot:
            image = crop_background(shot)
        image.save(out)
    report = {
        "path": str(out),
        "width": image.width,
        "height": image.height,
        **pixel_stats(image),
        "page_height": measured,
        "truncated": bool(measured and measured > args.max_height),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
