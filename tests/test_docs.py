"""The documentation site: it builds with warnings as errors (every tutorial runs, each within the
time limit, every reference resolves), every public name has a page, and in a real browser
(Debian's chromium driven by playwright) every page loads cleanly, the tutorials show their
figures, search works and the API pages' anchors resolve. Also: the docstring examples run.

The site is built once per session by ``scripts/build-docs`` into a temporary folder (2-3 min on
two cores). Without a browser the browser tests skip, saying why; with ``CI`` set they fail.
"""

import doctest
import functools
import http.server
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

import rnnkit
import rnnkit.models
import rnnkit.train

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted(p.stem for p in (ROOT / "docs" / "tutorials").glob("*.py"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Where each documented name has its anchor in the site: rnnkit's own names (the training ones
# included, as users call them: rnnkit.fit), then those of rnnkit.train and rnnkit.models.
TRAIN_IN_RNNKIT = {"fit", "load", "predict", "TrainConfig"}


def _public_names() -> list[str]:
    names = [f"rnnkit.{n}" for n in rnnkit.__all__]
    names += [f"rnnkit.train.{n}" for n in rnnkit.train.__all__ if n not in TRAIN_IN_RNNKIT]
    names += [
        f"rnnkit.models.{name}"
        for name, obj in vars(rnnkit.models).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == "rnnkit.models"
    ]
    return names


# --- the build -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("docs")
    done = subprocess.run(
        [str(ROOT / "scripts" / "build-docs"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, done


@pytest.fixture(scope="session")
def site(built) -> Path:
    out, done = built
    if done.returncode != 0:
        pytest.fail(f"scripts/build-docs failed:\n{_warnings(done.stderr + done.stdout)}")
    return out / "html"


def _warnings(log: str) -> str:
    lines = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    return "\n".join(lines[:50]) or log[-5000:]


def test_site_builds_with_warnings_as_errors_and_runs_every_tutorial(built):
    out, done = built
    assert done.returncode == 0, _warnings(done.stderr + done.stdout)
    # sphinx-gallery's report: every tutorial ran, none failed (the build also fails then).
    report = (out / "sphinx-gallery" / "junit-results.xml").read_text()
    assert f'tests="{len(TUTORIALS)}"' in report and 'failures="0"' in report
    for name in TUTORIALS:
        assert f'classname="{name}"' in report


def test_every_tutorial_page_embeds_its_figures_and_downloads(site):
    for name in TUTORIALS:
        html = (site / "auto_tutorials" / f"{name}.html").read_text()
        figures = re.findall(rf'src="[^"]*sphx_glr_{name}_(\d+)\.png"', html)
        assert figures, f"{name} has no figure"
        for number in set(figures):
            image = site / "_images" / f"sphx_glr_{name}_{number}.png"
            assert image.stat().st_size > 1000, f"{image} is empty"
        assert f"{name}.py" in html and f"{name}.ipynb" in html, f"{name}: no downloads"


def test_every_public_name_has_an_api_entry(site):
    ids = set()
    for page in (site / "api").rglob("*.html"):
        ids |= set(re.findall(r'id="([^"]+)"', page.read_text()))
    missing = [name for name in _public_names() if name not in ids]
    assert not missing, f"no API entry for {missing}"


def test_api_pages_link_to_the_tutorials_that_use_them(site):
    page = (site / "api" / "generated" / "rnnkit.LSTM.html").read_text()
    assert "Examples using" in page
    assert "../../auto_tutorials/01_layer_outputs.html" in page
    fit = (site / "api" / "generated" / "rnnkit.fit.html").read_text()
    assert "../../auto_tutorials/05_tagger.html" in fit


def test_site_needs_no_network(site):
    """No page refers to anything outside the site (a CDN script, a web font, MathJax)."""
    remote = re.compile(r'(?:src|href)="(?:https?:)?//', re.I)
    for page in site.rglob("*.html"):
        html = page.read_text()
        for match in re.finditer(r"<(?:script|link|img)\b[^>]*>", html):
            assert not remote.search(match.group(0)), f"{page}: {match.group(0)}"


def test_readme_and_guide_show_the_same_fit_example():
    """The README's training example (which tests/test_fit.py runs) is the guide's, verbatim."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Train your own model in Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    guide = (ROOT / "docs" / "guide" / "fit.rst").read_text()
    block = re.search(r"\.\. code:: python\n\n((?:   .*\n|\n)+)", guide).group(1)
    unindented = "\n".join(line[3:] for line in block.splitlines()).strip()
    assert unindented == code.strip()


# --- docstring examples --------------------------------------------------------------------------

# The engines are internals (and import Triton where it is installed); the command-line modules
# hold no examples. Everything else a user may import is checked.
SKIP_MODULES = ("rnnkit.engines", "rnnkit.__main__")


def _modules() -> list[str]:
    found = ["rnnkit"]
    for info in pkgutil.walk_packages(rnnkit.__path__, "rnnkit."):
        if not info.name.startswith(SKIP_MODULES):
            found.append(info.name)
    return sorted(found)


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples_run(module):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(importlib.import_module(module), optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module} failed"


def test_public_docstrings_have_examples_that_doctest_finds():
    finder = doctest.DocTestFinder()
    examples = sum(
        len(test.examples)
        for module in ("rnnkit.layers", "rnnkit.params", "rnnkit.deploy", "rnnkit.models")
        for test in finder.find(importlib.import_module(module))
    )
    assert examples >= 10


# --- the browser ---------------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    thread.join()
    httpd.server_close()


def _no_browser(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the browser test, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        _no_browser(f"playwright is not installed ({err}); pip install -e '.[docs]'")
    if not Path(CHROMIUM).exists():
        _no_browser(f"{CHROMIUM} is missing; apt-get install -y chromium")
    manager = sync_playwright().start()
    try:
        launched = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as err:
        manager.stop()
        _no_browser(f"chromium at {CHROMIUM} did not start: {str(err).splitlines()[0]}")
    yield launched
    launched.close()
    manager.stop()


class _Visit:
    """One page in a fresh tab, with everything that went wrong while it loaded: console errors,
    uncaught exceptions, failed requests, HTTP errors, and requests that left localhost (which are
    blocked, and so fail too)."""

    def __init__(self, browser, url: str):
        self.problems: list[str] = []
        self.page = browser.new_page()
        origin = urlparse(url).netloc
        self.page.route(
            re.compile(r"^(?!https?://" + re.escape(origin) + r"/|data:|blob:|about:).*"),
            self._outside,
        )
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))
        self.page.on(
            "requestfailed",
            lambda req: self.problems.append(f"request failed: {req.url} ({req.failure})"),
        )
        self.page.on("response", self._response)
        self.page.goto(url, wait_until="load")

    def _outside(self, route):
        self.problems.append(f"request outside the site: {route.request.url}")
        route.abort()

    def _console(self, message):
        if message.type == "error":
            self.problems.append(f"console error: {message.text}")

    def _response(self, response):
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def close(self):
        self.page.close()


def _pages(site: Path) -> list[str]:
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))


def test_every_page_loads_without_console_errors_or_failed_requests(site, server, browser):
    problems = {}
    pages = _pages(site)
    assert len(pages) > 50
    for path in pages:
        visit = _Visit(browser, urljoin(server, path))
        if visit.problems:
            problems[path] = visit.problems
        visit.close()
    assert not problems, problems


def test_tutorial_pages_show_their_figures(site, server, browser):
    for name in TUTORIALS:
        visit = _Visit(browser, urljoin(server, f"auto_tutorials/{name}.html"))
        images = visit.page.eval_on_selector_all(
            "img.sphx-glr-single-img, img.sphx-glr-multi-img",
            "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth,"
            " e.naturalHeight])",
        )
        visit.close()
        assert images, f"{name}: no figure on the page"
        for src, complete, width, height in images:
            assert complete and width > 0 and height > 0, f"{name}: {src} did not load"
        assert not visit.problems, visit.problems


def test_search_for_h_n_finds_the_shapes_tutorial(server, browser):
    visit = _Visit(browser, urljoin(server, "search.html?q=h_n"))
    # Sphinx's search runs in the page after load; wait (with a deadline) for its result list.
    visit.page.wait_for_selector("#search-results ul.search li", timeout=30_000)
    links = visit.page.eval_on_selector_all(
        "#search-results ul.search li a", "els => els.map(e => e.getAttribute('href'))"
    )
    visit.close()
    assert any("auto_tutorials/01_layer_outputs.html" in link for link in links), links
    assert not visit.problems, visit.problems


class _Ids(HTMLParser):
    def __init__(self, html: str):
        super().__init__()
        self.ids: set[str] = set()
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)


def test_every_api_page_anchor_resolves(site, server, browser):
    """Every link with a fragment on an API page points at an element that exists: on the page
    itself (checked in the browser, after its scripts ran) or on another page of the site."""
    ids_of: dict[str, set[str]] = {}
    broken = []
    checked = 0
    api_pages = [p for p in _pages(site) if p.startswith("api/")]
    assert len(api_pages) > 30
    for path in api_pages:
        visit = _Visit(browser, urljoin(server, path))
        hrefs = visit.page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
        page_ids = set(
            visit.page.eval_on_selector_all("[id], a[name]", "els => els.map(e => e.id || e.name)")
        )
        visit.close()
        for href in hrefs:
            url = urlparse(href)
            if not url.fragment or url.netloc != urlparse(server).netloc:
                continue
            target = url.path.lstrip("/")
            fragment = unquote(url.fragment)
            if target == path:
                ids = page_ids
            else:
                if target not in ids_of:
                    file = site / target
                    ids_of[target] = _Ids(file.read_text()).ids if file.is_file() else set()
                ids = ids_of[target]
            checked += 1
            if fragment not in ids:
                broken.append(f"{path}: {href}")
    assert checked > 100
    assert not broken, broken
