"""A screenshot of `flamingo-annotate report` for the README: python jobs/report_screenshot.py OUTPUT PNG.

Builds the report of OUTPUT (`make screenshot` uses the demo's, out/demo) in a temporary folder, opens it in
headless Chromium (Debian's `chromium` package; nothing is fetched: every browser service that would reach the
network is off) and saves the window as PNG, reduced to a 256-colour palette so the file stays small.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from flamingo_annotate.report import ReportOptions, build_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def screenshot(page: Path, png: Path, width: int, height: int, browser: str) -> None:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                        f"--window-size={width},{height}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120, env={**os.environ, "HOME": profile})
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="an annotation output (folder or s3://...)")
    parser.add_argument("png", type=Path, help="where to save the screenshot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    if not Path(args.browser).exists():
        sys.exit(f"Error: no browser at {args.browser}; install Debian's chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="report-") as folder:
        summary = build_report(args.output, Path(folder) / "report.html", ReportOptions(page_size=60))
        print(summary.format())
        raw = Path(folder) / "screenshot.png"
        screenshot(summary.pages[0], raw, args.width, args.height, args.browser)
        with Image.open(raw) as image:
            small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        small.save(args.png, optimize=True)
    print(f"Wrote {args.png} ({args.png.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
