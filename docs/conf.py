"""Sphinx configuration of the rnnkit site: ``scripts/build-docs`` builds it.

Everything is local: no intersphinx (nothing is fetched at build time), no math (MathJax would
come from a CDN at view time), the furo theme's own files. Tutorials in ``tutorials/`` are plain
Python scripts that sphinx-gallery runs at build time, one CPU thread each, under a minute each.
"""

import sys
from pathlib import Path

import rnnkit

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "rnnkit"
author = "the rnnkit developers"
copyright = "the rnnkit developers, MIT licence"
release = version = rnnkit.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    "rnnkit_docs",
]

exclude_patterns = [
    "_build",
    "tutorials",
    "auto_tutorials/*.ipynb",
    "auto_tutorials/*.py",
]
templates_path = ["_templates"]
html_theme = "furo"
html_title = f"rnnkit {release}"
html_theme_options = {"navigation_with_keys": True}
html_show_sourcelink = False

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
# Undocumented methods (forward) get no docstring rather than nn.Module's.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = True

# Warnings are errors (scripts/build-docs passes -W --keep-going), and every reference must
# resolve. Without intersphinx, torch's and the standard library's types in signatures cannot be
# linked; these are those names, each listed, so that an unresolved rnnkit name still fails.
nitpicky = True
nitpick_ignore = [
    ("py:class", name)
    for name in (
        "torch.Tensor",
        "Tensor",
        "torch.device",
        "torch.dtype",
        "torch.nn.Module",
        "nn.Module",
        "torch.nn.modules.module.Module",
        "torch.nn.parameter.Parameter",
        "nn.Parameter",
        "torch.nn.utils.rnn.PackedSequence",
        "PackedSequence",
        "numpy.ndarray",
        "np.ndarray",
        "os.PathLike",
        "pathlib.Path",
        "Path",
        "collections.abc.Sequence",
        "collections.abc.Callable",
        "Sequence",
        "Callable",
        "collections.abc.Iterable",
    )
]

sphinx_gallery_conf = {
    "examples_dirs": ["tutorials"],
    "gallery_dirs": ["auto_tutorials"],
    # Run every tutorial (not only plot_*.py), in file-name order (their numbers).
    "filename_pattern": r"/",
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": False,
    # "Examples using this" on the API pages.
    "backreferences_dir": "api/generated/backreferences",
    "doc_module": ("rnnkit",),
    "reference_url": {"rnnkit": None},
    "reset_modules": ("matplotlib", "rnnkit_docs.one_thread"),
    "junit": "../sphinx-gallery/junit-results.xml",
    # Its pages of computation times load jQuery and DataTables from CDNs: the site must not.
    "write_computation_times": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "show_signature": False,
    "capture_repr": ("_repr_html_",),
    "image_srcset": [],
    "default_thumb_file": None,
}
