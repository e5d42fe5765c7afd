"""Config files and config_lib: recipes in epochs turned into steps from the split size and the global batch,
`*_steps` overrides, and the variants each config file declares."""
import importlib.util
import json
import logging
import pathlib
import subprocess
import sys

from absl import flags
import jax
from ml_collections import config_flags
import pytest

from gaussiantoken_jax import config_lib, data
from gaussiantoken_jax.train import sharding, step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR10_TRAIN = 50_000


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_command_line(*args):
  """The config as `gaussiantoken_jax.main` receives it from these flags (the same config_flags definition)."""
  argv = ["main", *args]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                           sys_argv=argv)
  flag_values(argv)
  return holder.value


def test_cifar10_at_batch_64_keeps_30_epochs_and_says_so(caplog):
  config = parse_command_line(f"--config={REPO / 'configs/cifar10.py'}", "--config.batch_size=64")
  with caplog.at_level(logging.INFO):
    resolved = config_lib.resolve_steps(config, CIFAR10_TRAIN)
  # Rounded up: 30 * 50,000 / 64 = 23,437.5 steps, so 23,438 (a run never trains less than its recipe).
  assert resolved.total_steps == 23_438
  assert resolved.optimizer.warmup_steps == resolved.disc_optimizer.warmup_steps == 782  # 781.25: 1 epoch
  assert resolved.loss.gan_start_step == 3_907  # 5 epochs = 3,906.25 steps
  assert config.total_steps is None  # the config given is left as it was
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training for ")]
  assert lines == ["Training for 30 epochs = 23,438 steps of 64 images from a training split of 50,000 images; "
                   "warm-up 1 epoch = 782 steps; GAN from epoch 5 = step 3,907."], lines
  # The recipe's own batch (384) trains the same 30 epochs in fewer steps.
  assert config_lib.resolve_steps(load_config("cifar10"), CIFAR10_TRAIN).total_steps == 3_907  # 3,906.25


def test_steps_given_on_the_command_line_win_over_epochs(caplog):
  config = parse_command_line(f"--config={REPO / 'configs/cifar10.py'}", "--config.batch_size=64",
                              "--config.total_steps=24", "--config.optimizer.warmup_steps=3",
                              "--config.loss.gan_start_step=7", "--config.total_epochs=2")
  with caplog.at_level(logging.INFO):
    resolved = config_lib.resolve_steps(config, CIFAR10_TRAIN)
  assert (resolved.total_steps, resolved.optimizer.warmup_steps, resolved.loss.gan_start_step) == (24, 3, 7)
  assert resolved.disc_optimizer.warmup_steps == 782  # not overridden: still 1 epoch
  assert ("Training for 24 steps of 64 images (set in steps; total_epochs=2 not used) from a training split of "
          "50,000 images; warm-up 3 steps (set in steps; optimizer.warmup_epochs=1 not used) (generator), 1 epoch = "
          "782 steps (discriminator); GAN from step 7 (set in steps; loss.gan_start_epochs=5 not used)."
          in caplog.text)


def test_equal_warm_ups_are_said_once(caplog):
  config = parse_command_line(f"--config={REPO / 'configs/cifar10.py'}", "--config.optimizer.warmup_steps=3",
                              "--config.disc_optimizer.warmup_steps=3")
  with caplog.at_level(logging.INFO):
    config_lib.resolve_steps(config, CIFAR10_TRAIN)
  assert "warm-up 3 steps (set in steps; optimizer.warmup_epochs=1 not used); GAN from epoch 5" in caplog.text


def test_the_demo_counts_in_steps_850_of_16_with_warm_up_50_and_no_gan_before_1200():
  config = load_config("demo")
  assert config.total_epochs is None and config.loss.gan_start_epochs is None  # its "epoch" is artificial
  resolved = config_lib.resolve_steps(config, data.train_split_size(config))
  assert (resolved.total_steps, resolved.batch_size, resolved.loss.gan_start_step) == (850, 16, 1200)
  assert resolved.optimizer.warmup_steps == resolved.disc_optimizer.warmup_steps == 50
  embedder = config.model.embedder
  assert (embedder.num_blocks, embedder.num_encoder_layers, embedder.dropout) == (1, 0, 0.0)
  runlocal = config_lib.resolve_steps(load_config("demo", "runlocal"), 576)
  # The train-step tests exercise dropout and stacks of more than one block and encoder layer.
  assert (runlocal.model.embedder.num_blocks, runlocal.model.embedder.num_encoder_layers) == (2, 1)
  assert runlocal.model.embedder.dropout == 0.1
  assert (runlocal.total_steps, runlocal.batch_size, runlocal.optimizer.warmup_steps) == (20, 8, 5)


def test_epochs_round_up_after_float_noise_and_a_duration_needs_one_field():
  assert config_lib.epochs_to_steps(1.1, 50_000, 100) == 550  # 1.1 * 50000 / 100 = 550.0000000000001
  assert config_lib.epochs_to_steps(0.0, 50_000, 64) == 0
  config = load_config("demo")
  config.total_steps = None
  with pytest.raises(ValueError, match="Set config.total_epochs or config.total_steps"):
    config_lib.resolve_steps(config, 576)


def test_the_demo_train_state_holds_no_zero_size_array():
  """The demo's embedder has no self-attention encoder layers: a checkpoint of its state must still save (Orbax
  refuses zero-size arrays). `abstract_state` traces the init without compiling it."""
  config = load_config("demo")
  assert config.model.embedder.num_encoder_layers == 0
  steps = step_lib.make_steps(config, sharding.make_mesh(dict(data=1, fsdp=1), devices=jax.devices()[:1]))
  empty = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(steps.abstract_state)
           if leaf.size == 0]
  assert not empty


@pytest.mark.parametrize("name, vq_mult", [("cifar10", (1, 1, 2)), ("cifar100", (1, 1, 2)), ("demo", (1, 1, 2)),
                                           ("imagenet", (1, 1, 2, 2, 4)), ("mini_imagenet", (1, 1, 2, 2, 4))])
def test_each_config_file_applies_its_variants(name, vq_mult):
  plain, vq, both = load_config(name), load_config(name, "baseline=vq"), load_config(name, "runlocal,baseline=vq")
  assert plain.model.type == "gaussiantoken" and vq.model.type == "vq"
  assert tuple(vq.model.encoder_ch_mult) == tuple(vq.model.decoder_ch_mult) == vq_mult
  assert both.to_dict() == load_config(name, "baseline=vq,runlocal").to_dict()
  assert (both.model.type, tuple(both.model.encoder_ch_mult), both.model.ch) == ("vq", vq_mult, 16)
  assert (both.total_steps, both.batch_size, both.data.image_size) == (20, 8, 32)
  # runlocal's docstring: warm-up and GAN from step 5, the discriminator's warm-up too (the files' own warm-ups
  # are 1 epoch or, in the demo, 50 steps: a forgotten field would keep them).
  assert both.optimizer.warmup_steps == both.disc_optimizer.warmup_steps == both.loss.gan_start_step == 5
  # shrink_for_cpu's docstring: 16 eval images, no worker processes, no profile (9 s and 73 MB per CPU run).
  assert (both.num_eval_images, both.data.num_workers, both.profile_steps) == (16, 0, 0)


@pytest.mark.parametrize("arg, match", [
    ("fast", r"Unknown config variant 'fast' in 'fast'"),
    ("baseline=vqvae", r"Unknown baseline 'vqvae'"),
    ("baseline=VQ", r"Unknown baseline 'VQ'"),  # values are taken as written, not case-folded
    ("baseline", r"write it as 'baseline=VALUE'"),
    ("runlocal=1", r"write it as 'runlocal'"),
])
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet", "mini_imagenet", "demo"])
def test_unknown_or_malformed_variants_are_errors(arg, match, name):
  with pytest.raises(ValueError, match=match):
    load_config(name, arg)


def test_a_variant_another_file_declares_is_an_error_here():
  """The demo has no `:paper` (its recipe is its own): asking for it must fail, not train the demo unchanged."""
  with pytest.raises(ValueError, match=r"Unknown config variant 'paper' in 'runlocal,paper'; expected any of "
                     r"\('runlocal', 'baseline'\)"):
    load_config("demo", "runlocal,paper")


# ---------------------------------------------------------------------------------------------------------------
# The paper's settings (Table 1 and Sec. 4.1), each one variant away from the reference code's.


# reference-implementation.md, the numbers per config: section 2.1 (data, K, z, codebook), 2.3 (ch, res blocks,
# GroupNorm groups, D' = 64), 2.5 (the embedder: 4 heads, 4 points, 3 blocks, 2 + 2 layers, MLPs of 256, dropout
# 0.1, scale range 0.1 .. 4 annealed to 3), 2.6 (EMA VQ: decay 0.8, eps 1e-5, 10 k-means iterations, dead codes
# below 2, the rotation trick), 2.7 (PatchGAN ndf 64 with 3 layers; L1 1.0 + LPIPS 1.0, GAN 0.1 fixed from epoch 5,
# LeCAM 0.05 with EMA decay 0.999, commitment 0.25) and 2.8 (batch 6 GPUs x 64 or 4; timm cosine from 1e-6 over a
# 1-epoch warm-up; 30 epochs; weight EMA 0.999; no gradient clipping). The deliberate departures of
# docs/differences.md (centre_feature, grid_anchors, initial_scale, the evaluation crop) are not listed.
REFERENCE_MODEL = dict(ch=128, num_res_blocks=4, num_groups=32, embed_dim=64, codebook_size=1024)
REFERENCE_EMBEDDER = dict(num_heads=4, num_points=4, num_blocks=3, num_encoder_layers=2, num_decoder_layers=2,
                          mlp_dim=256, ffn_dim=256, dropout=0.1, scale_min=0.1, scale_max_init=4.0,
                          scale_max_final=3.0)
REFERENCE_QUANTIZER = dict(decay=0.8, eps=1e-5, kmeans_iters=10, dead_code_threshold=2.0, gradient="rotation")
REFERENCE_LOSS = dict(l1_weight=1.0, lpips_weight=1.0, gan_weight=0.1, gan_start_epochs=5.0, lecam_weight=0.05,
                      lecam_decay=0.999, commitment_weight=0.25, adaptive_gan_weight=False)


@pytest.mark.parametrize("name, data_fields, ch_mult, k_z, batch_size", [
    ("cifar100", dict(train_split="train", eval_split="test", image_size=32, augment="none"), (1, 2), (64, 3), 384),
    ("mini_imagenet", dict(source="folder", train_split="train", eval_split="val", image_size=256,
                           augment="random_resized_crop"), (1, 2, 2, 4), (256, 8), 24),
    ("imagenet", dict(name="imagenet2012", train_split="train", eval_split="validation", image_size=256,
                      augment="random_resized_crop"), (1, 2, 2, 4), (256, 8), 24),
])
def test_each_reference_config_is_the_reference_recipe(name, data_fields, ch_mult, k_z, batch_size):
  config = load_config(name)
  assert {k: config.data[k] for k in data_fields} == data_fields
  model = config.model
  assert {k: model[k] for k in REFERENCE_MODEL} == REFERENCE_MODEL
  assert (tuple(model.encoder_ch_mult), tuple(model.decoder_ch_mult)) == (ch_mult, ch_mult)
  assert (model.type, model.num_gaussians, model.feature_dim) == ("gaussiantoken", *k_z)
  assert {k: model.embedder[k] for k in REFERENCE_EMBEDDER} == REFERENCE_EMBEDDER
  assert model.quantizer.to_dict() == REFERENCE_QUANTIZER
  assert config.discriminator.to_dict() == dict(ndf=64, n_layers=3)
  assert {k: config.loss[k] for k in REFERENCE_LOSS} == REFERENCE_LOSS
  assert (config.batch_size, config.total_epochs, config.ema_decay) == (batch_size, 30.0, 0.999)
  for opt in (config.optimizer, config.disc_optimizer):  # the schedule, the same for G and D
    assert (opt.init_learning_rate, opt.warmup_epochs, opt.grad_clip_norm) == (1e-6, 1.0, 0.0)
  assert config.disc_optimizer.to_dict() == config.optimizer.to_dict()
  # Section 10: the plain-VQ baseline is GaussianToken's recipe with one more downsampling level (same codebook of
  # 1024, same losses, optimizers and data); only the model's type and levels differ.
  vq = load_config(name, "baseline=vq").to_dict()
  plain = config.to_dict()
  vq_model, plain_model = vq.pop("model"), plain.pop("model")
  assert vq == plain
  changed = {k for k in plain_model if vq_model[k] != plain_model[k]}
  assert changed <= {"type", "encoder_ch_mult", "decoder_ch_mult", "feature_dim"}, changed
  assert len(vq_model["encoder_ch_mult"]) == len(ch_mult) + 1
  assert vq_model["feature_dim"] == (4 if name == "cifar100" else 8)  # Table 1's CIFAR VQGAN row: 4; section 10: 8


@pytest.mark.parametrize("name, dataset", [("cifar100", "cifar100"), ("cifar10", "cifar10")])
def test_cifar_configs_read_their_tfds_dataset_with_the_reference_recipe(name, dataset):
  config = load_config(name)
  assert (config.data.source, config.data.name, config.data.image_size) == ("tfds", dataset, 32)
  assert (config.data.train_split, config.data.eval_split) == ("train", "test")
  # The reference's cifar-gqgan-1 recipe, the same in both files.
  assert (config.model.num_gaussians, config.model.feature_dim, config.model.codebook_size) == (64, 3, 1024)
  assert (config.optimizer.name, config.optimizer.learning_rate, config.total_epochs) == ("adamw", 2e-4, 30.0)
  assert config_lib.resolve_steps(config, CIFAR10_TRAIN).total_steps == 3_907  # 30 epochs at batch 384
  other = load_config("cifar10" if name == "cifar100" else "cifar100")
  other.data.name = dataset
  assert other.to_dict() == config.to_dict()  # nothing but the dataset differs


def reference_encoder_params(ch, ch_mult, num_res_blocks, out_channels):
  """The encoder of reference-implementation.md section 2.3, counted by hand: conv_in 3x3 without bias; per level
  `num_res_blocks` ResBlocks (two affine GroupNorms, two 3x3 convs without bias, a 1x1 shortcut without bias when
  the width changes) and, but for the last level, a strided 3x3 conv with bias; `num_res_blocks` mid ResBlocks;
  GroupNorm and a 1x1 conv with bias to `out_channels`."""
  def res_block(c_in, c_out):
    return 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + (c_in * c_out if c_in != c_out else 0)
  total, width = 9 * 3 * ch, ch
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      total, width = total + res_block(width, ch * mult), ch * mult
    if level < len(ch_mult) - 1:
      total += 9 * width * width + width
  total += num_res_blocks * res_block(width, width)
  return total + 2 * width + width * out_channels + out_channels


def reference_discriminator_params(ndf, n_layers):
  """The PatchGAN of section 2.7: 4x4 convs 3 -> ndf (bias), then n_layers convs to ndf * min(2^n, 8) without bias,
  each with BatchNorm's scale and offset, then to 1 logit (bias)."""
  total, width = 16 * 3 * ndf + ndf, ndf
  for n in range(1, n_layers + 1):
    total, width = total + 16 * width * ndf * min(2 ** n, 8) + 2 * ndf * min(2 ** n, 8), ndf * min(2 ** n, 8)
  return total + 16 * width + 1


def test_cifar_vq_baseline_is_the_papers_vqgan_row_64_tokens_of_dimension_4():
  """Table 1: VQGAN on CIFAR, 8x8 tokens of embedding dimension 4; GaussianToken 64 Gaussians of z = 3. CIFAR-100's
  variants are CIFAR-10's but for the dataset, so the dry runs are made once."""
  from gaussiantoken_jax import overview  # pylint: disable=import-outside-toplevel
  gt, vq = load_config("cifar10"), load_config("cifar10", "baseline=vq")
  assert (vq.model.type, vq.model.feature_dim, gt.model.feature_dim) == ("vq", 4, 3)
  assert vq.model.ch == gt.model.ch and vq.model.num_res_blocks == gt.model.num_res_blocks  # the same widths
  out = subprocess.run([sys.executable, "-m", "gaussiantoken_jax.main", "--config=configs/cifar10.py:baseline=vq",
                        "--dry_run"], cwd=REPO, capture_output=True, text=True, check=True, timeout=300)
  assert "64 tokens per image, each a code of dimension 4 from a codebook of 1024" in out.stdout
  vq_summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert (vq_summary["tokens"], vq_summary["token_dim"], vq_summary["codebook_size"]) == (64, 4, 1024)
  assert vq_summary["params"]["quantizer"] == 1024 * 4
  _, gt_summary = overview.dry_run(load_config("cifar10", "runlocal"))
  assert (gt_summary["tokens"], gt_summary["token_dim"]) == (16, 3)  # runlocal's K = 16
  # Each component counted alone (ch 16, one res block, D' = 32, ndf 8): the discriminator's BatchNorm running
  # statistics are state, not parameters, and no component's count includes another's.
  # The formulas at the reference's sizes give its section 8 figures, 10.53M and 2.77M.
  assert round(reference_encoder_params(128, (1, 2), 4, 64) / 1e6, 2) == 10.53
  assert round(reference_discriminator_params(64, 3) / 1e6, 2) == 2.77
  assert gt_summary["params"]["encoder"] == reference_encoder_params(16, (1, 2), 1, 32)
  assert gt_summary["params"]["discriminator"] == reference_discriminator_params(8, 3)
  for variant in ("baseline=vq", "runlocal", "paper"):  # the paper's 30 CIFAR epochs in both (Sec. 4.1)
    cifar100 = load_config("cifar100", variant)
    cifar100.data.name = "cifar10"
    assert cifar100.to_dict() == load_config("cifar10", variant).to_dict(), variant


@pytest.mark.parametrize("name, paper_epochs, code_optimizer", [
    ("imagenet", 20.0, dict(name="adam", learning_rate=2e-4, b1=0.5, b2=0.9, weight_decay=0.0)),
    ("mini_imagenet", 30.0, dict(name="adamw", learning_rate=2e-4, b1=0.9, b2=0.999, weight_decay=0.01)),
    ("cifar100", 30.0, dict(name="adamw", learning_rate=2e-4, b1=0.9, b2=0.999, weight_decay=0.01)),
])
def test_paper_variant_is_the_papers_schedule_and_the_default_the_codes(name, paper_epochs, code_optimizer):
  """Paper Sec. 4.1: Adam 1e-4, betas (0.5, 0.9), weight decay 0; 30, 30 and 20 epochs for CIFAR, Mini-ImageNet
  and ImageNet. The reference code: 30 epochs at 2e-4 everywhere (AdamW on CIFAR and Mini-ImageNet)."""
  code, paper = load_config(name), load_config(name, "paper")
  fields = tuple(code_optimizer)
  for opt in (code.optimizer, code.disc_optimizer):
    assert {k: opt[k] for k in fields} == code_optimizer
  for opt in (paper.optimizer, paper.disc_optimizer):
    assert {k: opt[k] for k in fields} == dict(name="adam", learning_rate=1e-4, b1=0.5, b2=0.9, weight_decay=0.0)
  assert (code.total_epochs, paper.total_epochs) == (30.0, paper_epochs)
  assert paper.optimizer.warmup_epochs == code.optimizer.warmup_epochs == 1.0
  assert paper.model.to_dict() == code.model.to_dict() and paper.data.to_dict() == code.data.to_dict()
  both = load_config(name, "paper,runlocal")
  assert (both.total_steps, both.optimizer.learning_rate) == (20, 1e-4)
  train_size = 1_281_167 if name == "imagenet" else 50_000
  steps = config_lib.resolve_steps(paper, train_size).total_steps
  assert steps == config_lib.epochs_to_steps(paper_epochs, train_size, paper.batch_size)
  if name == "imagenet":
    assert steps == 1_067_640  # 20 epochs of 1,281,167 images at batch 24 (the code's 30: 1,601,459)
