"""The published InternImage weights by name, through the Hugging Face hub.

``models.create("internimage_t", pretrained="in1k")``,
``models.create_segmentor("upernet_internimage_t", pretrained="ade20k")`` and
``models.create_detector("mask_rcnn_internimage_t", pretrained="coco_1x")`` find the
original's checkpoint (all in the hub repository ``OpenGVLab/InternImage``, at its root),
in this order:

1. ``pretrained`` is a path (a ``.pth``, ``.safetensors``, converted directory or
   train.py run): that file.
2. ``$INTERNIMAGE_JAX_WEIGHTS/<file>`` (default ``~/.cache/internimage_jax``): a copy
   placed by hand, e.g. on a machine without network.
3. The hub's cache (``HF_HUB_CACHE``), downloading on a miss unless ``HF_HUB_OFFLINE=1``.

A hub file is verified: the hub names a large (LFS) file's blob by its SHA-256, which
is compared with the file's (a copy placed by hand is trusted as it is). The first load
converts the PyTorch pickle to ``<file>.safetensors`` beside it (atomically; torch is
needed only then; it doubles the disk use), and later loads read that copy without
verifying again; where it cannot be written (a read-only cache), each load verifies and
reads the ``.pth``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from internimage_jax.training.errors import first_line

REPO_ID = "OpenGVLab/InternImage"
WEIGHTS_ENV = "INTERNIMAGE_JAX_WEIGHTS"


@dataclasses.dataclass(frozen=True)
class Published:
  """One published checkpoint: its file in ``REPO_ID``, the resolution it was trained
  at, its class count, and what it holds (``"classifier"``: a whole classification
  network; ``"segmentor"``: an mmseg UperNet, ``backbone.*`` / ``decode_head.*`` /
  ``auxiliary_head.*``; ``"detector"``: an mmdet Mask R-CNN with FPN, ``backbone.*`` /
  ``neck.*`` / ``rpn_head.*`` / ``roi_head.*``). A detector's ``image_size`` is the
  short side of its test scale, mmdet's ``(1333, 800)``: keep-ratio resize to at most
  1333 x 800."""
  filename: str
  image_size: int
  num_classes: int
  holds: str = "classifier"

  @property
  def url(self) -> str:
    return f"https://huggingface.co/{REPO_ID}/resolve/main/{self.filename}"


def _table() -> dict[str, dict[str, Published]]:
  table: dict[str, dict[str, Published]] = {}
  for size in ("t", "s", "b"):
    table[f"internimage_{size}"] = {
        "in1k": Published(f"internimage_{size}_1k_224.pth", 224, 1000),
        "ade20k": Published(f"upernet_internimage_{size}_512_160k_ade20k.pth", 512, 150,
                            "segmentor"),
        # Mask R-CNN on COCO (80 classes): the 12-epoch (1x) and 36-epoch multi-scale (3x)
        # schedules of detection/configs/coco/mask_rcnn_internimage_{size}_fpn_{1x,3x}_coco.py.
        **{f"coco_{schedule}": Published(
            f"mask_rcnn_internimage_{size}_fpn_{schedule}_coco.pth", 800, 80, "detector")
           for schedule in ("1x", "3x")}}
  for size in ("l", "xl"):
    table[f"internimage_{size}"] = {
        "in22k": Published(f"internimage_{size}_22k_192to384.pth", 384, 21841),
        "22kto1k": Published(f"internimage_{size}_22kto1k_384.pth", 384, 1000),
        "ade20k": Published(f"upernet_internimage_{size}_640_160k_ade20k.pth", 640, 150,
                            "segmentor")}
  table["internimage_h"] = {
      "in22k": Published("internimage_h_jointto22k_384.pth", 384, 21841),
      "22kto1k": Published("internimage_h_22kto1k_640.pth", 640, 1000),
      "ade20k": Published("upernet_internimage_h_896_160k_ade20k.pth", 896, 150, "segmentor")}
  table["internimage_g"] = {
      "in22k": Published("internimage_g_pretrainto22k_384.pth", 384, 21841),
      "22kto1k": Published("internimage_g_22kto1k_512.pth", 512, 1000)}
  return table


# The original README's checkpoints, per model and tag. Tags: "in1k", "in22k",
# "22kto1k" (classifiers), "ade20k" (UperNet), "coco_1x" / "coco_3x" (Mask R-CNN, T/S/B;
# COCO val2017 box / mask AP: T 47.2 / 42.5 and 49.1 / 43.7, S 47.8 / 43.3 and
# 49.7 / 44.5, B 48.8 / 44.0 and 50.3 / 44.8).
PUBLISHED: dict[str, dict[str, Published]] = _table()


def published(model: str, tag: str) -> Published:
  """The checkpoint ``tag`` of ``model`` (e.g. ``"internimage_t"``, ``"in1k"``), with a
  one-line error naming the choices."""
  if model not in PUBLISHED:
    raise ValueError(f"no published weights for {model!r}; models with weights: "
                     f"{sorted(PUBLISHED)}")
  if tag not in PUBLISHED[model]:
    raise ValueError(f"no published weights {tag!r} for {model} and no file of that name; "
                     f"choose one of {sorted(PUBLISHED[model])} or pass a checkpoint path")
  return PUBLISHED[model][tag]


def tags_holding(model: str, holds: str) -> list[str]:
  """The published tags of ``model`` whose checkpoints hold a ``holds``
  (``"classifier"``, ``"segmentor"``, ``"detector"``)."""
  return sorted(tag for tag, entry in PUBLISHED.get(model, {}).items() if entry.holds == holds)


def is_path(pretrained: str | os.PathLike) -> bool:
  """``pretrained`` names a file or directory rather than a tag (tags have no suffix)."""
  text = os.fspath(pretrained)
  return (isinstance(pretrained, os.PathLike) or os.sep in text or bool(Path(text).suffix)
          or Path(text).exists())


def weights_dir() -> Path:
  return Path(os.environ.get(WEIGHTS_ENV) or Path.home() / ".cache" / "internimage_jax")


def checkpoint_file(model: str, tag: str) -> Path:
  """The local file of the published checkpoint ``tag`` of ``model``: a copy in
  :func:`weights_dir`, else the hub's cached (or freshly downloaded) file, verified."""
  entry = published(model, tag)
  placed = weights_dir() / entry.filename
  if placed.is_file():
    return placed
  try:
    from huggingface_hub import hf_hub_download
  except ImportError as e:
    raise ImportError("published weights by name need huggingface_hub: pip install "
                      "huggingface_hub (or pass pretrained=PATH)") from e
  try:
    path = Path(hf_hub_download(REPO_ID, entry.filename))
  except Exception as e:  # noqa: BLE001 - offline, unreachable, cut transfers (httpx), ...
    raise FileNotFoundError(
        f"pretrained {tag!r} of {model}: cannot get {entry.filename} from the Hugging Face "
        f"repository {REPO_ID} ({type(e).__name__}: {first_line(e)}); download "
        f"{entry.url} and place it at {placed}, or pass pretrained=PATH") from None
  _verify(path, entry)
  return path


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _verify(path: Path, entry: Published) -> None:
  """The hub stores an LFS file under its SHA-256: a cached file must hash to its blob's
  name. Checked once per file (the converted copy beside it marks a verified file)."""
  blob = path.resolve()
  if not _SHA256.fullmatch(blob.name) or _converted(path).is_file():
    return
  digest = hashlib.sha256()
  with open(blob, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  if digest.hexdigest() != blob.name:
    raise OSError(f"{entry.filename} in the Hugging Face cache is corrupt (SHA-256 "
                  f"{digest.hexdigest()}, the hub's {blob.name}): delete {blob} and load "
                  "again to download it anew")


def _converted(path: Path) -> Path:
  return path.with_name(path.name + ".safetensors")


def entry_of(pretrained: str | os.PathLike, model: str) -> Published | None:
  """The published entry that ``pretrained`` names for ``model`` (``None`` for a path),
  before anything is downloaded."""
  tag = None if isinstance(pretrained, os.PathLike) else str(pretrained)
  return PUBLISHED.get(model, {}).get(tag)


def resolve(pretrained: str | os.PathLike, model: str) -> tuple[Path, Published | None]:
  """The local checkpoint of ``pretrained`` (a tag of ``model``, which wins over a file
  of that name: write ``./in1k`` for one, or a path) and its published entry (``None``
  for a path). A published ``.pth`` is converted to safetensors beside it on first use,
  and that copy is returned (no torch needed later); where the copy cannot be written
  (a read-only cache), the ``.pth`` itself, verified again at each use."""
  entry = entry_of(pretrained, model)
  if entry is None:
    if is_path(pretrained):
      return Path(pretrained), None
    published(model, str(pretrained))  # the error names the tags
  tag = str(pretrained)
  path = checkpoint_file(model, tag)
  copy = _converted(path)
  if copy.is_file():
    return copy, entry
  from safetensors.numpy import save_file

  from internimage_jax import convert

  state_dict = convert.read_state_dict(path)
  # A name of this process's own: processes converting the same file at once each write
  # a whole copy, and the last rename wins.
  tmp = copy.with_name(f"{copy.name}.tmp-{os.getpid()}")
  try:
    # np.array(order="C"), unlike np.ascontiguousarray, keeps 0-d entries 0-d.
    save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, copy)  # never a half-written copy under the final name
  except Exception:  # noqa: BLE001 - safetensors raises its own error type for I/O
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass
    return path, entry
  return copy, entry


def read(pretrained: str | os.PathLike, model: str) -> tuple[dict[str, np.ndarray],
                                                              Published | None]:
  """The official-layout state dict of ``pretrained`` (see :func:`resolve`) and its
  published entry."""
  from internimage_jax import convert

  path, entry = resolve(pretrained, model)
  return convert.read_state_dict(path), entry


def backbone_part(state_dict: dict[str, Any]) -> dict[str, Any]:
  """The ``backbone.*`` entries of an mmseg/mmdet state dict, without the prefix (a
  classification state dict is returned as it is)."""
  if any(k.startswith("backbone.") for k in state_dict):
    return {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
  return state_dict


_BACKBONE = ("patch_embed.", "levels.")


def _mismatch(module: Any, report: Any, source: str) -> Exception:
  from internimage_jax.convert import CheckpointMismatchError

  lines = [f"{source} does not fit {type(module).__name__}:"]
  for title, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                      ("shape mismatch", report.mismatched)):
    if keys:
      lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:8]) +
                   (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else ""))
  return CheckpointMismatchError("\n".join(lines))


def load_backbone_or_classifier(model: Any, state_dict: dict[str, Any], source: str
                                ) -> list[str]:
  """Loads ``state_dict`` (a classification network's, or the ``backbone.*`` part of a
  segmentor's) into an ``InternImage``; the backbone must match exactly. The classifier
  starts afresh where the checkpoint has none or one of another class count, and a
  ``features_only`` model ignores the checkpoint's classifier. Returns the entries kept
  at their initialisation."""
  from internimage_jax import convert

  report = convert.load_state_dict(model, backbone_part(state_dict), strict=False)
  classifier = lambda key: not key.split(":")[0].startswith(_BACKBONE)  # noqa: E731
  if (any(not classifier(k) for k in report.missing + report.unexpected + report.mismatched)
      or (report.unexpected and not getattr(model, "features_only", False))):
    raise _mismatch(model, report, source)
  return sorted(report.missing + [m.split(":")[0] for m in report.mismatched])


def load_segmentor(seg: Any, state_dict: dict[str, Any], source: str) -> list[str]:
  """Loads an mmseg UperNet state dict into a ``Segmentor``: everything must match but the
  classifiers (``conv_seg``) of another class count, which start afresh (returned)."""
  from internimage_jax import convert

  report = convert.load_state_dict(seg, state_dict, strict=False)
  fresh = [m.split(":")[0] for m in report.mismatched]
  unused = [k for k in report.unexpected  # a segmentor built without the auxiliary head
            if not (seg.auxiliary_head is None and k.startswith("auxiliary_head."))]
  if report.missing or unused or any(".conv_seg." not in k for k in fresh):
    raise _mismatch(seg, report, source)
  return fresh
