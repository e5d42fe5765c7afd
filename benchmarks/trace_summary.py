r"""Where a program's time went, from a JAX profiler trace: the events of each device (or of the host, off
accelerators), summed by name and by kind, largest first. Names are taken without a trailing ".N" (XLA numbers the
instances of an op, "while.2058"), so that the instances of one op add up.

    python benchmarks/trace_summary.py TRACE [--top=25]

TRACE is a `*.trace.json.gz` that `jax.profiler.trace` wrote, or a folder holding one (the newest is read), e.g.
what `benchmarks/train_step_bench.py --trace_dir=DIR` traced. On a GPU the events of the "/device:GPU:N"
processes are kernels and copies, timed by CUPTI. On the CPU they are the ops (thunks) that XLA's worker threads
ran (threads named "tf_XLA..."), without the executor and thread-pool events that wrap them; two threads run ops
at once, so the total is CPU time, more than wall time. Convolutions are the exception: XLA:CPU hands them to
Eigen's thread pool and their events end at the hand-over (a 3x3, 128 -> 128 convolution of 8 32x32 maps: a 0.18 ms
event for 11 ms of wall time), so on the CPU their rows time the launch, not the work.

Kinds, from the kernel name, in this order (the first match wins; kernel names are the library's and XLA's, so
the patterns are heuristics and "other" is what none matched):
  splat (Pallas)      names holding "splat"
  convolution         "conv", "xmma", "cudnn", "implicit_gemm", "dgrad", "wgrad", "fprop"
  matmul              "gemm", "cublas", "nvjet", "cutlass", "dot", "triton_gemm"
  copy / memset       "memcpy", "memset", "copy"
  reduction fusion    "reduce", "input_" (XLA's reduction emitters)
  other fusion        "fusion", "loop_"
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

KINDS = (("splat (Pallas)", ("splat",)),
         ("convolution", ("conv", "xmma", "cudnn", "implicit_gemm", "dgrad", "wgrad", "fprop")),
         ("matmul", ("gemm", "cublas", "nvjet", "cutlass", "dot", "triton_gemm")),
         ("copy / memset", ("memcpy", "memset", "copy")),
         ("reduction fusion", ("reduce", "input_")),
         ("other fusion", ("fusion", "loop_")))


def find_trace(path: pathlib.Path) -> pathlib.Path:
  if path.is_file():
    return path
  traces = sorted(path.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"No *.trace.json.gz under {path}; expected a `jax.profiler.trace` folder or file.")
  return traces[-1]


def kind_of(name: str) -> str:
  lower = name.lower()
  return next((kind for kind, patterns in KINDS if any(p in lower for p in patterns)), "other")


# The XLA:CPU events that wrap the ops (an executor's run, a pool's wait) rather than being ops.
_HOST_WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool")


def device_events(trace: dict) -> tuple[list[dict], str]:
  """(the complete events of the device processes, else of XLA's host worker threads; which they were)."""
  meta = [e for e in trace["traceEvents"] if e.get("ph") == "M"]
  processes = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
  complete = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  if devices:
    return [e for e in complete if e["pid"] in devices], ", ".join(sorted(processes[p] for p in devices))
  ops = [e for e in complete if threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
         and not e["name"].startswith(_HOST_WRAPPERS)]
  return ops, ("XLA's host worker threads (no device processes in the trace; convolution events time their launch "
               "only, not their work)")


def summarise(events: list[dict]) -> tuple[list[tuple[str, int, float]], dict[str, float]]:
  """([(name without its ".N", calls, total us)] largest first, {kind: total us})."""
  calls, totals, kinds = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    name = re.sub(r"\.\d+$", "", e["name"])
    calls[name] += 1
    totals[name] += e["dur"]
    kinds[kind_of(name)] += e["dur"]
  rows = sorted(((name, calls[name], total) for name, total in totals.items()), key=lambda r: -r[2])
  return rows, dict(kinds.most_common())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace", type=pathlib.Path)
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  try:
    path = find_trace(args.trace)
  except FileNotFoundError as err:
    parser.error(str(err))
  with gzip.open(path) as f:
    events, source = device_events(json.load(f))
  rows, kinds = summarise(events)
  total = sum(t for _, _, t in rows)
  print(f"{path}: {len(events)} events of {source}, {total / 1e3:.1f} ms in all")
  print(f"\n{'kind':<20} {'ms':>10} {'share':>7}")
  for kind, t in kinds.items():
    print(f"{kind:<20} {t / 1e3:10.2f} {100 * t / total:6.1f}%")
  print(f"\n{'name':<70} {'calls':>6} {'ms':>9} {'share':>7} {'mean us':>9}")
  for name, n, t in rows[:args.top]:
    print(f"{name[:70]:<70} {n:>6} {t / 1e3:9.2f} {100 * t / total:6.1f}% {t / n:9.1f}")


if __name__ == "__main__":
  main()
