"""OpenAI CLIP byte-level BPE tokenizer, token-for-token equal to sam3's `SimpleTokenizer`.

Cleaning ("lower" mode, the one SAM 3 uses): `ftfy.fix_text`, `html.unescape` twice, strip,
collapse whitespace runs to one space, strip, lowercase. Output rows are
`[SOT] + bpe(text) + [EOT]`, zero padded; a longer row is cut to `context_length` and its last
token is forced to EOT.

The vocabulary is never downloaded. `find_vocab` looks, in order, at an explicit path, the
`SAM3I_BPE_PATH` environment variable, the given extra directories (e.g. a converted checkpoint
directory, where the converter copies the file), and the copies shipped inside installed
packages (`open_clip`, then `sam3`), located with `importlib.util.find_spec` so neither package
(both import torch) is imported.

Import-light on purpose: numpy, ftfy, regex and the standard library only.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.util
import os
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_MD5 = "933b7abbbbde62c36f02f0e6ccde464f"
ENV_VAR = "SAM3I_BPE_PATH"
VOCAB_SIZE = 49408
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_ID = 49406
EOT_ID = 49407
DEFAULT_CONTEXT_LENGTH = 32  # SAM 3's text encoder context
# CLIP uses the first 49152 - 256 - 2 merge lines (after the version header).
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2

# Word-level pre-tokenisation: the special tokens, English contractions, letter runs, single
# digits, and runs of anything else that is neither whitespace, letter nor digit.
_WORD_PATTERN = regex.compile(
    "|".join([regex.escape(SOT_TOKEN), regex.escape(EOT_TOKEN)])
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_VISIBLE_BYTES = frozenset([*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)])


class VocabNotFoundError(FileNotFoundError):
  """The CLIP BPE vocabulary file could not be located."""


@functools.lru_cache(maxsize=1)
def _byte_to_char() -> tuple[str, ...]:
  """`table[b]` is the printable character that stands for byte `b` in the vocabulary.

  Bytes that are visible, non-space Latin-1 characters stand for themselves; the others
  (controls, space, DEL, NBSP, soft hyphen) get U+0100, U+0101, ... in increasing byte order.
  """
  table, next_code = [], 0x100
  for b in range(256):
    if b in _VISIBLE_BYTES:
      table.append(chr(b))
    else:
      table.append(chr(next_code))
      next_code += 1
  return tuple(table)


def _byte_alphabet() -> list[str]:
  """The 256 byte characters in CLIP's vocabulary order: visible bytes first, then the rest."""
  table = _byte_to_char()
  order = sorted(range(256), key=lambda b: (b not in _VISIBLE_BYTES, b))
  return [table[b] for b in order]


def _candidate(path: str | os.PathLike) -> str:
  """A vocabulary path given as a file or as a directory holding it."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return os.path.join(path, VOCAB_FILENAME)
  return path


def _package_copy(package: str, *subdirs: str) -> str | None:
  """The vocabulary shipped inside an installed package, without importing the package."""
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    path = os.path.join(root, *subdirs, VOCAB_FILENAME)
    if os.path.isfile(path):
      return path
  return None


def find_vocab(vocab_path: str | os.PathLike | None = None,
               extra_dirs: Iterable[str | os.PathLike] = ()) -> str:
  """The path of `bpe_simple_vocab_16e6.txt.gz`; never downloads.

  Order: `vocab_path` (file or directory) > `$SAM3I_BPE_PATH` (file or directory) > each of
  `extra_dirs` > the copy in the installed `open_clip` package > `sam3/assets`. An explicit path
  or environment variable that does not exist is an error (no silent fallback).
  """
  if vocab_path is not None:
    path = _candidate(vocab_path)
    if not os.path.isfile(path):
      raise VocabNotFoundError(f"CLIP BPE vocabulary not found at vocab_path={path!r}")
    return path
  env = os.environ.get(ENV_VAR)
  if env:
    path = _candidate(env)
    if not os.path.isfile(path):
      raise VocabNotFoundError(f"${ENV_VAR}={env!r} but {path!r} is not a file")
    return path
  for directory in extra_dirs:
    path = os.path.join(os.fspath(directory), VOCAB_FILENAME)
    if os.path.isfile(path):
      return path
  for package, subdirs in (("open_clip", ()), ("sam3", ("assets",))):
    path = _package_copy(package, *subdirs)
    if path is not None:
      return path
  raise VocabNotFoundError(
      f"CLIP BPE vocabulary {VOCAB_FILENAME} (md5 {VOCAB_MD5}) not found. Provide it with "
      f"ClipTokenizer(vocab_path=...), the {ENV_VAR} environment variable (file or directory), "
      "a converted checkpoint directory that contains it, or `pip install open_clip_torch` "
      "(which ships it). Nothing is downloaded at run time.")


def file_md5(path: str | os.PathLike) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _load_vocab(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
  """(token -> id, merge pair -> rank) from a verified vocabulary file; cached per path."""
  md5 = file_md5(path)
  if md5 != VOCAB_MD5:
    raise ValueError(f"{path!r} has md5 {md5}, expected {VOCAB_MD5} (CLIP's "
                     f"{VOCAB_FILENAME}); the file is corrupt or a different vocabulary")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  merges = [tuple(line.split()) for line in lines[1:1 + _NUM_MERGES]]
  alphabet = _byte_alphabet()
  tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
  tokens += [SOT_TOKEN, EOT_TOKEN]
  encoder = {}
  for i, token in enumerate(tokens):
    encoder[token] = i  # a repeated string keeps its last id, as a dict(zip(...)) would
  ranks = {pair: i for i, pair in enumerate(merges)}
  if len(tokens) != VOCAB_SIZE or encoder[SOT_TOKEN] != SOT_ID or encoder[EOT_TOKEN] != EOT_ID:
    raise ValueError(f"unexpected vocabulary layout in {path!r}")
  return encoder, ranks


def clean_text(text: str) -> str:
  """SAM 3's "lower" cleaning: fix mojibake, unescape HTML twice, collapse spaces, lowercase."""
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  text = _WHITESPACE.sub(" ", text).strip()
  return text.lower()


class ClipTokenizer:
  """CLIP BPE tokenizer; `tokenizer(texts, context_length=32)` -> int32 (B, context_length)."""

  def __init__(self, vocab_path: str | os.PathLike | None = None,
               extra_dirs: Iterable[str | os.PathLike] = (), bpe_cache_size: int = 1 << 16):
    self.vocab_path = find_vocab(vocab_path, extra_dirs)
    self.encoder, self.ranks = _load_vocab(self.vocab_path)
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.sot_id = self.encoder[SOT_TOKEN]
    self.eot_id = self.encoder[EOT_TOKEN]
    self.vocab_size = len(self.decoder)
    self._bytes = _byte_to_char()
    self._byte_of = {c: b for b, c in enumerate(self._bytes)}
    self._bpe = functools.lru_cache(maxsize=bpe_cache_size)(self._bpe_uncached)

  def _bpe_uncached(self, word: str) -> tuple[str, ...]:
    """Byte-pair merges of one pre-token (already mapped to byte characters)."""
    if word in (SOT_TOKEN, EOT_TOKEN):
      return (word,)
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    ranks = self.ranks
    while len(parts) > 1:
      best_rank, best = None, None
      for pair in zip(parts, parts[1:]):
        rank = ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best_rank, best = rank, pair
      if best is None:
        break
      merged, i = [], 0
      while i < len(parts):  # merge every occurrence, left to right, non-overlapping
        if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return tuple(parts)

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text` without SOT/EOT or padding."""
    ids = []
    for word in _WORD_PATTERN.findall(clean_text(text)):
      mapped = "".join(self._bytes[b] for b in word.encode("utf-8"))
      ids.extend(self.encoder[piece] for piece in self._bpe(mapped))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; each end-of-word marker becomes a space (strip padding zeros first)."""
    chars = "".join(self.decoder[int(i)] for i in ids)
    data = bytes(self._byte_of[c] for c in chars)
    return data.decode("utf-8", errors="replace").replace("</w>", " ")

  def __call__(self, texts: str | Sequence[str],
               context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """int32 (B, context_length): `[SOT] + bpe + [EOT]`, zero padded, truncated with EOT last."""
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 1:
      raise ValueError(f"context_length must be >= 1, got {context_length}")
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_id] + self.encode(text) + [self.eot_id]
      if len(ids) > context_length:
        ids = ids[:context_length - 1] + [self.eot_id]
      out[row, :len(ids)] = ids
    return out
