"""A training run's directory kept trustworthy: one writer at a time, checkpoints verified, metrics repaired.

    with RunLock(out_dir):                       # refuses while another run holds out_dir
      write_digest(checkpoints / "8")            # after each save: sha256 of every file, written atomically
      step, rejected = latest_good_checkpoint(checkpoints)  # newest step whose files match their digest
      records, notes = repair_metrics(out_dir / "metrics.jsonl", step)

A checkpoint step directory counts only once its digest file exists (the digest
is written after the save completes), so a save cut short by a kill, a file
truncated, emptied, deleted or with flipped bytes, all read as a bad checkpoint.
Bad ones are moved to `rejected_checkpoints/` (kept for inspection, out of the
checkpoint manager's sight) and the previous good one is used.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket

LOCK_FILE = "run.lock"
DIGEST_FILE = "sha256.json"
REJECTED_DIR = "rejected_checkpoints"


class RunDirError(ValueError):
  """The run directory cannot be used as asked (held by another run, no intact checkpoint, unreadable metrics)."""


class RunLock:
  """An exclusive `fcntl.flock` on `out_dir/run.lock`, held for the run's life.

  The operating system releases it when the process ends, however it ends, so a
  killed run leaves no stale lock. The file names the holder (pid, host, start
  time) for the message of a run that finds it taken.
  """

  def __init__(self, out_dir: pathlib.Path):
    self.path = pathlib.Path(out_dir) / LOCK_FILE
    self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip()
      os.close(self._fd)
      self._fd = None
      raise RunDirError(f"{out_dir} is in use by another run ({describe_holder(holder)}; lock {self.path}): "
                        f"wait for it to end, or pick another --out-dir") from None
    holder = dict(pid=os.getpid(), host=socket.gethostname(),
                  started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> RunLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def describe_holder(text: str) -> str:
  try:
    holder = json.loads(text)
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
  except (ValueError, KeyError, TypeError):
    return f"holder unknown: lock file reads {text[:200]!r}"


# Checkpoint digests.


def file_digests(step_dir: pathlib.Path) -> dict[str, str]:
  """sha256 of every file under `step_dir` but the digest file, by path relative to it."""
  digests = {}
  for path in sorted(p for p in step_dir.rglob("*") if p.is_file() or p.is_symlink()):
    rel = path.relative_to(step_dir).as_posix()
    if rel in (DIGEST_FILE, DIGEST_FILE + ".tmp"):
      continue
    sha = hashlib.sha256()
    with path.open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        sha.update(block)
    digests[rel] = sha.hexdigest()
  return digests


def write_digest(step_dir: pathlib.Path) -> None:
  """Writes `step_dir/sha256.json` atomically (temporary file, fsync, rename): the mark of a complete checkpoint."""
  step_dir = pathlib.Path(step_dir)
  tmp = step_dir / (DIGEST_FILE + ".tmp")
  with tmp.open("w") as f:
    json.dump(dict(files=file_digests(step_dir)), f, indent=0)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, step_dir / DIGEST_FILE)
  fsync_dir(step_dir)


def check_checkpoint(step_dir: pathlib.Path) -> str | None:
  """None if every file of `step_dir` matches its digest; else what is wrong, naming the file."""
  step_dir = pathlib.Path(step_dir)
  try:
    want = json.loads((step_dir / DIGEST_FILE).read_text())["files"]
  except FileNotFoundError:
    return f"no {DIGEST_FILE} (the save did not complete)"
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
    return f"unreadable {DIGEST_FILE} ({err})"
  have = file_digests(step_dir)
  for rel in sorted(want.keys() | have.keys()):
    if rel not in have:
      return f"file {rel} is missing"
    if rel not in want:
      return f"file {rel} is not in its digest"
    if have[rel] != want[rel]:
      return f"file {rel} does not match its sha256 (changed, truncated or emptied)"
  return None


def checkpoint_steps(checkpoint_dir: pathlib.Path) -> list[int]:
  """The steps of the step directories under `checkpoint_dir` (named by the step), in increasing order."""
  if not checkpoint_dir.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_good_checkpoint(checkpoint_dir: pathlib.Path
                           ) -> tuple[int | None, list[tuple[int, str, pathlib.Path | None]]]:
  """The newest step whose checkpoint is intact, and the newer ones found bad: (step, reason, where it was moved).

  When a good one is found, the bad ones newer than it move to `../rejected_checkpoints/STEP-N`, so that the
  resumed run can save those steps again; when none is good, nothing moves (their where is None).
  """
  checkpoint_dir = pathlib.Path(checkpoint_dir)
  bad = []
  for step in reversed(checkpoint_steps(checkpoint_dir)):
    reason = check_checkpoint(checkpoint_dir / str(step))
    if reason is None:
      return step, [(s, why, set_aside(checkpoint_dir / str(s))) for s, why in bad]
    bad.append((step, reason))
  return None, [(s, why, None) for s, why in bad]


def set_aside(step_dir: pathlib.Path) -> pathlib.Path:
  """Moves a bad step directory to `rejected_checkpoints/` beside the checkpoints; returns its new path."""
  target_dir = step_dir.parent.parent / REJECTED_DIR
  target_dir.mkdir(exist_ok=True)
  for n in range(1, 10_000):
    target = target_dir / f"{step_dir.name}-{n}"
    if not target.exists():
      break
  else:
    raise RunDirError(f"{target_dir} is full: remove old rejected checkpoints")
  shutil.move(step_dir, target)
  return target


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `path` through a temporary file and a rename: a kill leaves the old file or the new one, never half."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


# metrics.jsonl.


def repair_metrics(path: pathlib.Path, step: int) -> tuple[list[dict], list[str]]:
  """The records of `path` up to `step` (without `stop` lines), rewritten atomically, and notes on what changed.

  A missing file starts empty; a partial last line (a run killed while writing it) is dropped; lines logged
  after `step` (after the checkpoint the run resumes from) are dropped so that the resumed run logs them once.
  A malformed line elsewhere raises RunDirError naming it.
  """
  path = pathlib.Path(path)
  notes = []
  if not path.is_file():
    notes.append(f"{path} is missing: starting it again at step {step} (the lines before it are lost)")
    raw = b""
  else:
    raw = path.read_bytes()
  lines = raw.split(b"\n")
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError:
      if number == len(lines):  # the last line, without its newline: cut short by a kill
        notes.append(f"{path}: dropped a partial last line ({len(line)} bytes; the run was killed while writing it)")
        continue
      raise RunDirError(f"{path}, line {number}: not JSON ({line[:80]!r}); fix or remove that line") from None
  kept = [r for r in records if r.get("step", 0) <= step and r.get("kind") != "stop"]
  later = [r for r in records if r.get("step", 0) > step]
  if later:
    notes.append(f"{path}: dropped {len(later)} lines after step {step} (logged after the checkpoint; "
                 f"the resumed run logs those steps again)")
  if notes or len(kept) != len(records):
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
  return kept, notes
