"""Training data for the LM experiments: byte-level corpora and synthetic associative recall.

Corpora (`load_corpus(spec)`), tokenised as UTF-8 bytes (vocabulary 256; for
ASCII text a byte is a character, so bits per byte = bits per character):

- `"stdlib"`: the running Python's standard-library source (`*.py` under
  `sysconfig`'s stdlib path, site-packages excluded), read in sorted path
  order. Real text on every machine, no download. A file is held out for
  evaluation when the CRC-32 of its relative path is 0 mod 20 (about 5%), so
  both splits are fixed by the Python version alone.
- a path: any UTF-8 text file; the last 5% of its bytes are held out.
- a name in `CORPORA` (`enwik8`, `tiny-shakespeare`): downloaded once into the
  cache directory, checked against its published checksum, and split as
  usually published (enwik8: 90M / 5M / 5M bytes; tiny-shakespeare: 90% / 10%).

Batches are pure functions of `(seed, step)`, so a resumed run sees the same
data as an uninterrupted one.

MQAR (`mqar_batch`): multi-query associative recall, Zoology protocol (Arora
et al. 2023): key-value pairs, then the keys queried again in power-law
distributed slots; the model must produce each key's value.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import pathlib
import sysconfig
import urllib.error
import urllib.request
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

EVAL_FRACTION = 0.05
IGNORE = -100  # label of positions without a target
FILLER = 0  # MQAR token between the queries
MQAR_EVAL_SEED_OFFSET = 1_000_003  # held-out MQAR sequences come from data seed `seed + MQAR_EVAL_SEED_OFFSET`


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A byte corpus split in two; `train` and `eval` are uint8 arrays."""

  name: str
  train: np.ndarray
  eval: np.ndarray
  description: str


@dataclasses.dataclass(frozen=True)
class NamedCorpus:
  url: str
  member: str | None  # file inside a zip archive, None for a plain file
  sha256: str  # of the text itself (the member, for an archive)
  size: int
  split: tuple[int, int]  # [0, split[0]) train, [split[0], split[1]) held out
  description: str


CORPORA = {
    "enwik8": NamedCorpus(
        url="http://mattmahoney.net/dc/enwik8.zip", member="enwik8",
        sha256="2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8", size=100_000_000,
        split=(90_000_000, 95_000_000), description="enwik8: first 10^8 bytes of an English Wikipedia XML dump"),
    "tiny-shakespeare": NamedCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt", member=None,
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", size=1_115_394,
        split=(1_003_854, 1_115_394), description="tiny-shakespeare: 40k lines of Shakespeare's plays"),
}


def default_cache_dir() -> pathlib.Path:
  """`$EFFICIENT_ATTENTION_DATA`, else `~/.cache/efficient_attention`."""
  return pathlib.Path(os.environ.get("EFFICIENT_ATTENTION_DATA", pathlib.Path.home() / ".cache/efficient_attention"))


def load_corpus(spec: str, *, cache_dir: str | os.PathLike | None = None) -> Corpus:
  """The corpus named by `spec`: "stdlib", a name in `CORPORA`, or a path to a UTF-8 text file.

  Raises:
    FileNotFoundError: a path that does not exist (and is no corpus name).
    ValueError: an empty, binary or non-UTF-8 file; a download that fails its checksum.
    ConnectionError: a named corpus that is not cached and cannot be downloaded.
  """
  if spec == "stdlib":
    return stdlib_corpus()
  if spec in CORPORA:
    return named_corpus(spec, pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir())
  return file_corpus(spec)


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> Corpus:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  train, held_out, files = [], [], 0
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root).as_posix()
    if "site-packages" in rel or "dist-packages" in rel:
      continue
    data = path.read_bytes()
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:  # a handful of encoding test fixtures
      continue
    (held_out if zlib.crc32(rel.encode()) % 20 == 0 else train).append(data)
    files += 1
  if not train or not held_out:
    raise ValueError(f"found no Python source under the standard library path {root}")
  as_array = lambda parts: np.frombuffer(b"\n".join(parts), np.uint8)
  return Corpus("stdlib", as_array(train), as_array(held_out),
                f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library: {files} files "
                f"under {root}")


def file_corpus(path: str | os.PathLike) -> Corpus:
  path = pathlib.Path(path)
  if not path.is_file():
    names = ", ".join(["stdlib", *CORPORA])
    raise FileNotFoundError(f"--data {str(path)!r}: no such file (and not a corpus name: {names})")
  data = path.read_bytes()
  check_text(data, str(path))
  cut = len(data) - max(1, int(len(data) * EVAL_FRACTION))
  array = np.frombuffer(data, np.uint8)
  return Corpus(path.name, array[:cut], array[cut:], f"{path} ({len(data):,} bytes, last 5% held out)")


def check_text(data: bytes, name: str) -> None:
  """Raises ValueError unless `data` is non-empty UTF-8 text without NUL bytes."""
  if not data:
    raise ValueError(f"{name}: the file is empty")
  if b"\0" in data[:1 << 20]:
    raise ValueError(f"{name}: a NUL byte at offset {data.index(0)}: binary data, not text")
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def named_corpus(name: str, cache_dir: pathlib.Path) -> Corpus:
  spec = CORPORA[name]
  path = cache_dir / f"{name}.txt"
  if not path.is_file() or _sha256(path.read_bytes()) != spec.sha256:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _download(name, spec)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)
  array = np.fromfile(path, np.uint8)
  return Corpus(name, array[:spec.split[0]], array[spec.split[0]:spec.split[1]], f"{spec.description} ({path})")


def _download(name: str, spec: NamedCorpus) -> bytes:
  try:
    with urllib.request.urlopen(spec.url, timeout=60) as response:
      raw = response.read()
  except (urllib.error.URLError, OSError) as e:
    raise ConnectionError(f"--data {name}: not cached and the download from {spec.url} failed ({e}); "
                          f"without a network use --data stdlib or --data PATH") from None
  data = zipfile.ZipFile(io.BytesIO(raw)).read(spec.member) if spec.member else raw
  digest = _sha256(data)
  if digest != spec.sha256 or len(data) != spec.size:
    raise ValueError(f"--data {name}: downloaded {len(data):,} bytes with sha256 {digest}; expected "
                     f"{spec.size:,} bytes with sha256 {spec.sha256}")
  return data


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def lm_batch(tokens: np.ndarray, seed: int, step: int, *, batch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """`batch` random windows of `tokens`, a pure function of `(seed, step)`.

  Returns int32 `inputs [batch, seq_len]` and `labels [batch, seq_len]` (the next bytes).
  """
  check_length(tokens, seq_len)
  starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=batch)
  windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
  return windows[:, :-1], windows[:, 1:]


def eval_batches(tokens: np.ndarray, *, num_batches: int, batch: int, seq_len: int
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """`num_batches` batches of windows at evenly spaced offsets across the held-out split."""
  check_length(tokens, seq_len)
  starts = np.linspace(0, len(tokens) - seq_len - 1, num_batches * batch).astype(np.int64)
  windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32).reshape(num_batches, batch, -1)
  return [(w[:, :-1], w[:, 1:]) for w in windows]


def check_length(tokens: np.ndarray, seq_len: int) -> None:
  if len(tokens) < seq_len + 2:
    raise ValueError(f"a split of {len(tokens)} bytes is too short for windows of seq_len + 1 = {seq_len + 1} bytes")


def check_mqar(*, seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
  """Raises ValueError when these sizes cannot hold an MQAR sequence."""
  if num_kv_pairs < 1 or seq_len + 1 < 4 * num_kv_pairs:
    raise ValueError(f"MQAR needs num_kv_pairs >= 1 and seq_len + 1 >= 4 * num_kv_pairs (the context, then a "
                     f"query slot per key), got {seq_len=}, {num_kv_pairs=}")
  if vocab_size // 2 - 1 < num_kv_pairs:
    raise ValueError(f"MQAR draws distinct keys from [1, vocab_size // 2): need vocab_size // 2 - 1 >= "
                     f"num_kv_pairs, got {vocab_size=}, {num_kv_pairs=}")


def mqar_batch(seed: int, step: int, *, batch: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
               power_a: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """One batch of MQAR sequences, a pure function of `(seed, step)` and the sizes.

  Returns:
    inputs: int32 `[batch, seq_len]`: `k1 v1 ... kn vn`, then the n keys again at
      power-law-drawn query slots, each followed by its value, filler 0 elsewhere.
      Keys lie in `[1, vocab_size // 2)`, values in `[vocab_size // 2, vocab_size)`.
    labels: int32 `[batch, seq_len]`: at each query position (where a key
      re-appears) the value paired with that key; -100 everywhere else.
  """
  check_mqar(seq_len=seq_len, num_kv_pairs=num_kv_pairs, vocab_size=vocab_size)
  if not power_a > 0:
    raise ValueError(f"power_a must be positive, got {power_a=}")
  key = jax.random.fold_in(jax.random.key(seed), step)
  return _mqar_batch(key, batch=batch, seq_len=seq_len, num_kv_pairs=num_kv_pairs, vocab_size=vocab_size,
                     power_a=power_a)


@functools.partial(jax.jit, static_argnames=("batch", "seq_len", "num_kv_pairs", "vocab_size", "power_a"))
def _mqar_batch(key, *, batch, seq_len, num_kv_pairs, vocab_size, power_a):
  n, half = num_kv_pairs, vocab_size // 2
  context = 2 * n
  # Query slots: position pairs (key, value) after the context, in a sequence of T + 1 tokens.
  space = (seq_len + 1 - context) // 2
  gap = np.arange(1, space + 1, dtype=np.float64)
  log_p = jnp.asarray((power_a - 1) * np.log(gap), jnp.float32)  # unnormalised log p(gap) of Zoology's power law

  def draw(key, log_weights, size):
    """`size` distinct indices drawn without replacement with probabilities ∝ exp(log_weights) (Gumbel top-k)."""
    return jax.lax.top_k(log_weights + jax.random.gumbel(key, log_weights.shape), size)[1]

  def one(key):
    key_k, key_v, key_q = jax.random.split(key, 3)
    keys = 1 + draw(key_k, jnp.zeros(half - 1), n)
    values = half + draw(key_v, jnp.zeros(vocab_size - half), n)
    slots = draw(key_q, log_p, n)  # key i is queried in slot slots[i]
    where = context + 2 * slots
    seq = jnp.full((seq_len + 1,), FILLER, jnp.int32)
    seq = seq.at[:context].set(jnp.stack([keys, values], axis=-1).reshape(-1))
    seq = seq.at[where].set(keys).at[where + 1].set(values)
    labels = jnp.full((seq_len + 1,), IGNORE, jnp.int32).at[where + 1].set(values)
    # Next-token form: the target at input position t is token t + 1.
    return seq[:-1], labels[1:]

  return jax.vmap(one)(jax.random.split(key, batch))
