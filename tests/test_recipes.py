"""The official recipe configs: hyper-parameters, LR groups, and a compiled train step each."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import PARAM_COUNTS
from internimage_jax.training import config as config_lib
from internimage_jax.training import optim, tasks

REPO = Path(__file__).resolve().parents[1]
FROM_SCRATCH = {"internimage_t_1k_224": 0.1, "internimage_s_1k_224": 0.4,
                "internimage_b_1k_224": 0.5}
FINE_TUNES = {"internimage_l_22kto1k_384": (0.1, 384), "internimage_xl_22kto1k_384": (0.2, 384),
              "internimage_h_22kto1k_640": (0.2, 640), "internimage_g_22kto1k_512": (0.4, 512)}
RECIPES = [*FROM_SCRATCH, *FINE_TUNES]


def load_config(name: str, variant: str = ""):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_hyper_parameters(name):
  cfg = load_config(name)
  config_lib.validate(cfg)
  t, aug = cfg.train, cfg.aug
  assert cfg.model.name == name.rsplit("_", 2)[0]
  assert (t.weight_decay, t.clip_grad, t.ema_decay) == (0.05, 5.0, 0.9999)
  assert aug.randaugment == "rand-m9-mstd0.5-inc1" and aug.hflip == 0.5
  assert tuple(aug.scale) == (0.08, 1.0) and aug.random_resized_crop
  if name in FROM_SCRATCH:
    assert cfg.model.overrides.drop_path_rate == FROM_SCRATCH[name]
    assert cfg.data.image_size == 224
    assert (t.epochs, t.warmup_epochs, t.lr, t.warmup_lr, t.min_lr) == (300, 20, 5e-4, 5e-7, 5e-6)
    assert (t.label_smoothing, aug.mixup, aug.cutmix, aug.mixup_switch_prob, aug.reprob) == (
        0.1, 0.8, 1.0, 0.5, 0.25)
  else:
    drop_path, size = FINE_TUNES[name]
    assert cfg.model.overrides.drop_path_rate == drop_path and cfg.data.image_size == size
    assert (t.epochs, t.warmup_epochs, t.lr, t.warmup_lr, t.min_lr) == (20, 2, 2e-5, 0, 0)
    assert (t.label_smoothing, aug.mixup, aug.cutmix, aug.reprob) == (0.3, 0, 0, 0)
    assert (t.layer_decay, t.dcn_lr_mul) == (0.9, 0.1)
  bf16 = load_config(name, "bf16,fsdp,folder")
  assert bf16.train.compute_dtype == "bfloat16" and bf16.mesh.fsdp == -1
  assert bf16.data.source == "folder" and bf16.data.eval_split == "val"


def test_config_errors_name_the_key():
  cfg = load_config("internimage_t_1k_224")
  with pytest.raises(ValueError, match="unknown config variant 'bf61'"):
    load_config("internimage_t_1k_224", "bf61")
  cfg.unlock()
  cfg.train.lrr = 1.0
  with pytest.raises(ValueError, match=r"train.lrr \(did you mean train.lr\?\)"):
    config_lib.validate(cfg)
  with pytest.raises(AttributeError):  # --config.x=v of a new key: refused by the lock
    load_config("internimage_t_1k_224").lock().train.lrr = 1.0
  cfg = load_config("internimage_h_22kto1k_640")
  assert cfg.model.remat == "block"
  cfg.model.remat = "blocks"
  with pytest.raises(ValueError, match="config.model.remat must be"):
    config_lib.validate(cfg)
  # Model options are the constructor's; a typo is named before anything is built
  # (a TypeError raised while building is a bug, reported as one).
  cfg = load_config("internimage_t_1k_224")
  cfg.model.overrides.drop_path_rat = 0.2
  with pytest.raises(ValueError, match=r"model.overrides.drop_path_rat \(did you mean "
                     r"model.overrides.drop_path_rate\?\)"):
    config_lib.validate(cfg)


def test_schedule_matches_the_recipe():
  cfg = load_config("internimage_t_1k_224").train
  steps_per_epoch = 10
  lr = optim.schedule(cfg, 1024, 300 * steps_per_epoch, steps_per_epoch)
  scale = 1024 / 512
  np.testing.assert_allclose(lr(0), 5e-7 * scale, rtol=1e-4)  # float32
  np.testing.assert_allclose(lr(20 * steps_per_epoch), 5e-4 * scale, rtol=1e-5)
  np.testing.assert_allclose(lr(300 * steps_per_epoch), 5e-6 * scale, rtol=1e-5)
  middle = 160 * steps_per_epoch  # half-way through the cosine: the mean of peak and end
  np.testing.assert_allclose(lr(middle), (5e-4 + 5e-6) / 2 * scale, rtol=1e-4)


def test_layer_decay_groups_follow_the_original():
  """Blocks from the last backwards; the stem with the first block; downsample and level
  norm with the next level's first block; 0.1 more on the deformable offsets."""
  from internimage_jax import models
  from internimage_jax.convert import official_names

  depths = (2, 1, 3, 2)
  model = nnx.eval_shape(lambda: models.create("internimage_t", num_classes=5, channels=8,
                                               depths=depths, groups=(1, 2, 2, 4),
                                               center_feature_scale=True))
  cfg = load_config("internimage_l_22kto1k_384")
  # One multiplier per block along the train state's stacked parameters.
  mults = tasks.Classification(cfg, num_classes=5).lr_multipliers(model)
  names = official_names(model)
  by_name = {name: float(value)
             for path, var in nnx.to_flat_state(mults)
             for name, value in zip(names[path], np.ravel(var.get_value()))}
  r = 0.9
  expect = {
      "levels.3.blocks.1.mlp.fc1.weight": 1.0,
      "levels.3.blocks.0.mlp.fc1.weight": r,
      "levels.2.blocks.2.mlp.fc1.weight": r ** 2,
      "levels.0.blocks.0.mlp.fc1.weight": r ** 7,
      "patch_embed.conv1.weight": r ** 7,
      "levels.0.downsample.conv.weight": r ** 5,  # = levels.1.blocks.0
      "levels.0.norm.0.weight": r ** 5,
      "levels.2.downsample.conv.weight": r,  # = levels.3.blocks.0
      "levels.3.norm.0.weight": 1.0,
      "head.weight": 1.0,
      "levels.3.blocks.1.dcn.offset.weight": 0.1,
      "levels.0.blocks.1.dcn.offset.bias": 0.1 * r ** 6,
      "levels.2.blocks.0.dcn.center_feature_scale_proj_weight": 0.1 * r ** 4,
      "levels.2.blocks.0.dcn.mask.weight": r ** 4,
  }
  for name, want in expect.items():
    assert by_name[name] == pytest.approx(want, rel=1e-9), name
  off = load_config("internimage_t_1k_224")
  assert tasks.Classification(off, 5).lr_multipliers(model) is None  # from scratch: one group


# Each path once by default: from scratch (T), a fine-tune with layer decay (L), every
# option of the large models at 640 px (H). The other four take one of these paths
# (``pytest -m slow`` compiles them too).
COMPILED_BY_DEFAULT = ("internimage_t_1k_224", "internimage_l_22kto1k_384",
                       "internimage_h_22kto1k_640")


@pytest.mark.parametrize("name", [
    name if name in COMPILED_BY_DEFAULT else pytest.param(name, marks=pytest.mark.slow)
    for name in RECIPES])
def test_recipe_train_step_compiles(name):
  """The full-size model's train step (augmentation, EMA, LR groups) lowers and compiles
  from abstract shapes only: nothing of the model is allocated."""
  from internimage_jax.training.trainer import TrainProgram

  cfg = load_config(name)
  cfg.train.global_batch = 2
  program = TrainProgram(cfg, num_classes=1000, steps_per_epoch=1000)
  lowered = program.train_step.lower(*program.abstract_inputs())
  # Shapes only, and exactly the spec's parameter count of the variant.
  params = jax.tree.leaves(program.abstract_state["params"])
  assert all(isinstance(p, jax.ShapeDtypeStruct) for p in params)
  n_params = sum(int(np.prod(p.shape)) for p in params)
  assert n_params == PARAM_COUNTS[cfg.model.name]
  loss = lowered.out_info[1]["loss"]
  assert loss.shape == () and loss.dtype == np.float32
  # Quick codegen: this checks that XLA accepts the program, not how fast it runs.
  compiled = lowered.compile({"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True})
  memory = compiled.memory_analysis()
  if memory is not None:  # the donated state is updated in place
    assert memory.alias_size_in_bytes >= 4 * n_params
  # Seven full-size programs would otherwise stay cached in this test worker.
  del compiled, lowered, program
  jax.clear_caches()
