"""Stop words: words the augmenter never replaces.

NLTK's list needs a corpus download (no hub here), so we ship our own list of English function words
(``stopwords_en.txt``); a user list can replace it (one word a line, ``#`` comments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ds_kdqat.errors import DataError

DEFAULT_STOPWORDS_FILE = Path(__file__).with_name("stopwords_en.txt")


def load_stopwords(path: Optional[str] = None) -> frozenset[str]:
    """Read a stop-word file (default: ours); words are lower-cased; blank lines and ``#`` comments skipped."""
    file = Path(path) if path is not None else DEFAULT_STOPWORDS_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(str(file), f"cannot read stop-word list: {exc.strerror}") from exc
    words = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        if any(ch.isspace() for ch in word):
            raise DataError(f"{file}:{lineno}", f"expected one word per line, got {line!r}")
        words.add(word.lower())
    return frozenset(words)
