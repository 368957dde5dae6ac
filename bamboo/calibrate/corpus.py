"""Public-domain English text for training and calibration, offline: Jane Austen's six novels as shipped by
Debian's r-cran-janeaustenr (R's .rdb format, read in pure Python with the `rdata` package), tokenized with
the Mistral tokenizer and split into train and validation by novel.

A processed copy (token ids, uint16) is committed as bamboo/data/austen_mistral.npz with its provenance, so
nothing here is needed to use it; `build_processed` recreates it.
"""
from __future__ import annotations

import gzip
import json
import lzma
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from bamboo.errors import InputError, require

AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
PROCESSED = Path(__file__).resolve().parents[1] / "data" / "austen_mistral.npz"
VALIDATION_NOVELS = ("persuasion",)


def _unpack_rdb_entry(blob: bytes) -> bytes:
    """An .rdb entry: 4-byte length, then zlib data (R's 'Z'/'2'/'X' typed form has one more type byte)."""
    try:
        return zlib.decompress(blob[4:])
    except zlib.error:
        import bz2

        return {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}[blob[4:5]](blob[5:])


def read_austen_novels(directory: str | Path = AUSTEN_DIR) -> dict[str, str]:
    """The six novels as text, one line per line of the original, keyed by the R variable name."""
    rdata = require("rdata", "data", "reading the Austen corpus")
    directory = Path(directory)
    rdx, rdb = directory / "Rdata.rdx", directory / "Rdata.rdb"
    if not rdx.exists():
        raise InputError(f"{rdx} not found: install Debian's r-cran-janeaustenr (or `apt-get download` it and "
                         "unpack with dpkg -x), or pass its data directory")
    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialized object has no file header
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx.read_bytes()))
    blob = rdb.read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        lines = parse(_unpack_rdb_entry(blob[offset:offset + length]))
        novels[str(name)] = "\n".join(str(line) for line in lines)
    return novels


def build_processed(out: str | Path = PROCESSED, directory: str | Path = AUSTEN_DIR, tokenizer=None) -> Path:
    """Tokenize every novel (BOS at the start of each) and save the ids with their provenance."""
    from bamboo.models.tokenizer import BambooTokenizer

    tokenizer = tokenizer or BambooTokenizer()
    novels = read_austen_novels(directory)
    arrays = {name: np.asarray(tokenizer.encode(text), dtype=np.uint16) for name, text in sorted(novels.items())}
    provenance = {
        "source": "Debian package r-cran-janeaustenr 1.0.0 (public-domain novels by Jane Austen, from Project "
                  "Gutenberg via the CRAN package janeaustenr), data/Rdata.rdb",
        "tokenizer": "Mistral-7B-v0.1 SentencePiece model (mistral_common/data/tokenizer.model.v1), BOS per novel",
        "validation": list(VALIDATION_NOVELS),
        "tokens": {name: int(a.size) for name, a in arrays.items()},
        "builder": "bamboo.calibrate.corpus.build_processed",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, provenance=np.array(json.dumps(provenance)), **arrays)
    return out


def load_processed(path: str | Path = PROCESSED) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train ids, validation ids, provenance): novels concatenated, split by novel."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} not found; build it with bamboo.calibrate.corpus.build_processed()")
    with np.load(path) as data:
        provenance = json.loads(str(data["provenance"]))
        names = [n for n in data.files if n != "provenance"]
        train = [data[n] for n in names if n not in provenance["validation"]]
        valid = [data[n] for n in names if n in provenance["validation"]]
    as_tensor = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))  # noqa: E731
    return as_tensor(train), as_tensor(valid), provenance


def random_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches [batch, seq_len] of random windows (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
        yield torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def sequential_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, limit: int | None = None):
    """Non-overlapping windows in order (for evaluation), at most `limit` batches."""
    windows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)
    for i, start in enumerate(range(0, windows.shape[0], batch_size)):
        if limit is not None and i >= limit:
            return
        yield windows[start:start + batch_size]
