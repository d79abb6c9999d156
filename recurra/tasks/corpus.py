"""Text corpora for language modelling, as bytes split into train and validation.

``load_corpus()`` gives the embedded default: the English documentation text every CPython ships
(``pydoc_data.topics.topics``, ~466 KB, 79 topics). In sorted-key order every 20th topic (the
1st, 21st, ...) is validation (~4% of the bytes on CPython 3.11), the rest train; the split is
the same on every machine with the same Python version.

``load_corpus(path)`` reads a text file, or every file under a folder (sorted by relative path,
hidden files and files with NUL bytes skipped), and holds out the last 5% of the bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

VALIDATION_FRACTION = 0.05
_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    name: str
    train: bytes
    validation: bytes

    def __repr__(self) -> str:
        return (f"Corpus({self.name!r}, train={len(self.train):,} bytes, "
                f"validation={len(self.validation):,} bytes)")


def embedded_corpus(validation_fraction: float = VALIDATION_FRACTION) -> Corpus:
    """CPython's pydoc topics; every ``round(1 / validation_fraction)``-th topic in sorted-key
    order (the 1st, 21st, 41st, ... for 5%) is validation, the others are train."""
    _check_fraction(validation_fraction)
    from pydoc_data.topics import topics

    stride = max(2, round(1 / validation_fraction))
    keys = sorted(topics)
    train = [topics[k].encode("utf-8") for i, k in enumerate(keys) if i % stride != 0]
    validation = [topics[k].encode("utf-8") for i, k in enumerate(keys) if i % stride == 0]
    return Corpus("pydoc-topics", _SEPARATOR.join(train) + _SEPARATOR,
                  _SEPARATOR.join(validation) + _SEPARATOR)


def load_corpus(path: str | os.PathLike | None = None,
                validation_fraction: float = VALIDATION_FRACTION) -> Corpus:
    """The embedded default (``path=None``), or a text file or folder of text files."""
    if path is None:
        return embedded_corpus(validation_fraction)
    _check_fraction(validation_fraction)
    root = Path(path)
    if not root.exists():
        raise ValueError(f"data path {str(path)!r} does not exist")
    if root.is_file():
        data = root.read_bytes()
    elif root.is_dir():
        files = sorted(
            p for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        texts = [p.read_bytes() for p in files]
        data = _SEPARATOR.join(t for t in texts if b"\x00" not in t[:8192])
    else:
        raise ValueError(f"data path {str(path)!r} is neither a file nor a folder")
    if len(data) < 2:
        raise ValueError(
            f"data path {str(path)!r} holds no text ({len(data)} bytes); give a text file or a "
            f"folder with text files"
        )
    cut = len(data) - max(1, int(len(data) * validation_fraction))
    return Corpus(root.name or str(root), data[:cut], data[cut:])


def _check_fraction(fraction: float) -> None:
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {fraction!r}")
