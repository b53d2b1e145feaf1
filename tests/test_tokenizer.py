"""ClipTokenizer against sam3's SimpleTokenizer, and the vocabulary lookup rules."""

import os
import shutil
import subprocess
import sys

import numpy as np
import parity  # noqa: F401  (must precede torch/sam3)
import pytest
import sam3_cpu
from sam3.model.tokenizer_ve import SimpleTokenizer

from sam3i_jax import tokenizer as tok

HAND_WRITTEN = [
    "the helmet of the rider on the black horse",
    "what protects the riders' heads",
    "the person who is holding an umbrella but not wearing a hat",
    "segment the object that can be used to cut paper",
    "the second car from the left",
    "a red car", "dog", "visual", "A Dog.", "DOGS!!!", "cat, dog; bird: fish?",
    "it's", "don't", "we're", "they've", "I'm", "we'll", "he'd", "IT'S", "rock 'n' roll",
    "the dog's ball", "the dogs' balls", "o'clock", "'s", "'", "''", "'t'", "Ain't",
    "3 apples", "1234567890", "the 2nd and 3rd items", "3.14159", "1,000,000", "v2.0-beta",
    "A &amp; B", "&lt;div&gt;", "&amp;amp;", "&amp;lt;b&amp;gt;", "&quot;quoted&quot;",
    "&#39;x&#39;",
    "&nbsp;a&nbsp;b", "&unknown;", "Tom &amp Jerry", "&#x1F600;",
    "Ã©tÃ©", "cafÃ©", "donâ€™t", "â€œquotesâ€\x9d", "Ã¼ber", "naÃ¯ve",
    "é", "café au lait", "naïve façade", "Straße", "İstanbul", "ǅemal", "ﬁsh ﬂour", "Ω ≈ ç √ ∫",
    "日本語", "東京タワーの近くの犬", "中文 和 English", "한국어", "Ελληνικά", "русский текст", "עברית",
    "العربية", "हिन्दी", "ไทย",
    "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷 flag", "dog 🐕 and cat 🐈", "❤️", "☃",
    "multiple   spaces", "tabs\tand\ttabs", "new\nline", "\n\n\n", "  leading", "trailing  ",
    "\u00a0nbsp\u00a0", "zero\u200bwidth", "\u3000ideographic space", "\r\nwindows",
    "", " ", "\t", "a", "A", "?", "...", "!!!???", "--", "__init__", "snake_case_name", "CamelCase",
    "e-mail@example.com", "https://example.com/path?q=1&r=2", "C++ and C#", "50% off", "$9.99",
    "#hashtag @mention", "<b>bold</b>", "<start_of_text>", "<end_of_text>", "x<end_of_text>y",
    "<START_OF_TEXT>", "(parenthesised) [bracketed] {braced}", "a/b\\c|d", "~`^*+=",
    "the " * 40, "word " * 31, "word " * 30, "supercalifragilisticexpialidocious" * 5,
    "a" * 100, "ab" * 60, "1" * 50,
    "the helmet of the rider on the black horse that is jumping over "
    "the fence next to the tree on the left side of the picture in the evening light",
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  pools = [
      "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n  ",
      "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "éèêëàâäôöûüçñßøåæœ", "日本語中文字한국어",
      "😀🐕👍🏽❤️🇫", "\u00a0\u200b\u3000\u00ad\x00\x07", "ΑΒΓαβγдж",
  ]
  pieces = ["'s", "'t", "'re", "'ll", "&amp;", "&lt;", "&gt;", "&quot;", "Ã©", "â€™", "the ",
            "horse "]
  out = []
  for _ in range(n):
    length = int(rng.integers(0, 60))
    chars = []
    while len(chars) < length:
      if rng.random() < 0.1:
        chars.append(pieces[int(rng.integers(len(pieces)))])
      else:
        pool = pools[int(rng.choice(len(pools), p=[.3, .1, .1, .15, .1, .07, .05, .05, .03, .05]))]
        chars.append(pool[int(rng.integers(len(pool)))])
    out.append("".join(chars))
  return out


ALL_STRINGS = HAND_WRITTEN + _random_strings(300)


@pytest.fixture(scope="module")
def tokenizers():
  reference = SimpleTokenizer(bpe_path=sam3_cpu.BPE_PATH)
  return tok.ClipTokenizer(vocab_path=sam3_cpu.BPE_PATH), reference


@pytest.mark.parametrize("context_length", [32, 77, 5])
def test_matches_reference(tokenizers, context_length):
  ours, reference = tokenizers
  got = ours(ALL_STRINGS, context_length=context_length)
  want = reference(ALL_STRINGS, context_length=context_length).numpy()
  assert got.dtype == np.int32 and got.shape == (len(ALL_STRINGS), context_length)
  mismatched = [s for s, g, w in zip(ALL_STRINGS, got, want) if not np.array_equal(g, w)]
  assert not mismatched, f"{len(mismatched)} strings differ, e.g. {mismatched[:3]!r}"
  # Every row starts with SOT.
  assert (got[:, 0] == tok.SOT_ID).all()


def test_encode_decode_match_reference(tokenizers):
  ours, reference = tokenizers
  for text in ALL_STRINGS:
    ids = ours.encode(text)
    assert ids == reference.encode(text), text
    assert ours.decode(ids) == reference.decode(ids), text


def test_single_string_truncation_and_padding(tokenizers):
  ours, _ = tokenizers
  short = ours("a red car")
  assert short.shape == (1, 32)
  n = int((short[0] != 0).sum())
  assert short[0, n - 1] == tok.EOT_ID and (short[0, n:] == 0).all()
  long = ours("the horse " * 40)[0]
  assert (long != 0).all() and long[-1] == tok.EOT_ID and long[-2] != tok.EOT_ID


def test_vocab_layout(tokenizers):
  ours, reference = tokenizers
  assert ours.vocab_size == tok.VOCAB_SIZE == reference.vocab_size
  assert ours.encoder == reference.encoder
  assert (ours.sot_id, ours.eot_id) == (reference.sot_token_id, reference.eot_token_id)


def test_env_override_and_order(tmp_path, monkeypatch):
  copy_dir = tmp_path / "ckpt"
  copy_dir.mkdir()
  copy = shutil.copy(sam3_cpu.BPE_PATH, copy_dir / tok.VOCAB_FILENAME)
  monkeypatch.delenv(tok.ENV_VAR, raising=False)
  # No override: a checkpoint directory beats the installed packages.
  assert tok.find_vocab(extra_dirs=[copy_dir]) == str(copy)
  assert tok.find_vocab(extra_dirs=[tmp_path / "missing"]).endswith(tok.VOCAB_FILENAME)
  # The environment variable (a file or a directory) beats extra_dirs.
  other_dir = tmp_path / "env"
  other_dir.mkdir()
  other = shutil.copy(sam3_cpu.BPE_PATH, other_dir / tok.VOCAB_FILENAME)
  monkeypatch.setenv(tok.ENV_VAR, str(other_dir))
  assert tok.find_vocab(extra_dirs=[copy_dir]) == str(other)
  monkeypatch.setenv(tok.ENV_VAR, str(other))
  t = tok.ClipTokenizer(extra_dirs=[copy_dir])
  assert t.vocab_path == str(other)
  assert t("a dog")[0, :4].tolist() == [tok.SOT_ID, 320, 1929, tok.EOT_ID]
  # An explicit path beats the environment.
  assert tok.find_vocab(copy) == str(copy)
  # A broken override fails instead of silently falling back.
  monkeypatch.setenv(tok.ENV_VAR, str(tmp_path / "nowhere.txt.gz"))
  with pytest.raises(tok.VocabNotFoundError, match=tok.ENV_VAR):
    tok.ClipTokenizer()
  with pytest.raises(tok.VocabNotFoundError, match="vocab_path"):
    tok.ClipTokenizer(vocab_path=tmp_path / "nowhere.txt.gz")


def test_missing_vocab_error(monkeypatch, tmp_path):
  monkeypatch.delenv(tok.ENV_VAR, raising=False)
  monkeypatch.setattr(tok, "_package_copy", lambda *a: None)
  with pytest.raises(tok.VocabNotFoundError) as info:
    tok.ClipTokenizer(extra_dirs=[tmp_path])
  message = str(info.value)
  assert tok.ENV_VAR in message and "vocab_path" in message and "open_clip" in message


def test_package_lookup_does_not_import_open_clip(monkeypatch):
  monkeypatch.delenv(tok.ENV_VAR, raising=False)
  path = tok.find_vocab()
  assert os.path.basename(path) == tok.VOCAB_FILENAME and "open_clip" in path
  code = ("import sys; import sam3i_jax.tokenizer as t; t.ClipTokenizer()('a dog'); "
          "bad = [m for m in ('torch', 'open_clip', 'tensorflow', 'scipy') if m in sys.modules]; "
          "assert not bad, bad")
  env = {k: v for k, v in os.environ.items() if k != tok.ENV_VAR}
  subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(
      os.path.dirname(os.path.abspath(__file__))))


def test_md5_mismatch(tmp_path):
  bad = tmp_path / tok.VOCAB_FILENAME
  bad.write_bytes(b"not the CLIP vocabulary")
  with pytest.raises(ValueError, match="md5"):
    tok.ClipTokenizer(vocab_path=bad)
