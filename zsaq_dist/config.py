"""Typed job configuration: YAML file + ``--set dotted.key=value`` overrides.

Every model forbids unknown keys, so a typo fails loudly instead of being
ignored. The Ray driver sends ``cfg.model_dump()`` to workers, which validate
it again with :func:`Config.model_validate`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zsaq_dist.errors import ConfigError

DEMO_MODEL = "demo:smollm2-135m-instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Strict):
    path: str = Field(description="local HF directory, a .gguf file, a hub id, or 'demo:smollm2-135m-instruct'")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of teacher, student and scales; training in bfloat16 runs as DeepSpeed mixed "
        "precision (fp32 master weights) and so needs dist.launcher: ray",
    )
    trust_remote_code: bool = Field(False, description="run the model repository's own code (only for models you trust)")
    revision: str | None = Field(None, description="hub revision, for hub ids")


class WeightQuantCfg(_Strict):
    bits: int = Field(4, description="2-8; vLLM's kernels take 4 and 8")
    group_size: int | None = Field(128, description="must divide every targeted layer's input dim; null = per-channel")
    symmetric: bool = Field(True, description="false adds zero points (vLLM loads them; transformers with dequantize)")
    observer: Literal["minmax", "mse"] = Field("minmax", description="initial scales: min-max, or MSE-optimal clip search")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(f"weights.bits={v} is not supported: use an integer from 2 to 8")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("group_size must be a positive integer, or null for per-channel scales")
        return v


class ActQuantCfg(_Strict):
    bits: int = Field(8, description="dynamic per-token symmetric int8 on each targeted Linear's input")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v != 8:
            raise ValueError(
                f"activations.bits={v}: the int-quantized format holds 8-bit dynamic per-token "
                "activations only; use bits: 8, or activations: null for weight-only"
            )
        return v


class QuantCfg(_Strict):
    weights: WeightQuantCfg = WeightQuantCfg()
    activations: ActQuantCfg | None = Field(None, description="{bits: 8} for W8A8 / W4A8; null = weight-only")
    targets: list[str] = Field(["Linear"], description="class names, module names or 're:' regexes")
    ignore: list[str] = Field(["lm_head"], description="same forms; these stay in full precision")

    @model_validator(mode="after")
    def _format_fits(self) -> QuantCfg:
        if self.activations is not None:
            if self.weights.bits != 8 and self.weights.group_size is None:
                raise ValueError(
                    f"W{self.weights.bits}A8 per-channel is not a compressed-tensors format: "
                    "use weights.bits: 8 (int-quantized W8A8) or give weights.group_size"
                )
            if self.weights.bits == 8 and self.weights.group_size is not None:
                raise ValueError(
                    "W8A8 (int-quantized) uses per-channel weight scales: set weights.group_size: null"
                )
            if self.weights.bits == 8 and not self.weights.symmetric:
                raise ValueError("W8A8 (int-quantized) weights are symmetric: set weights.symmetric: true")
        return self

    @property
    def format(self) -> str:
        """The compressed-tensors format the export writes."""
        if self.activations is not None and self.weights.bits == 8:
            return "int-quantized"
        return "pack-quantized"


class GeneratorCfg(_Strict):
    mode: Literal["adversarial", "self_sample", "noise"] = Field(
        "adversarial", description="inputs for method zsaq; methods self_sample and noise force their own"
    )
    lr: float = Field(1e-3, description="generator (adapter) learning rate, gradient ascent")
    radius: float = Field(0.1, ge=0.0, description="max perturbation relative to the embedding norm")
    radius_final: float | None = Field(
        None,
        ge=0.0,
        description="radius at the last student step (cosine from radius, as rho_final for SAM), for the ascent "
        "and the student's inputs alike; 0 ends the game on the seed embeddings as they are; null = constant radius",
    )
    noise_dim: int = Field(64, description="dimension of the noise z")
    hidden_dim: int = Field(128, description="width of the adapter MLP")
    adapter_init: Literal["random", "zero"] = Field(
        "random",
        description="the adapter's output layer: random (PyTorch's default init, so the generator starts with a "
        "random move of each seed embedding) or zero (it starts as the identity, x = E(seed), and every move it "
        "makes comes from its ascent; with ascent: false it is then self_sample exactly)",
    )
    student_steps_per_generator_step: int = Field(1, ge=1)
    lambda_nat: float = Field(0.1, ge=0.0, description="weight of R_nat (keeps inputs plausible to the teacher)")
    r_nat: Literal["nll", "norm"] = Field("nll", description="teacher NLL of its argmax continuation, or embedding-norm penalty")
    lambda_gm: float = Field(0.0, ge=0.0, description="sharpness-aware data term: gradient match with a latent neighbour")
    lambda_div: float = Field(0.0, ge=0.0, description="diversity of the samples' gradients")
    rho_z: float = Field(0.05, ge=0.0, description="latent radius of the GM neighbour")
    clean_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of each student batch fed the seed sequences' embeddings as they are (chosen by global "
        "sample number), the rest the generator's inputs; 0: all from the generator, 1: as self_sample",
    )
    seed_hardness: float = Field(
        0.0,
        ge=0.0,
        description="with ascent, after one pass over the seed pool each sample draws its seed sequence with "
        "probability ~ exp(seed_hardness * KL_j / mean KL), KL_j the student's latest KL on it; 0: in order",
    )


class SeedDataCfg(_Strict):
    num_sequences: int = Field(64, ge=1, description="teacher-generated sequences per run (cached)")
    greedy_tokens: int = Field(3, ge=0, description="greedy tokens after the uniform first one; then sampling")
    temperature: float = Field(1.0, gt=0.0)
    top_k: int | None = 50
    cache_dir: str | None = Field(None, description="default ~/.cache/zsaq_dist/seed")
    seed_model: str | None = Field(None, description="a smaller LM sharing the tokenizer; default: the teacher")
    fresh_per_epoch: bool = Field(
        False,
        description="a new set of num_sequences for every pass of the game over them (steps x batch_size sequences "
        "in all, none repeated); the block warm-up takes the first set",
    )


class MethodCfg(_Strict):
    name: Literal["rtn", "zsaq", "self_sample", "noise"] = "zsaq"
    steps: int = Field(100, ge=0, description="student optimizer steps")
    seed: int = Field(0, description="seeds noise, seed sequences and sampling by global sample number")
    batch_size: int = Field(8, ge=1, description="global batch (all workers together)")
    seq_len: int = Field(128, ge=2, description="tokens per synthetic sequence")
    lr: float = Field(5e-5, ge=0.0, description="student weights (AdamW)")
    scale_lr: float = Field(1e-6, ge=0.0, description="learnable quantization scales; keep <= lr/10")
    learnable_scales: bool = Field(True, description="train weight_scale (LSQ-style) with the weights")
    scales_only_steps: int = Field(
        0,
        ge=0,
        description="first K student steps train only the scales (weights at lr 0; their warm-up and schedule start at K)",
    )
    norm_lr: float = Field(
        0.0,
        ge=0.0,
        description="train the student's norm layers (LayerNorm, RMSNorm, classes named *Norm) at this lr, no decay, "
        "with the scales: from step 0 (so also in scales_only_steps) and in the block warm-up; 0 = frozen at the "
        "teacher's values",
    )
    weight_decay: float = Field(0.0, ge=0.0)
    rho: float = Field(0.05, ge=0.0, description="SAM radius; 0 = plain AdamW")
    rho_final: float | None = Field(
        None, ge=0.0, description="SAM radius at the last step (cosine decay from rho); null = constant rho"
    )
    adaptive_sam: bool = Field(False, description="ASAM: perturbation scaled by abs(w)")
    sam_space: Literal["quantized", "latent"] = Field(
        "quantized",
        description="where SAM perturbs: quantized = added after fake quantization, Q(w) + e (SAQ); latent = the "
        "trained full-precision weights, Q(w + e), whose rounding the perturbation can flip",
    )
    init_from: str | None = Field(
        None,
        description="a compressed-tensors checkpoint of this model in the same quant scheme (e.g. GPTQ run on "
        "zsaq's own seed sequences): the student starts from its codes, scales and zero points; null = RTN",
    )
    init_latent: Literal["teacher", "center", "nearest"] = Field(
        "teacher",
        description="with init_from, where each trained weight starts in its rounding bin: the teacher's weight "
        "where it rounds to the checkpoint's code, else the bin's centre (teacher); every bin's centre (center; "
        "needed when the checkpoint rescaled other tensors, as AWQ does); the teacher's weight clamped into the "
        "bin (nearest)",
    )
    block_warmup_steps: int = Field(
        64,
        ge=0,
        description="before the end-to-end game, AdamW steps on each decoder layer alone, matching the teacher's "
        "layer output on the seed sequences (the student's own inputs); 0 = off; rtn and noise: off",
    )
    block_warmup_lr: float = Field(3e-4, ge=0.0, description="lr of the block warm-up (cosine to 0 within each layer)")
    block_warmup_margin: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="after its warm-up, each layer's trained weights move at least this far (in quantization "
        "steps) inside their rounding bins, codes unchanged, so that the game's first steps do not flip at once "
        "the codes near a bin's edge; 0 = leave them (0.1 keeps the warm-up's KL and top-1 through the game "
        "but ended at a higher perplexity, bench/README.md)",
    )
    ascent: bool = Field(True, description="false freezes the generator (ablation)")
    tau: float = Field(1.0, gt=0.0, description="distillation temperature (loss scaled by tau^2)")
    lambda_hidden: float = Field(0.0, ge=0.0, description="weight of the hidden-state MSE")
    warmup_steps: int = Field(5, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, description="max gradient norm; null = no clipping")
    generator: GeneratorCfg = GeneratorCfg()
    seed_data: SeedDataCfg = SeedDataCfg()
    log_every: int = Field(1, ge=1, description="progress-bar update interval (steps)")
    recompute_fake_quant: bool = Field(
        False,
        description="recompute each layer's fake quantization in the backward instead of keeping its "
        "weight-sized intermediates (about 3.5x the parameters at small batches): less memory, more compute",
    )

    @model_validator(mode="after")
    def _scales_only(self) -> MethodCfg:
        k = self.scales_only_steps
        if k == 0:
            return self
        if not self.learnable_scales or self.scale_lr <= 0:
            raise ValueError(
                f"scales_only_steps={k} trains only the quantization scales, but they are frozen "
                f"(learnable_scales={self.learnable_scales}, scale_lr={self.scale_lr}): "
                "set learnable_scales: true and scale_lr > 0, or scales_only_steps: 0"
            )
        if k >= self.steps:
            raise ValueError(
                f"scales_only_steps={k} leaves no step for the weights (steps={self.steps}): "
                f"use scales_only_steps < steps, or scales_only_steps: 0"
            )
        return self

    @property
    def trains(self) -> bool:
        """Whether the student is trained at all (end-to-end steps, or the block warm-up alone)."""
        return self.name != "rtn" and (self.steps > 0 or self.block_warmup_steps > 0)

    @property
    def trains_norms(self) -> bool:
        """Whether the student's norm layers train: ``norm_lr > 0`` and a method that trains (not ``rtn``)."""
        return self.norm_lr > 0 and self.name != "rtn"

    @model_validator(mode="after")
    def _block_warmup(self) -> MethodCfg:
        if self.block_warmup_steps == 0:
            return self
        seedless = self.name in ("rtn", "noise") or (self.name == "zsaq" and self.generator.mode == "noise")
        if seedless and "block_warmup_steps" not in self.model_fields_set:
            self.__dict__["block_warmup_steps"] = 0  # the default is for methods that train on seed sequences
            return self
        if self.name == "rtn":
            raise ValueError(
                f"block_warmup_steps={self.block_warmup_steps} trains the student, but method rtn trains nothing: "
                "use method.name: zsaq (or self_sample), or block_warmup_steps: 0"
            )
        if seedless:
            raise ValueError(
                "block_warmup_steps warms the layers on the seed sequences, which the noise baseline does not use: "
                "set block_warmup_steps: 0 for noise"
            )
        return self

    @model_validator(mode="after")
    def _fresh_seeds(self) -> MethodCfg:
        if self.seed_data.fresh_per_epoch and self.generator.seed_hardness > 0:
            raise ValueError(
                f"generator.seed_hardness={self.generator.seed_hardness} re-draws the sequences the student found "
                "hard from a pool the game passes over again, but seed_data.fresh_per_epoch never repeats one: "
                "set seed_hardness: 0 or fresh_per_epoch: false"
            )
        return self

    @model_validator(mode="after")
    def _sam_space(self) -> MethodCfg:
        if self.sam_space == "quantized" and self.adaptive_sam:
            raise ValueError(
                "adaptive_sam scales the perturbation by abs(w) of the latent weights; with sam_space: quantized "
                "the perturbation lives after the quantizer: set adaptive_sam: false or sam_space: latent"
            )
        return self


class DistCfg(_Strict):
    launcher: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Train workers (embedded Ray if no cluster); local: this process only"
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel + ZeRO shards)")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage of the student (teacher: always 3 when >0)")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl")
    address: str | None = Field(None, description="Ray cluster; default RAY_ADDRESS, else embedded Ray")
    resources_per_worker: dict[str, float] | None = None
    checkpoint_every: int = Field(0, ge=0, description="0 = no intermediate checkpoints")
    max_failures: int = Field(0, ge=-1, description="worker failures to resume from (-1 = no limit)")
    fail_at_step: int | None = Field(None, description="fault injection for tests: kill a worker at this step once")
    storage_path: str | None = Field(None, description="Ray Train checkpoints; default <output.dir>.ray")
    sharded_load: bool = Field(
        True, description="build the teacher (and a ZeRO-3 student) partitioned at load; false: each worker loads it whole"
    )


class OutputCfg(_Strict):
    dir: str = Field(description="local path or fsspec URI (s3://, gs://, ...)")
    max_shard_size: str = Field("2GB", description="size of each safetensors shard")
    overwrite: bool = Field(False, description="replace an existing output (only once the new one is complete)")


class EvalCfg(_Strict):
    text: str | None = Field(None, description="a text file; default: stdlib pydoc_data.topics prose")
    seq_len: int = Field(512, ge=2, description="non-overlapping evaluation windows")
    max_tokens: int | None = Field(16384, ge=2, description="evaluate at most this many tokens")
    batch_size: int = Field(4, ge=1)


class Config(_Strict):
    model: ModelCfg
    quant: QuantCfg = QuantCfg()
    method: MethodCfg = MethodCfg()
    dist: DistCfg = DistCfg()
    output: OutputCfg
    eval: EvalCfg | None = None

    def hash(self) -> str:
        """Stable hash of everything that changes the result (not where it is written)."""
        d = self.model_dump(mode="json", exclude={"output": True, "eval": True})
        d["dist"] = {k: d["dist"][k] for k in ("zero_stage",)}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``4``, ``null``, ``[a, b]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set quant.weights.bits=3")
        key, val = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(val))
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against the config reference in README.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate(raw: dict[str, Any], source: str = "") -> Config:
    """Validate a raw dict into a :class:`Config`, raising :class:`ConfigError` with readable messages."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found: pass the path of a YAML recipe, e.g. configs/quickstart.yaml")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping at the top level (model:, quant:, method:, output:)")
    return validate(apply_overrides(raw, overrides or []), str(p))
