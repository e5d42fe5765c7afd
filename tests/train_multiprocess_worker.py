"""One process of the two-process test in test_train_multiprocess.py (run as a script, not collected).

usage: train_multiprocess_worker.py PROCESS_ID COORDINATOR_PORT WORKDIR RESULT_JSON

Each process has 2 CPU devices; together they form a 2 x 2 ("data", "fsdp") mesh. Process 1 receives
SIGTERM before step 3; with sync_every_steps=2 both processes must stop at step 4. Then both save one
checkpoint of an fsdp-sharded array together and restore it into another sharding. Last, they meet twice at one
barrier name, process 1 a second late the second time: process 0 must wait for it again.
"""
import json
import os
import signal
import sys
import time

process_id, port, workdir, result_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from gaussiantoken_jax.train import checkpointing, distributed, sharding  # noqa: E402

mesh = sharding.make_mesh(dict(data=2, fsdp=2))
kernel = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
state = {"kernel": jax.make_array_from_callback(kernel.shape, NamedSharding(mesh, P("fsdp", None)),
                                                lambda index: kernel[index])}

# Created after jax.distributed.initialize, so that its handler is the one SIGTERM reaches.
with checkpointing.PreemptionGuard(sync_every_steps=2) as guard:
  stopped_at = None
  for step in range(10):
    if step == 3 and process_id == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    if guard.should_stop(step):
      stopped_at = step
      break
  signalled = guard.signalled

with checkpointing.Checkpointer(workdir) as ckpt:
  ckpt.save(stopped_at, state, config={"run": "two-process"})
  ckpt.wait()
  abstract = {"kernel": jax.ShapeDtypeStruct(kernel.shape, jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))}
  restored = ckpt.restore(abstract)
  max_error = max(float(np.max(np.abs(np.asarray(shard.data) - kernel[shard.index])))
                  for shard in restored.state["kernel"].addressable_shards)
  barrier_waits = []
  for late in (0.0, 1.0):
    if process_id == 1:
      time.sleep(late)
    start = time.monotonic()
    distributed.barrier("train_multiprocess_worker.twice", timeout_seconds=60)
    barrier_waits.append(time.monotonic() - start)
  result = {
      "barrier_waits": barrier_waits,
      "process_count": jax.process_count(),
      "stopped_at": stopped_at,
      "signalled": signalled,
      "restored_step": restored.step,
      "steps": ckpt.all_steps(),
      "config": ckpt.restore_config(),
      "max_error": max_error,
      "restored_spec": list(restored.state["kernel"].sharding.spec),
  }

with open(result_path, "w") as f:
  json.dump(result, f)
jax.distributed.shutdown()
