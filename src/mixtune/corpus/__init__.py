"""Preparing a corpus: documents → cleaned → split by document → token chunks → rows.

The entry point is :class:`ChunkedCorpus` (``from_folder``, ``from_documents``,
``from_hub``); the other names are its parts and results.
"""

from __future__ import annotations

from mixtune.corpus._chunking import Window, cut_windows
from mixtune.corpus._cleaning import clean_text
from mixtune.corpus._corpus import Chunk, ChunkedCorpus, CorpusSpec
from mixtune.corpus._describe import CorpusDescription, Provenance, Source, SplitStats
from mixtune.corpus._documents import SUPPORTED_SUFFIXES, Document, SkippedDocument
from mixtune.corpus._layouts import IGNORE_INDEX, pack_lengths
from mixtune.corpus._splitting import SPLITS, Split, assign_split, split_point

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "SUPPORTED_SUFFIXES",
    "Chunk",
    "ChunkedCorpus",
    "CorpusDescription",
    "CorpusSpec",
    "Document",
    "Provenance",
    "SkippedDocument",
    "Source",
    "Split",
    "SplitStats",
    "Window",
    "assign_split",
    "clean_text",
    "cut_windows",
    "pack_lengths",
    "split_point",
]
