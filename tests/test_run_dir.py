"""A run directory of train_lm.py is not trusted blindly: verified checkpoints, repaired metrics, a lock, kills.

Each resumed run is compared with one uninterrupted run of the same settings: every logged loss must be equal.
"""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.util import load_experiment

_ROOT = pathlib.Path(__file__).resolve().parents[1]
train_lm = load_experiment("train_lm")
run_dir = load_experiment("run_dir")

# Six steps, a checkpoint every two (the manager keeps two), dropout so that the restored RNG state matters.
ARGS = ("--preset", "smoke", "--no-progress", "--steps", "6", "--log-every", "1", "--eval-every", "3",
        "--checkpoint-every", "2", "--dropout", "0.1", "--sample-tokens", "0")


def _train(out, *args) -> dict:
  return train_lm.main([*ARGS, "--out-dir", str(out), *args])


def _losses(out: pathlib.Path) -> list[tuple]:
  """(kind, step, loss) of every train and eval line, in order."""
  return [(r["kind"], r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
          if r["kind"] in ("train", "eval")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted run (`whole`) and one stopped after 5 steps (`stopped`: checkpoints 4 and 5)."""
  root = tmp_path_factory.mktemp("runs")
  _train(root / "whole")
  _train(root / "stopped", "--stop-after", "5")
  assert run_dir.checkpoint_steps(root / "stopped" / "checkpoints") == [4, 5]
  return root


@pytest.fixture
def stopped(runs, tmp_path):
  shutil.copytree(runs / "stopped", tmp_path / "run")
  return tmp_path / "run"


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest file of a checkpoint: array data."""
  return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("flags, message", [
    (("--implementation", "cuda"), "--implementation 'cuda': valid implementations are auto, xla, pallas, cudnn"),
    (("--stride", "0"), "--stride must be >= 1, got 0"),
    (("--seed", "-1"), "--seed must be >= 0, got -1"),
    (("--mesh", "data=1,data=2"), "--mesh 'data=1,data=2': axis 'data' is given twice"),
    (("--out-dir", "{file}"), "--out-dir '{file}': '{file}' is an existing file, not a directory"),
    (("--out-dir", "{file}/run"), "--out-dir '{file}/run': '{file}' is an existing file, not a directory"),
], ids=["implementation", "stride", "seed", "mesh", "out-dir-file", "out-dir-under-file"])
def test_bad_flags_stop_at_parsing(tmp_path, monkeypatch, capsys, flags, message):
  file = tmp_path / "a_file"
  file.write_text("x")
  monkeypatch.setattr(train_lm, "Run", None)  # never reached: no data read, no model built
  with pytest.raises(SystemExit) as exit_info:
    train_lm.main([*ARGS, "--out-dir", str(tmp_path / "out"), *(f.format(file=file) for f in flags)])
  assert exit_info.value.code == 2 and message.format(file=file) in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_every_kind_of_damage_is_named(stopped):
  checkpoints = stopped / "checkpoints"
  assert run_dir.check_checkpoint(checkpoints / "5") is None and run_dir.check_checkpoint(checkpoints / "4") is None
  cases = {
      "flipped": lambda p: _flip(p),
      "truncated": lambda p: p.write_bytes(p.read_bytes()[:-7]),
      "emptied": lambda p: p.write_bytes(b""),
      "deleted": lambda p: p.unlink(),
  }
  for name, damage in cases.items():
    step_dir = stopped / name
    shutil.copytree(checkpoints / "5", step_dir)
    victim = _data_file(step_dir)
    damage(victim)
    reason = run_dir.check_checkpoint(step_dir)
    assert reason is not None and victim.relative_to(step_dir).as_posix() in reason, (name, reason)
    assert ("missing" if name == "deleted" else "does not match") in reason
  shutil.copytree(checkpoints / "5", stopped / "extra")
  (stopped / "extra" / "default" / "stray").write_bytes(b"x")
  assert "default/stray is not in its digest" in run_dir.check_checkpoint(stopped / "extra")
  (checkpoints / "5" / run_dir.DIGEST_FILE).unlink()
  assert "did not complete" in run_dir.check_checkpoint(checkpoints / "5")


def test_flipped_bytes_fall_back_to_the_previous_checkpoint(runs, stopped, capsys):
  victim = _data_file(stopped / "checkpoints" / "5")
  _flip(victim)
  _train(stopped, "--resume")
  err = capsys.readouterr().err
  assert f"checkpoint step 5 is bad (file {victim.relative_to(stopped / 'checkpoints' / '5').as_posix()}" in err
  assert "resuming from step 4" in err and "dropped 1 lines after step 4" in err
  assert (stopped / "rejected_checkpoints" / "5-1").is_dir()
  assert _losses(stopped) == _losses(runs / "whole")  # exact: the losses of the uninterrupted run
  assert run_dir.checkpoint_steps(stopped / "checkpoints") == [4, 6]


def test_no_intact_checkpoint_stops_naming_each(stopped):
  _data_file(stopped / "checkpoints" / "5").write_bytes(b"")
  (stopped / "checkpoints" / "4" / run_dir.DIGEST_FILE).unlink()
  with pytest.raises(SystemExit, match=r"no intact checkpoint.*step 5: file .* does not match.*step 4: no sha256"):
    _train(stopped, "--resume")
  assert run_dir.checkpoint_steps(stopped / "checkpoints") == [4, 5]  # nothing moved when nothing is good


def test_partial_last_line_and_later_lines_of_metrics_are_repaired(runs, stopped, capsys):
  # A killed run logged step 6 after its last checkpoint (5), and was cut short in the middle of another line.
  whole = (runs / "whole" / "metrics.jsonl").read_text().splitlines()
  with (stopped / "metrics.jsonl").open("a") as f:
    f.write(next(line for line in whole if json.loads(line)["step"] == 6) + "\n" + '{"kind": "train", "st')
  _train(stopped, "--resume")
  err = capsys.readouterr().err
  assert "dropped a partial last line" in err and "dropped 1 lines after step 5" in err
  assert _losses(stopped) == _losses(runs / "whole")


def test_deleted_metrics_restart_at_the_checkpoint(runs, stopped, capsys):
  (stopped / "metrics.jsonl").unlink()
  _train(stopped, "--resume")
  assert "metrics.jsonl is missing: starting it again at step 5" in capsys.readouterr().err
  assert _losses(stopped) == [x for x in _losses(runs / "whole") if x[1] > 5]


def test_deleted_config_is_named(stopped):
  (stopped / "config.json").unlink()
  with pytest.raises(SystemExit, match=r"config\.json is missing"):
    _train(stopped, "--resume")


def test_resuming_a_finished_run_logs_nothing_again(runs, tmp_path, capsys):
  shutil.copytree(runs / "whole", tmp_path / "run")
  before = (tmp_path / "run" / "metrics.jsonl").read_text()
  summary = _train(tmp_path / "run", "--resume")
  assert "finished all 6 steps already" in capsys.readouterr().err
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # no second final eval line
  saved = json.loads((runs / "whole" / "summary.json").read_text())
  assert summary["finished"] and summary["eval"] == saved["eval"] and summary["final_train_loss"] == \
      saved["final_train_loss"]


def test_a_second_run_on_a_locked_directory_refuses_naming_the_holder(tmp_path):
  (tmp_path / "run").mkdir()
  with run_dir.RunLock(tmp_path / "run"):
    for resume in ((), ("--resume",)):
      with pytest.raises(SystemExit, match=rf"in use by another run \(pid {os.getpid()} on .*, started 20"):
        _train(tmp_path / "run", *resume)
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  code = ("import sys, time; from experiments import run_dir; lock = run_dir.RunLock(sys.argv[1]); "
          "print('locked', flush=True); time.sleep(60)")
  holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(_ROOT)))
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(run_dir.RunDirError, match=f"pid {holder.pid}"):
    run_dir.RunLock(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  run_dir.RunLock(tmp_path).release()  # free again


def _spawn(out: pathlib.Path, *args, env=None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(_ROOT / "experiments/train_lm.py"), *ARGS, "--out-dir", str(out), *args],
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(_ROOT), **(env or {})))


@pytest.mark.slow  # 16 s on 2 cores
def test_a_kill_inside_a_save_resumes_from_the_previous_checkpoint(runs, tmp_path, capsys):
  out = tmp_path / "run"
  proc = _spawn(out, env={train_lm.SAVE_PAUSE_ENV: "4:60"})
  for line in proc.stderr:  # the save of step 4 has written its files, not yet its digest
    if "pausing 60 s in the save of checkpoint step 4" in line:
      break
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert run_dir.check_checkpoint(out / "checkpoints" / "4") == f"no {run_dir.DIGEST_FILE} (the save did not complete)"
  (out / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # a save cut short earlier: its temporary directory
  _train(out, "--resume")
  assert "checkpoint step 4 is bad (no sha256.json" in capsys.readouterr().err
  assert _losses(out) == _losses(runs / "whole")
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "6"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_random_kills_and_resumes_repeat_the_uninterrupted_losses(tmp_path, seed):
  # A checkpoint every step, so that many kills land inside a save. A kill comes either at a random time of the
  # start (imports, compilation, restore, metrics repair), or at a random delay after a random number of new
  # steps were logged.
  steps = 24
  args = ("--steps", str(steps), "--checkpoint-every", "1", "--eval-every", "8")
  whole, out = tmp_path / "whole", tmp_path / "run"
  _train(whole, *args)
  rng = random.Random(seed)
  kills = resumes = restarts = 0
  for _ in range(100):
    good = [s for s in run_dir.checkpoint_steps(out / "checkpoints")
            if run_dir.check_checkpoint(out / "checkpoints" / str(s)) is None]
    if out.exists() and not good:  # killed before its first checkpoint: start again
      shutil.rmtree(out)
      restarts += 1
    resume = out.exists()
    resumes += resume
    before = _records(out)
    started = time.monotonic()
    proc = _spawn(out, *args, *(("--resume",) if resume else ()))
    if rng.random() < 0.2:
      wait = lambda deadline=rng.uniform(0.0, 4.0): time.monotonic() - started < deadline
    else:
      target = min(max(good, default=0) + rng.randint(1, 6), steps)
      wait = lambda: max(_new_steps(out, before), default=0) < target
    while proc.poll() is None and wait():
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    if proc.poll() is not None:
      assert proc.returncode == 0, proc.stderr.read()
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills += 1
  else:
    raise AssertionError(f"not finished after {kills} kills")
  print(f"seed {seed}: {kills} kills, {resumes} resumes, {restarts} restarts, "
        f"{len(list((out / 'rejected_checkpoints').glob('*')))} checkpoints rejected")
  assert kills >= 1
  assert _losses(out) == _losses(whole)


def _records(out: pathlib.Path) -> list[dict]:
  """The complete lines of metrics.jsonl (none while it is missing or being replaced)."""
  try:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
  except (FileNotFoundError, ValueError):
    return []


def _new_steps(out: pathlib.Path, before: list[dict]) -> list[int]:
  """The steps of the train lines a process logged since `before` was read: after its own resume line, if it
  resumes (lines logged after a checkpoint by the killed process stay until the new one drops them)."""
  records = _records(out)
  resumes = [i for i, r in enumerate(records) if r["kind"] == "resume"]
  own = sum(r["kind"] == "resume" for r in before)
  if before and len(resumes) <= own:
    return []
  start = resumes[own] + 1 if before else 0
  return [r["step"] for r in records[start:] if r["kind"] == "train"]
