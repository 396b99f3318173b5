"""sasa browse in real headless Chromium (Debian's, driven over DevTools): the index loads with no
console errors from file:// and over HTTP, search narrows the list, sorting reorders it, a group
page shows its contexts and plots (a ring for a planted circle), an r = 1 SAE has no 2-D view."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from chromium import Chromium, find_chromium

from sasa.analysis.contexts import ring_shape
from sasa.analysis.evaluate import EvalConfig, evaluate_many
from sasa.analysis.oracle import oracle_sae
from sasa.analysis.synth import load_truth, write_synthetic_cache
from sasa.analysis.synthetic import SyntheticSpec
from sasa.store import open_cache
from sasa.trainer import SAE, SAEConfig, save_sae

SPEC = SyntheticSpec(d=16, features_per_dim={1: 4, 2: 4}, mean_active=2.0)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("browse")
    url = str(d / "cache")
    write_synthetic_cache(url, spec=SPEC, n_tokens=4096, ctx_len=16, shard_seqs=64, progress=False)
    run = d / "run"
    save_sae(oracle_sae(load_truth(open_cache(url)).bases), run / "oracle")  # groups 4-7 own a circle each
    save_sae(SAE(SAEConfig(d_in=16, groups=80, arch="topk", top_s=4), seed=0), run / "topk")  # 2 shards of groups
    evaluate_many([EvalConfig(cache=url, sae=str(run / n), tokens=None, progress=False) for n in ("oracle", "topk")])
    out = subprocess.run([sys.executable, "-m", "sasa", "browse", str(run), "--out", str(d / "site")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return d / "site"


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI fails here instead")
    b = Chromium(binary)
    yield b
    b.close()


@pytest.fixture(scope="module")
def http_root(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


ROWS = "document.querySelectorAll('#groups tbody tr').length"


@pytest.mark.parametrize("where", ["file", "http"])
def test_index_loads_search_narrows_sort_reorders(browser, site, http_root, where):
    base = site.as_uri() if where == "file" else http_root
    browser.errors.clear()
    browser.goto(f"{base}/index.html")
    assert browser.wait_for(ROWS) == 8 + 80
    assert browser.js("document.getElementById('count').textContent") == "88 of 88 groups"
    browser.js("var s = document.getElementById('search'); s.value = 'oracle'; s.dispatchEvent(new Event('input'))")
    assert browser.js(ROWS) == 8
    browser.js("var s = document.getElementById('search'); s.value = ''; s.dispatchEvent(new Event('input'))")
    assert browser.js(ROWS) == 88
    freq = "Array.from(document.querySelectorAll('#groups tbody tr td:nth-child(3)')).map(t => +t.textContent)"
    shown = browser.js(freq)
    assert shown == sorted(shown, reverse=True) and shown[0] > shown[-1]  # default: most frequent first
    browser.js("document.querySelector('th[data-key=freq]').click()")
    assert browser.js(freq) == sorted(shown)
    assert browser.errors == []


def test_group_page_shows_contexts_and_plots(browser, site):
    browser.errors.clear()
    browser.goto(site.as_uri() + "/group.html?s=0&g=5")  # the oracle's circle feature
    browser.wait_for("document.querySelectorAll('.ctx').length > 0")
    assert browser.js("document.getElementById('title').textContent") == "oracle \u2014 group 5"
    assert browser.js("document.querySelectorAll('.ctx').length") == 8
    assert browser.js("document.querySelectorAll('.ctx span.center').length") == 8
    assert browser.js("document.querySelectorAll('#density rect').length") > 3
    assert browser.js("document.querySelectorAll('#sv rect').length") == 2
    # the 2-D view: the tokens where the circle is on form a ring around the origin (the oracle's
    # group is also slightly active on every other token: a blob at the origin)
    pts = np.array(browser.js("Array.from(document.querySelectorAll('#view circle')).map(c => [+c.getAttribute('cx'), +c.getAttribute('cy')])"))
    x, y = pts[:, 0] - 120, 120 - pts[:, 1]  # relative to the centre of the 240 px square
    far = np.hypot(x, y) > 0.5 * np.hypot(x, y).max()
    assert far.sum() >= 20
    ring = ring_shape(x[far], y[far])
    assert ring.radius_cv < 0.2 and ring.angle_coverage > 0.9
    # hovering the top token shows the group's code
    browser.js("document.querySelector('.ctx span.center').dispatchEvent(new MouseEvent('mouseover'))")
    assert "z = (" in browser.js("document.getElementById('hover').textContent")
    assert browser.errors == []


def test_r1_group_page_has_no_geometry_and_a_second_shard_loads(browser, site):
    browser.errors.clear()
    browser.goto(site.as_uri() + "/group.html?s=1&g=70")  # groups 64-79 live in the second shard
    browser.wait_for("document.getElementById('title').textContent.indexOf('group 70') >= 0")
    assert browser.js("getComputedStyle(document.getElementById('viewbox')).display") == "none"
    assert browser.js("document.querySelectorAll('#sv rect').length") == 1
    assert browser.errors == []


def test_console_errors_are_seen(browser, site):
    """The no-errors checks above can fail: a page whose data file is missing logs one."""
    browser.errors.clear()
    browser.goto(site.as_uri() + "/group.html?s=9&g=0")
    browser.wait_for("document.getElementById('title').textContent.indexOf('no data') >= 0")
    assert browser.errors and "9/0.js" in " ".join(browser.errors)


def test_report_links_the_browser(site):
    page = site.parent / "report.html"
    out = subprocess.run([sys.executable, "-m", "sasa", "report", "--sweep", str(site.parent / "run"), "--out", str(page),
                          "--browser", str(site)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert '<a href="site/index.html">feature browser</a>' in page.read_text()
    out = subprocess.run([sys.executable, "-m", "sasa", "report", "--sweep", str(site.parent / "run"), "--out", str(page),
                          "--browser", str(site.parent / "nothing")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "holds no sasa browse site" in out.stderr and "Traceback" not in out.stderr


def test_browse_bad_input(site, tmp_path):
    out = subprocess.run([sys.executable, "-m", "sasa", "browse", str(tmp_path), "--out", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "run folder" in out.stderr
    (tmp_path / "keep.txt").write_text("mine")
    out = subprocess.run([sys.executable, "-m", "sasa", "browse", str(site.parent / "run"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a sasa browser site" in out.stderr and (tmp_path / "keep.txt").is_file()
