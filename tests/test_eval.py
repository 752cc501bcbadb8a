"""Evaluation metrics are exact, and the evaluation text is deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama
from test_load_fixtures import make_word_tokenizer

from zsaq_dist.data.text import encode_text, load_eval_text, text_identity
from zsaq_dist.errors import ConfigError
from zsaq_dist.eval import evaluate, format_table, windows


@pytest.fixture(scope="module")
def word_tokenizer():
    return make_word_tokenizer()


@pytest.fixture(scope="module")
def models():
    return make_tiny_llama(seed=0), make_tiny_llama(seed=1)


def _ids(n: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_ppl_equals_hf_labels_loss_on_one_window(models):
    model, _ = models
    ids = _ids(33)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()  # mean NLL of 32 predictions
    r = evaluate(model, ids, seq_len=33, progress=False)
    assert r["windows"] == 1 and r["tokens"] == 32
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert "kl" not in r and "top1" not in r


def test_windows_and_batches_match_a_per_window_reference(models):
    model, _ = models
    ids = _ids(16 * 5 + 7)  # 5 full windows and a short tail of 7 tokens
    total, count = 0.0, 0
    with torch.no_grad():
        for w in ids.split(16):
            n = w.numel() - 1
            total += model(input_ids=w[None], labels=w[None]).loss.item() * n
            count += n
    results = [evaluate(model, ids, seq_len=16, batch_size=b, progress=False) for b in (1, 3, 8)]
    for r in results:
        assert r["windows"] == 6 and r["tokens"] == count == 5 * 15 + 6
        assert r["nll"] == pytest.approx(total / count, rel=1e-5)
    assert results[0]["nll"] == pytest.approx(results[1]["nll"], rel=1e-6)


def test_window_split_drops_a_one_token_tail():
    ids = torch.arange(2 * 8 + 1)
    assert [w.numel() for w in windows(ids, 8)] == [8, 8]
    assert [w.numel() for w in windows(torch.arange(18), 8)] == [8, 8, 2]
    with pytest.raises(ValueError, match="1-D"):
        windows(ids[None], 8)


def test_kl_and_top1_against_itself(models):
    model, _ = models
    r = evaluate(model, _ids(50), seq_len=16, reference=model, batch_size=2, progress=False)
    assert r["kl"] == 0.0
    assert r["top1"] == 1.0


def test_kl_and_top1_match_a_float64_reference(models):
    student, teacher = models
    ids = _ids(40, seed=3)
    r = evaluate(student, ids, seq_len=20, reference=teacher, batch_size=2, progress=False)
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for w in windows(ids, 20):
            logp = F.log_softmax(student(input_ids=w[None]).logits[0, :-1].double(), -1)
            logq = F.log_softmax(teacher(input_ids=w[None]).logits[0, :-1].double(), -1)
            kl += (logq.exp() * (logq - logp)).sum().item()  # KL(teacher || student)
            agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
            n += w.numel() - 1
    assert r["kl"] > 0
    assert r["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert r["top1"] == agree / n


def test_too_short_text_is_a_config_error(models):
    with pytest.raises(ConfigError, match="longer eval.text"):
        evaluate(models[0], torch.tensor([5]), seq_len=8, progress=False)


def test_default_eval_text_is_deterministic_prose():
    a, b = load_eval_text(), load_eval_text()
    assert a == b
    assert len(a) > 100_000
    assert 'The "assert" statement' in a


def test_eval_text_from_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("héllo wörld\n", encoding="utf-8")
    assert load_eval_text(str(p)) == "héllo wörld\n"
    with pytest.raises(ConfigError, match="not found"):
        load_eval_text(str(tmp_path / "missing.txt"))


def test_text_identity_names_the_interpreter_and_hashes_the_scored_tokens():
    import hashlib
    import platform

    ids = torch.tensor([3, 1, 4, 1, 5], dtype=torch.long)
    default = text_identity(None, ids)
    assert default["text"] == f"pydoc_data.topics (Python {platform.python_version()})"
    assert default["tokens_sha256"] == hashlib.sha256(np.array([3, 1, 4, 1, 5], dtype=np.int64).tobytes()).hexdigest()
    assert text_identity("t.txt", ids) == {"text": "t.txt", "tokens_sha256": default["tokens_sha256"]}
    assert text_identity(None, ids[:4])["tokens_sha256"] != default["tokens_sha256"]  # e.g. another max_tokens
    assert text_identity(None, ids.to(torch.int32))["tokens_sha256"] == default["tokens_sha256"]


def test_encode_text_adds_no_special_tokens_and_truncates(word_tokenizer):
    ids = encode_text(word_tokenizer, "a b c a b", max_tokens=None)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == [word_tokenizer.convert_tokens_to_ids(t) for t in "a b c a b".split()]
    assert encode_text(word_tokenizer, "a b c a b", max_tokens=3).tolist() == ids[:3].tolist()


def test_format_table_aligns_and_fills_dppl():
    rows = [
        {"name": "teacher", "ppl": 10.0},
        {"name": "w4-zsaq", "ppl": 10.5, "kl": 0.0123, "top1": 0.95},
        {"name": "w3-rtn-long-name", "ppl": 20.0, "kl": 0.3, "top1": 0.5},
    ]
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 5
    assert len({len(line) for line in lines}) == 1  # aligned
    assert lines[0].split(" | ")[0].strip() == "name"
    assert "+0.500" in lines[3] and "95.00%" in lines[3] and "0.01230" in lines[3]
    assert lines[2].split("|")[3].strip() == "-"  # the teacher has no KL
