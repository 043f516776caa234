"""ONNX export through jax2onnx, DCNv3 as ONNX ``GridSample`` plus the mask-weighted sum.

jax2onnx converts a function's jaxpr primitive by primitive. DCNv3's XLA fallback is a
gather program, which would convert into gathers over flattened tables and their index
arithmetic. During the conversion, the plugin below (``DCNv3Plugin``) makes the operator
bind one primitive instead, lowered to operators ONNX runtimes implement natively
(onnxruntime is tested; TensorRT has a GridSample layer, not tried here). Per image and
group, the ``P`` sampling points of every output pixel are one ``GridSample`` (bilinear,
zero padding, ``align_corners=0``: pixel ``i`` has its centre at normalised coordinate
``(2 i + 1) / size - 1``) over the group's channels, then the points are summed with
their mask weights. A point at input coordinate ``p`` (spec section 1: the output
pixel's centre plus ``offset_scale`` times its kernel-grid and learned offsets) sits at
``(2 p + 1) / size - 1``, an affine function of the learned offset whose constant part
depends only on the layer's static shapes and is computed here once.

jax2onnx is installed without its dependencies (``pip install --no-deps jax2onnx``): its
releases pin ``orbax-checkpoint<0.11.37``, which would downgrade the checkpointing
library this project trains with, and its converter never imports orbax.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internimage_jax.export.serving import require_fallback, serving_function, weight_bytes
from pallas_kernels.dcnv3.params import DCNv3Params
from pallas_kernels.dcnv3.reference import output_centres, dcnv3_xla

MODEL = "model.onnx"
# The oldest opset with GridSample's "linear" mode (opset 20 renamed "bilinear") and Gelu:
# the widest choice of runtimes.
OPSET = 20
# The plugin uses jax2onnx's plugin API, which may change between minor releases.
JAX2ONNX = "jax2onnx>=0.17.1,<0.18"
INSTALL = f'pip install -e ".[onnx]" && pip install --no-deps "{JAX2ONNX}"'
# One protobuf file holds at most 2 GiB; larger weights go to MODEL + ".data".
SINGLE_FILE_BYTES = 2**31 - 2**26


def _require(module: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"ONNX export needs {module.split('.')[0]} ({e}); install it with: "
                      f"{INSTALL}") from None


def grid_sample_affine(params: DCNv3Params, height: int, width: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """``(base, scale)`` with ``base + scale * offset`` the normalised GridSample
  coordinates ``(x, y)`` of every sampling point, for an input of ``height x width``.

  ``base`` is ``[Ho, Wo, 1, P, 2]`` (it broadcasts over groups), ``scale`` is ``[2]``.
  Both in float64; the caller casts them to the operator's dtype.
  """
  ho, wo = params.output_size(height, width)
  centre_x, centre_y = output_centres(params, ho, wo)
  s = params.offset_scale
  grid = np.asarray(params.kernel_grid(), np.float64)  # [P, (dx, dy)]
  px = centre_x[None, :, None] + s * grid[None, None, :, 0]  # [1, Wo, P]
  py = centre_y[:, None, None] + s * grid[None, None, :, 1]  # [Ho, 1, P]
  px, py = np.broadcast_arrays(px, py)
  base = np.stack([(2 * px + 1) / width - 1, (2 * py + 1) / height - 1], axis=-1)
  return base[:, :, None], np.asarray([2 * s / width, 2 * s / height])


def _dcnv3_plugin() -> type:
  """Defines and registers the jax2onnx plugin (once; jax2onnx imported lazily)."""
  import onnx_ir as ir
  from jax.extend.core import Primitive
  from jax2onnx.plugins._patching import MonkeyPatchSpec
  from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

  primitive = Primitive("internimage.dcnv3")
  primitive.def_impl(lambda x, offset, mask, *, params: dcnv3_xla(x, offset, mask, params))

  @primitive.def_abstract_eval
  def _shape(x, offset, mask, *, params):
    del mask, params
    return jax.core.ShapedArray((*offset.shape[:3], x.shape[-1]), x.dtype)

  @register_primitive(
      jaxpr_primitive=primitive.name,
      onnx=[{"component": "GridSample",
             "doc": "https://onnx.ai/onnx/operators/onnx__GridSample.html"}],
      since="internimage-jax 0.1", context="primitives.internimage", component="dcnv3")
  class DCNv3Plugin(PrimitiveLeafPlugin):
    """DCNv3 sampling -> Reshape/Transpose, GridSample, Mul, ReduceSum."""

    _PRIM: ClassVar[Primitive] = primitive

    @classmethod
    def binding_specs(cls) -> list:
      # The one function every DCNv3 call of an exported model reaches: the operator
      # looks the fallback up in ``api`` when it runs (exports use implementation="xla").
      return [MonkeyPatchSpec(
          target="pallas_kernels.dcnv3.api", attr="dcnv3_xla",
          make_value=lambda original: (
              lambda x, offset, mask, params: primitive.bind(x, offset, mask, params=params)))]

    def lower(self, ctx: Any, eqn: Any) -> None:
      x_var, offset_var, mask_var = eqn.invars
      (out_var,) = eqn.outvars
      params: DCNv3Params = eqn.params["params"]
      _, h, w, channels = x_var.aval.shape
      _, ho, wo, _ = offset_var.aval.shape
      g, p = params.group, params.num_points
      c = channels // g
      dtype = np.dtype(x_var.aval.dtype)
      element = ir.DataType.from_numpy(dtype)
      b = ctx.builder

      def stamp(value, shape):
        value.type = ir.TensorType(element)
        value.shape = ir.Shape(shape)
        return value

      def constant(array: np.ndarray, name: str):
        # Constant nodes rather than initializers: the operator may sit in a scan body.
        tensor = ir.tensor(np.asarray(array))
        value = b.Constant(value=tensor, _outputs=[ctx.fresh_name(name)])
        value.type = ir.TensorType(tensor.dtype)
        value.shape = ir.Shape(tensor.shape)
        return value

      def reshape(value, shape, name):
        return stamp(b.Reshape(value, constant(np.asarray(shape, np.int64), name + "_shape"),
                               _outputs=[ctx.fresh_name(name)]), [None, *shape[1:]])

      def transpose(value, perm, shape, name):
        return stamp(b.Transpose(value, perm=list(perm), _outputs=[ctx.fresh_name(name)]),
                     shape)

      x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("dcnv3_x"))
      offset = ctx.get_value_for_var(offset_var, name_hint=ctx.fresh_name("dcnv3_offset"))
      mask = ctx.get_value_for_var(mask_var, name_hint=ctx.fresh_name("dcnv3_mask"))

      # Features of each (image, group) as one NCHW image: [N*G, C, H, W].
      x = reshape(x, (-1, h, w, g, c), "dcnv3_x_groups")
      x = transpose(x, (0, 3, 4, 1, 2), (None, g, c, h, w), "dcnv3_x_nchw")
      x = reshape(x, (-1, c, h, w), "dcnv3_x_images")
      # Normalised sampling positions, the points of a pixel side by side: [N*G, Ho, Wo*P, 2].
      base, scale = grid_sample_affine(params, h, w)
      grid = reshape(offset, (-1, ho, wo, g, p, 2), "dcnv3_offset_points")
      grid = stamp(b.Mul(grid, constant(scale.astype(dtype), "dcnv3_scale"),
                         _outputs=[ctx.fresh_name("dcnv3_scaled")]), [None, ho, wo, g, p, 2])
      grid = stamp(b.Add(grid, constant(base.astype(dtype), "dcnv3_base"),
                         _outputs=[ctx.fresh_name("dcnv3_positions")]), [None, ho, wo, g, p, 2])
      grid = transpose(grid, (0, 3, 1, 2, 4, 5), (None, g, ho, wo, p, 2), "dcnv3_grid_groups")
      grid = reshape(grid, (-1, ho, wo * p, 2), "dcnv3_grid")
      sampled = stamp(b.GridSample(x, grid, mode="linear", padding_mode="zeros",
                                   align_corners=0, _outputs=[ctx.fresh_name("dcnv3_sampled")]),
                      [None, c, ho, wo * p])
      sampled = reshape(sampled, (-1, g, c, ho, wo, p), "dcnv3_sampled_points")
      # Mask weights [N, G, 1, Ho, Wo, P], broadcast over the channels.
      weights = reshape(mask, (-1, ho, wo, g, 1, p), "dcnv3_mask_points")
      weights = transpose(weights, (0, 3, 4, 1, 2, 5), (None, g, 1, ho, wo, p),
                          "dcnv3_mask_groups")
      weighted = stamp(b.Mul(sampled, weights, _outputs=[ctx.fresh_name("dcnv3_weighted")]),
                       [None, g, c, ho, wo, p])
      summed = stamp(b.ReduceSum(weighted, constant(np.asarray([5], np.int64), "dcnv3_axes"),
                                 keepdims=0, _outputs=[ctx.fresh_name("dcnv3_sum")]),
                     [None, g, c, ho, wo])
      y = transpose(summed, (0, 3, 4, 1, 2), (None, ho, wo, g, c), "dcnv3_nhwc")
      y = b.Reshape(y, constant(np.asarray((-1, ho, wo, channels), np.int64), "dcnv3_out_shape"),
                    _outputs=[ctx.fresh_name("dcnv3_out")])
      spec = ctx.get_value_for_var(out_var, name_hint=ctx.fresh_name("dcnv3_out"))
      y.type, y.shape = spec.type, spec.shape
      ctx.bind_value_for_var(out_var, y)

  return DCNv3Plugin


_PLUGIN: type | None = None


def convert(fn: Callable[..., jax.Array], inputs: list[jax.ShapeDtypeStruct | tuple],
            path: str | Path, **options: Any) -> Path:
  """``jax2onnx.to_onnx(fn, inputs)`` written to ``path``, with DCNv3 as GridSample.

  ``fn`` must reach DCNv3 through ``implementation="xla"`` (or ``"auto"`` where that
  is the fallback); ``inputs`` use a string for a symbolic dimension.
  """
  global _PLUGIN
  jax2onnx = _require("jax2onnx")
  _require("onnx_ir")
  if _PLUGIN is None:
    _PLUGIN = _dcnv3_plugin()
  path = Path(path)
  jax2onnx.to_onnx(fn, inputs, opset=OPSET, return_mode="file", output_path=str(path),
                   **options)
  return path


def to_onnx(model: nnx.Module, path: str | Path, *, image_size: int,
            batch: int | None = None) -> Path:
  """Writes ``model`` to ``path`` as an ONNX model from uint8 NHWC images ``images`` to
  float32 logits ``logits``; ``batch=None`` is a symbolic batch dimension ``batch``. One
  self-contained file when the weights fit in 2 GiB (T to XL), else the weights in
  ``<path>.data`` beside it (ONNX's external data; keep the two together)."""
  require_fallback(model, "ONNX export")
  serve = serving_function(model, image_size)
  if any(getattr(x, "dtype", jnp.float32) != jnp.float32
         for x in jax.tree.leaves(nnx.state(model, nnx.Param))):
    raise ValueError("export: ONNX export is float32 (--dtype float32); runtimes such "
                     "as TensorRT choose their own reduced precision")
  spec = jax.ShapeDtypeStruct(("batch" if batch is None else batch, image_size, image_size, 3),
                              jnp.uint8)
  mode = "web" if weight_bytes(model) < SINGLE_FILE_BYTES else "standard"  # jax2onnx's names
  return convert(serve, [spec], path, input_names=["images"], output_names=["logits"],
                 export_mode=mode)


def load(path: Path) -> Callable[[Any], np.ndarray]:
  """The ONNX model at ``path`` in onnxruntime (CUDA where it has it, else CPU), as a
  function of uint8 NHWC images."""
  ort = _require("onnxruntime")
  providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
               if p in ort.get_available_providers()]
  options = ort.SessionOptions()
  options.log_severity_level = 3  # errors only: not its notes on unused loop constants
  session = ort.InferenceSession(str(path), options, providers=providers)
  (name,) = [i.name for i in session.get_inputs()]
  return lambda images: session.run(None, {name: np.asarray(images, np.uint8)})[0]
