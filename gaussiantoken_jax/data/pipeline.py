"""grain input pipelines: one per JAX process, a shard of the source each, uint8 batches on the host.

    source (random access) -> this process's shard -> [train: shuffle, repeat] -> decode + crop (grain reader
    threads; worker processes if `num_workers` > 0) -> skip corrupt files -> batch -> prefetch

Training (`make_train_loader`) repeats forever with a per-epoch reshuffle and yields
`{"image": uint8 [local_batch, S, S, 3]}`; its iterator's state goes into the training checkpoint
(`checkpoint_args` / `restore_args`). Evaluation (`make_eval_loader`) is one ordered pass that yields
`{"image", "mask"}`, pads the last batch and then, where shards differ in size, whole padding batches, so
that every process runs the same number of steps (a process that stopped early would leave the others
waiting in a collective).

Corrupt files are skipped where they are decoded, each with a log line naming the file, the reason and the
running count in that process; they are not known before decoding, which is why the evaluation mask comes
from the data rather than from index arithmetic.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading

from absl import flags
import grain
import numpy as np

from gaussiantoken_jax.data import demo, sources, transforms

SOURCES = ("demo", "tfds", "folder")
AUGMENTS = ("none", "random_resized_crop")
EVAL_CROPS = ("resize_center", "center")
# Training raises when more than this fraction of a window of records fails to decode: that is a wrong path or
# format, not a few bad files, and without the check a repeating pipeline over unreadable files never yields.
_MAX_CORRUPT_FRACTION = 0.5
# Reader threads per process (grain's default): decoding and resizing in PIL release the GIL.
_READ_THREADS = 16

_log = logging.getLogger(__name__)
_skipped_lock = threading.Lock()
_skipped_count = 0


def _count_skip(key: str, reason: str) -> None:
  global _skipped_count
  with _skipped_lock:
    _skipped_count += 1
    count = _skipped_count
  _log.warning("Skipped unreadable image %r (%s); %d skipped so far in this process.", key, reason, count)


def load_record_image(record: dict) -> np.ndarray | None:
  """The uint8 [H, W, 3] image of a source record, or None (logged and counted) if it does not decode."""
  data = record["data"]
  if isinstance(data, np.ndarray):
    return data
  try:
    return transforms.decode_image(data)
  except transforms.CorruptImageError as e:
    _count_skip(record["key"], str(e))
    return None


# ----------------------------------------------------------------------------------------------------------------
# Configuration.


def _check_choice(field: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"config.data.{field} must be one of {choices}, got {value!r}.")


def _check_positive_int(field: str, value, allow_zero: bool = False) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
    raise ValueError(f"config.{field} must be a {'non-negative' if allow_zero else 'positive'} int, got {value!r}.")


def _check_config(config) -> None:
  data = config.data
  _check_choice("source", data.source, SOURCES)
  _check_choice("augment", data.augment, AUGMENTS)
  _check_choice("eval_crop", data.eval_crop, EVAL_CROPS)
  _check_positive_int("data.image_size", data.image_size)
  _check_positive_int("data.num_workers", data.num_workers, allow_zero=True)
  _check_positive_int("data.prefetch_buffer_size", data.prefetch_buffer_size)
  _check_positive_int("data.eval_batch_size", data.eval_batch_size, allow_zero=True)
  _check_positive_int("batch_size", config.batch_size)
  _check_positive_int("seed", config.seed, allow_zero=True)
  if data.source == "tfds" and not data.name:
    raise ValueError("config.data.name must name a TFDS dataset (e.g. 'cifar10') when config.data.source='tfds'.")
  if data.source == "folder" and not data.path:
    raise ValueError("config.data.path must be an image directory or .tar when config.data.source='folder'.")


def _local_batch_size(global_batch_size: int, field: str, shard_count: int) -> int:
  if global_batch_size % shard_count:
    raise ValueError(f"config.{field}={global_batch_size} (the global batch) must be divisible by the number of "
                     f"processes, {shard_count}.")
  return global_batch_size // shard_count


def make_source(config, split: str):
  """The random-access source of `split` for `config.data` (records `{"key", "data"}`, see `sources`).

  For folders, a "{split}" in `path` or `split_file` is replaced by the split name (e.g.
  ".../cifar10-jpeg-{split}.tar", ".../mini_imagenet/{split}.csv"); a split file alone defines the split;
  otherwise a non-empty split selects the subfolder of that name ("" = every image under `path`).
  """
  data = config.data
  if data.source == "demo":
    return demo.demo_source(split, data.image_size)
  if data.source == "tfds":
    return sources.TfdsImageSource(data.name, split, data.data_dir)
  path, subfolder, split_file = _folder_source_args(data, split)
  return sources.ImageFolderSource(path, subfolder=subfolder, split_file=split_file)


def _folder_source_args(data, split: str) -> tuple[str, str, str]:
  """(path, subfolder, split file) of a folder source's `split` (see `make_source`)."""
  split_by_folder = not data.split_file and "{split}" not in data.path
  subfolder = split if split_by_folder else ""
  return data.path.replace("{split}", split), subfolder, data.split_file.replace("{split}", split)


def _warn_if_evaluating_on_training_data(data) -> None:
  """Logs a warning when the training and the evaluation split resolve to the same records: with a split file
  without "{split}", for example, both read the files it lists, and every evaluation metric would be measured on
  training images."""
  def records(split):
    return _folder_source_args(data, split) if data.source == "folder" else split
  if records(data.train_split) == records(data.eval_split):
    _log.warning("config.data: the training split %r and the evaluation split %r read the same records (source "
                 "%r, path %r, split file %r): evaluation will measure training images.", data.train_split,
                 data.eval_split, data.source, data.path, data.split_file)


def train_split_size(config) -> int:
  """Records in the training split, all processes together: what one epoch is, for turning epochs into steps.

  TFDS: from the builder's info; image folders and tars: the image files listed (corrupt ones included, as
  they are only found when decoded); the demo: its own artificial epoch, `demo.TRAIN_RECORDS`.
  """
  data = config.data
  _check_choice("source", data.source, SOURCES)
  if data.source == "demo":
    return demo.TRAIN_RECORDS
  if data.source == "tfds":
    return sources.tfds_split_size(data.name, data.train_split, data.data_dir)
  return len(make_source(config, data.train_split))


# ----------------------------------------------------------------------------------------------------------------
# Per-record transforms (picklable callables: worker processes receive them by pickle).


@dataclasses.dataclass(frozen=True)
class EvalCrop:
  """The evaluation crop of a uint8 [H, W, 3] image to [size, size, 3]: "center" crops the centre square at
  full resolution; otherwise the short side is resized to `size` first. Also used by the tokenize command."""
  size: int
  eval_crop: str

  def __call__(self, image: np.ndarray) -> np.ndarray:
    if self.eval_crop == "center":
      return transforms.center_crop(image, self.size)
    return transforms.resize_short_side_center_crop(image, self.size)


@dataclasses.dataclass(frozen=True)
class _TrainTransform:
  """Decode, then the training crop: demo -> random scale crop; "random_resized_crop" -> RRC + flip;
  "none" -> the evaluation crop (the reference trains CIFAR on the images as they are)."""
  size: int
  demo: bool
  augment: str
  eval_crop: EvalCrop

  def __call__(self, record: dict, rng: np.random.Generator) -> dict | None:
    image = load_record_image(record)
    if image is None:
      return None
    if self.demo:
      image = transforms.random_scale_crop(image, rng, self.size)
    elif self.augment == "random_resized_crop":
      image = transforms.random_resized_crop(image, rng, self.size)
    else:
      image = self.eval_crop(image)
    return {"image": np.ascontiguousarray(image)}


@dataclasses.dataclass(frozen=True)
class _EvalTransform:
  eval_crop: EvalCrop

  def __call__(self, record: dict) -> dict | None:
    image = load_record_image(record)
    if image is None:
      return None
    return {"image": np.ascontiguousarray(self.eval_crop(image)), "mask": np.True_}


def _add_mask(element: dict | None) -> dict | None:
  return None if element is None else element | {"mask": np.True_}


def _is_present(element) -> bool:
  return element is not None


def _transforms_from_config(config) -> tuple[_TrainTransform, EvalCrop]:
  data = config.data
  eval_crop = EvalCrop(data.image_size, data.eval_crop)
  return _TrainTransform(data.image_size, data.source == "demo", data.augment, eval_crop), eval_crop


# ----------------------------------------------------------------------------------------------------------------
# Pipelines.


def _shard(ds: grain.MapDataset, shard_options: grain.sharding.ShardOptions) -> grain.MapDataset:
  """Every shard_count-th record from shard_index: disjoint shards that together cover the source."""
  if shard_options.drop_remainder:
    ds = ds[:len(ds) // shard_options.shard_count * shard_options.shard_count]
  return ds[shard_options.shard_index::shard_options.shard_count]


def _shard_seeds(seed: int, shard_options: grain.sharding.ShardOptions) -> tuple[int, int]:
  """(shuffle seed, augmentation seed) for this shard: distinct per process, so that processes do not draw the
  same crop parameters for their i-th records."""
  shuffle_seed, augment_seed = np.random.SeedSequence([seed, shard_options.shard_index]).generate_state(2)
  return int(shuffle_seed), int(augment_seed)


def _finish(ds: grain.IterDataset, batch_size: int, data, *, batch_fn=None,
            drop_remainder: bool) -> grain.IterDataset:
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
  if data.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read absl flags (at their defaults), which FLAGS refuses before parsing. Under
      # absl.app the command line is parsed long before this; in tests and notebooks keep the defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers,
                                                     per_worker_buffer_size=data.prefetch_buffer_size))
  return ds


def _read_options(data, batch_size: int) -> grain.ReadOptions:
  # The prefetch buffer counts records, the config counts batches; more reader threads than buffered records
  # would idle (and grain warns).
  buffer_size = batch_size * data.prefetch_buffer_size
  return grain.ReadOptions(num_threads=min(_READ_THREADS, buffer_size), prefetch_buffer_size=buffer_size)


def make_train_loader(config, *, shard_options: grain.sharding.ShardOptions | None = None) -> grain.IterDataset:
  """The training pipeline of this process: `{"image": uint8 [local_batch, S, S, 3]}` batches, forever.

  Args:
    config: the training config; reads `batch_size` (GLOBAL), `seed` and `data.*` (see docs/data.md).
    shard_options: which shard this process reads; default `grain.sharding.ShardByJaxProcess()`. Tests pass
      explicit `grain.sharding.ShardOptions` to stand in for other processes.

  Returns:
    A `grain.IterDataset`; `iter()` of it gives an iterator with `get_state()` / `set_state()` that
    `checkpoint_args` / `restore_args` put into an Orbax checkpoint. local_batch = batch_size / shards.
  """
  _check_config(config)
  shard_options = shard_options or grain.sharding.ShardByJaxProcess()
  data = config.data
  batch_size = _local_batch_size(config.batch_size, "batch_size", shard_options.shard_count)
  shuffle_seed, augment_seed = _shard_seeds(config.seed, shard_options)
  train_transform, _ = _transforms_from_config(config)
  _warn_if_evaluating_on_training_data(data)

  ds = _shard(grain.MapDataset.source(make_source(config, data.train_split)), shard_options)
  if len(ds) == 0:
    raise ValueError(f"shard {shard_options.shard_index} of {shard_options.shard_count} of the training data is "
                     f"empty: fewer records than processes.")
  ds = ds.shuffle(seed=shuffle_seed).repeat()  # repeat() reseeds the shuffle every epoch.
  ds = ds.random_map(train_transform, seed=augment_seed).filter(_is_present)
  it = ds.to_iter_dataset(_read_options(data, batch_size))
  it = grain.experimental.WithOptionsIterDataset(
      it, grain.experimental.DatasetOptions(filter_raise_threshold_ratio=_MAX_CORRUPT_FRACTION))
  return _finish(it, batch_size, data, drop_remainder=True)


@dataclasses.dataclass(frozen=True)
class _PadBatch:
  """Stacks up to `batch_size` eval elements and pads with zero images whose mask is False."""
  batch_size: int

  def __call__(self, elements) -> dict:
    images = np.stack([e["image"] for e in elements])
    mask = np.zeros(self.batch_size, dtype=bool)
    mask[:len(elements)] = True
    padded = np.zeros((self.batch_size,) + images.shape[1:], dtype=np.uint8)
    padded[:len(elements)] = images
    return {"image": padded, "mask": mask}


class EvalLoader:
  """One ordered pass over this process's shard, `num_batches` batches of `{"image", "mask"}`.

  Every process yields the same number of batches (computed from the source length, before any corrupt file
  is skipped): after the data run out, the rest are all padding (mask all False). Iterating again starts a
  new pass.
  """

  def __init__(self, dataset: grain.IterDataset, *, num_batches: int, batch_size: int, image_size: int,
               num_records: int):
    self._dataset = dataset
    self.num_batches = num_batches
    self.batch_size = batch_size
    self.image_size = image_size
    self.num_records = num_records  # In the whole source (all shards), corrupt files included.

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    emitted = 0
    for batch in self._dataset:
      if emitted == self.num_batches:
        raise RuntimeError(f"the evaluation pass produced more than the {self.num_batches} batches planned.")
      yield batch
      emitted += 1
    for _ in range(emitted, self.num_batches):
      yield {"image": np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.uint8),
             "mask": np.zeros(self.batch_size, dtype=bool)}


def make_eval_loader(config, *, split: str | None = None, augment: bool = False,
                     shard_options: grain.sharding.ShardOptions | None = None) -> EvalLoader:
  """One pass over an evaluation split: `{"image": uint8 [local_eval_batch, S, S, 3], "mask": bool [...]}`.

  The last partial batch is padded (mask False on padding), never dropped; all processes yield the same
  number of batches. Records are in source order within a shard (no shuffle).

  Args:
    config: reads `batch_size`, `seed` and `data.*` (`data.eval_batch_size`, 0 = `batch_size`; `eval_crop`).
    split: the split to read; default `config.data.eval_split`.
    augment: apply the training transform (seeded by `config.seed`) instead of the evaluation crop: what the
      model sees in training, in a single ordered pass (used by `python -m gaussiantoken_jax.data.inspect`).
    shard_options: default `grain.sharding.ShardByJaxProcess()`.
  """
  _check_config(config)
  shard_options = shard_options or grain.sharding.ShardByJaxProcess()
  data = config.data
  batch_size = _local_batch_size(data.eval_batch_size or config.batch_size,
                                 "data.eval_batch_size" if data.eval_batch_size else "batch_size",
                                 shard_options.shard_count)
  train_transform, eval_crop = _transforms_from_config(config)

  source = make_source(config, data.eval_split if split is None else split)
  ds = _shard(grain.MapDataset.source(source), shard_options)
  if augment:
    _, augment_seed = _shard_seeds(config.seed, shard_options)
    ds = ds.random_map(train_transform, seed=augment_seed).map(_add_mask)
  else:
    ds = ds.map(_EvalTransform(eval_crop))
  it = ds.filter(_is_present).to_iter_dataset(_read_options(data, batch_size))
  it = _finish(it, batch_size, data, batch_fn=_PadBatch(batch_size), drop_remainder=False)
  largest_shard = math.ceil(len(source) / shard_options.shard_count)
  return EvalLoader(it, num_batches=math.ceil(largest_shard / batch_size), batch_size=batch_size,
                    image_size=data.image_size, num_records=len(source))


# ----------------------------------------------------------------------------------------------------------------
# Checkpointing the training iterator with Orbax.


def checkpoint_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
  """Orbax save args for the training iterator, for an `ocp.args.Composite`, e.g.

      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=data.checkpoint_args(train_iter)))

  Each process writes its own iterator state (`process_<i>-of-<n>.json`).
  """
  return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
  """Orbax restore args that set a fresh iterator (from `iter(make_train_loader(config))`) to the saved state:

      restored = manager.restore(step, args=ocp.args.Composite(state=..., data=data.restore_args(train_iter)))
      train_iter = restored.data   # the same object, now positioned after the last batch trained on

  The config must describe the same data, batch size, seed and process count as the saved run.
  """
  return grain.checkpoint.CheckpointRestore(iterator)
