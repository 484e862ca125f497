"""Caption tokenizers: hand-computed ids, truncation that keeps BOS/EOS, determinism across processes."""

import subprocess
import sys
import zlib

import numpy as np
import pytest

from cinema_jax.data import text


def test_byte_tokenizer_hand_values():
  tok = text.ByteTokenizer()
  ids, mask = tok(["Hi", ""], 6)
  np.testing.assert_array_equal(ids, [[1, 3 + 72, 3 + 105, 2, 0, 0], [1, 2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(mask, ids != 0)
  assert ids.dtype == np.int32 and tok.vocab_size == 259


def test_byte_tokenizer_truncates_content_not_markers_and_round_trips_utf8():
  tok = text.ByteTokenizer()
  ids, _ = tok(["abcdef"], 5)
  np.testing.assert_array_equal(ids[0], [1, 3 + 97, 3 + 98, 3 + 99, 2])
  caption = "Café — Ada, the red circle."
  ids, _ = tok([caption], 64)
  assert tok.decode(ids[0]) == caption


def test_word_hash_tokenizer_hand_values():
  tok = text.WordHashTokenizer(vocab_size=1000)
  words = ["ada", ",", "the", "red", "circle", "."]
  expected = [3 + zlib.crc32(w.encode()) % 997 for w in words]
  assert tok.encode("Ada, the RED circle.") == expected
  ids, mask = tok(["Ada, the RED circle."], 10)
  np.testing.assert_array_equal(ids[0], [1, *expected, 2, 0, 0])
  assert mask[0].sum() == 8


def test_word_hash_is_the_same_in_another_process():
  # Python's hash() is salted per process; the tokenizer must not be.
  code = "from cinema_jax.data import text; print(text.WordHashTokenizer(512).encode('Bo pans left'))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == str(text.WordHashTokenizer(512).encode("Bo pans left"))


def test_tokenizer_errors_name_the_problem():
  with pytest.raises(KeyError, match="unknown tokenizer 'bpe'; choose one of bytes, words"):
    text.get_tokenizer("bpe")
  with pytest.raises(ValueError, match="max_length must be >= 2"):
    text.ByteTokenizer()(["a"], 1)
