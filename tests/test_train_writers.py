"""Metric writers (JSON lines, PNG), progress/ETA and image grids."""
import json
import logging
import math
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gaussiantoken_jax.train import writers


def _read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_writer_appends_parseable_lines(tmp_path):
  writer = writers.JsonlWriter(tmp_path)
  writer.write_scalars(10, {"loss": jnp.float32(0.25), "lr": np.float64(2e-4), "count": 7})
  writer.write_scalars(20, {"loss": 0.125, "bad": float("nan")})
  writer.write_hparams({"batch_size": 8})
  writer.write_texts(20, {"note": "hello"})
  writer.flush()
  writer.close()
  lines = _read_jsonl(tmp_path / "metrics.jsonl")
  assert len(lines) == 2
  assert lines[0]["step"] == 10 and lines[0]["loss"] == 0.25 and lines[0]["lr"] == 2e-4 and lines[0]["count"] == 7
  assert isinstance(lines[0]["count"], int)
  assert lines[1]["step"] == 20 and lines[1]["loss"] == 0.125 and math.isnan(lines[1]["bad"])
  assert lines[0]["time"] <= lines[1]["time"]
  with pytest.raises(ValueError, match="'vector'.*shape \\(3,\\)"):
    writer.write_scalars(30, {"vector": np.ones(3)})


def test_jsonl_writer_saves_png(tmp_path):
  writer = writers.JsonlWriter(tmp_path)
  rng = np.random.default_rng(0)
  single = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
  floats = rng.random((2, 4, 6, 3)).astype(np.float32)
  writer.write_images(3, {"train/recon": single, "eval grid": floats})
  png = np.asarray(Image.open(tmp_path / "images" / "train_recon_00000003.png"))
  np.testing.assert_array_equal(png, single)
  for i in range(2):
    png = np.asarray(Image.open(tmp_path / "images" / f"eval_grid_00000003_{i}.png"))
    np.testing.assert_array_equal(png, np.round(floats[i].astype(np.float64) * 255).astype(np.uint8))
  with pytest.raises(ValueError, match="'x'.*\\[N, H, W, C\\]"):
    writer.write_images(3, {"x": np.zeros((4, 4, 2), np.uint8)})
  with pytest.raises(ValueError, match="'x'.*dtype int32"):
    writer.write_images(3, {"x": np.zeros((4, 4, 3), np.int32)})


def test_create_writer(tmp_path):
  main_dir, other_dir = tmp_path / "main", tmp_path / "other"
  other = writers.create_writer(other_dir, is_main_process=False)
  other.write_scalars(1, {"loss": 1.0})
  other.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
  other.close()
  assert not other_dir.exists()
  main = writers.create_writer(main_dir, is_main_process=True)
  main.write_scalars(1, {"loss": 1.5})
  main.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
  main.close()
  assert _read_jsonl(main_dir / "metrics.jsonl")[0]["loss"] == 1.5
  assert (main_dir / "images" / "x_00000001.png").exists()


class _FakeClock:
  def __init__(self, times):
    self._times = iter(times)

  def __call__(self):
    return next(self._times)


def test_a_resume_discards_the_metrics_logged_after_its_checkpoint(tmp_path):
  writer = writers.JsonlWriter(tmp_path, log=False)
  for step in (1, 2, 2, 3, 4):
    writer.write_scalars(step, {"loss": float(step)})
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 5, "lo')  # a line cut short by a kill
  assert writers.discard_metrics_after(tmp_path, 2) == 3  # steps 3 and 4, and the broken line
  assert [(line["step"], line["loss"]) for line in _read_jsonl(tmp_path / "metrics.jsonl")] == [
      (1, 1.0), (2, 2.0), (2, 2.0)]
  assert writers.discard_metrics_after(tmp_path, 2) == 0
  assert writers.discard_metrics_after(tmp_path / "no_run_here", 5) == 0


def test_logged_record_finds_a_scalar_at_its_step_only(tmp_path):
  assert writers.logged_record(tmp_path, 2, "loss") is None  # no file yet
  writer = writers.JsonlWriter(tmp_path)
  writer.write_scalars(2, {"loss": 1.0})
  writer.write_scalars(3, {"eval_psnr": 20.0, "eval_ssim": 0.5})
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 4, "eval_psnr": 2')  # cut short by a kill
  without_time = lambda record: {name: value for name, value in record.items() if name != "time"}
  assert without_time(writers.logged_record(tmp_path, 2, "loss")) == {"step": 2, "loss": 1.0}
  assert without_time(writers.logged_record(tmp_path, 3, "eval_psnr")) == {"step": 3, "eval_psnr": 20.0,
                                                                           "eval_ssim": 0.5}
  assert writers.logged_record(tmp_path, 2, "eval_psnr") is None and writers.logged_record(tmp_path, 3, "loss") is None
  assert writers.logged_record(tmp_path, 4, "eval_psnr") is None
  # Logged twice at one step (a rerun's pass after an earlier one): the later record is the one that counts.
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write("\n")  # ends the cut line, as a resume's discard_metrics_after would have dropped it
  writer.write_scalars(3, {"eval_psnr": 21.0})
  assert writers.logged_record(tmp_path, 3, "eval_psnr")["eval_psnr"] == 21.0


def test_progress_reporter_eta(tmp_path):
  writer = writers.JsonlWriter(tmp_path)
  progress = writers.ProgressReporter(total_steps=1000, batch_size=8, writer=writer, first_step=100,
                                      clock=_FakeClock([50.0, 70.0, 80.0, 80.0, 80.0]))
  # 100 -> 150 in 20 s: 2.5 steps/s, 20 images/s, 850 steps left = 340 s.
  first = progress.report(150)
  assert first == pytest.approx({"steps_per_sec": 2.5, "images_per_sec": 20.0, "eta_seconds": 340.0})
  # 150 -> 250 in 10 s: 10 steps/s now, but 150 steps in 30 s since the start: 750 steps left = 150 s.
  second = progress.report(250)
  assert second == pytest.approx({"steps_per_sec": 10.0, "images_per_sec": 80.0, "eta_seconds": 150.0})
  # No time and no step: no speed in this interval; the ETA keeps the average since the start.
  third = progress.report(250)
  assert third["steps_per_sec"] == 0.0 and third["eta_seconds"] == pytest.approx(150.0)
  # Steps but no time on the clock: an infinite speed, not a zero one.
  assert progress.report(260)["steps_per_sec"] == math.inf
  lines = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [line["step"] for line in lines] == [150, 250, 250, 260]
  assert lines[1]["eta_seconds"] == pytest.approx(150.0)
  with pytest.raises(ValueError, match="previously reported step 260"):
    progress.report(200)
  with pytest.raises(ValueError, match="batch_size"):
    writers.ProgressReporter(total_steps=10, batch_size=0)


def test_format_duration_is_hours_minutes_seconds():
  for seconds, text in ((0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"), (90061, "25:01:01")):
    assert writers.format_duration(seconds) == text, seconds
  assert writers.format_duration(math.inf) == "?"


def test_progress_of_an_evaluation_counts_batches(caplog):
  progress = writers.ProgressReporter(total_steps=40, batch_size=64, clock=_FakeClock([0.0, 5.0]),
                                      unit="eval batch", units="batches")
  with caplog.at_level(logging.INFO):
    progress.report(10)
  assert "eval batch 10/40 (25.0%): 2 batches/s, 128 images/s, ETA 0:00:15" in caplog.text


def _numpy_grid(images, rows, padding, pad_value):
  """The grid pixel by pixel: pixel (y, x) belongs to cell (y // (H + pad), x // (W + pad)) or to padding."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  out_h, out_w = rows * h + (rows - 1) * padding, cols * w + (cols - 1) * padding
  out = np.empty((out_h, out_w, c), np.uint8)
  for y in range(out_h):
    for x in range(out_w):
      row, dy = divmod(y, h + padding)
      col, dx = divmod(x, w + padding)
      index = row * cols + col
      out[y, x] = images[index, dy, dx] if dy < h and dx < w and index < n else pad_value
  return out


@pytest.mark.parametrize("n, rows, padding", [(6, 2, 0), (5, 2, 1), (4, 1, 2), (3, 3, 0)])
def test_image_grid(n, rows, padding):
  images = np.random.default_rng(n).integers(0, 256, size=(n, 3, 4, 3), dtype=np.uint8)
  grid = writers.image_grid(images, rows, padding=padding, pad_value=255)
  np.testing.assert_array_equal(grid, _numpy_grid(images, rows, padding, 255))


def test_image_grid_puts_originals_above_reconstructions():
  originals = np.zeros((3, 2, 2, 3), np.uint8)
  reconstructions = np.full((3, 2, 2, 3), 200, np.uint8)
  grid = writers.image_grid(np.concatenate([originals, reconstructions]), rows=2)
  assert grid.shape == (4, 6, 3)
  assert (grid[:2] == 0).all() and (grid[2:] == 200).all()


@pytest.mark.parametrize("images, rows, message", [
    (np.zeros((2, 4, 4, 3), np.float32), 1, "uint8"),
    (np.zeros((4, 4, 3), np.uint8), 1, "\\[N, H, W, C\\]"),
    (np.zeros((2, 4, 4, 3), np.uint8), 3, "rows"),
    (np.zeros((2, 4, 4, 3), np.uint8), 0, "rows"),
])
def test_image_grid_rejects_bad_input(images, rows, message):
  with pytest.raises(ValueError, match=message):
    writers.image_grid(images, rows)


def test_create_writer_with_tensorflow_writes_tensorboard_and_jsonl(tmp_path):
  """Only where TensorFlow and TensorBoard are installed (the `tf` extra): clu's writer next to the JSON lines."""
  tf = pytest.importorskip("tensorflow")
  pytest.importorskip("tensorboard")
  writer = writers.create_writer(tmp_path, is_main_process=True)
  writer.write_scalars(4, {"loss": 1.5})
  writer.write_images(4, {"grid": np.full((2, 2, 3), 9, np.uint8)})
  writer.close()
  assert _read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 1.5
  assert (tmp_path / "images" / "grid_00000004.png").exists()
  scalars = {}
  for event_file in tmp_path.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
      for value in event.summary.value:
        if value.tag == "loss":
          scalars[event.step] = float(tf.make_ndarray(value.tensor))
  assert scalars == {4: 1.5}


def test_profiler_is_off_on_other_processes_and_at_zero_steps(tmp_path):
  assert writers.create_profiler(tmp_path, is_main_process=False, num_profile_steps=5) is None
  assert writers.create_profiler(tmp_path, is_main_process=True, num_profile_steps=0) is None
  with pytest.raises(ValueError, match=r"`num_profile_steps` must be an int >= 0, got -1"):
    writers.create_profiler(tmp_path, is_main_process=True, num_profile_steps=-1)


def test_profiler_captures_the_profiled_steps_then_waits_an_hour_and_close_ends_an_open_capture(tmp_path, caplog):
  """Real `jax.profiler` captures of a jitted matmul: one after step 13 (resumed at step 3, first capture 10 steps
  later) that holds steps 14-15, none while the hour since it has not passed, another once it has; `close` ends
  a capture the loop left open (a second trace could not start otherwise)."""
  import jax  # pylint: disable=import-outside-toplevel
  now = [0.0]
  profiler = writers.Profiler(tmp_path, num_steps=2, first_step=3, clock=lambda: now[0])
  step_fn = jax.jit(lambda x: x @ x.T / 64.0)
  x = jnp.ones((64, 64))
  captures = lambda: sorted((tmp_path / "plugins" / "profile").glob("*"))  # noqa: E731
  with caplog.at_level(logging.INFO):
    for step in range(4, 40):
      x = step_fn(x)
      profiler(step, x)
      if step == 12:
        assert not (tmp_path / "plugins").exists()
  assert len(captures()) == 1 and re.findall(r"Profiling steps \d+-\d+", caplog.text) == ["Profiling steps 14-15"]
  files = sorted(p.name for p in captures()[0].iterdir())
  assert {name.split(".", 1)[1] for name in files} == {"xplane.pb", "trace.json.gz"}, files
  shutil.rmtree(tmp_path / "plugins")  # a second capture in the same second would reuse the first one's folder
  for step, now[0] in ((40, 3599.0), (41, 3600.0)):  # an hour after the first capture's start, the second
    x = step_fn(x)
    profiler(step, x)
    assert not captures()  # written when it ends
  profiler.close()
  assert len(captures()) == 1
  jax.profiler.start_trace(str(tmp_path / "other"))  # no capture is left running
  jax.profiler.stop_trace()
