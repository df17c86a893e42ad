"""Plain English text as a language-model dataset: fixed-length token windows (dataset ``text``).

The text (a ``.txt`` file, a folder of them read in name order, or ``bible:REFS`` — verses of the
King James Bible through Debian's ``bible`` program, ``apt-get install bible-kjv-text``, verse
numbers stripped) is cut at whitespace into consecutive, non-overlapping stretches of
:data:`CHARS_PER_TOKEN` × (T + 1) characters, T = :data:`WINDOW` by default (split ``"tokens=N"``
sets another). Each stretch is an item, a :class:`lesionbench.TextWindow`: every language model
keeps the first T + 1 tokens of its own tokenizer from it and is scored on its T next-token
predictions, so the same text serves models with different tokenizers. Items have no class: their
label is 0; the seeded evaluation subset is a random choice of windows, and the bootstrap
resamples whole windows.

The default, ``bible:Mat1:1-28:20`` (the Gospel of Matthew, 133 KB, public domain), is English
prose of one style that Debian installs offline, as it does Fashion-MNIST.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from lesionbench.data import RawDataset, TextWindow
from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl

WINDOW = 128  # next-token predictions per window
# Characters per window and token: English runs about 4 characters to a token (SmolLM2's tokenizer:
# 4.1 on Matthew), so 6 leaves every window more tokens than it needs.
CHARS_PER_TOKEN = 6
DEFAULT_PATH = "bible:Mat1:1-28:20"
VERSE = re.compile(r"^\S+\d+:\d+ ", re.MULTILINE)


def read_text(path: str) -> str:
    """The text at ``path``: a .txt file, a folder of .txt files, or ``bible:REFS``.

    Raises LesionbenchError for a missing or empty path or an absent ``bible`` program."""
    if path.startswith("bible:"):
        if shutil.which("bible") is None:
            raise LesionbenchError("dataset text: 'bible' not found: apt-get install bible-kjv-text")
        done = subprocess.run(["bible", "-f", path.removeprefix("bible:")], capture_output=True, text=True, check=False)
        text = VERSE.sub("", done.stdout)
        if done.returncode != 0 or not text.strip():
            raise LesionbenchError(f"dataset text: bible gave no verses for {path!r}")
        return text
    p = Path(path).expanduser()
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not p.exists() or not files:
        raise LesionbenchError(f"dataset text: {path!r} is neither a .txt file nor a folder holding .txt files")
    try:
        return "\n".join(f.read_text(encoding="utf-8") for f in files)
    except (OSError, UnicodeDecodeError) as exc:
        raise LesionbenchError(f"dataset text: {path!r} is unreadable as UTF-8 text ({exc})") from None


def windows(text: str, chars: int) -> list[str]:
    """Consecutive stretches of ``text``, each of at least ``chars`` characters, cut after whitespace
    (whitespace runs become one space); a shorter tail is dropped."""
    words = text.split()
    out, current, size = [], [], 0
    for word in words:
        current.append(word)
        size += len(word) + 1
        if size >= chars:
            out.append(" ".join(current))
            current, size = [], 0
    return out


class TextSource:
    name = "text"
    description = (
        "Next-token prediction on plain text (.txt files or bible:REFS), windows of 128 tokens of each "
        "model's own tokenizer; for causal language models (hf:)."
    )
    default_path = DEFAULT_PATH

    def load(self, path: str | None, split: str) -> RawDataset:
        tokens = WINDOW
        if split.startswith("tokens="):
            try:
                tokens = int(split.removeprefix("tokens="))
            except ValueError:
                tokens = 0
            if tokens < 1:
                raise LesionbenchError(f"dataset text: split {split!r} must be 'tokens=N' with N ≥ 1")
        path = path or DEFAULT_PATH
        items = windows(read_text(path), CHARS_PER_TOKEN * (tokens + 1))
        if not items:
            raise LesionbenchError(f"dataset text: {path!r} is shorter than one window of {tokens + 1} tokens")
        return RawDataset(
            name=self.name,
            path=path,
            labels=np.zeros(len(items), np.int64),
            num_classes=1,
            decode=lambda i: TextWindow(items[i], tokens),
            tokens=tokens,
        )


@hookimpl
def lesionbench_datasets():
    return [TextSource()]
