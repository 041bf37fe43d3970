"""Tests for latentdiv.sharding: a step on 8 simulated devices equals the 1-device step.

The 8-device checks run in a subprocess: ``XLA_FLAGS`` must be set before jax
initialises its CPU backend, and the test process has already done that.
"""

import fcntl
import json
import os
import subprocess
import sys
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from jax.sharding import PartitionSpec as P

from latentdiv import experiment
from latentdiv import objectives
from latentdiv import sharding

NUM_DEVICES = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(lambda_pg=0.5):
  c = objectives.base_config()
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.num_layers = 1
  c.model.d_ff = 64
  c.task.prompt_len = 3
  c.train.batch_size = 2 * NUM_DEVICES
  c.objective.lambda_jsd = 0.1
  c.objective.sequence_term.weight = lambda_pg
  c.objective.sequence_term.estimator = "rao_blackwell"
  c.objective.sequence_term.rollout_len = 4
  return c


def _max_rel_diff(a_tree, b_tree) -> float:
  """max|a − b| over all leaves / max|b| over all leaves.

  Normalised by the whole tree, not leaf by leaf: some gradients are exactly 0
  in exact arithmetic (the attention key bias shifts every score of a query
  equally) and hold only float noise, which differs between layouts.
  """
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a_tree), jax.tree_util.tree_leaves(b_tree)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))
             for a, b in zip(leaves_a, leaves_b))
  scale = max(float(np.max(np.abs(np.asarray(b)), initial=0.0))
              for b in leaves_b)
  return diff / (scale + 1e-12)


def _run_config(workdir: str):
  """The whole ``run.py`` path (train.train_and_evaluate) on a tiny config: 3 steps, 1 eval."""
  c = _tiny_config()
  c.train.num_steps = 3
  c.optim.schedule = "constant"  # The resume below extends num_steps.
  c.train.log_every = 1
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.eval.batch_size = 2 * NUM_DEVICES
  return c


def _train_losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r["loss"] for r in records if r["kind"] == "train"]


def _worker() -> dict:
  """Runs inside the 8-device subprocess; returns the measured differences."""
  jax.config.update("jax_numpy_rank_promotion", "raise")
  import tempfile  # pylint: disable=import-outside-toplevel
  from latentdiv import checkpointing  # pylint: disable=import-outside-toplevel
  from latentdiv import experiment  # pylint: disable=import-outside-toplevel
  from latentdiv import train  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh()
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  # 1. The full objective (reconstruction, token JSD, seq_pg rollouts and
  # estimator) on a fixed batch: batch split over 'data', parameters replicated.
  setup, objective = experiment.build(_tiny_config())
  config = setup.config
  state = train.init_state(setup, objective)
  batch = jax.jit(setup.task.sample, static_argnums=1)(
      jax.random.fold_in(train.data_key(config), 0), config.train.batch_size)
  key = jax.random.PRNGKey(7)

  def loss_fn(params, batch, key):
    # The loss the train step differentiates: reconstruction − λ_jsd·Ĵ + w·sequence-term surrogate.
    return objective.loss(params, (), state.extra, batch, key, state.step)[0]

  grad_fn = jax.value_and_grad(loss_fn)
  loss_1, grads_1 = jax.jit(grad_fn)(state.params, batch, key)
  params_dp = sharding.replicate(state.params, mesh)
  batch_dp = sharding.shard_batch(jax.device_get(batch), mesh)  # from the host, as a loader would.
  dp = jax.jit(grad_fn, in_shardings=(rep, data, rep), out_shardings=rep)
  compiled = dp.lower(params_dp, batch_dp, key).compile()
  loss_dp, grads_dp = compiled(params_dp, batch_dp, key)

  # 2. train.make_train_step itself (it draws the same batch inside, from
  # fold_in(data_key, 0)), its whole state FSDP-sharded over the mesh (the
  # threshold lowered for the tiny model), against a single-device reference
  # computed from the teacher-forced loss and gradient. The optimiser is SGD
  # with learning rate 1, so the update IS the gradient (Adam's first step,
  # g / |g|, would amplify float noise in gradients that are 0 in exact
  # arithmetic, such as the attention key bias's).
  tf_setup, tf_objective = experiment.build(_tiny_config(lambda_pg=0.0))
  tf_setup = tf_setup._replace(optimizer=optax.sgd(1.0))
  tf_state = state.replace(opt_state=tf_setup.optimizer.init(state.params))

  @jax.jit
  def reference(state, batch):
    def tf_loss_fn(params):
      _, rec, jsd, _, _ = tf_objective.teacher_forced_terms(params, batch)
      return rec.loss - config.objective.lambda_jsd * jnp.mean(jsd.value)

    loss, grads = jax.value_and_grad(tf_loss_fn)(state.params)
    updates, _ = tf_setup.optimizer.update(grads, state.opt_state, state.params)
    return loss, optax.global_norm(grads), optax.apply_updates(state.params, updates)

  ref_loss, ref_grad_norm, ref_params = reference(tf_state, batch)
  step = train.make_train_step(tf_setup, tf_objective)
  shardings = sharding.state_shardings(tf_state, mesh, fsdp=True, min_size=256)
  step_fsdp = sharding.jit_data_parallel(step, mesh, tf_state, fsdp=True, min_size=256)
  new_state, aux = step_fsdp(sharding.place_state(tf_state, mesh, fsdp=True, min_size=256))
  split = [s.spec for s in jax.tree_util.tree_leaves(shardings.params) if s.spec != P()]

  # 3. A checkpoint of the sharded state restores straight into the mesh layout
  # (what a multi-host resume needs: no host holds the whole state).
  with tempfile.TemporaryDirectory() as directory:
    manager = checkpointing.make_manager(directory, keep=1, save_every=1)
    checkpointing.save(manager, 1, new_state, dict(step=1), force=True)
    target = sharding.abstract_state(tf_state, mesh, fsdp=True, min_size=256)
    restored, _, _ = checkpointing.restore_latest(manager, target)
    manager.close()
  restored_leaves = jax.tree_util.tree_leaves(restored)

  try:
    sharding.shard_batch(jax.tree_util.tree_map(lambda a: np.asarray(a)[:12], batch), mesh)
    bad_batch_error = ""
  except ValueError as err:
    bad_batch_error = str(err)

  # 4. run.py's own loop (train.train_and_evaluate) on the 8-device mesh: the
  # step, evaluation, checkpoint, and a resume restoring into the mesh layout.
  with tempfile.TemporaryDirectory() as workdir:
    run_config = _run_config(workdir)
    run_summary = experiment.train_and_evaluate(run_config, workdir)
    run_losses = _train_losses(workdir)
    run_config.train.num_steps = 4
    resumed_summary = experiment.train_and_evaluate(run_config, workdir, accept_changes=True)
  try:
    bad = _run_config("")
    bad.train.batch_size = 12
    experiment.train_and_evaluate(bad, os.path.join(tempfile.gettempdir(), "never_created"))
    run_bad_batch_error = ""
  except ValueError as err:
    run_bad_batch_error = str(err)

  return dict(
      run_losses=run_losses, run_summary=run_summary, resumed_steps=resumed_summary["steps"],
      run_bad_batch_error=run_bad_batch_error,
      num_devices=jax.device_count(),
      bad_batch_error=bad_batch_error,
      rows_per_device=[int(s.data.shape[0]) for s in batch_dp.prompt.addressable_shards],
      loss_single=float(loss_1), loss_dp=float(loss_dp),
      grad_rel_diff_dp=_max_rel_diff(grads_dp, grads_1),
      grad_norm=float(jax.jit(optax.global_norm)(grads_1)),
      has_all_reduce="all-reduce" in compiled.as_text(),
      step_count=int(new_state.step),
      step_loss=float(aux["loss"]), ref_loss=float(ref_loss),
      step_grad_norm=float(aux["grad_norm"]), ref_grad_norm=float(ref_grad_norm),
      step_param_rel_diff=_max_rel_diff(new_state.params, ref_params),
      param_change=_max_rel_diff(ref_params, tf_state.params),
      num_fsdp_split=len(split),
      restore_rel_diff=_max_rel_diff(restored, new_state),
      restore_layout_kept=all(
          r.sharding == t.sharding
          for r, t in zip(restored_leaves, jax.tree_util.tree_leaves(target))),
      restore_some_split=any(not r.sharding.is_fully_replicated for r in restored_leaves),
      fsdp_state_sharded=[
          jax.tree_util.keystr(path) for path, a in
          jax.tree_util.tree_flatten_with_path(new_state)[0]
          if not a.sharding.is_fully_replicated][:3],
  )


class EightDeviceTest(absltest.TestCase):
  """One subprocess with 8 simulated CPU devices (XLA_FLAGS set before jax starts)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    env = dict(os.environ)
    # LLVM optimisation off: this test is mostly compile time, and both sides
    # of every comparison are compiled in this same process.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={NUM_DEVICES}"
                        " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # pytest-xdist may give this class's tests to both workers: the first to
    # take the lock runs the subprocess, the other reads its result (one file
    # per test run, PYTEST_XDIST_TESTRUNUID; per process without xdist).
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
    cache = os.path.join(tempfile.gettempdir(), f"latentdiv_eight_devices_{run_id}.json")
    with open(cache + ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if os.path.exists(cache):
        with open(cache) as f:
          cls.result = json.load(f)
        return
      proc = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--worker"], env=env, cwd=REPO,
          capture_output=True, text=True, timeout=300, check=False)
      if proc.returncode != 0:
        raise AssertionError(f"worker failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
      cls.result = json.loads(proc.stdout.strip().splitlines()[-1])
      with open(cache, "w") as f:
        json.dump(cls.result, f)

  def test_runs_on_eight_devices_with_the_batch_split(self):
    self.assertEqual(self.result["num_devices"], NUM_DEVICES)
    self.assertEqual(self.result["rows_per_device"], [2] * NUM_DEVICES)

  def test_batch_not_divisible_by_devices_is_refused(self):
    message = self.result["bad_batch_error"]
    self.assertIn("12", message)
    self.assertIn(str(NUM_DEVICES), message)
    self.assertIn(".prompt", message)  # names the offending leaf.

  def test_gradient_is_all_reduced(self):
    # A data-parallel gradient needs a cross-device sum: if the partitioner had
    # replicated the whole computation there would be no all-reduce.
    self.assertTrue(self.result["has_all_reduce"])

  def test_sharded_loss_and_gradients_match_single_device(self):
    r = self.result
    self.assertGreater(r["grad_norm"], 1e-4)  # a non-trivial gradient is compared.
    np.testing.assert_allclose(r["loss_dp"], r["loss_single"], rtol=1e-5, atol=1e-6)
    self.assertLess(r["grad_rel_diff_dp"], 1e-5)

  def test_train_step_fsdp_matches_single_device_update(self):
    r = self.result
    self.assertEqual(r["step_count"], 1)
    self.assertGreater(r["num_fsdp_split"], 0)
    self.assertTrue(r["fsdp_state_sharded"])  # large state arrays are split.
    self.assertGreater(r["param_change"], 1e-4)  # the update is not a no-op.
    np.testing.assert_allclose(r["step_loss"], r["ref_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["step_grad_norm"], r["ref_grad_norm"], rtol=1e-5)
    self.assertLess(r["step_param_rel_diff"], 1e-5)


  def test_run_loop_on_eight_devices_matches_one_device(self):
    # train.train_and_evaluate (what run.py calls) on 8 devices against the same
    # config here on 1: the same per-step losses and final metrics.
    r = self.result
    with tempfile.TemporaryDirectory() as workdir:
      summary = experiment.train_and_evaluate(_run_config(workdir), workdir)
      losses = _train_losses(workdir)
    self.assertLen(r["run_losses"], 3)
    np.testing.assert_allclose(r["run_losses"], losses, rtol=1e-4)
    for key in ("coverage", "nll", "token_jsd", "seq_kl"):
      np.testing.assert_allclose(r["run_summary"][key], summary[key], rtol=1e-3, err_msg=key)
    self.assertEqual(r["resumed_steps"], 4)

  def test_run_refuses_a_batch_the_devices_cannot_split(self):
    message = self.result["run_bad_batch_error"]
    self.assertIn("config.train.batch_size = 12", message)
    self.assertIn(str(NUM_DEVICES), message)

  def test_checkpoint_restores_into_the_mesh_layout(self):
    r = self.result
    self.assertEqual(r["restore_rel_diff"], 0.0)
    self.assertTrue(r["restore_layout_kept"])
    self.assertTrue(r["restore_some_split"])


class SingleProcessTest(absltest.TestCase):
  """Helpers on the test process's own device(s)."""

  def test_mesh_has_one_data_axis_over_all_devices(self):
    mesh = sharding.make_mesh()
    self.assertEqual(mesh.axis_names, (sharding.DATA_AXIS,))
    self.assertEqual(mesh.devices.size, jax.device_count())

  def test_shard_batch_keeps_values_and_rejects_bad_leaves(self):
    mesh = sharding.make_mesh()
    batch = dict(x=np.arange(12.0).reshape(4, 3), y=np.arange(4))
    placed = sharding.shard_batch(batch, mesh)
    chex.assert_trees_all_close(placed, batch)
    self.assertEqual(placed["x"].sharding.spec, P(sharding.DATA_AXIS))
    with self.assertRaisesRegex(ValueError, "scalar"):
      sharding.shard_batch(dict(s=np.float32(1.0)), mesh)

  def test_fsdp_spec_splits_the_largest_divisible_axis(self):
    # Brute force over the rule: the largest axis with n % 8 == 0, else replicated.
    cases = {
        ((512, 128), 8, 1): P("data", None),
        ((100, 64), 8, 1): P(None, "data"),  # 100 % 8 != 0
        ((4, 32, 32), 8, 1): P(None, None, "data"),  # ties: the last axis
        ((7, 9), 8, 1): P(),  # nothing divisible
        ((512, 128), 8, 10 ** 6): P(),  # below min_size
        ((512, 128), 1, 1): P(),  # one device
        ((), 8, 1): P(),
    }
    for (shape, n, min_size), expected in cases.items():
      self.assertEqual(sharding.fsdp_spec(shape, n, "data", min_size), expected, shape)

  def test_abstract_state_carries_the_shardings(self):
    mesh = sharding.make_mesh()
    state = dict(w=jnp.zeros((4, 8)), step=jnp.zeros((), jnp.int32))
    target = sharding.abstract_state(state, mesh)
    for leaf in jax.tree_util.tree_leaves(target):
      self.assertIsInstance(leaf, jax.ShapeDtypeStruct)
      self.assertEqual(leaf.sharding, sharding.replicated(mesh))
    self.assertEqual(target["w"].shape, (4, 8))
    with self.assertRaisesRegex(ValueError, "example state"):
      sharding.jit_data_parallel(lambda s: (s, {}), mesh, fsdp=True)

  def test_mesh_must_be_one_dimensional(self):
    devices = np.array(jax.devices()[:1], dtype=object).reshape(1, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "model"))
    with self.assertRaisesRegex(ValueError, "1-D"):
      sharding.batch_sharding(mesh)


if __name__ == "__main__":
  if "--worker" in sys.argv:
    print(json.dumps(_worker()))
  else:
    absltest.main()
