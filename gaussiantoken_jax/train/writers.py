"""Where metrics and pictures go: metric writers, a progress/ETA reporter, and image grids.

`create_writer` returns an object with the `clu.metric_writers.MetricWriter` interface. `clu.metric_writers`
itself can only be imported when TensorFlow and TensorBoard are installed (its package `__init__` imports
the TF summary writer), and the GPU image has no TensorFlow. So:

* with TensorFlow and TensorBoard: clu's default writer (log lines + TensorBoard event files in `workdir`)
  plus `JsonlWriter`;
* without them: `JsonlWriter` alone, which logs too;
* on every process but the main one: `NoOpWriter`.

`JsonlWriter` implements clu's interface method for method (without inheriting from it, for the reason
above): scalars are appended as one JSON object per call to `workdir/metrics.jsonl`, images are saved as
PNG files under `workdir/images/`, everything else is logged. The JSON lines are written in both cases so
that scripts and notebooks can read metrics without TensorBoard.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from gaussiantoken_jax.checks import check_positive_int

METRICS_FILE = "metrics.jsonl"
IMAGES_DIR = "images"


def image_path(workdir: epath.PathLike, key: str, step: int, index: int | None = None) -> epath.Path:
  """Where `JsonlWriter.write_images` puts image `index` (None: the only one) of `key` at `step`:
  `workdir/images/<key>_<step:08d>[_<index>].png`, with characters other than letters, digits, "-" and "_" in
  the key replaced by "_"."""
  stem = f"{re.sub(r'[^A-Za-z0-9_-]', '_', key)}_{int(step):08d}"
  return epath.Path(workdir) / IMAGES_DIR / (f"{stem}.png" if index is None else f"{stem}_{index}.png")


def _to_python_scalar(name: str, value) -> int | float | bool:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"write_scalars: scalar {name!r} must have exactly one element, got shape {array.shape}.")
  return array.reshape(()).item()


def _to_uint8_images(name: str, images) -> np.ndarray:
  """[N, H, W, C] or [H, W, C] with C in {1, 3, 4}, uint8 or float in [0, 1] (clu's convention) -> uint8 NHWC."""
  array = np.asarray(images)
  if array.ndim == 3:
    array = array[None]
  if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"write_images: {name!r} must have shape [N, H, W, C] or [H, W, C] with C in (1, 3, 4), "
                     f"got shape {np.shape(images)}.")
  if array.dtype == np.uint8:
    return array
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"write_images: {name!r} must be uint8 or float in [0, 1], got dtype {array.dtype}.")
  return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


class JsonlWriter:
  """A clu-style MetricWriter: scalars to `metrics.jsonl`, images to PNG, everything logged.

  Each `write_scalars(step, scalars)` appends one line `{"step": step, "time": unix_seconds, **scalars}`.
  Non-finite values are written as NaN / Infinity, which Python's json reads back. Each image of
  `write_images(step, {key: images})` goes to `image_path(workdir, key, step, i)`. Files are opened per write,
  so a crash loses nothing already written.
  """

  def __init__(self, workdir: epath.PathLike, *, log: bool = True):
    self._workdir = epath.Path(workdir)
    self._workdir.mkdir(parents=True, exist_ok=True)
    self._log = log

  @property
  def metrics_path(self) -> epath.Path:
    return self._workdir / METRICS_FILE

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    values = {name: _to_python_scalar(name, value) for name, value in scalars.items()}
    record = {"step": int(step), "time": time.time(), **values}
    with self.metrics_path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._log:
      logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in sorted(values.items())))

  def write_images(self, step: int, images: Mapping[str, Any]):
    images_dir = self._workdir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    for key, value in images.items():
      batch = _to_uint8_images(key, value)
      for i, image in enumerate(batch):
        path = image_path(self._workdir, key, step, None if len(batch) == 1 else i)
        with path.open("wb") as f:
          Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")
      if self._log:
        logging.info("[%d] wrote %d image(s) %r to %s", step, len(batch), key, images_dir)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    if self._log:
      logging.info("[%d] texts: %s", step, dict(texts))

  def write_hparams(self, hparams: Mapping[str, Any]):
    if self._log:
      logging.info("[hparams] %s", dict(hparams))

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
    del metadata
    if self._log:
      logging.info("[%d] summaries (not stored): %s", step, {k: np.shape(v) for k, v in values.items()})

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None):
    del num_buckets
    if self._log:
      logging.info("[%d] histograms (not stored): %s", step,
                   {k: (float(np.min(v)), float(np.max(v))) for k, v in arrays.items() if np.size(v)})

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    if self._log:
      logging.info("[%d] videos (not stored): %s", step, {k: np.shape(v) for k, v in videos.items()})

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    if self._log:
      logging.info("[%d] audios at %d Hz (not stored): %s", step, sample_rate,
                   {k: np.shape(v) for k, v in audios.items()})

  def flush(self):
    """Nothing is buffered: every write opens, writes and closes its file."""

  def close(self):
    self.flush()


class NoOpWriter:
  """The writer of processes other than the main one: accepts every clu MetricWriter call, writes nothing."""

  def write_scalars(self, step, scalars):
    pass

  def write_images(self, step, images):
    pass

  def write_texts(self, step, texts):
    pass

  def write_hparams(self, hparams):
    pass

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def _logged_lines(workdir: epath.PathLike) -> list[tuple[str, dict | None]]:
  """(line, record) for every line of `workdir/metrics.jsonl` (none without the file); the record is None for a
  line cut short by a kill."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = []
  for line in path.read_text().splitlines(keepends=True):
    try:
      lines.append((line, json.loads(line)))
    except json.JSONDecodeError:  # a write cut off by a kill
      lines.append((line, None))
  return lines


def discard_metrics_after(workdir: epath.PathLike, step: int) -> int:
  """Drops the lines of `metrics.jsonl` logged after `step`, and a last line cut short; returns how many went.

  A run resumed from its checkpoint at `step` trains and logs the steps after it again, so without this the
  file would hold those steps twice, from two runs, and a plot of it would go back in time.
  """
  logged = _logged_lines(workdir)
  lines = [line for line, _ in logged]
  kept = [line if line.endswith("\n") else line + "\n" for line, record in logged
          if record is not None and record.get("step", 0) <= step]
  if kept != lines:  # also when a whole last record only lost its newline, which the next append needs
    path = epath.Path(workdir) / METRICS_FILE
    temporary = path.parent / f".{path.name}.tmp"
    temporary.write_text("".join(kept))
    temporary.replace(path)
  return len(lines) - len(kept)


def logged_record(workdir: epath.PathLike, step: int, name: str) -> dict | None:
  """The last record of `metrics.jsonl` in `workdir` that holds the scalar `name` at `step`; None if there is
  none (or no file)."""
  found = [record for _, record in _logged_lines(workdir)
           if record is not None and record.get("step") == step and name in record]
  return found[-1] if found else None


def create_writer(workdir: epath.PathLike, is_main_process: bool):
  """The run's metric writer (see the module docstring); only the main process writes anything."""
  if not is_main_process:
    return NoOpWriter()
  try:
    # Importable only with both tensorflow and tensorboard installed (the `tf` extra).
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.info("No TensorBoard summaries (%s); metrics go to %s.", e, epath.Path(workdir) / METRICS_FILE)
    return JsonlWriter(workdir)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(epath.Path(workdir), asynchronous=True),
      JsonlWriter(workdir, log=False),
  ])


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressReporter:
  """Training speed and time to completion: steps/s, images/s and ETA, as scalars and one log line.

  The speeds are those of the interval since the previous report (or since construction). The ETA takes the
  average speed since construction instead: evaluations and checkpoints fall into a few intervals only, and an
  ETA from the last interval alone would leave them out everywhere else, though they recur. The trainer
  builds its reporter after compiling the train step; the evaluation's first pass compiles inside the average.

    progress = ProgressReporter(total_steps=..., batch_size=config.batch_size, writer=writer, first_step=step)
    ...
    if step % config.log_every_steps == 0:
      progress.report(step)

  `unit` / `units` name what is counted in the log line (default "step" / "steps"; an evaluation pass
  counts batches: `unit="eval batch", units="batches"`).
  """

  def __init__(self, *, total_steps: int, batch_size: int, writer=None, first_step: int = 0,
               clock: Callable[[], float] = time.monotonic, unit: str = "step", units: str = "steps"):
    check_positive_int("ProgressReporter", "total_steps", total_steps)
    check_positive_int("ProgressReporter", "batch_size", batch_size)
    if not isinstance(first_step, int) or not 0 <= first_step <= total_steps:
      raise ValueError(f"`first_step` must be an int in [0, total_steps={total_steps}], got {first_step!r}.")
    self._total_steps = total_steps
    self._batch_size = batch_size
    self._writer = writer
    self._clock = clock
    self._first_step = self._last_step = first_step
    self._start_time = self._last_time = clock()
    self._unit, self._units = unit, units

  def report(self, step: int) -> dict[str, float]:
    """Measures the speed since the last report, writes it (if there is a writer), logs it and returns it.

    Returns {"steps_per_sec", "images_per_sec", "eta_seconds"}: the interval's speeds, and (total_steps - step)
    over the average speed since construction, infinite if no step has been taken since.
    """
    if not isinstance(step, int) or step < self._last_step:
      raise ValueError(f"`step` must be an int >= the previously reported step {self._last_step}, got {step!r}.")
    now = self._clock()
    elapsed = now - self._last_time
    steps = step - self._last_step
    steps_per_sec = steps / elapsed if elapsed > 0 else math.inf if steps else 0.0
    average = (step - self._first_step) / max(now - self._start_time, 1e-9)
    eta = (self._total_steps - step) / average if average > 0 else math.inf
    scalars = {
        "steps_per_sec": steps_per_sec,
        "images_per_sec": steps_per_sec * self._batch_size,
        "eta_seconds": eta,
    }
    self._last_step, self._last_time = step, now
    if self._writer is not None:
      self._writer.write_scalars(step, scalars)
    logging.info("%s %d/%d (%.1f%%): %.3g %s/s, %.4g images/s, ETA %s", self._unit, step, self._total_steps,
                 100.0 * step / self._total_steps, steps_per_sec, self._units, scalars["images_per_sec"],
                 format_duration(eta))
    return scalars


def image_grid(images: np.ndarray, rows: int, *, padding: int = 0, pad_value: int = 0) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*H + (rows-1)*padding, cols*W + (cols-1)*padding, C] image.

  Images go row by row (image i at row i // cols, column i % cols) with cols = ceil(N / rows); empty
  cells and the `padding` pixels between cells get `pad_value`. For a reconstruction grid, pass
  `np.concatenate([originals, reconstructions])` with rows=2: originals on top, each above its
  reconstruction.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0 or images.dtype != np.uint8:
    raise ValueError(f"image_grid: `images` must be a uint8 array [N, H, W, C] with N >= 1, got shape "
                     f"{images.shape} and dtype {images.dtype}.")
  n, height, width, channels = images.shape
  if not isinstance(rows, int) or isinstance(rows, bool) or not 1 <= rows <= n:
    raise ValueError(f"image_grid: `rows` must be an int in [1, N={n}], got {rows!r}.")
  if not isinstance(padding, int) or padding < 0:
    raise ValueError(f"image_grid: `padding` must be an int >= 0, got {padding!r}.")
  if not isinstance(pad_value, int) or not 0 <= pad_value <= 255:
    raise ValueError(f"image_grid: `pad_value` must be an int in [0, 255], got {pad_value!r}.")
  cols = -(-n // rows)
  grid = np.full((rows * height + (rows - 1) * padding, cols * width + (cols - 1) * padding, channels),
                 pad_value, np.uint8)
  for i, image in enumerate(images):
    top = (i // cols) * (height + padding)
    left = (i % cols) * (width + padding)
    grid[top:top + height, left:left + width] = image
  return grid


class Profiler:
  """Captures JAX profiles of `num_steps` training steps into `logdir/plugins/profile/<time>/`.

  The first capture starts `FIRST_AFTER` steps after `first_step` (the step the run starts or resumes from, so
  that compilation and the first slow steps stay out of it), later ones at most once every `every_seconds`.
  Each capture holds `<host>.xplane.pb` for TensorBoard's or XProf's profile tab and `<host>.trace.json.gz`.
  `jax.profiler` alone: no TensorFlow needed, so it also runs on GPU machines without it. On the CPU every
  kernel of every host device is recorded: 5 steps of `configs/demo.py:runlocal` on 8 host devices wrote 73 MB
  in about 9 s, which is why the CPU configs switch it off.
  """

  FIRST_AFTER = 10

  def __init__(self, logdir: epath.PathLike, num_steps: int, first_step: int = 0, *, every_seconds: float = 3600.0,
               clock: Callable[[], float] = time.monotonic):
    self._logdir = str(logdir)
    self._num_steps = num_steps
    self._next_step = first_step + self.FIRST_AFTER
    self._every_seconds = every_seconds
    self._clock = clock
    self._last_start = None  # clock time of the last capture's start
    self._stop_step = None  # set while a capture is open

  def __call__(self, step: int, outputs=None) -> None:
    """Call after step `step` was dispatched; `outputs` (e.g. its metrics) are waited for before a capture ends,
    so that the profiled steps' device work is inside it."""
    if self._stop_step is not None:
      if step >= self._stop_step:
        jax.block_until_ready(outputs)
        self.close()
      return
    due = self._last_start is None or self._clock() - self._last_start >= self._every_seconds
    if step >= self._next_step and due:
      self._last_start = self._clock()
      try:
        jax.profiler.start_trace(self._logdir)
      except RuntimeError as e:  # e.g. a notebook's own trace is running: training goes on without this one
        logging.warning("No profile at step %d: %s", step, e)
        return
      self._stop_step = step + self._num_steps
      logging.info("Profiling steps %d-%d into %s.", step + 1, self._stop_step, self._logdir)

  def close(self) -> None:
    """Ends the open capture, if any (the loop calls it when it ends, also mid-capture)."""
    if self._stop_step is not None:
      self._stop_step = None
      jax.profiler.stop_trace()
      logging.info("Profile written to %s.", epath.Path(self._logdir) / "plugins" / "profile")


def create_profiler(workdir: epath.PathLike, is_main_process: bool, num_profile_steps: int,
                    first_step: int = 0) -> Profiler | None:
  """The run's `Profiler` of `num_profile_steps` steps into `workdir`; None on processes other than the main one
  and with `num_profile_steps=0`."""
  if not isinstance(num_profile_steps, int) or isinstance(num_profile_steps, bool) or num_profile_steps < 0:
    raise ValueError(f"`num_profile_steps` must be an int >= 0, got {num_profile_steps!r}.")
  if not is_main_process or not num_profile_steps:
    return None
  return Profiler(workdir, num_profile_steps, first_step)
