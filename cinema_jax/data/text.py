"""Deterministic caption tokenizers for the loaders and the small trainable text encoder.

Two tokenizers share one id layout, so a model built for one vocabulary size works with either:

  id 0 = padding, 1 = begin of text, 2 = end of text, ids >= 3 = content.

* ``bytes`` (``ByteTokenizer``): one token per UTF-8 byte, id = 3 + byte; vocabulary 259. Exact and reversible
  (``decode``), no state, no unknown tokens; sequences are as long as the text in bytes.
* ``words`` (``WordHashTokenizer``): lower-cased words and punctuation marks (``[a-z0-9]+`` runs, and every other
  non-space character on its own), id = 3 + crc32(word) mod (vocab_size - 3). Shorter sequences; collisions are
  possible (a hashing trick), never an error.

``tokenizer(texts, max_length)`` returns ``(ids, mask)``: int32 [N, T] and bool [N, T]. Each row is
``[BOS] content... [EOS] 0 0 ...``; content is truncated to ``max_length - 2`` tokens so BOS and EOS always survive.
An empty string gives ``[BOS, EOS, 0, ...]`` (the loaders blank padded keyframe slots' masks themselves).
crc32 is used rather than Python's ``hash`` because the latter is salted per process.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIAL = 3

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class _Tokenizer:
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    """Content ids of ``text`` (no BOS/EOS, no padding)."""
    raise NotImplementedError

  def __call__(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (BOS and EOS), got {max_length}")
    ids = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      content = self.encode(text)[: max_length - 2]
      ids[row, : len(content) + 2] = [BOS_ID, *content, EOS_ID]
    return ids, ids != PAD_ID


class ByteTokenizer(_Tokenizer):
  """UTF-8 bytes: id = 3 + byte (vocabulary 259)."""

  vocab_size = NUM_SPECIAL + 256

  def encode(self, text: str) -> list[int]:
    return [NUM_SPECIAL + b for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of a row of ids; special ids are dropped (undoes ``encode`` exactly)."""
    return bytes(int(i) - NUM_SPECIAL for i in ids if int(i) >= NUM_SPECIAL).decode("utf-8", errors="replace")


class WordHashTokenizer(_Tokenizer):
  """Lower-cased words and punctuation hashed with crc32 into ``vocab_size - 3`` buckets."""

  def __init__(self, vocab_size: int = 4096):
    if vocab_size <= NUM_SPECIAL:
      raise ValueError(f"vocab_size must exceed the {NUM_SPECIAL} special ids, got {vocab_size}")
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    buckets = self.vocab_size - NUM_SPECIAL
    return [NUM_SPECIAL + zlib.crc32(w.encode("utf-8")) % buckets for w in _WORD.findall(text.lower())]


TOKENIZERS = {"bytes": ByteTokenizer, "words": WordHashTokenizer}


def get_tokenizer(name: str, **options) -> _Tokenizer:
  """``"bytes"`` or ``"words"`` (options: ``vocab_size``)."""
  if name not in TOKENIZERS:
    raise KeyError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
  return TOKENIZERS[name](**options)
