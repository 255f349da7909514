"""Person-name normalisation for case- and accent-insensitive matching and fuzzy word search."""

from __future__ import annotations

import re
import unicodedata

_WORD_SPLIT = re.compile(r"[\^=\s,]+")
# Letters with a stroke have no Unicode decomposition, so NFKD alone would keep them apart from their base letter.
_STROKES = str.maketrans("ØøŁłĐđĦħŦŧ", "OoLlDdHhTt")


def fold(value: str) -> str:
    """Upper-case without accents: the form PN values are indexed and compared in."""
    decomposed = unicodedata.normalize("NFKD", value.translate(_STROKES))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).upper()


def name_words(value: str) -> list[str]:
    """The distinct words of a person name (all component groups), folded, for prefix matching."""
    words: list[str] = []
    for word in _WORD_SPLIT.split(fold(value)):
        if word and word not in words:
            words.append(word)
    return words
