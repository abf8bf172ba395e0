"""`score --html`: one self-contained page, checked in a real headless browser (Chromium).

The browser test loads a copy of the report with a small probe script appended (the report
itself has none), which writes every image's decoded size into the DOM; Chromium's
`--dump-dom` prints the DOM after the page has loaded. A broken image decodes to width 0.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import orjson
import pytest
from fixtures import answered, gold_records, prediction_lines

from cellpuzzle_cli.io import write_jsonl

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PROBE = ("<script>window.addEventListener('load', () => document.body.setAttribute("
         "'data-images', JSON.stringify([...document.images].map("
         "i => [i.complete, i.naturalWidth, i.naturalHeight]))));</script>")
GOLDS = ["T cell | B cell | monocyte", "B cell | monocyte | T cell | NK cell"] * 6


def _browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def _decoded_images(browser: str, page, tmp_path) -> list[list]:
    """[complete, naturalWidth, naturalHeight] of each <img> as Chromium rendered `page`."""
    probe = tmp_path / f"probe-{page.stem}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                     encoding="utf-8")
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'data-images="([^"]*)"', done.stdout)
    assert found, f"no probe result from {browser}: {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"'))


@pytest.fixture
def report(cli, tmp_path):
    """The page for two runs (one right every time, one swapping two types)."""
    records = gold_records(GOLDS)
    swapped = [answered(" | ".join([g.split(" | ")[1], g.split(" | ")[0], *g.split(" | ")[2:]]))
               for g in GOLDS]
    for name, texts in (("right", [answered(g) for g in GOLDS]), ("swapped", swapped)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "shard-0-of-1.jsonl", prediction_lines(records, texts))
    page = tmp_path / "report.html"
    result = cli("score", tmp_path / "right", tmp_path / "swapped", "--html", page)
    assert result.code == 0, result.output
    return page


def test_the_page_is_self_contained_with_tables_chance_and_per_type(report, cli):
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:|file:|/)', text)   # nothing fetched
    for fragment in ("Cell accuracy (chance)", "(chance 0.2", "By N", "Per gold type",
                     "monocyte", "swapped: F1 (precision / recall)", "Macro-F1"):
        assert fragment in text, fragment
    entry = orjson.loads(cli.manifest.read_bytes())["entries"][-1]
    assert {"name": "html", "kind": "report"}.items() <= next(
        o for o in entry["outputs"] if o["name"] == "html").items()


def test_the_page_renders_with_its_images_in_headless_chromium(report, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium on PATH (tried chromium, chromium-browser, google-chrome); "
                    "install it (Debian: apt-get install -y chromium) to render the report")
    images = _decoded_images(browser, report, tmp_path)
    assert len(images) == 2
    for complete, width, height in images:     # by N, then the confusion heatmaps
        assert complete and width > 300 and height > 200, images
    broken = tmp_path / "broken.html"          # the probe tells a broken image apart
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/]{40}", "base64,AAAA", report.read_text(),
                             count=1), encoding="utf-8")
    assert _decoded_images(browser, broken, tmp_path)[0][1] == 0
