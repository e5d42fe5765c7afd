r"""Exports the tokens of every image of a folder, an uncompressed .tar or a prepared TFDS split.

  python -m gaussiantoken_jax.tokenize --workdir=/tmp/gt_demo --data=/path/to/images --output=/tmp/tokens.npz
  python -m gaussiantoken_jax.tokenize --workdir=DIR --step=600 --data=images.tar --output=OUT.npz --batch_size=128
  python -m gaussiantoken_jax.tokenize --workdir=DIR --data=tfds:cifar10 --split=test [--tfds_data_dir=D] --output=OUT
  python -m gaussiantoken_jax.tokenize --workdir=DIR --data=/path/to/images --output=OUT.npz --fit_geometry_steps=25

Folder and tar images are read in the order of their relative paths; a TFDS split (`--data=tfds:NAME`, split
`--split`, default "train", slices such as "train[:10%]" too) in the order of its records, read through
`data.sources.TfdsImageSource` (the dataset must be prepared as ArrayRecord; no TensorFlow). Images are decoded to
RGB and brought to the trained size by the run's evaluation crop (`config.data.eval_crop`, as evaluation sees
them). Records that do not decode are skipped, logged and counted, as the data pipeline does. The output `.npz`
holds, one row per readable image:

  ids        str [N]          the source key: the image's path relative to --data; for TFDS the record's
                              `file_name` feature if it has one, else "NAME/SPLIT[index]"
  indices    int32 [N, K]     codebook indices
  means      float32 [N, K, 2]  (GaussianToken only; absent for the plain-VQ baseline)
  rotations  float32 [N, K]
  scales     float32 [N, K, 2]
  skipped    str [M]          the keys of the records that could not be read

An output ending in `.array_record` is an ArrayRecord file instead, one record per readable image in the same
order: a msgpack map (`flax.serialization.msgpack_serialize`) {"id": str, "indices": int32 [K], and for
GaussianToken "means": float32 [K, 2], "rotations": float32 [K], "scales": float32 [K, 2]}; the skipped files
are only counted and logged.

Read either back with `load_export(path)` -> (ids, Tokens), or batch by batch through grain with
`token_dataset(path, batch_size)` -> (ids, Tokens) batches. Resumable: each batch is written as it is done to
`<output>.parts/<batch>.npz` (atomically, by rename), and a rerun with the same arguments encodes only the
batches missing there; the output is assembled from the parts at the end and the parts are then removed.

Several processes (started as for training, `train.distributed`'s environment variables or a cluster that JAX
detects; the output's folder must be shared by them): process p of P encodes the batches b with b % P == p, each
with the whole model on its own local devices, and writes their parts; after a barrier process 0 assembles the
output in batch order. One process splits each batch over its devices (the run's mesh).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import grain
import jax
import numpy as np
from etils import epath
from flax import serialization

from gaussiantoken_jax import cli_flags, command_line, restore
from gaussiantoken_jax.checks import check_positive_int
from gaussiantoken_jax.data import pipeline, sources
from gaussiantoken_jax.tokenizer import GaussianTokenizer, Tokens, read_npz
from gaussiantoken_jax.train import distributed, sharding

FLAGS = flags.FLAGS
DEFAULT_BATCH_SIZE = 64
_TOKEN_FIELDS = ("indices", "means", "rotations", "scales")
_MANIFEST = "manifest.json"
ARRAY_RECORD_SUFFIX = ".array_record"
TFDS_PREFIX = "tfds:"
DEFAULT_TFDS_SPLIT = "train"
_BARRIER_COUNT = itertools.count()


def _define_flags() -> None:
  # Defined only when run as a command (the other commands define `workdir` and `output` too).
  flags.DEFINE_string("workdir", None, "The training run's workdir (or its checkpoints dir, or a step dir).")
  flags.DEFINE_string("data", None, "An image folder, an uncompressed .tar of images, or tfds:NAME (a prepared "
                      "TFDS dataset).")
  flags.DEFINE_string("split", None, f"The TFDS split (with --data=tfds:NAME); default {DEFAULT_TFDS_SPLIT!r}.")
  flags.DEFINE_string("tfds_data_dir", None, "Where the TFDS dataset is prepared; default TFDS's own.")
  flags.DEFINE_string("output", None, "The .npz (or .array_record) to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the newest complete one.")
  flags.DEFINE_bool("use_ema", True, "Use the EMA parameters (as evaluation does).")
  flags.DEFINE_integer("fit_geometry_steps", 0, "GaussianToken: fit each image's geometry to it in this many Adam "
                       "steps (GaussianTokenizer.encode's fit_geometry_steps); 0: the embedder's geometry.")


def parts_dir(output: epath.PathLike) -> epath.Path:
  """Where the per-batch parts of an export to `output` are kept until it is complete."""
  output = epath.Path(output)
  return output.parent / f"{output.name}.parts"


def _part_path(parts: epath.Path, batch: int) -> epath.Path:
  return parts / f"{batch:06d}.npz"


def _write_npz(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes `path` atomically: a reader (or a resumed run) sees the whole file or none."""
  temporary = path.parent / f".{path.name}.tmp"
  with temporary.open("wb") as f:
    np.savez(f, **arrays)
  temporary.replace(path)  # overwrites: a rerun may write the same part or output again


def _is_array_record(path: epath.PathLike) -> bool:
  return os.fspath(path).endswith(ARRAY_RECORD_SUFFIX)


def _write_array_record(path: epath.Path, arrays: dict[str, np.ndarray]) -> None:
  """One msgpack record per image (see the module docstring), written to a temporary file, then renamed."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top  (grain's, Linux)
  temporary = path.parent / f".{path.name}.tmp"
  writer = array_record_module.ArrayRecordWriter(os.fspath(temporary), "group_size:1")
  try:
    for row in range(len(arrays["ids"])):
      record = {"id": str(arrays["ids"][row])}
      record.update({name: arrays[name][row] for name in _TOKEN_FIELDS if name in arrays})
      writer.write(serialization.msgpack_serialize(record))
  finally:
    writer.close()
  temporary.replace(path)


def _canonical(path: epath.PathLike) -> str:
  """A local path made absolute, with links resolved; a URL (gs://...) as given."""
  path = os.fspath(path)
  return path if "://" in path else os.path.realpath(path)


def _check_manifest(parts: epath.Path, manifest: dict[str, Any]) -> None:
  """Writes the export's manifest (process 0), or checks that the one of an interrupted export is the same.

  Every process checks a manifest that exists (so all raise the same error); when there is none, process 0
  writes it atomically and the others go on (their parts carry the same arguments).
  """
  path = parts / _MANIFEST
  if not path.exists():
    if jax.process_index() == 0:
      temporary = parts / f".{_MANIFEST}.tmp"
      temporary.write_text(json.dumps(manifest, indent=2))
      temporary.replace(path)
    return
  saved = json.loads(path.read_text())
  differ = [f"{key}: before {saved.get(key)!r}, now {value!r}" for key, value in manifest.items()
            if saved.get(key) != value]
  if differ:
    raise ValueError(f"{parts} holds an interrupted export made with other arguments ({'; '.join(differ)}); rerun "
                     f"with those, or delete {parts} to start over.")


def make_source(data: str, *, split: str | None = None, tfds_data_dir: str | None = None):
  """The records to tokenize (`{"key", "data"}`, see `data.sources`): `tfds:NAME` is split `split` (default
  "train") of the prepared TFDS dataset NAME in `tfds_data_dir` (FileNotFoundError if it is not prepared),
  anything else an image folder or uncompressed .tar (then `split` and `tfds_data_dir` must be None)."""
  data = os.fspath(data)
  if data.startswith(TFDS_PREFIX):
    name = data[len(TFDS_PREFIX):]
    if not name:
      raise ValueError(f"`data` {data!r} names no TFDS dataset; expected e.g. 'tfds:cifar10'.")
    return sources.TfdsImageSource(name, split or DEFAULT_TFDS_SPLIT, tfds_data_dir)
  if split is not None or tfds_data_dir is not None:
    raise ValueError(f"`split` and `tfds_data_dir` are for TFDS data ('tfds:NAME'); `data` {data!r} is a folder or "
                     f"tar, got split={split!r}, tfds_data_dir={tfds_data_dir!r}.")
  if not epath.Path(data).exists():
    example = data if data.isidentifier() else "cifar10"  # a bare name, not a path
    raise FileNotFoundError(f"`data` {data!r}: no such image folder or .tar; a prepared TFDS dataset is written "
                            f"'{TFDS_PREFIX}NAME', e.g. '{TFDS_PREFIX}{example}'.")
  return sources.ImageFolderSource(data)


def _encode_batch(tokenizer: GaussianTokenizer, source, first: int, last: int, batch_size: int, crop,
                  fit_geometry_steps: int) -> dict[str, np.ndarray]:
  """The part for records [first, last): ids, token arrays of the readable images, and the skipped ids."""
  ids, images, skipped = [], [], []
  for index in range(first, last):
    record = source[index]
    image = pipeline.load_record_image(record)  # None (logged and counted) if it does not decode
    if image is None:
      skipped.append(record["key"])
    else:
      ids.append(record["key"])
      images.append(crop(image))
  size = tokenizer.image_size
  batch = np.zeros((batch_size, size, size, 3), np.uint8)  # padded to one shape: one compilation
  if images:
    batch[:len(images)] = np.stack(images)
  tokens = jax.device_get(tokenizer.encode(batch, fit_geometry_steps=fit_geometry_steps))
  part = {"ids": np.asarray(ids, dtype=str), "skipped": np.asarray(skipped, dtype=str)}
  for name in _TOKEN_FIELDS:
    value = getattr(tokens, name)
    if value is not None:
      part[name] = np.asarray(value)[:len(images)]
  return part


def export(workdir: epath.PathLike, data: str, output: epath.PathLike, *, step: int | None = None,
           use_ema: bool = True, batch_size: int = DEFAULT_BATCH_SIZE, split: str | None = None,
           tfds_data_dir: str | None = None, stop_after_batches: int | None = None,
           fit_geometry_steps: int = 0) -> dict[str, Any]:
  """Writes the tokens of every image of `data` to `output` (see the module docstring).

  Every process of a multi-process run calls it with the same arguments.

  Args:
    workdir: the checkpoint (`GaussianTokenizer.from_checkpoint`'s path).
    data: an image folder, an uncompressed .tar, or "tfds:NAME" (see `make_source`).
    output: the .npz (or .array_record) to write.
    step, use_ema: which parameters (see `GaussianTokenizer.from_checkpoint`).
    batch_size: images per encode call (per process).
    split, tfds_data_dir: the TFDS split and data_dir (with "tfds:NAME" only).
    stop_after_batches: encode at most this many new batches (in each process), then return without assembling
      the output (an interruption, for tests and for splitting a long export into jobs).
    fit_geometry_steps: GaussianToken: each image's geometry fitted to it in this many steps at encode time
      (`GaussianTokenizer.encode`).

  Returns {"num_images", "num_skipped", "batches_encoded", "batches_reused", "complete"}: the batches counted
  are this process's; the image counts are None when the export is not complete and in processes other
  than 0 (process 0 assembles the output).
  """
  check_positive_int("export", "batch_size", batch_size)
  output = epath.Path(output)
  if output.is_dir():
    raise ValueError(f"export: `output` {output} is a directory; expected the path of a .npz or "
                     f"{ARRAY_RECORD_SUFFIX} file to write.")
  source = make_source(data, split=split, tfds_data_dir=tfds_data_dir)  # before the restore: its errors are quick
  process, num_processes = jax.process_index(), jax.process_count()
  # Several processes: each encodes its own batches with the whole model on its local devices (no collective).
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1), jax.local_devices()) if num_processes > 1 else None
  tokenizer = GaussianTokenizer.from_checkpoint(workdir, step, use_ema=use_ema, mesh=mesh)
  tokenizer.check_fit(fit_geometry_steps)  # before the manifest: a bad value must not be recorded as the export's
  devices = tokenizer.mesh.size
  if batch_size % devices:
    logging.warning("Batches of %d images are not split over the %d devices (not a multiple of them); "
                    "--batch_size=%d would be.", batch_size, devices,
                    -(-batch_size // devices) * devices)
  config = tokenizer.config
  crop = pipeline.EvalCrop(config.data.image_size, config.data.eval_crop)
  num_batches = -(-len(source) // batch_size)
  parts = parts_dir(output)
  parts.mkdir(parents=True, exist_ok=True)
  is_tfds = os.fspath(data).startswith(TFDS_PREFIX)
  # Paths as absolute and without links, and the checkpoint as its workdir and step: the same export named
  # another way (a trailing slash, the step directory) resumes.
  manifest = {"checkpoint": _canonical(restore.locate_checkpoint(workdir, step)[0]), "step": tokenizer.step,
              "use_ema": use_ema, "data": os.fspath(data) if is_tfds else _canonical(data),
              "num_files": len(source), "batch_size": batch_size, "fit_geometry_steps": fit_geometry_steps}
  if is_tfds:
    manifest.update(split=split or DEFAULT_TFDS_SPLIT, tfds_data_dir=tfds_data_dir)
  else:  # the same files, not only as many: a part holds the tokens of the files its batch named then
    manifest["files_sha256"] = hashlib.sha256("\n".join(source.names).encode()).hexdigest()
  _check_manifest(parts, manifest)
  mine = range(process, num_batches, num_processes)
  logging.info("Tokenizing %d records of %s in %d batches of %d with step %d of %s%s.", len(source), data,
               num_batches, batch_size, tokenizer.step, workdir,
               f"; process {process} of {num_processes} encodes {len(mine)} of them" if num_processes > 1 else "")

  encoded = reused = files_read = 0
  start = time.monotonic()
  for batch in mine:
    path = _part_path(parts, batch)
    if path.exists():
      reused += 1
      continue
    if stop_after_batches is not None and encoded >= stop_after_batches:
      logging.info("Stopping after %d new batches; %d of this process's %d done.", encoded, encoded + reused,
                   len(mine))
      break
    first, last = batch * batch_size, min((batch + 1) * batch_size, len(source))
    _write_npz(path, _encode_batch(tokenizer, source, first, last, batch_size, crop, fit_geometry_steps))
    encoded += 1
    files_read += last - first  # not the padding of a short last batch
    elapsed = time.monotonic() - start
    remaining = len(mine) - reused - encoded
    logging.info("Batch %d/%d done (%.1f files/s; about %.0f s left).", batch + 1, num_batches,
                 files_read / elapsed, remaining * elapsed / encoded)

  # Every process decides from the same files whether the export is complete, before process 0 assembles it
  # and removes the parts; the last barrier keeps the others until the output is there.
  barrier = f"gaussiantoken_jax.tokenize.{output.name}.{next(_BARRIER_COUNT)}"
  distributed.barrier(f"{barrier}.encoded")
  complete = all(_part_path(parts, batch).exists() for batch in range(num_batches))
  distributed.barrier(f"{barrier}.checked")
  summary = {"num_images": None, "num_skipped": None, "batches_encoded": encoded, "batches_reused": reused,
             "complete": complete}
  if not complete:
    logging.info("Export to %s not complete: %s.", output, summary)
    return summary
  if process == 0:
    assembled = [read_npz(_part_path(parts, batch)) for batch in range(num_batches)]
    arrays = {name: np.concatenate([part[name] for part in assembled]) for name in assembled[0]}
    output.parent.mkdir(parents=True, exist_ok=True)
    if _is_array_record(output):
      _write_array_record(output, arrays)
    else:
      _write_npz(output, arrays)
    shutil.rmtree(os.fspath(parts))
    summary.update(num_images=len(arrays["ids"]), num_skipped=len(arrays["skipped"]))
  distributed.barrier(f"{barrier}.assembled")
  logging.info("%s %s: %s.", "Wrote" if process == 0 else f"Process {process}'s parts are in; process 0 wrote",
               output, summary)
  return summary


def load_export(path: epath.PathLike) -> tuple[np.ndarray, Tokens]:
  """(ids str [N], Tokens with N rows) of an export (.npz or .array_record)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No token export {path}.")
  if _is_array_record(path):
    rows = _ArrayRecordRows(path)
    records = [rows[i] for i in range(len(rows))]
    arrays = {"ids": np.asarray([r["id"] for r in records], dtype=str)}
    if records:
      arrays.update({name: np.stack([r[name] for r in records]) for name in _TOKEN_FIELDS if name in records[0]})
    else:  # no image decoded: records carry the token shapes, so there are none to give
      arrays["indices"] = np.zeros((0, 0), np.int32)
  else:
    arrays = read_npz(path)
  if "ids" not in arrays or "indices" not in arrays:
    raise ValueError(f"{path} is not a token export: expected arrays 'ids' and 'indices', got {sorted(arrays)}.")
  return arrays["ids"], Tokens(**{name: arrays[name] for name in _TOKEN_FIELDS if name in arrays})


class _ExportRows:
  """Random access to an export's rows, {"id", "indices", ...} per image (the whole file is read into memory)."""

  def __init__(self, path: epath.PathLike):
    ids, tokens = load_export(path)
    self._columns = {"id": ids, **{name: value for name, value in tokens._fields().items() if value is not None}}

  def __len__(self) -> int:
    return len(self._columns["id"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {name: column[index] for name, column in self._columns.items()}


class _ArrayRecordRows:
  """Random access to an ArrayRecord export's rows, read record by record (nothing held in memory)."""

  def __init__(self, path: epath.PathLike):
    self._source = grain.sources.ArrayRecordDataSource([os.fspath(path)])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return serialization.msgpack_restore(self._source[index])


def _to_ids_and_tokens(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, Tokens]:
  return np.asarray(batch["id"], dtype=str), Tokens(**{name: batch[name] for name in _TOKEN_FIELDS if name in batch})


def token_dataset(path: epath.PathLike, batch_size: int, *, shuffle_seed: int | None = None,
                  drop_remainder: bool = False) -> grain.MapDataset:
  """An export (.npz, read into memory, or .array_record, read record by record) as a grain dataset of
  (ids str [b], Tokens with b rows) batches, for a downstream pipeline.

  In the export's order, or shuffled (per epoch of `grain`'s own) with `shuffle_seed`; the last batch is
  shorter unless `drop_remainder`. `.to_iter_dataset()` gives grain's prefetching iterator.
  """
  check_positive_int("token_dataset", "batch_size", batch_size)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"No token export {path}.")
  dataset = grain.MapDataset.source(_ArrayRecordRows(path) if _is_array_record(path) else _ExportRows(path))
  if shuffle_seed is not None:
    dataset = dataset.shuffle(seed=shuffle_seed)
  return dataset.batch(batch_size, drop_remainder=drop_remainder).map(_to_ids_and_tokens)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.data or not FLAGS.output:
    raise app.UsageError("--workdir, --data and --output are required.")
  cli_flags.refuse("tokenize", cli_flags.INCEPTION_WEIGHTS)
  distributed.initialize_from_env()
  summary = export(FLAGS.workdir, FLAGS.data, FLAGS.output, step=FLAGS.step, use_ema=FLAGS.use_ema,
                   batch_size=cli_flags.BATCH_SIZE.value or DEFAULT_BATCH_SIZE, split=FLAGS.split,
                   tfds_data_dir=FLAGS.tfds_data_dir, fit_geometry_steps=FLAGS.fit_geometry_steps)
  print(json.dumps(summary))


if __name__ == "__main__":
  _define_flags()
  flags.declare_key_flag("batch_size")  # in --helpshort
  command_line.run(main)
