"""The grain pipelines over image folders, tar archives, a tiny TFDS dataset and the demo photographs.

The folder and TFDS images are flat colours that encode their identity (red = 8 * id), so each delivered
image can be traced back to its file whatever the crop or resize: that is how shuffling, sharding, resuming
and the evaluation pass are checked without calling the code under test for the expected values.
"""
import collections
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from gaussiantoken_jax import data
from gaussiantoken_jax.data import demo, inspect as data_inspect, transforms

NUM_TRAIN, NUM_TEST = 23, 7  # Identities 0..22 in train/, 23..29 in test/.
# ../shared/data beside the repository (development machines and CI); tests that need it skip without it.
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def _config(**data_fields):
  config = ml_collections.ConfigDict(dict(
      batch_size=4, seed=0,
      data=dict(source="folder", name="", data_dir=None, path="", split_file="", train_split="train",
                eval_split="test", image_size=8, augment="none", eval_crop="resize_center", num_workers=0,
                prefetch_buffer_size=2, eval_batch_size=0)))
  for field in ("batch_size", "seed"):
    if field in data_fields:
      config[field] = data_fields.pop(field)
  config.data.update(data_fields)
  return config


def _identity_image(identity: int, height: int, width: int) -> Image.Image:
  return Image.fromarray(np.full((height, width, 3), (8 * identity, 255 - 8 * identity, 100), np.uint8))


def _identities(images: np.ndarray) -> list[int]:
  """The identity of each flat-colour image of a batch (after any crop/resize), checking it is flat."""
  red = images[..., 0].astype(np.int64)
  assert (red.max(axis=(1, 2)) - red.min(axis=(1, 2)) <= 1).all()
  return [int(round(r / 8)) for r in red[:, 0, 0]]


def _take(iterator, num_batches):
  return [next(iterator)["image"] for _ in range(num_batches)]


def _eval_identities(loader):
  """Identities delivered by one evaluation pass, checking masks and padding."""
  seen = []
  for batch in loader:
    assert batch["image"].dtype == np.uint8 and batch["mask"].dtype == bool
    assert batch["mask"].shape == (batch["image"].shape[0],)
    assert not batch["image"][~batch["mask"]].any()  # Padding is black.
    seen += _identities(batch["image"][batch["mask"]])
  return seen


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  """root/train/<class>/*.png (identities 0..22) and root/test/<class>/*.png (23..29), assorted sizes."""
  root = tmp_path_factory.mktemp("images")
  for identity in range(NUM_TRAIN + NUM_TEST):
    split = "train" if identity < NUM_TRAIN else "test"
    folder = root / split / f"class_{identity % 3}"
    folder.mkdir(parents=True, exist_ok=True)
    _identity_image(identity, 9 + identity % 5, 10 + 3 * (identity % 4)).save(folder / f"{identity:03d}.png")
  (root / "train" / "README.txt").write_text("not an image, ignored by extension")
  return root


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
  """Good images (ids 1, 2, 3, a 1x1 id 4, a 4000x3000 id 5) plus a truncated JPEG, an empty file and text."""
  root = tmp_path_factory.mktemp("bad")
  for identity in (1, 2, 3):
    _identity_image(identity, 12, 16).save(root / f"good_{identity}.png")
  _identity_image(4, 1, 1).save(root / "tiny_1x1.png")
  _identity_image(5, 3000, 4000).save(root / "large_4000x3000.png")
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(buf, "JPEG")
  (root / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  (root / "empty.jpg").write_bytes(b"")
  (root / "text.png").write_text("this is a text file named .png\n")
  return root


# ---------------------------------------------------------------------------------------------------------------
# Training loader.


def test_train_batches_shape_dtype_and_content(image_root):
  iterator = iter(data.make_train_loader(_config(path=str(image_root))))
  for images in _take(iterator, 3):
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    assert set(_identities(images)) <= set(range(NUM_TRAIN))


def test_train_epochs_cover_the_split_and_reshuffle(image_root):
  iterator = iter(data.make_train_loader(_config(path=str(image_root), batch_size=1)))
  order = [_identities(images)[0] for images in _take(iterator, 2 * NUM_TRAIN)]
  first, second = order[:NUM_TRAIN], order[NUM_TRAIN:]
  assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))
  assert first != second and first != sorted(first)


def test_train_order_is_determined_by_the_seed(image_root):
  def order(seed):
    iterator = iter(data.make_train_loader(_config(path=str(image_root), seed=seed)))
    return [_identities(images) for images in _take(iterator, 5)]

  assert order(3) == order(3)
  assert order(3) != order(4)


def test_train_shards_are_disjoint_and_cover_the_split(image_root):
  config = _config(path=str(image_root), batch_size=3)  # 3 processes x local batch 1.
  epochs = []
  for index in range(3):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=3)
    iterator = iter(data.make_train_loader(config, shard_options=shard))
    shard_size = len(range(index, NUM_TRAIN, 3))
    epoch = [_identities(images)[0] for images in _take(iterator, shard_size)]
    assert len(set(epoch)) == shard_size
    epochs.append(set(epoch))
  assert not (epochs[0] & epochs[1] or epochs[0] & epochs[2] or epochs[1] & epochs[2])
  assert set().union(*epochs) == set(range(NUM_TRAIN))


def test_train_iterator_resumes_exactly(image_root):
  loader = data.make_train_loader(_config(path=str(image_root)))
  iterator = iter(loader)
  _take(iterator, 3)
  state = iterator.get_state()
  uninterrupted = _take(iterator, 4)  # Crosses an epoch boundary (23 records, batches of 4).
  resumed = iter(loader)
  resumed.set_state(state)
  for a, b in zip(uninterrupted, _take(resumed, 4)):
    np.testing.assert_array_equal(a, b)


def test_train_iterator_resumes_from_an_orbax_checkpoint(tmp_path):
  config = _config(source="demo", image_size=16, batch_size=8)  # Random crops: the augmentation must resume too.
  iterator = iter(data.make_train_loader(config))
  _take(iterator, 2)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(2, args=ocp.args.Composite(data=data.checkpoint_args(iterator)))
    manager.wait_until_finished()
  uninterrupted = _take(iterator, 3)

  fresh = iter(data.make_train_loader(config))
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    restored = manager.restore(2, args=ocp.args.Composite(data=data.restore_args(fresh)))
  for a, b in zip(uninterrupted, _take(restored.data, 3)):
    np.testing.assert_array_equal(a, b)


def test_one_worker_process_gives_the_same_batches_and_resumes(image_root):
  in_process = iter(data.make_train_loader(_config(path=str(image_root))))
  expected = _take(in_process, 5)
  loader = data.make_train_loader(_config(path=str(image_root), num_workers=1))
  iterator = iter(loader)
  got = _take(iterator, 2)
  state = iterator.get_state()
  resumed = iter(loader)
  resumed.set_state(state)
  got += _take(resumed, 3)
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)


def _ramp_folder(folder, copies: int):
  """`copies` identical 24 x 32 PNGs of a horizontal and vertical ramp: any crop or flip shows in the pixels."""
  folder.mkdir()
  y, x = np.mgrid[0:24, 0:32]
  ramp = np.stack([8 * x, 10 * y, 255 - 8 * x], axis=-1).astype(np.uint8)
  for i in range(copies):
    Image.fromarray(ramp).save(folder / f"{i:02d}.png")


def test_random_resized_crop_augment_is_applied_and_seeded_per_process(tmp_path):
  """augment="random_resized_crop" crops each record anew (the "none" augment gives the evaluation crop every
  time), and the processes' augmentation seeds differ: two shards of identical images do not get the same crops
  for their i-th records."""
  _ramp_folder(tmp_path / "ramps", 4)
  config = _config(path=str(tmp_path / "ramps"), train_split="", eval_split="", augment="random_resized_crop",
                   batch_size=2)
  shards = [iter(data.make_train_loader(config, shard_options=grain.sharding.ShardOptions(i, 2))) for i in (0, 1)]
  first, second = (np.concatenate(_take(iterator, 6)) for iterator in shards)  # 3 epochs of 2 records each
  center = next(iter(data.make_eval_loader(config)))["image"][0]
  assert len({image.tobytes() for image in first}) == 6
  assert not any(np.array_equal(image, center) for image in first)
  assert not any(np.array_equal(a, b) for a, b in zip(first, second))
  # The evaluation loader's augment=True (the inspection tool's view of training) applies the same transform.
  augmented = next(iter(data.make_eval_loader(config, augment=True)))
  assert augmented["mask"].all()
  assert not any(np.array_equal(image, center) for image in augmented["image"])
  # ... seeded by config.seed, as training is: the same seed the same crops, another seed others.
  again = next(iter(data.make_eval_loader(config, augment=True)))["image"]
  config.seed = 1
  reseeded = next(iter(data.make_eval_loader(config, augment=True)))["image"]
  np.testing.assert_array_equal(again, augmented["image"])
  assert not any(np.array_equal(a, b) for a, b in zip(reseeded, augmented["image"]))


def test_each_configs_training_crop_is_its_documented_transform():
  """The demo: the log-uniform scale crop; "random_resized_crop": RRC + flip; "none": the evaluation crop. Each
  against the transforms function given a generator of the same seed (a noise image: any two crops differ)."""
  image = np.random.default_rng(13).integers(0, 256, (24, 32, 3), dtype=np.uint8)
  cases = [(_config(source="demo"), lambda rng: transforms.random_scale_crop(image, rng, 8)),
           (_config(augment="random_resized_crop"), lambda rng: transforms.random_resized_crop(image, rng, 8)),
           (_config(), lambda rng: transforms.resize_short_side_center_crop(image, 8))]
  for config, expected in cases:
    train_transform, _ = data.pipeline._transforms_from_config(config)  # pylint: disable=protected-access
    got = train_transform({"key": "noise.png", "data": image}, np.random.default_rng(7))["image"]
    np.testing.assert_array_equal(got, expected(np.random.default_rng(7)), err_msg=config.data.augment)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation loader.


def test_eval_pass_covers_every_image_once_with_padding(image_root):
  loader = data.make_eval_loader(_config(path=str(image_root), eval_split="train", batch_size=5))
  batches = list(loader)
  assert len(batches) == len(loader) == 5  # ceil(23 / 5)
  assert [int(b["mask"].sum()) for b in batches] == [5, 5, 5, 5, 3]
  seen = _eval_identities(loader)
  assert seen == sorted(range(NUM_TRAIN), key=lambda i: (i % 3, i))  # Path order (class_0/000, 003, ...).
  # A second pass is a fresh, identical pass.
  assert _eval_identities(loader) == seen


def test_eval_shards_are_disjoint_cover_and_have_equal_length(image_root):
  config = _config(path=str(image_root), eval_split="train", batch_size=12, eval_batch_size=6)  # local 2
  seen, lengths = [], []
  for index in range(3):
    loader = data.make_eval_loader(config, shard_options=grain.sharding.ShardOptions(index, 3))
    lengths.append(len(list(loader)))
    seen += _eval_identities(loader)
    assert loader.num_records == NUM_TRAIN  # the whole split (what evaluation counts), not this shard's 7 or 8
  assert lengths == [4, 4, 4]  # ceil(ceil(23 / 3) / 2)
  assert sorted(seen) == list(range(NUM_TRAIN))


def test_a_shorter_eval_shard_ends_with_an_all_padding_batch(image_root):
  """Local batch 1 over 3 shards of 23 records (8, 8, 7): every shard yields ceil(23 / 3) = 8 batches, the third's
  last one all padding; a count from the smallest shard (7) would leave shards 0 and 1 with a batch too many."""
  config = _config(path=str(image_root), eval_split="train", batch_size=3)
  masks = []
  for index in range(3):
    loader = data.make_eval_loader(config, shard_options=grain.sharding.ShardOptions(index, 3))
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    assert all(not b["image"][~b["mask"]].any() for b in batches)
    masks.append([bool(b["mask"][0]) for b in batches])
  assert masks == [[True] * 8, [True] * 8, [True] * 7 + [False]]


def test_shards_with_drop_remainder_have_equal_sizes(image_root):
  """ShardOptions(drop_remainder=True): the first 3 * floor(23 / 3) = 21 records in path order, 7 a shard."""
  config = _config(path=str(image_root), eval_split="train", batch_size=3)
  seen = []
  for index in range(3):
    shard = grain.sharding.ShardOptions(index, 3, drop_remainder=True)
    delivered = _eval_identities(data.make_eval_loader(config, shard_options=shard))
    assert len(delivered) == 7
    seen += delivered
  path_order = sorted(range(NUM_TRAIN), key=lambda i: (i % 3, i))
  assert sorted(seen) == sorted(path_order[:21])


def test_eval_center_crop_option_does_not_resize(image_root):
  config = _config(path=str(image_root), eval_crop="center", image_size=12)
  images = next(iter(data.make_eval_loader(config)))["image"]
  black = np.zeros(3, np.uint8)
  colour = lambda identity: np.array(_identity_image(identity, 1, 1))[0, 0]
  # test/class_0/024.png is 13 x 10: rows cropped from round(0.5) = 0, one black column either side.
  np.testing.assert_array_equal(images[0, :, 1:11], np.broadcast_to(colour(24), (12, 10, 3)))
  np.testing.assert_array_equal(images[0, :, [0, 11]], np.broadcast_to(black, (2, 12, 3)))
  # test/class_0/027.png is 11 x 19: one black row below (padding splits 0 above, 1 below), columns cropped.
  np.testing.assert_array_equal(images[1, :11], np.broadcast_to(colour(27), (11, 12, 3)))
  np.testing.assert_array_equal(images[1, 11], np.broadcast_to(black, (12, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Folder sources: bad files, archives, split files, errors.


def test_bad_files_are_skipped_and_counted_the_rest_load(bad_root, caplog):
  with caplog.at_level(logging.WARNING, logger="gaussiantoken_jax.data.pipeline"):
    loader = data.make_eval_loader(_config(path=str(bad_root), eval_split=""))
    seen = _eval_identities(loader)
  assert sorted(seen) == [1, 2, 3, 4, 5]
  skipped = [r.getMessage() for r in caplog.records if "Skipped unreadable image" in r.getMessage()]
  assert len(skipped) == 3
  for name in ("truncated.jpg", "empty.jpg", "text.png"):
    assert sum(name in message for message in skipped) == 1
  # The running count of the process: the counter is process-wide (earlier tests' skips count too), so the three
  # messages carry three consecutive counts, whatever order the reader threads logged them in.
  counts = sorted(int(re.search(r"; (\d+) skipped so far in this process", message).group(1)) for message in skipped)
  assert counts == list(range(counts[0], counts[0] + 3)), skipped


def test_training_on_a_folder_with_bad_files_keeps_going(bad_root):
  iterator = iter(data.make_train_loader(_config(path=str(bad_root), train_split="", batch_size=5)))
  # The first epoch has 8 records, 3 unreadable: the first batch of 5 is exactly the readable ones.
  assert sorted(_identities(next(iterator)["image"])) == [1, 2, 3, 4, 5]


def test_tar_archive_reads_in_place_like_the_folder(image_root, tmp_path):
  archive = tmp_path / "images.tar"
  with tarfile.open(archive, "w") as tar:
    tar.add(image_root, arcname=".")  # Members become "./train/...": the keys drop the "./".
  from_tar = data.make_eval_loader(_config(path=str(archive), eval_split="train"))
  from_dir = data.make_eval_loader(_config(path=str(image_root), eval_split="train"))
  for a, b in zip(from_tar, from_dir, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert sorted(_eval_identities(from_tar)) == list(range(NUM_TRAIN))
  # A split file reorders the members: each name must keep its own offset in the archive.
  split_file = tmp_path / "split.txt"
  split_file.write_text("test/class_2/029.png\ntrain/class_0/003.png\ntest/class_0/024.png\n")
  assert _eval_identities(data.make_eval_loader(_config(path=str(archive), split_file=str(split_file)))) == [29, 3, 24]


def test_listed_files_and_their_bytes_in_a_folder_and_in_a_tar(tmp_path):
  """Every image extension in any case, files at the top (keys without "./") and in a linked folder; each record's
  data is the file's bytes exactly, in place from a tar too (an image may well decode with its last byte cut off or
  a byte of the archive's padding added: only the bytes show a wrong member size). A compressed tar is refused: its
  members have no offsets in the file."""
  folder, elsewhere = tmp_path / "folder", tmp_path / "elsewhere"
  (folder / "sub").mkdir(parents=True)
  elsewhere.mkdir()
  files = {"top.PNG": folder / "top.PNG", "sub/b.jpeg": folder / "sub" / "b.jpeg",
           "sub/c.JPG": folder / "sub" / "c.JPG", "linked/d.bmp": elsewhere / "d.bmp"}
  for identity, path in enumerate(files.values()):
    _identity_image(identity, 3, 5 + identity).save(path)
  (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
  (folder / "notes.txt").write_text("not an image")
  expected = sorted(files)  # Python's sort of the relative paths: upper case first
  archive = tmp_path / "folder.tar"
  with tarfile.open(archive, "w", dereference=True) as tar:  # the linked folder's files stored as files
    tar.add(folder, arcname=".")
  for path in (folder, archive):
    source = data.sources.ImageFolderSource(str(path))
    assert source.names == expected, path
    for index, name in enumerate(expected):
      assert source[index] == {"key": name, "data": files[name].read_bytes()}, (path, name)
  with tarfile.open(tmp_path / "folder.tar.gz", "w:gz") as tar:
    tar.add(folder, arcname=".")
  with pytest.raises(ValueError, match="as an uncompressed tar archive"):
    data.sources.ImageFolderSource(str(tmp_path / "folder.tar.gz"))


def test_split_file_selects_and_orders_files(image_root, tmp_path):
  split_file = tmp_path / "split.csv"
  split_file.write_text("filename,label\ntest/class_2/029.png,x\ntrain/class_0/003.png,y\ntest/class_0/024.png,z\n")
  loader = data.make_eval_loader(_config(path=str(image_root), split_file=str(split_file)))
  assert _eval_identities(loader) == [29, 3, 24]
  # "path label" lines; a commented-out entry is not read (it would be a missing file if it were).
  split_file.write_text("test/class_2/029.png 4\n#test/class_0/024.png\ntrain/class_0/003.png\t5\n")
  assert _eval_identities(data.make_eval_loader(_config(path=str(image_root), split_file=str(split_file)))) == [29, 3]
  split_file.write_text("train/class_0/003.png\ntrain/class_0/no_such_file.png\n")
  with pytest.raises(ValueError, match="no_such_file.png"):
    data.make_eval_loader(_config(path=str(image_root), split_file=str(split_file)))


def test_a_split_file_shared_by_both_splits_is_warned_about(image_root, tmp_path, caplog):
  split_file = tmp_path / "split.txt"
  split_file.write_text("train/class_0/003.png\ntest/class_0/024.png\n")
  with caplog.at_level("WARNING"):
    data.make_train_loader(_config(path=str(image_root), split_file=str(split_file)))
  assert "read the same records" in caplog.text and "evaluation will measure training images" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    data.make_train_loader(_config(path=str(image_root)))  # train/ and test/ subfolders: no warning
  assert "read the same records" not in caplog.text


def test_a_split_subfolder_is_a_whole_folder_name(tmp_path):
  """Split "train" is the folder train/, not every path that begins with "train" (train_extra/ here)."""
  for folder in ("train", "train_extra"):
    (tmp_path / folder).mkdir()
    _identity_image(1, 2, 2).save(tmp_path / folder / "a.png")
  assert data.sources.ImageFolderSource(str(tmp_path), subfolder="train").names == ["train/a.png"]


def test_split_template_in_path(image_root):
  config = _config(path=os.path.join(str(image_root), "{split}"))
  assert sorted(_eval_identities(data.make_eval_loader(config))) == list(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))
  # An explicit split (the evaluate command's --split) wins over config.data.eval_split.
  assert sorted(_eval_identities(data.make_eval_loader(config, split="train"))) == list(range(NUM_TRAIN))


def test_empty_or_missing_folder_errors_name_the_path(tmp_path):
  empty = tmp_path / "empty"
  (empty / "sub").mkdir(parents=True)
  (empty / "sub" / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match=f"no image files.*{empty}"):
    data.make_eval_loader(_config(path=str(empty), eval_split=""))
  missing = tmp_path / "does_not_exist"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    data.make_train_loader(_config(path=str(missing), train_split=""))
  with pytest.raises(FileNotFoundError, match=r"image folder path is empty: set it, e.g. --config.data.path="):
    data.sources.ImageFolderSource("")


@pytest.mark.parametrize("field,value,match", [
    ("source", "imagenet", "config.data.source"),
    ("augment", "mixup", "config.data.augment"),
    ("eval_crop", "five_crop", "config.data.eval_crop"),
    ("image_size", 0, "config.data.image_size"),
    ("num_workers", -1, "config.data.num_workers"),
    ("prefetch_buffer_size", 0, "config.data.prefetch_buffer_size"),
    ("eval_batch_size", -1, "config.data.eval_batch_size"),
    ("seed", -1, "config.seed"),
])
def test_config_errors_name_the_field(image_root, field, value, match):
  with pytest.raises(ValueError, match=match):
    data.make_train_loader(_config(path=str(image_root), **{field: value}))


def test_global_batch_must_split_over_processes(image_root):
  with pytest.raises(ValueError, match="config.batch_size=4.*divisible.*3"):
    data.make_train_loader(_config(path=str(image_root)), shard_options=grain.sharding.ShardOptions(0, 3))
  # 7 test images over 8 processes: the last shard would have nothing to repeat.
  with pytest.raises(ValueError, match="shard 7 of 8 of the training data is empty: fewer records than processes"):
    data.make_train_loader(_config(path=str(image_root), train_split="test", batch_size=8),
                           shard_options=grain.sharding.ShardOptions(7, 8))


# ---------------------------------------------------------------------------------------------------------------
# TFDS: a tiny dataset written as ArrayRecord by a custom builder, without TensorFlow.


class GaussiantokenTestImages(tfds.core.GeneratorBasedBuilder):
  """10 train / 5 test flat-colour PNGs; test record 2 holds bytes that are not an image."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(10)), "test": self._generate_examples(range(10, 15))}

  def _generate_examples(self, identities):
    for identity in identities:
      if identity == 12:
        encoded = b"\x89PNG\r\n\x1a\n but truncated right after the signature"
      else:
        buf = io.BytesIO()  # Encoded bytes are stored as they are; encoding arrays would need TensorFlow.
        _identity_image(identity, 10 + identity % 3, 12).save(buf, "PNG")
        encoded = buf.getvalue()
      yield identity, {"image": encoded, "label": identity % 2}


class GaussiantokenNamedImages(tfds.core.GeneratorBasedBuilder):
  """2 train PNGs with a `file_name` feature, as imagenet2012's records have."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for identity in (3, 4):
      buf = io.BytesIO()
      _identity_image(identity, 5, 6).save(buf, "PNG")
      yield identity, {"image": buf.getvalue(), "file_name": f"n0{identity}/img_{identity}.JPEG"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  GaussiantokenTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  GaussiantokenNamedImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  assert "tensorflow" not in sys.modules
  return str(data_dir)


def test_tfds_source_train_and_eval(tfds_dir):
  config = _config(source="tfds", name="gaussiantoken_test_images", data_dir=tfds_dir, batch_size=2)
  iterator = iter(data.make_train_loader(config))
  epoch = sum((_identities(images) for images in _take(iterator, 5)), [])
  assert sorted(epoch) == list(range(10))
  seen = _eval_identities(data.make_eval_loader(config))
  assert sorted(seen) == [10, 11, 13, 14]  # Record 12 does not decode: skipped, and its slot is padding.


def test_tfds_keys_are_the_records_file_names_where_they_have_one(tfds_dir):
  """A record's `file_name` names it (in skip logs and in token exports); without one, "name/split[index]"."""
  source = data.sources.TfdsImageSource("gaussiantoken_named_images", "train", tfds_dir)
  records = [source[index] for index in range(len(source))]
  keys = {record["key"]: _identities(transforms.decode_image(record["data"])[None])[0] for record in records}
  assert keys == {"n03/img_3.JPEG": 3, "n04/img_4.JPEG": 4}
  unnamed = data.sources.TfdsImageSource("gaussiantoken_test_images", "test", tfds_dir)
  assert [unnamed[index]["key"] for index in range(len(unnamed))] == [
      f"gaussiantoken_test_images/test[{index}]" for index in range(5)]


def test_train_split_size_counts_the_training_records_of_each_source(tfds_dir, image_root, tmp_path):
  """What one epoch is: the tfds builder's count (slices too), the folder's files, the demo's own epoch."""
  tfds_config = _config(source="tfds", name="gaussiantoken_test_images", data_dir=tfds_dir)
  assert data.train_split_size(tfds_config) == 10  # not the 5 of the test split
  tfds_config.data.train_split = "train[:40%]"
  assert data.train_split_size(tfds_config) == 4
  assert data.train_split_size(_config(path=str(image_root))) == NUM_TRAIN  # train/ only, the README ignored
  assert data.train_split_size(_config(source="demo", image_size=32)) == 9 * 64 == len(demo.demo_source("train", 32))
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data.train_split_size(_config(source="tfds", name="gaussiantoken_test_images", data_dir=str(tmp_path)))


def test_tfds_unprepared_dataset_error_names_it(tmp_path):
  config = _config(source="tfds", name="gaussiantoken_test_images", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="gaussiantoken_test_images.*not prepared"):
    data.make_eval_loader(config)


# ---------------------------------------------------------------------------------------------------------------
# The demo source.


def _independent_photo(name):
  """The photo straight from the package's public loader, not through gaussiantoken_jax."""
  import skimage.data
  from sklearn.datasets import load_sample_image
  if name in ("china", "flower"):
    return load_sample_image(name + ".jpg")
  if name.startswith("motorcycle"):
    return skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1]
  return getattr(skimage.data, name)()


def test_demo_trains_on_eight_or_more_photos_and_holds_out_others():
  source = demo.demo_source("train", 32)
  keys = {source[i]["key"] for i in range(len(source))}
  assert len(keys) >= 8 and not keys & set(demo.HELD_OUT_PHOTOS)
  photos = {}
  for i in range(len(source)):
    photos.setdefault(source[i]["key"], source[i]["data"])
  held_out = [_independent_photo(name) for name in demo.HELD_OUT_PHOTOS]
  for name, photo in photos.items():
    np.testing.assert_array_equal(photo, _independent_photo(name))
    assert not any(photo.shape == other.shape and np.array_equal(photo, other) for other in held_out)
  distinct = {photo.tobytes() for photo in photos.values()}
  assert len(distinct) == len(photos)
  # The module's docstring: nine photos, each as many records (an epoch that leaves one out, or favours one, would
  # still pass the checks above).
  counts = collections.Counter(source[i]["key"] for i in range(len(source)))
  assert counts == {name: demo.CROPS_PER_PHOTO for name in (
      "astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left",
      "motorcycle_right", "china")}
  eval_keys = {demo.demo_source("test", 32)[i]["key"].split("[")[0] for i in range(3)}
  assert eval_keys <= set(demo.HELD_OUT_PHOTOS)


def test_demo_train_crops_are_seeded_and_varied():
  def first_batches(seed):
    iterator = iter(data.make_train_loader(_config(source="demo", image_size=16, batch_size=8, seed=seed)))
    return np.stack(_take(iterator, 2))

  a, b, c = first_batches(0), first_batches(0), first_batches(1)
  assert a.shape == (2, 8, 16, 16, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  flat = a.reshape(16, -1)
  assert len({row.tobytes() for row in flat}) == 16


def test_demo_eval_is_a_fixed_grid_of_held_out_crops():
  config = _config(source="demo", image_size=64, batch_size=16)
  loader = data.make_eval_loader(config)
  first = [b["image"][b["mask"]] for b in loader]
  second = [b["image"][b["mask"]] for b in loader]
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a, b)
  images = np.concatenate(first)
  # chelsea 300 x 451: sides 300, 150, 75 -> 1x2 + 2x4 + 4x7 = 38; flower 427 x 640: 427, 213, 106 -> 2 + 12 + 35.
  assert len(images) == loader.num_records == 38 + 49
  # The first crop is chelsea's left square (rows 0..299, columns 0..299) shrunk to 64: compare block means.
  chelsea = _independent_photo("chelsea")[:, :300].astype(np.float64)
  coarse_photo = chelsea.reshape(4, 75, 4, 75, 3).mean(axis=(1, 3))
  coarse_crop = images[0].astype(np.float64).reshape(4, 16, 4, 16, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(coarse_crop, coarse_photo, atol=3.0)
  # A zoom level whose side equals the crop size is kept ("while side >= size"): chelsea's 75 at size 75.
  assert len(demo.demo_source("test", 75)) == 38 + 49


@pytest.mark.parametrize("size", [32, 64])
def test_demo_eval_crops_are_distinct_squares_that_tile_each_held_out_photo_at_every_zoom(size):
  """Each key names its photo and its (top, left, side, side) box: at every zoom level (side = short side, halved
  while >= size) the boxes must lie inside the photo, be distinct, and together cover every pixel of it."""
  source = demo.demo_source("test", size)
  boxes = collections.defaultdict(list)
  for i in range(len(source)):
    name, _, box = source[i]["key"].partition("[")
    top, left, height, width = (int(v) for v in box.rstrip("]").split(","))
    boxes[name, height].append((top, left, height, width))
  for name in demo.HELD_OUT_PHOTOS:
    photo_height, photo_width = _independent_photo(name).shape[:2]
    side, sides = min(photo_height, photo_width), []
    while side >= size:
      sides.append(side)
      side //= 2
    assert sorted(side for n, side in boxes if n == name) == sorted(sides), name
    for side in sides:
      level = boxes[name, side]
      assert len(set(level)) == len(level), (name, side)
      covered = np.zeros((photo_height, photo_width), bool)
      for top, left, height, width in level:
        assert height == width == side and 0 <= top <= photo_height - side and 0 <= left <= photo_width - side
        covered[top:top + side, left:left + side] = True
      assert covered.all(), (name, side)


# ---------------------------------------------------------------------------------------------------------------
# The inspection tool.


def test_inspect_counts_delivered_and_skipped_and_writes_a_grid(bad_root, tmp_path):
  output = tmp_path / "grid.png"
  counts = data_inspect.run(data_inspect.inspect_config(str(bad_root), None, 16, 4), augment=False,
                            output=str(output))
  assert counts == {"images": 5, "skipped": 3}
  grid = np.asarray(Image.open(output))
  assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 4 images of 16 px, 2 a row, 2-pixel gutters.
  assert _identities(grid[2:18, 2:18][None]) == [1]


def test_inspect_reads_a_missing_path_as_a_folder_and_a_versioned_name_as_tfds(tmp_path):
  for flag, source in ((str(tmp_path / "missing"), "folder"), ("./missing.tar", "folder"), ("cifar10", "tfds"),
                       ("cifar10/3.0.2", "tfds")):
    assert data_inspect.inspect_config(flag, None, 16, 4).data.source == source, flag
  # --data=demo without --split shows the held-out crops (the flag's help), not the training photos.
  demo_config = data_inspect.inspect_config("demo", None, 16, 4)
  assert (demo_config.data.source, demo_config.data.eval_split) == ("demo", "test")


def test_inspect_grid_puts_ceil_sqrt_n_images_in_a_row():
  images = np.stack([np.asarray(_identity_image(identity, 4, 4)) for identity in range(1, 6)])
  grid = data_inspect.image_grid(images)
  # 5 images: 3 a row (ceil(sqrt(5))), 2 rows; each 4 px plus a 2-pixel gutter, and a 2-pixel outer border.
  assert grid.shape == (2 + 2 * 6, 2 + 3 * 6, 3)
  assert _identities(grid[2:6, 2 + 2 * 6:6 + 2 * 6][None]) == [3]  # row 0, column 2
  assert _identities(grid[8:12, 2:6][None]) == [4]  # row 1, column 0


def test_inspect_command_line_prints_json_last(image_root):
  result = subprocess.run(
      [sys.executable, "-m", "gaussiantoken_jax.data.inspect", f"--data={image_root}", "--split=test",
       "--image_size=8"], capture_output=True, text=True, check=True, timeout=120)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == {"images": NUM_TEST, "skipped": 0}


# ---------------------------------------------------------------------------------------------------------------
# Optional: the development data next to the project.


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "cifar10-jpeg-test.tar")),
                    reason="needs ../shared/data (development machine only)")
def test_shared_cifar10_test_tar_reads_in_place():
  config = _config(path=os.path.join(SHARED_DATA, "cifar10-jpeg-{split}.tar"), image_size=32, batch_size=250)
  loader = data.make_eval_loader(config)
  assert loader.num_records == 10000 and len(loader) == 40
  iterator = iter(loader)
  for _ in range(2):
    batch = next(iterator)
    assert batch["mask"].all() and batch["image"].shape == (250, 32, 32, 3)
    assert batch["image"].reshape(250, -1).std(axis=1).min() > 1.0  # Real pictures, not padding.


def _numpy_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The reference's `torchvision.transforms.CenterCrop(size)` on an HWC array, written out independently: a
  black size x size canvas; each axis either pads (the image pasted at floor((size - n) / 2)) or crops (starting
  at round half to even of (n - size) / 2, as torchvision's `int(round(...))`)."""
  out = np.zeros((size, size, 3), image.dtype)
  src, dst = [], []
  for n in image.shape[:2]:
    if n >= size:
      start = int(np.round((n - size) / 2))
      src.append(slice(start, start + size))
      dst.append(slice(0, size))
    else:
      start = (size - n) // 2
      src.append(slice(0, n))
      dst.append(slice(start, start + n))
  out[dst[0], dst[1]] = image[src[0], src[1]]
  return out


def test_eval_center_crop_matches_numpy_on_random_images(tmp_path):
  """`data.eval_crop="center"` (the reference's ImageNet / Mini-ImageNet evaluation crop: no resize) through the
  whole evaluation pipeline equals a NumPy centre crop on small random images larger, smaller and mixed against
  the crop; the default `"resize_center"` resizes instead (it differs on the same images)."""
  rng = np.random.default_rng(12)
  shapes = [(17, 23), (9, 10), (12, 31), (30, 8), (12, 12), (13, 14)]  # odd and even margins, both directions
  images = []
  for index, shape in enumerate(shapes):
    images.append(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    Image.fromarray(images[-1]).save(tmp_path / f"{index:02d}.png")
  batches = list(data.make_eval_loader(_config(path=str(tmp_path), eval_split="", eval_crop="center",
                                               image_size=12, batch_size=len(shapes))))
  delivered = np.concatenate([b["image"][b["mask"]] for b in batches])
  assert delivered.shape == (len(shapes), 12, 12, 3)
  for image, got in zip(images, delivered):
    np.testing.assert_array_equal(got, _numpy_center_crop(image, 12))
  resized = next(iter(data.make_eval_loader(_config(path=str(tmp_path), eval_split="", image_size=12,
                                                    batch_size=len(shapes)))))["image"]
  np.testing.assert_array_equal(resized[4], images[4])  # 12 x 12: nothing to resize or crop
  assert not np.array_equal(resized[0], delivered[0])
