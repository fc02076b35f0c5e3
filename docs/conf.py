"""Sphinx configuration for the mixtune documentation."""

from __future__ import annotations

project = "mixtune"
author = "the mixtune developers"
copyright = "2026, the mixtune developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "mixtune"

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# No network at build time: intersphinx inventories cannot be fetched, so
# references to other projects' objects are listed here instead of resolved.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|transformers|datasets|peft|bitsandbytes|accelerate|attrs|attr|numpy|safetensors|huggingface_hub|tqdm|pathlib|collections|typing|typing_extensions|os|enum|abc)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Tensor|Path|PathLike|PreTrainedTokenizerBase|PreTrainedTokenizerFast|PreTrainedModel|DatasetDict|Dataset|Module|dtype|device|Sequence|Iterable|Iterator|Mapping|Callable|Literal|Any|Self|NoneType|T)",
    ),
]
