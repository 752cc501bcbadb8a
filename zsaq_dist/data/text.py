"""Evaluation text: the Python reference prose shipped in the standard library, or a user's file.

This text is for EVALUATION only (perplexity, KL to the teacher). The method is
zero-shot: nothing here may ever be used for calibration or training.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import torch

from zsaq_dist.errors import ConfigError


def _stdlib_prose() -> str:
    """The texts of ``pydoc_data.topics`` joined in sorted key order (~460k characters).

    Deterministic for a given Python version; the prose changes a little between
    Python releases, so compare numbers measured with the same interpreter.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def load_eval_text(path: str | None = None) -> str:
    """The evaluation text: the UTF-8 file at ``path``, or by default the stdlib ``pydoc_data.topics`` prose."""
    if path is None:
        return _stdlib_prose()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"evaluation text file {p} not found: give eval.text the path of a UTF-8 text file, "
            "or leave it null to use the built-in Python reference prose"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"evaluation text file {p} is not UTF-8 ({err}): convert it, e.g. iconv -t utf-8") from None
    if not text.strip():
        raise ConfigError(f"evaluation text file {p} is empty: give a file with some prose in it")
    return text


def encode_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.LongTensor:
    """Token ids of ``text`` as a 1-D LongTensor, without special tokens, truncated to ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def text_identity(path: str | None, ids: torch.Tensor) -> dict[str, str]:
    """What an evaluation scored: ``text`` (the file, or the stdlib prose with the Python version that
    supplied it) and ``tokens_sha256``, the hash of the token ids (int64), which differs whenever the text,
    the tokenizer or ``max_tokens`` does. Two results are comparable in perplexity only if it matches.
    """
    text = path if path is not None else f"pydoc_data.topics (Python {platform.python_version()})"
    return {"text": text, "tokens_sha256": tokens_sha256(ids)}


def tokens_sha256(ids: torch.Tensor) -> str:
    """SHA-256 of token ids as int64 in row-major order: two tensors hash alike exactly when their ids do, in
    that order (a 1-D text or a batch of sequences; the shape itself is not hashed, so say it beside the hash)."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
