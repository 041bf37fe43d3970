"""The fault matrix: every way a run was found to break, injected into a checkout, measured.

    python experiments/fault_matrix.py --out=/tmp/after.jsonl
    git archive OLD_COMMIT | tar -x -C /tmp/old && \\
        python experiments/fault_matrix.py --repo=/tmp/old --out=/tmp/before.jsonl

Each fault runs ``run.py`` (or the workdir lock) of the checkout ``--repo``
on ``tests/configs/tiny.py`` in a scratch directory, from the outside: only
command lines, exit codes, stderr and the files a run leaves are read, so
the same script measures an old checkout (the "before" column) and this one.
One JSON line per fault goes to ``--out``; the last lines print a table.

Faults (DESIGN.md §11): the lock race (two processes, stale lock files);
stale lock files of a reused pid or another host; rows and TensorBoard
scalars lost or repeated across random SIGKILL/resume cycles; a restart
from scratch duplicating rows; an unreadable (chmod 000) newest checkpoint;
a non-finite streak and the advised rerun with a lower learning rate; a
structural change with config.json missing; a seed change on resume; a
flipped byte in checkpoint data; bad inputs (config values, config files,
workdirs, a batch that cannot fit); asyncio noise after a failed restore and
a failed save; exit codes of SIGTERM and SIGINT.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

from absl import app
from absl import flags

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RACER = textwrap.dedent("""
    import json, os, sys, time
    from latentdiv import workdir
    root, rounds, core, period = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 0.06
    # One core each (where there are two) and, where allowed, priority over other
    # load: the race needs both running at the same instant.
    os.sched_setaffinity(0, {core})
    try:
      os.nice(-20)
    except OSError:
      pass
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    held, errors = [], []
    for i in range(rounds):
      while time.time() < start + i * period:
        pass
      try:
        with workdir.lock(os.path.join(root, str(i))):
          t0 = time.time(); time.sleep(0.02); held.append((i, t0, time.time()))
      except workdir.WorkdirBusyError:
        pass
      except Exception as err:
        errors.append(f"{i}: {type(err).__name__}: {err}")
    print(json.dumps(dict(held=held, errors=errors)))
""")


def race_for_stale_locks(root: str, rounds: int, python_path: str) -> dict:
  """Two processes take the stale lock of each of ``rounds`` workdirs at the same instant.

  Each workdir holds a lock file left by a dead process. Returns the rounds
  where both held the lock at overlapping times (``overlaps``), the rounds
  someone held it (``won``) and the errors raised.
  """
  dead = subprocess.Popen(["true"])
  dead.wait()
  for i in range(rounds):
    os.makedirs(os.path.join(root, str(i)))
    with open(os.path.join(root, str(i), ".lock"), "w") as f:
      json.dump(dict(pid=dead.pid, host=socket.gethostname()), f)
  env = dict(os.environ, PYTHONPATH=python_path)
  cores = sorted(os.sched_getaffinity(0))
  procs = [subprocess.Popen([sys.executable, "-c", _RACER, root, str(rounds),
                             str(cores[i % len(cores)])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=root)
           for i in range(2)]
  for proc in procs:  # Both have imported latentdiv: start together.
    assert proc.stdout.readline().strip() == "ready"
  start = time.time() + 0.2
  for proc in procs:
    proc.stdin.write(f"{start}\n")
    proc.stdin.flush()
  outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
  held = {}
  for out in outs:
    for i, t0, t1 in out["held"]:
      held.setdefault(i, []).append((t0, t1))
  overlaps = sum(1 for spans in held.values() if len(spans) == 2
                 and max(s[0] for s in spans) < min(s[1] for s in spans))
  return dict(overlaps=overlaps, won=len(held), errors=outs[0]["errors"] + outs[1]["errors"])


# ---------------------------------------------------------------------------
# Running a checkout's run.py.


class Checkout:
  """``run.py`` of ``repo`` in scratch directories, with a shared compilation cache."""

  def __init__(self, repo: str, scratch: str, races: int = 100, cycles: int = 10,
               seed: int = 0):
    self.repo, self.scratch = os.path.abspath(repo), scratch
    self.races, self.cycles, self.seed = races, cycles, seed
    self.tiny = os.path.join(self.repo, "tests", "configs", "tiny.py")
    self.env = dict(os.environ, PYTHONPATH=self.repo, PYTHONUNBUFFERED="1",
                    JAX_COMPILATION_CACHE_DIR=os.path.join(scratch, "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def workdir(self, name: str) -> str:
    return tempfile.mkdtemp(prefix=name + "_", dir=self.scratch)

  def command(self, args, config=None):
    return [sys.executable, os.path.join(self.repo, "run.py"),
            f"--config={config or self.tiny}", *args]

  def run(self, args, config=None, timeout=900, wrap=None) -> dict:
    """Runs to the end: ``{rc, out, err, seconds}``."""
    command = self.command(args, config)
    if wrap:
      command = wrap + ["exec " + shlex.join(command)]
    start = time.time()
    try:
      proc = subprocess.run(command, capture_output=True, text=True, env=self.env,
                            cwd=self.scratch, timeout=timeout)
    except subprocess.TimeoutExpired as err:  # Accepted and still running: killed.
      return dict(rc=None, out=err.stdout or "", err=err.stderr or "",
                  seconds=round(time.time() - start, 1), timed_out=True)
    return dict(rc=proc.returncode, out=proc.stdout, err=proc.stderr,
                seconds=round(time.time() - start, 1))

  def start(self, args, log: str):
    out = open(log, "w")
    return subprocess.Popen(self.command(args), stdout=out, stderr=subprocess.STDOUT,
                            env=self.env, cwd=self.scratch), out


def _steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _rows(workdir):
  rows = []
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          pass
  except FileNotFoundError:
    pass
  return rows


def _tensorboard_steps(workdir, tag):
  """Steps of ``tag`` as TensorBoard shows them (its own loader), or the raw events."""
  try:
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  except ImportError:
    event_accumulator = None
  if event_accumulator is not None:
    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  import struct  # pylint: disable=import-outside-toplevel
  steps = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    data, offset = open(path, "rb").read(), 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      if offset + 16 + length > len(data):
        break
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      steps += [event.step for v in event.summary.value if v.tag == tag]
      offset += 16 + length
  return steps


def _lost_and_repeated(found, expected):
  return dict(lost=len(set(expected) - set(found)),
              repeated=len(found) - len(set(found)), extra=len(set(found) - set(expected)))


def _one_line(result) -> dict:
  err = result["err"] if isinstance(result["err"], str) else result["err"].decode()
  out = result["out"] if isinstance(result["out"], str) else result["out"].decode()
  result = dict(result, err=err, out=out)
  lines = [line for line in result["err"].splitlines() if line.strip()]
  return dict(rc=result["rc"], stderr_lines=len(lines), timed_out=result.get("timed_out", False),
              traceback="Traceback" in result["err"] + result["out"],
              first=lines[0][:160] if lines else "")


def _flip_one_byte(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    data = f.read()
    f.seek(len(data) // 2)
    f.write(bytes([data[len(data) // 2] ^ 0x01]))


_DROP_CAPS = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c"]


def _unprivileged():
  """A wrapper that runs a command without the capabilities that ignore file modes."""
  if os.geteuid() != 0:
    return None
  return _DROP_CAPS if shutil.which("capsh") else False


# ---------------------------------------------------------------------------
# The faults.


def lock_race(co: Checkout) -> dict:
  return race_for_stale_locks(co.workdir("race"), co.races, co.repo)


def stale_lock(co: Checkout) -> dict:
  taken = {}
  for name, owner in (("pid_1_same_host", dict(pid=1, host=socket.gethostname())),
                      ("another_host", dict(pid=1, host="another-host.invalid"))):
    workdir = co.workdir("stale")
    with open(os.path.join(workdir, ".lock"), "w") as f:
      json.dump(owner, f)
    proc = subprocess.run([sys.executable, "-c", "import sys\nfrom latentdiv import workdir\n"
                           "with workdir.lock(sys.argv[1]):\n  print('taken')", workdir],
                          capture_output=True, text=True, env=co.env, cwd=co.scratch)
    taken[name] = "taken" in proc.stdout
  return dict(taken_over=sum(taken.values()), of=len(taken), **taken)


def kill_cycles(co: Checkout) -> dict:
  """Random SIGKILLs (half the instant a new checkpoint appears), resumes, then the finish."""
  rng = random.Random(co.seed)
  workdir = co.workdir("cycles")
  num_steps, log_every = 400, 5
  args = [f"--workdir={workdir}", f"--config.train.num_steps={num_steps}",
          f"--config.train.log_every={log_every}", "--config.train.checkpoint_every=3"]
  kills = []
  for cycle in range(co.cycles):
    before = _steps(workdir)
    proc, out = co.start(args, os.path.join(co.scratch, f"cycle{cycle}.log"))
    at_checkpoint = cycle % 2 == 0
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
      now = _steps(workdir)
      if now and now != before and (not before or now[-1] > before[-1]):
        if not at_checkpoint:
          time.sleep(rng.uniform(0.0, 1.0))
        break
      time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out.close()
    kills.append(dict(at_checkpoint=at_checkpoint, newest=(_steps(workdir) or [0])[-1]))
  final = co.run(args)
  expected = list(range(log_every, num_steps + 1, log_every))
  rows = [r["step"] for r in _rows(workdir) if r["kind"] == "train"]
  return dict(cycles=len(kills), final_rc=final["rc"], kills=kills,
              rows=_lost_and_repeated(rows, expected),
              tensorboard=_lost_and_repeated(_tensorboard_steps(workdir, "train/loss"),
                                             expected))


def fresh_restart(co: Checkout) -> dict:
  workdir = co.workdir("fresh")
  args = [f"--workdir={workdir}", "--config.train.num_steps=10"]
  co.run(args)
  shutil.rmtree(os.path.join(workdir, "checkpoints"))  # Every checkpoint gone: from step 0.
  result = co.run(args)
  rows = [(r["kind"], r["step"]) for r in _rows(workdir)]
  return dict(rc=result["rc"], rows=len(rows), repeated=len(rows) - len(set(rows)))


def unreadable_checkpoint(co: Checkout) -> dict:
  wrap = _unprivileged()
  if wrap is False:
    return dict(skipped="root without capsh: chmod cannot deny access")
  workdir = co.workdir("chmod")
  os.chmod(workdir, 0o777)
  args = [f"--workdir={workdir}", "--config.train.num_steps=10"]
  co.run(args)
  os.chmod(os.path.join(workdir, "checkpoints", "10"), 0)
  result = co.run(args, wrap=wrap)
  for path in glob.glob(os.path.join(workdir, "checkpoints*", "*")):
    os.chmod(path, 0o755)
  resumed = [line for line in result["out"].splitlines() if line.startswith("Resuming")]
  return dict(**_one_line(result), resumed=resumed[0] if resumed else None)


def nonfinite_recovery(co: Checkout) -> dict:
  workdir = co.workdir("nonfinite")
  base = [f"--workdir={workdir}", "--config.train.num_steps=16",
          "--config.train.max_nonfinite_steps=3", "--config.train.checkpoint_every=1",
          "--config.train.keep_checkpoints=3"]
  first = co.run(base + ["--config.optim.learning_rate=1000000.0"])
  kept = _steps(workdir)
  again = co.run(base + ["--config.optim.learning_rate=0.01"])
  summary = {}
  if os.path.exists(os.path.join(workdir, "summary.json")):
    summary = json.load(open(os.path.join(workdir, "summary.json")))
  return dict(first_rc=first["rc"], checkpoints_after_streak=kept, lower_lr_rc=again["rc"],
              recovered=again["rc"] == 0 and summary.get("steps") == 16,
              error=_one_line(again)["first"])


def structural_without_config_json(co: Checkout) -> dict:
  workdir = co.workdir("no_config_json")
  args = [f"--workdir={workdir}", "--config.train.num_steps=4"]
  co.run(args)
  os.remove(os.path.join(workdir, "config.json"))
  changed = co.run(args + ["--config.model.d_model=32"])
  moved = os.path.isdir(os.path.join(workdir, "checkpoints_unreadable"))
  original = co.run(args)
  resumed = [line for line in original["out"].splitlines() if line.startswith("Resuming")]
  return dict(changed_rc=changed["rc"], checkpoints_moved=moved,
              original_resumes=resumed[0] if resumed else "trained from step 0")


def seed_change(co: Checkout) -> dict:
  workdir = co.workdir("seed")
  args = [f"--workdir={workdir}", "--config.train.num_steps=4"]
  co.run(args)
  result = co.run(args + ["--config.seed=3"])
  saved = json.load(open(os.path.join(workdir, "config.json")))["seed"]
  return dict(rc=result["rc"], config_json_seed=saved, message=_one_line(result)["first"])


def bit_flip(co: Checkout) -> dict:
  workdir = co.workdir("flip")
  args = [f"--workdir={workdir}", "--config.train.num_steps=4"]
  co.run(args)
  _flip_one_byte(os.path.join(workdir, "checkpoints", "4"))
  result = co.run(args)
  resumed = [line for line in result["out"].splitlines() if line.startswith("Resuming")]
  return dict(rc=result["rc"], detected="checksum" in result["out"] + result["err"],
              resumed=resumed[0] if resumed else None)


def bad_inputs(co: Checkout) -> dict:
  root = co.workdir("inputs")
  a_file = os.path.join(root, "a_file")
  open(a_file, "w").close()
  files = {
      "missing": None,
      "syntax": "def get_config(:\n",
      "no_get_config": "CONFIG = 1\n",
      "raising": "def get_config():\n  raise ValueError('no such arm')\n",
      "dict": "def get_config():\n  return {'seed': 0}\n",
      "bool_lr": ("import importlib.util\nspec = importlib.util.spec_from_file_location("
                  f"'t', {co.tiny!r})\nm = importlib.util.module_from_spec(spec)\n"
                  "spec.loader.exec_module(m)\n\ndef get_config():\n  c = m.get_config()\n"
                  "  c.optim.learning_rate = True\n  c.train.num_steps = 2\n  return c\n"),
  }
  for name, source in files.items():
    if source is not None:
      with open(os.path.join(root, f"{name}.py"), "w") as f:
        f.write(source)
  work = os.path.join(root, "run")
  cases = {f"config_file_{n}": ([f"--workdir={work}"], os.path.join(root, f"{n}.py"))
           for n in files}
  cases.update({
      "seed_10**20": ([f"--workdir={work}", "--config.seed=100000000000000000000"], None),
      "num_steps_3e9": ([f"--workdir={work}", "--config.train.num_steps=3000000000"], None),
      "num_latents_1": ([f"--workdir={work}", "--config.model.num_latents=1"], None),
      "workdir_empty": (["--workdir=", "--config.train.num_steps=2"], None),
      "workdir_a_file": ([f"--workdir={a_file}", "--config.train.num_steps=2"], None),
  })
  # An accepted input trains on: stopped after 5 minutes (rc None, timed_out).
  results = {name: _one_line(co.run(args, config, timeout=300))
             for name, (args, config) in cases.items()}
  wrap = _unprivileged()
  if wrap is not False:
    locked = os.path.join(root, "read_only")
    os.makedirs(locked)
    os.chmod(locked, 0o555)
    results["workdir_unwritable"] = _one_line(co.run(
        [f"--workdir={locked}/run", "--config.train.num_steps=2"], wrap=wrap))
  # A batch that cannot fit: its memory estimate is ~40 GiB; the process may
  # allocate at most 6 GiB (RLIMIT_AS would refuse more), so an old checkout
  # that starts training fails inside XLA instead of exhausting the machine.
  big = co.run([f"--workdir={root}/big", "--config.train.batch_size=1048576",
                "--config.train.num_steps=2"],
               wrap=["prlimit", "--as=6000000000", "--", "bash", "-c"], timeout=1200)
  results["batch_too_big"] = dict(_one_line(big), seconds=big["seconds"])
  clean = sum(1 for r in results.values()
              if r["rc"] not in (0, None) and r["stderr_lines"] == 1 and not r["traceback"])
  return dict(one_line=clean, of=len(results), cases=results)


def noise_and_exit_codes(co: Checkout) -> dict:
  out = {}
  workdir = co.workdir("noise")
  args = [f"--workdir={workdir}", "--config.train.num_steps=10"]
  co.run(args)
  lines = []
  for trial in range(3):  # Truncated data files of the newest checkpoint, three times.
    newest = _steps(workdir)[-1]
    for path in glob.glob(os.path.join(workdir, "checkpoints", str(newest), "state", "**", "d",
                                       "*"), recursive=True):
      if os.path.isfile(path):
        os.truncate(path, 5)
    result = co.run(args)
    lines.append((len(result["err"].splitlines()), result["err"].count("Event loop is closed")))
  out["failed_restore_stderr_lines"] = [n for n, _ in lines]
  out["failed_restore_event_loop_closed"] = [n for _, n in lines]
  # A failed save: every file may have at most 16 KiB (RLIMIT_FSIZE; Python
  # ignores SIGXFSZ, so writes fail with EFBIG as on a full disk).
  full = co.run([f"--workdir={co.workdir('full')}", "--config.train.num_steps=4"],
                wrap=["prlimit", "--fsize=16384", "--", "bash", "-c"])
  out["failed_save"] = dict(_one_line(full),
                            event_loop_closed=full["err"].count("Event loop is closed"))
  for name, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
    workdir = co.workdir(name)
    proc, log = co.start([f"--workdir={workdir}", "--config.train.num_steps=100000"],
                         os.path.join(co.scratch, f"{name}.log"))
    while not _steps(workdir) and proc.poll() is None:
      time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=600)
    log.close()
    out[f"{name}_exit"] = proc.returncode
  return out


def readme_commands(repo: str) -> list[list[str]]:
  """Every ``python run.py ...`` command of the README's code blocks (but ``--help``), in order."""
  with open(os.path.join(repo, "README.md")) as f:
    blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
  commands = []
  for block in blocks:
    for line in block.splitlines():
      for part in line.split("&&"):
        words = shlex.split(part.split("#")[0])
        if (words[:2] == ["python", "run.py"] and "--help" not in words
            and "--print_config" not in words):
          commands.append(words[2:])
  return commands


def readme_in_order(co: Checkout) -> dict:
  """The README's commands, in order, in a fresh copy with no workdir: which resumed another's run.

  Each command runs until its first checkpoint (its run exists), then gets
  SIGTERM; on a fresh copy no command may resume anything.
  """
  fresh = os.path.join(co.scratch, "fresh_clone")
  shutil.copytree(co.repo, fresh, ignore=shutil.ignore_patterns("workdir", ".git", "__pycache__"))
  env = dict(co.env, PYTHONPATH=fresh)
  runs = []
  for args in readme_commands(fresh):
    before = set(glob.glob(os.path.join(fresh, "workdir", "**", "checkpoints", "*"),
                           recursive=True))
    log = open(os.path.join(co.scratch, "readme.log"), "w+")
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=fresh, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 1800
    while proc.poll() is None and time.time() < deadline:
      now = set(glob.glob(os.path.join(fresh, "workdir", "**", "checkpoints", "*"),
                          recursive=True))
      if now - before:
        break
      time.sleep(0.2)
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=900)
    log.seek(0)
    text = log.read()
    log.close()
    folders = sorted({os.path.relpath(p.split(os.sep + "checkpoints")[0], fresh)
                      for p in set(glob.glob(os.path.join(fresh, "workdir", "**", "checkpoints",
                                                          "*"), recursive=True)) - before})
    runs.append(dict(command=" ".join(args), rc=proc.returncode, folder=folders,
                     resumed="Resuming from step" in text,
                     refused="holds a run of another config" in text))
  return dict(commands=len(runs), resumed_another=collisions(runs),
              refused=sum(r["refused"] for r in runs), runs=runs)


def collisions(runs: list[dict]) -> int:
  """Runs that resumed (or wrote into) a folder another command created.

  The README repeats some commands on purpose (``python run.py`` trains the
  teacher that ``distill.py`` reads): a command resuming its own folder is
  not a collision.
  """
  creator, count = {}, 0
  for run in runs:
    for folder in run["folder"]:
      if creator.setdefault(folder, run["command"]) != run["command"]:
        count += 1
  return count


FAULTS = {
    "lock_race": lock_race,
    "stale_lock": stale_lock,
    "kill_cycles": kill_cycles,
    "fresh_restart": fresh_restart,
    "unreadable_checkpoint": unreadable_checkpoint,
    "nonfinite_recovery": nonfinite_recovery,
    "structural_without_config_json": structural_without_config_json,
    "seed_change": seed_change,
    "bit_flip": bit_flip,
    "bad_inputs": bad_inputs,
    "noise_and_exit_codes": noise_and_exit_codes,
    "readme_in_order": readme_in_order,
}


def main(argv):
  del argv
  f = flags.FLAGS
  scratch = tempfile.mkdtemp(prefix="fault_matrix_")
  co = Checkout(f.repo, scratch, f.races, f.cycles, f.seed)
  try:
    for name, fault in FAULTS.items():
      if f.only and name not in f.only:
        continue
      start = time.time()
      record = dict(fault=name, repo=co.repo, **fault(co), seconds=round(time.time() - start))
      line = json.dumps(record)
      print(line, flush=True)
      if f.out:
        with open(f.out, "a") as out:
          out.write(line + "\n")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  # Flags only when run: tests import race_for_stale_locks without them.
  flags.DEFINE_string("repo", _HERE, "The checkout whose run.py and latentdiv are tested.")
  flags.DEFINE_string("out", "", "Append one JSON line per fault here.")
  flags.DEFINE_list("only", [], "Run only these faults (names of FAULTS).")
  flags.DEFINE_integer("races", 100, "Rounds of the two-process lock race.")
  flags.DEFINE_integer("cycles", 10, "SIGKILL/resume cycles.")
  flags.DEFINE_integer("seed", 0, "Seed of the random kill times.")
  app.run(main)
