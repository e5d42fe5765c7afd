"""benchmarks/paper_table1_small.py end to end at a few steps, so that the script cannot rot.

Subprocesses: the script defines absl flags (`config`, `data_dir`, `seed`, ...) that other modules of the
package define too, so it is never imported into the test process. The JAX compilation cache of the other
training tests (`runs.subprocess_env`) keeps the second and later runs short.
"""
import gzip
import json
import math
import subprocess
import sys

from runs import REPO, subprocess_env

SCRIPT = REPO / "benchmarks" / "paper_table1_small.py"
TIMEOUT = 900  # 2 shared CPU cores; with a warm compilation cache the run takes about a minute


def run_script(*args, check=True):
  out = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                       text=True, timeout=TIMEOUT)
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


def test_paper_table1_small_trains_and_evaluates_both_models_at_equal_tokens(tmp_path):
  out = run_script("--variant=runlocal", "--steps=2", "--nofid", "--num_eval_images=8",
                   "--set=model.num_gaussians=64", f"--workdir={tmp_path}")
  lines = out.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert set(result) == {"gaussiantoken", "vq"}
  gt, vq = result["gaussiantoken"], result["vq"]
  # The paper's comparison: the same number of tokens; GaussianToken's z = 3 against the VQGAN row's 4.
  assert (gt["tokens"], gt["token_dim"], vq["tokens"], vq["token_dim"]) == (64, 3, 64, 4)
  assert (gt["config_name"], vq["config_name"]) == ("gaussiantoken-demo-32px", "vq-demo-32px")
  for row in (gt, vq):
    assert (row["steps"], row["batch_size"], row["num_images"], row["codebook_size"]) == (2, 8, 8, 64)
    assert all(math.isfinite(row[k]) for k in ("psnr", "psnr_block_baseline", "ssim", "lpips", "perplexity"))
    assert 0 < row["codebook_usage"] <= 1 and "rfid" not in row  # --nofid
    assert (tmp_path / row["config_name"].split("-")[0] / "eval.json").is_file()
  table = [line for line in lines if line.startswith("| ")]
  assert [line.split(" | ")[0] for line in table] == ["| model", "| gaussiantoken", "| vq", "| difference"]
  psnr_column = table[0].split(" | ").index("PSNR")
  assert float(table[3].split(" | ")[psnr_column]) == round(gt["psnr"] - vq["psnr"], 2)


def test_paper_table1_small_refuses_unequal_tokens_and_a_missing_data_dir(tmp_path):
  out = run_script("--variant=runlocal", "--steps=2", f"--workdir={tmp_path}", check=False)
  assert out.returncode != 0 and "GaussianToken has 16 tokens per image and the baseline 64" in out.stderr
  out = run_script(f"--data_dir={tmp_path}", f"--workdir={tmp_path}", check=False)
  assert out.returncode != 0 and "cifar10-jpeg-train.tar" in out.stderr
  assert not (tmp_path / "gaussiantoken").exists()  # nothing was trained


def test_train_step_bench_counts_flops_on_one_cpu_as_on_the_mesh():
  """benchmarks/train_step_bench.py counts FLOPs on programs lowered for one CPU device (off the CPU XLA's own
  counts are 0 or a fraction): a matmul's are 2 m k n, and the `:runlocal` train step's equal those of the same
  step lowered for the 8-device mesh it trains on. A subprocess, as above (the script defines absl flags)."""
  code = f"""
import sys
sys.path.insert(0, {str(REPO / "benchmarks")!r})
sys.path.insert(0, {str(REPO / "tests")!r})
import jax, jax.numpy as jnp
import train_step_bench as bench
from runs import load_demo_config
from gaussiantoken_jax import losses
from gaussiantoken_jax.train import sharding, step as step_lib
print(bench.flops_on_cpu(jnp.matmul, jnp.ones((8, 16)), jnp.ones((16, 4))))
config = load_demo_config("runlocal")
dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
lpips = jax.eval_shape(lambda: losses.LPIPS().init(jax.random.key(0), dummy, dummy)["params"])
steps = step_lib.make_steps(config, sharding.make_mesh(config.mesh, jax.devices("cpu")))
on_mesh = bench.flops_of(steps.train_step.trace(steps.abstract_state, steps.abstract_batch(8), lpips).lower())
print(on_mesh, bench.step_flops_on_cpu(config, 8, lpips))
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=TIMEOUT)
  assert out.returncode == 0, out.stderr[-4000:]
  matmul, (on_mesh, on_one_cpu) = out.stdout.split("\n")[0], out.stdout.split("\n")[1].split()
  assert float(matmul) == 2 * 8 * 16 * 4
  assert float(on_mesh) > 1e8 and math.isclose(float(on_one_cpu), float(on_mesh), rel_tol=1e-6)


def test_step_memory_reports_the_state_and_batch_as_arguments():
  """benchmarks/step_memory.py: XLA's argument bytes are the train state's and the batch's, and its output bytes
  the step's outputs' (the new state and the metrics) plus the output tuple's table of 8-byte pointers, all summed
  here from their shapes (the demo trains without LPIPS, so jit drops its unused weights)."""
  code = f"""
import sys
sys.path.insert(0, {str(REPO / "benchmarks")!r})
sys.path.insert(0, {str(REPO / "tests")!r})
import jax, jax.numpy as jnp
import step_memory
from runs import load_demo_config
from gaussiantoken_jax import losses
from gaussiantoken_jax.train import sharding, step as step_lib
config = load_demo_config("runlocal")
config.batch_size = 2
steps = step_lib.make_steps(config, sharding.make_mesh(dict(data=1, fsdp=1), jax.devices()[:1]))
assert config.loss.lpips_weight == 0
dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
lpips = jax.eval_shape(lambda: losses.LPIPS().init(jax.random.key(0), dummy, dummy)["params"])
nbytes = lambda tree: sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
outputs = jax.eval_shape(steps.train_step, steps.abstract_state, steps.abstract_batch(2), lpips)
print(*step_memory.step_memory(config, 2), nbytes(steps.abstract_state) + nbytes(steps.abstract_batch(2)),
      nbytes(outputs) + 8 * len(jax.tree.leaves(outputs)))
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=TIMEOUT)
  assert out.returncode == 0, out.stderr[-4000:]
  arguments, temporaries, outputs, want_arguments, want_outputs = map(int, out.stdout.split())
  assert (arguments, outputs) == (want_arguments, want_outputs) and temporaries > 0


def _write_trace(folder, events, processes, threads=()):
  meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}} for pid, name in processes]
  meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}
           for pid, tid, name in threads]
  complete = [{"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur} for pid, tid, name, dur in events]
  folder.mkdir(parents=True)
  with gzip.open(folder / "vm.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": meta + complete}, f)


def _trace_summary(path, check=True):
  out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trace_summary.py"), str(path)],
                       capture_output=True, text=True, timeout=60)
  if check:
    assert out.returncode == 0, out.stderr
  return out


def test_trace_summary_sums_the_device_events_by_name_and_kind(tmp_path):
  """benchmarks/trace_summary.py on a trace written here: the device's events only, summed by name and by kind."""
  _write_trace(tmp_path / "plugins" / "profile" / "run",
               [(1, 1, "cudnn_conv_fprop", 30), (1, 1, "loop_add_fusion", 60), (1, 2, "cudnn_conv_fprop", 10),
                (1, 1, "splat_backward", 5), (2, 1, "python", 1000)], [(1, "/device:GPU:0"), (2, "/host:CPU")])
  lines = _trace_summary(tmp_path).stdout.splitlines()
  assert "4 events of /device:GPU:0, 0.1 ms in all" in lines[0]  # the host's 1000 us left out
  assert [(line[:20].strip(), line.split()[-1]) for line in lines[3:6]] == [
      ("other fusion", "57.1%"), ("convolution", "38.1%"), ("splat (Pallas)", "4.8%")]
  names = [line.split() for line in lines[-3:]]
  assert [(n[0], n[1]) for n in names] == [("loop_add_fusion", "1"), ("cudnn_conv_fprop", "2"), ("splat_backward", "1")]


def test_trace_summary_of_a_cpu_trace_counts_the_ops_of_xla_threads(tmp_path):
  """Without device processes: the ops on XLA's worker threads, their numbered instances added up, without the
  executor events that wrap them or the Python thread's."""
  events = [(7, 1, "while.12", 300), (7, 2, "while.40", 100), (7, 1, "dot.3", 200),
            (7, 1, "ThunkExecutor::Execute", 5000), (7, 3, "$api.py:2479 block_until_ready", 9000)]
  _write_trace(tmp_path / "run", events, [(7, "/host:CPU")],
               [(7, 1, "tf_XLAEigen/1"), (7, 2, "tf_XLAEigen/2"), (7, 3, "python")])
  lines = _trace_summary(tmp_path / "run" / "vm.trace.json.gz").stdout.splitlines()
  assert "3 events of XLA's host worker threads" in lines[0] and "0.6 ms in all" in lines[0]
  assert [line.split()[:3] for line in lines[-2:]] == [["while", "2", "0.40"], ["dot", "1", "0.20"]]


def test_trace_summary_of_a_folder_without_a_trace_is_a_clear_error(tmp_path):
  out = _trace_summary(tmp_path, check=False)
  assert out.returncode == 2 and f"error: No *.trace.json.gz under {tmp_path}" in out.stderr
