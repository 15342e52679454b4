"""Data for the training tasks: the bundled files and readers for the user's own.

Every reader checks its file and raises :class:`DataError` naming the file, the line and what was
expected, instead of letting a malformed file surface as a shape error deep inside torch. Where the
bundled files come from, and their licences, is in ``README.md`` beside this module.
"""

from rnnkit.data.errors import DataError
from rnnkit.data.readers import (
    ewt_conllu,
    load_digits,
    load_mnist,
    load_taylor,
    read_conllu,
    read_idx,
    read_labelled_text,
    read_series,
    sample_conllu,
    write_idx,
)
from rnnkit.data.split import chronological_split, stratified_split
from rnnkit.data.vocab import PAD, UNK, Vocab

__all__ = [
    "PAD",
    "UNK",
    "DataError",
    "Vocab",
    "chronological_split",
    "ewt_conllu",
    "load_digits",
    "load_mnist",
    "load_taylor",
    "read_conllu",
    "read_idx",
    "read_labelled_text",
    "read_series",
    "sample_conllu",
    "stratified_split",
    "write_idx",
]
