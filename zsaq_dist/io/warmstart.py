"""Start the student from an existing compressed-tensors checkpoint (``method.init_from``) instead of RTN.

The checkpoint (a GPTQ run on zsaq's own seed sequences, an earlier zsaq export, ...) must hold
the student's quantization scheme. Each quantized layer takes the checkpoint's integer codes,
scales and zero points. Its trainable weight is set so that the fake quantizer gives exactly the
checkpoint's codes (the check is part of :func:`latent_weight`), so a ``rtn`` run (0 steps)
exports the checkpoint's tensors bit for bit and training starts where the checkpoint is.
Re-deriving scales with an observer from dense weights would not: it moves most weights off
the checkpoint's grid (``bench/requant.py``).

Where in its rounding bin each trained weight starts (``method.init_latent``) decides how soon
training moves its code:

- ``teacher`` (default): the teacher's weight where it already rounds to the checkpoint's code
  under the checkpoint's scale (there the start is the same as from RTN), the bin's centre where
  the checkpoint moved it (GPTQ's error compensation): such a code moves back only after the
  weight has travelled half a step.
- ``center``: every weight at its bin's centre ``(q - zp) * s``, half a step from either edge.
- ``nearest``: the teacher's weight clamped into the bin, the point nearest the teacher with that
  code. A moved weight then waits at the bin's edge, where Adam's first step of about ``lr``
  (whatever the gradient's size) moves it back whenever its gradient points that way: measured,
  this undoes GPTQ's compensation within a few steps (``bench/README.md``).

``teacher`` and ``nearest`` refuse a checkpoint that rescaled other tensors (AWQ folds its scales
into the norms): the teacher's weights are then not on the checkpoint's scale; use ``center``.

Every other tensor the checkpoint holds for the model (norms, embeddings, biases, an unquantized
``lm_head``) is copied into the student (with ``center``), so a method that changed them starts
whole. Tensors it lacks (a tied ``lm_head``) keep the teacher's values.

``write_gather(param)``: a context in which a ZeRO-3 partitioned parameter is whole and written
back when it closes (``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``); one tensor is
whole at a time. Every rank reads the checkpoint and computes the same values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from torch import nn

from zsaq_dist.errors import ConfigError
from zsaq_dist.quant import QuantLinear, quant_modules
from zsaq_dist.quant.ste import dequantize_codes, into_bins, quantize_weight

_QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "weight")


def _fix(path: str) -> str:
    return (
        f"method.init_from={path!r}: give the directory of a compressed-tensors checkpoint of this model "
        "in the same quant scheme (an llm-compressor GPTQ output or a zsaq export), or null to start from RTN"
    )


def _tensor_files(d: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: d / f for k, f in weight_map.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{d} has no *.safetensors weights. {_fix(str(d))}")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as sf:
            out.update({k: f for k in sf.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


class _Reader:
    """Reads named tensors from a safetensors checkpoint, keeping one open handle per file."""

    def __init__(self, d: Path):
        self.files = _tensor_files(d)
        self._open: dict[Path, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self.files[key]
        if f not in self._open:
            self._open[f] = safe_open(str(f), "pt")
        return self._open[f].get_tensor(key)


def read_scheme(path: str) -> dict[str, Any]:
    """The checkpoint's single weight scheme: ``{"format", "bits", "group_size", "symmetric", "act_bits"}``."""
    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{d} has no config.json. {_fix(path)}")
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise ConfigError(f"{d} is not a compressed-tensors checkpoint (no such quantization_config). {_fix(path)}")
    if qc.get("quantization_status") != "compressed":
        raise ConfigError(
            f"{d} is a compressed-tensors checkpoint saved {qc.get('quantization_status')!r}, not 'compressed' "
            f"(save it with save_compressed=True). {_fix(path)}"
        )
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or qc.get("format") not in ("pack-quantized", "int-quantized"):
        raise ConfigError(
            f"{d} holds {len(groups)} quantization groups in format {qc.get('format')!r}; zsaq starts from one "
            f"int scheme in pack-quantized or int-quantized format. {_fix(path)}"
        )
    w = groups[0].get("weights") or {}
    acts = groups[0].get("input_activations")
    if w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
        raise ConfigError(
            f"{d} quantizes weights as type={w.get('type')!r} strategy={w.get('strategy')!r}; zsaq starts from "
            f"int weights with group or channel scales. {_fix(path)}"
        )
    return {
        "format": qc["format"],
        "bits": w.get("num_bits"),
        "group_size": w.get("group_size") if w.get("strategy") == "group" else None,
        "symmetric": w.get("symmetric", True),
        "act_bits": acts.get("num_bits") if acts else None,
    }


def check_scheme(scheme: dict[str, Any], m: QuantLinear, path: str) -> None:
    """The checkpoint's scheme is the student's, or a ConfigError naming the quant keys to set."""
    mine = {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric, "act_bits": m.act_bits}
    theirs = {k: scheme[k] for k in mine}
    if mine != theirs:
        acts = "null" if theirs["act_bits"] is None else f"{{bits: {theirs['act_bits']}}}"
        raise ConfigError(
            f"method.init_from={path!r} is quantized as {theirs}, the student as {mine}: set "
            f"quant.weights.bits: {theirs['bits']}, quant.weights.group_size: "
            f"{'null' if theirs['group_size'] is None else theirs['group_size']}, quant.weights.symmetric: "
            f"{str(theirs['symmetric']).lower()}, quant.activations: {acts} to train from it, or start from RTN "
            "(method.init_from: null)"
        )


def _codes(r: _Reader, name: str, m: QuantLinear, scheme: dict[str, Any], path: str) -> torch.Tensor:
    """Integer codes (O, I) of layer ``name`` as stored in the checkpoint."""
    if f"{name}.weight_g_idx" in r:
        g = r.get(f"{name}.weight_g_idx")
        if not torch.equal(g, torch.arange(g.numel(), dtype=g.dtype) // (m.group_size or g.numel())):
            raise ConfigError(
                f"layer {name} of {path} has activation-ordered groups (weight_g_idx, GPTQ actorder: group), "
                "which the student's contiguous groups cannot hold: re-run GPTQ with actorder: static or null, "
                "or start from RTN (method.init_from: null)"
            )
    if scheme["format"] == "int-quantized":
        return r.get(f"{name}.weight").to(torch.int32)
    shape = torch.Size(r.get(f"{name}.weight_shape").tolist())
    if shape != _shape(m.weight):
        raise ConfigError(f"layer {name} of {path} has shape {tuple(shape)}, not the model's. {_fix(path)}")
    return unpack_from_int32(r.get(f"{name}.weight_packed"), scheme["bits"], shape).to(torch.int32)


MARGIN = 1e-3  # in quantization steps: how far inside its rounding bin a projected weight stays


def latent_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    bits: int,
    teacher: torch.Tensor | None = None,
    mode: str = "center",
) -> torch.Tensor:
    """Trained weight whose fake quantization gives the codes ``q`` (``method.init_latent``).

    ``center``: ``(q - zp) * s``. ``teacher``: the teacher's weight where it rounds to ``q`` under
    this scale, the centre elsewhere. ``nearest``: the teacher's weight clamped into the bin of ``q``
    (``MARGIN`` inside its edges). Any weight whose value does not give back ``q`` in the dtype falls
    back to the centre; raises if even the centre does not (a dtype too coarse for the scheme).
    """
    centre = dequantize_codes(q, scale, zp)
    w = centre
    if mode != "center":
        if teacher is None:
            raise ValueError(f"init_latent={mode!r} needs the teacher's weight")
        t = teacher.to(scale.dtype)
        if mode == "nearest":
            t = into_bins(t, q, scale, zp, MARGIN)
        w = torch.where(quantize_weight(t, scale, zp, bits) == q, t, centre)
    if not torch.equal(quantize_weight(w, scale, zp, bits), q.to(w.dtype)):
        raise ConfigError(
            f"the checkpoint's {bits}-bit codes do not survive a round trip in {scale.dtype}: set model.dtype: float32"
        )
    return w


def _shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


@torch.no_grad()
def init_student_from(
    student: nn.Module,
    path: str,
    write_gather: Callable[[nn.Parameter], AbstractContextManager] | None = None,
    latent: str = "teacher",
) -> dict[str, int]:
    """Set ``student``'s quantized layers (and every other tensor the checkpoint holds) from ``path``.

    ``student`` is fresh from the teacher: its quantized layers' weights are the teacher's, which
    :func:`latent_weight` places in the checkpoint's bins as ``latent`` says.
    Returns counts for the log: quantized layers, other tensors copied, and how many of those differ
    from the teacher's.
    """
    scheme = read_scheme(path)
    r = _Reader(Path(path))
    mods = dict(quant_modules(student))
    theirs = {k.rsplit(".", 1)[0] for k in r.files if k.endswith((".weight_packed", ".weight_scale"))}
    missing, extra = sorted(set(mods) - theirs), sorted(theirs - set(mods))
    if missing or extra:
        what = (
            f"quantizes {extra[:3]} which the student leaves in full precision"
            if extra
            else f"leaves {missing[:3]} in full precision, which the student quantizes"
        )
        raise ConfigError(
            f"method.init_from={path!r} {what}: make quant.targets / quant.ignore select the layers the "
            "checkpoint quantized (its config.json quantization_config.ignore lists the others)"
        )
    for m in mods.values():
        check_scheme(scheme, m, path)
    gather = write_gather or (lambda p: nullcontext())
    skip = {f"{n}.{s}" for n in mods for s in _QUANT_SUFFIXES}
    others = changed = 0
    for name, p in list(student.named_parameters()) + list(student.named_buffers()):
        if name in skip or name not in r:
            continue
        t = r.get(name)
        if t.shape != _shape(p):
            raise ConfigError(
                f"tensor {name} of {path} has shape {tuple(t.shape)}, the model {tuple(_shape(p))}: the "
                f"checkpoint is of another model. {_fix(path)}"
            )
        with gather(p) if isinstance(p, nn.Parameter) else nullcontext():
            t = t.to(p.dtype)
            if not torch.equal(t, p):
                if latent != "center":
                    raise ConfigError(
                        f"method.init_from={path!r} changed {name} from the teacher's (as AWQ does when it "
                        "folds its scales), so the teacher's weights are not on the checkpoint's scale: set "
                        "method.init_latent: center"
                    )
                changed += 1
                p.copy_(t)
        others += 1
    for name, m in mods.items():
        q = _codes(r, name, m, scheme, path)
        dtype = m.weight_scale.dtype
        scale = r.get(f"{name}.weight_scale").to(dtype)
        if scale.shape != m.weight_scale.shape:
            raise ConfigError(
                f"layer {name} of {path} has scales of shape {tuple(scale.shape)}, the student "
                f"{tuple(m.weight_scale.shape)}. {_fix(path)}"
            )
        zp = None
        if not m.symmetric:
            packed = r.get(f"{name}.weight_zero_point")
            zp = unpack_from_int32(packed, m.bits, scale.shape, packed_dim=0).to(torch.int8)
            m.weight_zero_point.copy_(zp)
        m.weight_scale.copy_(scale)
        with gather(m.weight):
            m.weight.copy_(latent_weight(q, scale, zp, m.bits, m.weight, latent).to(m.weight.dtype))
    return {"quantized_layers": len(mods), "other_tensors": others, "other_tensors_changed": changed}
