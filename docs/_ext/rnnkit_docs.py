"""Build-time checks of the rnnkit site, as a Sphinx extension.

- Each tutorial runs on one CPU thread (the site must build on a 2-core laptop, and numbers should
  not depend on the thread count), so the build sets it before every tutorial.
- A tutorial that runs for longer than ``TUTORIAL_LIMIT_S`` makes the build fail: its time is read
  from sphinx-gallery's JUnit report when the build finishes, and reported as a warning, which
  ``-W`` turns into an error.
"""

import xml.etree.ElementTree as ET
from pathlib import Path

from sphinx.util import logging

TUTORIAL_LIMIT_S = 60.0
# Where sphinx-gallery writes its JUnit report, relative to the HTML output folder.
JUNIT = "../sphinx-gallery/junit-results.xml"

logger = logging.getLogger(__name__)


def one_thread(gallery_conf, fname, when=None):
    """A ``reset_modules`` hook of sphinx-gallery: runs before every tutorial, which all run in
    this one process, so that none inherits another's global torch settings."""
    import torch

    torch.set_num_threads(1)
    torch.set_grad_enabled(True)
    torch.set_default_dtype(torch.float32)


def _check_tutorial_times(app, exception):
    if exception is not None or not app.config.sphinx_gallery_conf.get(
        "plot_gallery", True
    ):
        return
    report = Path(app.outdir, JUNIT)
    if not report.is_file():
        logger.warning(
            "no sphinx-gallery timing report at %s; cannot check tutorial times",
            report,
        )
        return
    for case in ET.parse(report).getroot().iter("testcase"):
        seconds = float(case.get("time", "0"))
        if seconds > TUTORIAL_LIMIT_S:
            logger.warning(
                "tutorial %s ran for %.1f s, over the limit of %.0f s: make it lighter",
                case.get("file") or case.get("name"),
                seconds,
                TUTORIAL_LIMIT_S,
            )


def setup(app):
    app.connect("build-finished", _check_tutorial_times)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
