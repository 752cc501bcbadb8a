"""Run ONE quantizer on the demo model and score it; executed as a subprocess by ``bench/peers.py``.

    python bench/peers_run.py SPEC.json

SPEC holds ``method`` (rtn | hqq | gptq | awq), ``bits``, ``group_size``,
``symmetric``, ``model`` (fp32 HF dir), ``eval_ids`` (a ``torch.save``d 1-D
LongTensor), ``calib_ids`` (2-D (N, L), for gptq/awq), ``seq_len``, ``out``
(a directory for the result and any checkpoint) and optional ``observer``
(rtn) and ``awq_n_grid`` (AWQ's scale grid, default 20). ``rtn`` runs in the product's venv; hqq, gptq and awq run in the peers
venv (bench/.peers-venv), so the peers' pinned transformers/compressed-tensors
never meet the product's.

Every method is scored by the same code, ``zsaq_dist.eval.evaluate`` (the repo
root is put on ``sys.path``: that module needs only torch and tqdm), on the same
token ids, against the same fp32 teacher. ``seconds`` and ``peak_rss_mb`` cover
loading the model, quantizing and saving, not the evaluation.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zsaq_dist.eval.metrics import evaluate  # noqa: E402


def _load(model_dir: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every Linear but lm_head: the same set as the product's default (targets Linear, ignore lm_head)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def quantize_rtn(spec: dict) -> nn.Module:
    """Ours: ``zsaq_dist.quant.prepare`` (RTN init) + ``convert``; the forward equals the exported checkpoint's."""
    from zsaq_dist.config import QuantCfg
    from zsaq_dist.quant import convert, prepare

    cfg = QuantCfg.model_validate(
        {
            "weights": {
                "bits": spec["bits"],
                "group_size": spec["group_size"],
                "symmetric": spec["symmetric"],
                "observer": spec.get("observer", "minmax"),
            }
        }
    )
    return convert(prepare(_load(spec["model"]), cfg))


@torch.no_grad()
def quantize_hqq(spec: dict) -> nn.Module:
    """HQQ (calibration-free, asymmetric with a float zero point), dequantized in memory.

    ``axis=1`` groups along the input dimension, the same groups as compressed-tensors.
    """
    from hqq.core.quantize import Quantizer

    model = _load(spec["model"])
    for _, lin in _targets(model):
        w_q, meta = Quantizer.quantize(
            lin.weight.data,
            nbits=spec["bits"],
            group_size=spec["group_size"],
            axis=1,
            optimize=True,
            bitpack=False,
            compute_dtype=torch.float32,
            device="cpu",
        )
        lin.weight.data.copy_(Quantizer.dequantize(w_q, meta).reshape(lin.weight.shape))
    return model


def _scheme(spec: dict) -> dict:
    """compressed-tensors config_groups for int weight-only, per-group, sym or asym."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=spec["bits"], type="int", symmetric=spec["symmetric"], strategy="group", group_size=spec["group_size"]
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}


def _cpu_only_pinning_fix() -> None:
    """llm-compressor 0.14's AWQ pins cached activations for faster host-to-GPU copies, which raises
    on a machine without an accelerator. Pinning only speeds up copies (no numerical effect),
    so without an accelerator it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def quantize_llmc(spec: dict) -> nn.Module:
    """GPTQ or AWQ through llm-compressor's ``oneshot``; writes a compressed-tensors checkpoint to ``out/model``."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    _cpu_only_pinning_fix()
    calib = torch.load(spec["calib_ids"], weights_only=True)  # (N, L)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    groups = _scheme(spec)
    if spec["method"] == "gptq":
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    else:  # AWQ only rescales channels; a quantization modifier after it writes the scales
        recipe = [
            AWQModifier(n_grid=spec.get("awq_n_grid", 20)),
            QuantizationModifier(config_groups=groups, ignore=["lm_head"]),
        ]
    model = _load(spec["model"])
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
    )
    out = Path(spec["out"]) / "model"
    model.save_pretrained(out, save_compressed=True)
    return model


QUANTIZERS = {"rtn": quantize_rtn, "hqq": quantize_hqq, "gptq": quantize_llmc, "awq": quantize_llmc}


def _reload(spec: dict, model: nn.Module) -> nn.Module:
    """llm-compressor results are scored as users get them: reloaded (decompressed) from the checkpoint."""
    if spec["method"] not in ("gptq", "awq"):
        return model
    del model
    return _load(str(Path(spec["out"]) / "model"))


def peak_rss_mib() -> float:
    """Peak resident memory of this process image, in MiB.

    ``VmHWM`` belongs to the address space created by ``exec``; ``getrusage``'s
    ``ru_maxrss`` would also count the forking parent's resident set, which Linux
    carries across fork and exec.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def run(spec: dict) -> dict:
    """Quantize, measure time and peak RSS, then evaluate against the fp32 teacher."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = QUANTIZERS[spec["method"]](spec)
    seconds = time.perf_counter() - t0
    peak_rss_mb = peak_rss_mib()
    model = _reload(spec, model)
    ids = torch.load(spec["eval_ids"], weights_only=True)
    metrics = evaluate(model, ids, spec["seq_len"], reference=_load(spec["model"]), progress=False)
    return {
        **metrics,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb,
        "peak_rss_source": "VmHWM",
        "torch_threads": torch.get_num_threads(),
    }


def set_threads() -> int:
    """Torch intra-op threads from ``ZSAQ_PEERS_THREADS`` (set by ``bench/peers.py --threads``; default 1).

    On a shared 2-core CPU, 2 OpenMP threads per op are what made AWQ crawl: every small op
    ends in a barrier where one thread spin-waits for the other, and when another process holds
    the second core, each op waits for a scheduler time slice. AWQ's grid search is thousands of
    such small ops (measured on this machine, same tiny AWQ job under other jobs' load: 57 s with
    2 threads, 25 s with 1; with two other torch processes beside it, ~1 decoder layer a minute
    with 2 threads). One thread has no barrier to wait at.
    """
    n = int(os.environ.get("ZSAQ_PEERS_THREADS", "1"))
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def main() -> None:
    """Read the spec, run it, write ``out/result.json``."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    print(f"[peers_run] torch threads: {set_threads()}", flush=True)
    result = run(spec)
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["out"]) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
