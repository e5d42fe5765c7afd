"""Two real JAX processes (CPU, gloo collectives): preemption agreement and a shared checkpoint.

What a multi-host run relies on and a single process cannot show: a SIGTERM reaching one process stops
all of them at the same step, Orbax saves and restores an array whose shards live in two processes, and a
barrier name can be met again (`distributed.barrier`).
"""
import json
import os
import subprocess
import sys

from runs import free_port

WORKER = os.path.join(os.path.dirname(__file__), "train_multiprocess_worker.py")


def test_two_processes_stop_together_and_share_a_checkpoint(tmp_path):
  port = str(free_port())
  workdir = str(tmp_path / "workdir")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), port, workdir, str(tmp_path / f"result{i}.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=180)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]

  results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
  assert [r["signalled"] for r in results] == [False, True]
  assert results[0]["barrier_waits"][1] > 0.9  # a barrier name met again still waits for every process
  for r in results:
    assert r["process_count"] == 2
    # Signalled before step 3, agreed at the next sync step (every 2 steps): 4, on both processes.
    assert r["stopped_at"] == 4
    assert r["restored_step"] == 4 and r["steps"] == [4]
    assert r["config"] == {"run": "two-process"}
    assert r["max_error"] == 0.0
    assert r["restored_spec"] == [None, "fsdp"]
