"""One quantization job in this process: load, prepare, train, convert, export, evaluate.

The distributed layer (``zsaq_dist.dist``) reuses the pieces here on every
worker; ``run_quantize`` is the single-process path (``dist.launcher: local``).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsaq_dist import __version__
from zsaq_dist.config import Config
from zsaq_dist.minimax.student import freeze, make_student
from zsaq_dist.quant import convert, quant_modules


def device_for(cfg: Config) -> torch.device:
    """CUDA when the config asks for a GPU and one is present, else CPU."""
    if cfg.dist.use_gpu:
        if not torch.cuda.is_available():
            from zsaq_dist.errors import ConfigError

            raise ConfigError("dist.use_gpu is true but no CUDA device is visible: set dist.use_gpu: false")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def learnable_scales(cfg: Config) -> bool:
    """Scales are trained when the config asks and the method trains at all (not ``rtn``)."""
    return cfg.method.learnable_scales and cfg.method.name != "rtn"


def build_student(teacher: nn.Module, cfg: Config) -> nn.Module:
    """A fake-quantized copy of ``teacher`` (RTN, or ``method.init_from``); scales (norms) learnable when asked."""
    student = make_student(
        teacher, cfg.quant, learnable_scales(cfg), cfg.method.recompute_fake_quant, cfg.method.trains_norms
    )
    return init_from(student, cfg)


def init_from(student: nn.Module, cfg: Config, write_gather=None) -> nn.Module:
    """Start ``student`` from ``method.init_from``'s codes, scales and zero points when one is set."""
    if cfg.method.init_from is not None:
        from zsaq_dist.io.warmstart import init_student_from

        n = init_student_from(student, cfg.method.init_from, write_gather, cfg.method.init_latent)
        logging.getLogger("zsaq").info(
            "student starts from %s (init_latent %s): %d quantized layers, %d other tensors (%d differ from the "
            "teacher's)", cfg.method.init_from, cfg.method.init_latent, n["quantized_layers"], n["other_tensors"],
            n["other_tensors_changed"],
        )
    return student


def load_teacher(cfg: Config, device: torch.device) -> tuple[nn.Module, Any]:
    """The full-precision teacher and its tokenizer."""
    from zsaq_dist.io.load import load_model

    teacher, tokenizer = load_model(cfg.model, device=str(device))
    return freeze(teacher), tokenizer


def quant_summary(student: nn.Module) -> dict[str, Any]:
    """Counts of quantized layers and parameters, for the report."""
    mods = list(quant_modules(student))

    def numel(p: torch.Tensor) -> int:  # a ZeRO-3 partitioned parameter keeps its full size in ds_numel
        return getattr(p, "ds_numel", p.numel())

    qparams = sum(numel(m.weight) for _, m in mods)
    total = sum(numel(p) for p in student.parameters()) - sum(numel(m.weight_scale) for _, m in mods)
    return {"quantized_layers": len(mods), "quantized_params": qparams, "total_params": total}


def machine() -> dict[str, Any]:
    """The interpreter, torch, and the CPU whose kernels (and thread count) round this process's floats.

    A trained run reproduces bit for bit only on the same kernels at the same thread count: an AVX2 and an
    AVX512 machine sum the same matrix products in different orders, and the game carries that into other codes.
    """
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.machine(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def machine_line(device: str) -> str:
    """One line for a benchmark's ``machine`` field: host name, architecture, CPU and its kernels, CPUs, device."""
    m = machine()
    return f"{platform.node()} ({m['host']}, {m['cpu']}, {m['cpu_capability']}, {os.cpu_count()} cpus, {device})"


def base_report(cfg: Config) -> dict[str, Any]:
    """Provenance common to every report."""
    report = {
        "zsaq_dist_version": __version__,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.hash(),
        "format": cfg.quant.format,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "real_data_used_for_training": False,
    }
    if cfg.method.init_from is not None:  # whatever made that checkpoint is beyond what zsaq can vouch for
        report["init_from"] = {
            "path": cfg.method.init_from,
            "latent": cfg.method.init_latent,
            "note": "the student started from this checkpoint; zsaq used no real data, the checkpoint's own "
            "calibration data is not known here",
        }
    return report


def load_seed_model(cfg: Config, device: torch.device) -> nn.Module | None:
    """The optional smaller LM that writes the seed sequences (it must share the teacher's tokenizer)."""
    path = cfg.method.seed_data.seed_model
    if path is None or cfg.method.name in ("rtn", "noise"):
        return None
    from zsaq_dist.config import ModelCfg
    from zsaq_dist.io.load import load_model

    model, _ = load_model(ModelCfg(path=path, dtype=cfg.model.dtype), device=str(device))
    return freeze(model)


def train_student(teacher: nn.Module, student: nn.Module, tokenizer: Any, cfg: Config) -> dict[str, Any]:
    """Run the configured method; RTN trains nothing."""
    if not cfg.method.trains:
        return {}
    from zsaq_dist.minimax.trainer import train

    seed_model = load_seed_model(cfg, next(teacher.parameters()).device)
    return train(teacher, student, tokenizer, cfg, seed_model=seed_model)


def curves_png(history: dict[str, Any]) -> dict[str, bytes]:
    """``{"training_curves.png": bytes}`` for a trained run, else empty."""
    if not history:
        return {}
    import tempfile
    from pathlib import Path

    from zsaq_dist.minimax.trainer import plot_history

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "curves.png"
        plot_history(history, str(path))
        return {"training_curves.png": path.read_bytes()}


def evaluate_in_memory(teacher: nn.Module, student: nn.Module, tokenizer: Any, cfg: Config) -> dict[str, Any]:
    """Perplexity/KL/top-1 of teacher and student on the evaluation text (never used for training)."""
    from zsaq_dist.data.text import encode_text, load_eval_text, text_identity
    from zsaq_dist.eval import evaluate

    e = cfg.eval
    if tokenizer is None:
        from zsaq_dist.errors import ConfigError

        raise ConfigError(f"{cfg.model.path} has no tokenizer, so the eval: section cannot encode text: remove it")
    ids = encode_text(tokenizer, load_eval_text(e.text), e.max_tokens)
    fp = evaluate(teacher, ids, e.seq_len, batch_size=e.batch_size)
    q = evaluate(student, ids, e.seq_len, reference=teacher, batch_size=e.batch_size)
    return {"teacher": fp, "quantized": q, **text_identity(e.text, ids)}


def check_local_dtype(cfg: Config) -> None:
    """Refuse to train in 16 bits in this process: without fp32 master weights AdamW's small steps round away.

    The Ray path runs the same config as DeepSpeed mixed precision (16-bit parameters, fp32 master
    copies and moments), which is what ``model.dtype: bfloat16`` is for when training.
    """
    if not cfg.method.trains or cfg.model.dtype == "float32":
        return
    from zsaq_dist.errors import ConfigError

    raise ConfigError(
        f"model.dtype={cfg.model.dtype} with dist.launcher=local would train {cfg.model.dtype} weights with no "
        "fp32 master copy, so updates smaller than their precision are lost: set model.dtype: float32, or "
        "run with dist.launcher: ray (DeepSpeed mixed precision keeps fp32 master weights)"
    )


def run_quantize(cfg: Config) -> dict[str, Any]:
    """The whole job in this process; returns the report (also written as ``zsaq_report.json``)."""
    from zsaq_dist.io.export import export_checkpoint

    check_local_dtype(cfg)
    t0 = time.perf_counter()
    report = base_report(cfg)
    torch.manual_seed(cfg.method.seed)
    device = device_for(cfg)
    teacher, tokenizer = load_teacher(cfg, device)
    student = build_student(teacher, cfg)
    report["load_seconds"] = round(time.perf_counter() - t0, 2)
    report.update(quant_summary(student))

    t1 = time.perf_counter()
    history = train_student(teacher, student, tokenizer, cfg)
    report["train_seconds"] = round(time.perf_counter() - t1, 2)
    report["history"] = history
    convert(student)

    if cfg.eval is not None:
        t2 = time.perf_counter()
        report["eval"] = evaluate_in_memory(teacher, student, tokenizer, cfg)
        report["eval_seconds"] = round(time.perf_counter() - t2, 2)

    report["total_seconds_before_export"] = round(time.perf_counter() - t0, 2)
    out = export_checkpoint(student, tokenizer, cfg, report, extra_files=curves_png(history))
    report["output"] = out
    report["total_seconds"] = round(time.perf_counter() - t0, 2)
    return report
