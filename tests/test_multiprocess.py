"""Two JAX processes on one machine (jax.distributed on 127.0.0.1, CPU gloo collectives), 2 devices each.

* The train step: two processes, each feeding its half of the same global batches, reach the parameters and
  codebook of one process with the same 4 devices (4 of the pytest process's 8).
* The training loop: `python -m gaussiantoken_jax.main` launched as two processes (the variables of
  `launch/multiprocess_local.sh`) trains, checkpoints and exits 0, with metrics from process 0 only.
* Start-up: the launch variables reach `jax.distributed.initialize` unchanged (recorded, not started).

Two devices per process, not four: CPU collectives run one gloo rank per device, and a step of `:runlocal`
took 1.85 s over 2 x 4 devices against 0.75 s over 2 x 2 (a scratch timing of this worker's step, 2 CPU cores);
two local devices still exercise a process feeding several devices. Both tests train the config of the
session's shared run (`:runlocal`, SHARED_STEPS steps, tests/runs.py), so their programs are the same: the
two-process training loop loads those its processes compiled for the step test (each process has its own). The
two tests run one after the other in one pytest-xdist worker (`--dist loadfile`, tests/conftest.py) so that a
cold run compiles them once.

This file is also the worker script: `python tests/test_multiprocess.py worker PROCESS_ID NUM_PROCESSES OUT`.
"""
import json
import sys

import numpy as np
import pytest

from runs import SHARED_STEPS, load_demo_config, run_processes

NUM_DEVICES = 4  # over all processes
NUM_STEPS = 3


def worker(process_id: int, num_processes: int, out_path: str) -> None:
  """Trains NUM_STEPS steps of demo runlocal on fixed random global batches; process 0 writes the result."""
  import jax  # pylint: disable=import-outside-toplevel  (after XLA_FLAGS is set by the parent)
  import optax  # pylint: disable=import-outside-toplevel
  from gaussiantoken_jax import losses  # pylint: disable=import-outside-toplevel
  from gaussiantoken_jax.data import to_global_array  # pylint: disable=import-outside-toplevel
  from gaussiantoken_jax.train import distributed, sharding  # pylint: disable=import-outside-toplevel
  from gaussiantoken_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  distributed.initialize_from_env()
  assert jax.process_count() == num_processes and jax.device_count() >= NUM_DEVICES
  config = load_demo_config("runlocal")
  config.total_steps = SHARED_STEPS
  steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh, jax.devices()[:NUM_DEVICES]))
  state, lpips_params = steps.init(), steps.replicate(losses.load_lpips_params())
  # Compile first, then meet: gloo gives up on a collective whose peers arrive more than 30 s apart.
  train_step = steps.train_step.lower(state, steps.abstract_batch(config.batch_size), lpips_params).compile()
  distributed.barrier("test_multiprocess.compiled")
  local = config.batch_size // num_processes
  step_metrics = []  # per step: generator loss, discriminator loss, both gradient norms
  arrays = {}
  for step in range(NUM_STEPS):
    images = np.random.default_rng(step).integers(0, 256, (config.batch_size, 32, 32, 3), dtype=np.uint8)
    mine = images[process_id * local:(process_id + 1) * local]
    state, metrics = train_step(state, to_global_array({"image": mine}, steps.batch_sharding), lpips_params)
    step_metrics.append([float(metrics[name]) for name in ("loss", "disc_loss", "grad_norm", "disc_grad_norm")])
    if step in (0, NUM_STEPS - 1):
      # Parameters and codebook are replicated: every process holds whole copies.
      # Adam's first moments after step 1 are (1 - b1) x the step-1 gradients of G and D.
      leaves = jax.tree_util.tree_leaves_with_path({
          "params": state.params, "disc_params": state.disc_params, "codebook": state.model_state["codebook"],
          "mu": optax.tree_utils.tree_get(state.opt_state, "mu"),
          "disc_mu": optax.tree_utils.tree_get(state.disc_opt_state, "mu")})
      arrays.update({f"step{step + 1}{jax.tree_util.keystr(path)}": np.asarray(leaf.addressable_data(0))
                     for path, leaf in leaves if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)})
  if process_id == 0:
    np.savez(out_path, metrics=np.asarray(step_metrics),
             learning_rates=[float(steps.gen_schedule(t)) for t in range(NUM_STEPS)], **arrays)


def test_two_processes_reach_the_parameters_of_one_process(tmp_path):
  # One process with the 4 devices: this pytest process itself (it has 8, tests/conftest.py).
  worker(0, 1, str(tmp_path / "result_1.npz"))
  codes, outputs = run_processes(2, lambda i: [
      sys.executable, __file__, "worker", str(i), "2", str(tmp_path / "result_2.npz")], tmp_path, "step_2",
      num_devices=NUM_DEVICES)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  one, two = dict(np.load(tmp_path / "result_1.npz")), dict(np.load(tmp_path / "result_2.npz"))
  assert sorted(one) == sorted(two)
  assert np.all(np.isfinite(one["metrics"]))
  # Same program on the same 4-device mesh; only the cross-process reductions may sum in another order.
  np.testing.assert_allclose(two["metrics"][:2, :2], one["metrics"][:2, :2], rtol=2e-5)  # losses, steps 1-2
  # From step 3 on, Adam's first updates (+-lr per weight whatever the gradient's size) turn reduction-order
  # differences in tiny gradient components into whole-lr differences of the weights: measured 5e-4 relative on
  # the step-3 losses after the splat math moved to pallas_kernels (different XLA fusion of the same formula).
  np.testing.assert_allclose(two["metrics"][2:, :2], one["metrics"][2:, :2], rtol=2e-3)
  np.testing.assert_allclose(two["metrics"][0], one["metrics"][0], rtol=1e-5)  # and the first gradient norms
  # The step-1 gradients per leaf (Adam's first moments; the step-1 weights cannot show a wrong gradient, Adam's
  # first update being ~ +-lr whatever its size). The losses agree to 2e-5 relative; a leaf's gradient sums many
  # such terms: 1e-3 of the leaf's largest entry, plus 1e-5 of the largest gradient anywhere for leaves whose true
  # gradient is zero (pure rounding). A sign-flipped or doubled gradient misses that by ~1000x.
  for prefix in ("step1['mu']", "step1['disc_mu']"):
    keys = [key for key in one if key.startswith(prefix)]
    largest = max(float(np.abs(one[key]).max()) for key in keys)
    for key in keys:
      np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-3 * np.abs(one[key]).max() + 1e-5 * largest,
                                 err_msg=key)
  # After NUM_STEPS steps those lr-sized differences have passed through a steep early loss surface
  # (generator gradient norms ~1e3) and grown to the size of the updates themselves; the losses above stay
  # equal to float precision. The trainable weights must still agree to within the summed Adam steps.
  total_lr = one["learning_rates"].sum()
  for key in (k for k in one if k.startswith(f"step{NUM_STEPS}['params']") or
              k.startswith(f"step{NUM_STEPS}['disc_params']")):
    np.testing.assert_allclose(two[key], one[key], rtol=1e-3, atol=2 * total_lr, err_msg=key)


def test_the_launch_variables_reach_jax_distributed_initialize(monkeypatch):
  """What `launch/` scripts set must arrive as they are: host:port, process count and index (process 1 of 4, so
  that swapping the two is seen), once; JAX's own detection for GAUSSIANTOKEN_DISTRIBUTED=auto. Recorded, not
  started: a real start is the two tests around this one."""
  import jax  # pylint: disable=import-outside-toplevel
  from gaussiantoken_jax.train import distributed  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
  environ = {distributed.ENV_COORDINATOR: "10.1.2.3:8476", distributed.ENV_NUM_PROCESSES: "4",
             distributed.ENV_PROCESS_ID: "1"}
  assert distributed.initialize_from_env(environ) is True
  assert calls == [((), dict(coordinator_address="10.1.2.3:8476", num_processes=4, process_id=1))]
  assert distributed.initialize_from_env(environ) is False  # already initialised (a second run in one process)
  assert len(calls) == 1
  calls.clear()
  assert distributed.initialize_from_env({distributed.ENV_AUTO: "auto"}) is True
  assert calls == [((), {})]
  calls.clear()
  for name in environ:  # any two of the three are as incomplete as one
    with pytest.raises(ValueError, match="Set all of"):
      distributed.initialize_from_env({k: v for k, v in environ.items() if k != name})
  assert not calls


def test_training_loop_on_two_processes(tmp_path):
  workdir = tmp_path / "run"
  codes, outputs = run_processes(2, lambda i: [
      sys.executable, "-m", "gaussiantoken_jax.main", "--config=configs/demo.py:runlocal", f"--workdir={workdir}",
      f"--config.total_steps={SHARED_STEPS}", f"--config.log_every_steps={SHARED_STEPS // 2}",
      f"--config.checkpoint_every_steps={SHARED_STEPS // 2}", f"--config.eval_every_steps={SHARED_STEPS}"],
      tmp_path, "loop", num_devices=NUM_DEVICES)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  assert "Process 1 of 2" in outputs[1]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))  # written once (process 0), at the two log steps
  assert [r["eval_num_images"] for r in records if "eval_psnr" in r] == [16]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      SHARED_STEPS // 2, SHARED_STEPS]
  assert sorted(p.name for p in (workdir / "checkpoints" / str(SHARED_STEPS) / "data").iterdir()
                if p.name.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]


if __name__ == "__main__":
  if len(sys.argv) != 5 or sys.argv[1] != "worker":
    raise SystemExit(f"usage: {sys.argv[0]} worker PROCESS_ID NUM_PROCESSES OUT")
  worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
