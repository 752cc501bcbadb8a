"""GPTQ (llm-compressor) calibrated on zsaq's seed sequences: a data-free start for ``method.init_from``.

Runs in an environment with llm-compressor (not a zsaq dependency; ``python bench/peers_venv.py``
builds one at ``bench/.peers-venv``)::

    zsaq seeds configs/smollm2-w4g64.yaml --set method.seq_len=512 \\
        --set method.seed_data.num_sequences=8 --out out/seeds.jsonl
    bench/.peers-venv/bin/python scripts/gptq_on_seeds.py --model "$(zsaq fetch-demo-model)" \\
        --seeds out/seeds.jsonl --bits 4 --group-size 64 --out out/gptq-seeds
    zsaq quantize configs/smollm2-w4g64.yaml --set method.init_from=out/gptq-seeds

The seed file holds only text the teacher wrote itself, so the checkpoint uses zero real data.
It targets every Linear but ``lm_head`` (zsaq's default ``quant.targets`` / ``quant.ignore``) with
contiguous groups (``actorder: static``; ``init_from`` refuses activation-ordered groups).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the full-precision model directory (the teacher)")
    p.add_argument("--seeds", required=True, help="JSON lines written by `zsaq seeds`")
    p.add_argument("--out", required=True, help="directory of the compressed-tensors checkpoint")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64, help="0 = per-channel")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero points); default symmetric")
    args = p.parse_args()
    try:
        import torch
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        sys.exit(f"error: {err.name} is missing: run this with llm-compressor installed (python bench/peers_venv.py)")

    rows = [json.loads(line) for line in Path(args.seeds).read_text().splitlines() if line.strip()]
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "attention_mask")})
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=not args.asym,
        strategy="group" if args.group_size else "channel",
        group_size=args.group_size or None,
        actorder="static" if args.group_size else None,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(rows),
        max_seq_length=max(len(r["input_ids"]) for r in rows),
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(args.out, save_compressed=True)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    print(f"wrote {args.out}: GPTQ W{args.bits} g{args.group_size or 'channel'} on {len(rows)} seed sequences")


if __name__ == "__main__":
    main()
