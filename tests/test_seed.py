"""Zero-shot seed sequences: per-sample determinism, slices, greedy prefix, special tokens, disk cache."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from zsaq_dist.config import MethodCfg, SeedDataCfg
from zsaq_dist.data import seed as seed_mod
from zsaq_dist.data.seed import (
    cache_key,
    generate_seed_tokens,
    load_or_generate,
    model_fingerprint,
    pool_cfg,
    sample_seed,
)

CFG = SeedDataCfg(num_sequences=10, greedy_tokens=2, top_k=20)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(hidden=32)


@pytest.fixture(scope="module")
def full(model):
    return generate_seed_tokens(model, CFG, 12, seed=3)


def test_slices_equal_the_full_set(model, full):
    assert full.shape == (10, 12) and full.dtype == torch.long
    for k, m in [(0, 3), (3, 10), (7, 9), (9, 10), (5, 5)]:
        assert torch.equal(generate_seed_tokens(model, CFG, 12, seed=3, start=k, stop=m), full[k:m])


def test_seed_changes_the_data_and_reruns_reproduce(model, full):
    assert torch.equal(generate_seed_tokens(model, CFG, 12, seed=3), full)
    assert not torch.equal(generate_seed_tokens(model, CFG, 12, seed=4), full)
    assert len({tuple(r.tolist()) for r in full}) == len(full)  # sequences differ from each other
    assert sample_seed(1, 2) != sample_seed(2, 1)


def test_greedy_prefix_and_no_special_tokens(model):
    specials = [0, 1, 2]
    ids = generate_seed_tokens(model, CFG, 8, seed=0, special_ids=specials)
    assert not torch.isin(ids, torch.tensor(specials)).any()
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (N, T, V)
    logits[..., specials] = float("-inf")
    greedy = logits.argmax(-1)
    # tokens 1..greedy_tokens are the argmax continuation
    assert torch.equal(ids[:, 1 : 1 + CFG.greedy_tokens], greedy[:, : CFG.greedy_tokens])
    # sampled tokens stay inside the top_k of the teacher
    topk = logits[:, CFG.greedy_tokens : -1].topk(CFG.top_k, -1).indices
    assert (topk == ids[:, 1 + CFG.greedy_tokens :, None]).any(-1).all()


def test_cache_is_reused_and_keyed(model, full, tmp_path, monkeypatch):
    cfg = CFG.model_copy(update={"cache_dir": str(tmp_path)})
    first = load_or_generate(model, cfg, 12, seed=3)
    assert torch.equal(first, full) and len(list(tmp_path.glob("seed-*.pt"))) == 1

    def boom(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(seed_mod, "generate_seed_tokens", boom)
    assert torch.equal(load_or_generate(model, cfg, 12, seed=3), full)
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(make_tiny_llama(hidden=32)) != model_fingerprint(make_tiny_llama(seed=1, hidden=32))
    keys = {
        cache_key(fp, cfg, 12, 3),
        cache_key(fp, cfg, 13, 3),
        cache_key(fp, cfg, 12, 4),
        cache_key(fp, cfg.model_copy(update={"temperature": 0.7}), 12, 3),
        cache_key("other", cfg, 12, 3),
    }
    assert len(keys) == 5
    assert cache_key(fp, cfg.model_copy(update={"cache_dir": "/elsewhere"}), 12, 3) == cache_key(fp, cfg, 12, 3)
    # a change of the generation code that changes its output bumps GENERATOR_VERSION, and so every key
    monkeypatch.setattr(seed_mod, "GENERATOR_VERSION", seed_mod.GENERATOR_VERSION + 1)
    assert cache_key(fp, cfg, 12, 3) not in keys


@pytest.mark.parametrize("steps,batch,pool", [(5, 4, 20), (3, 4, 20), (1, 1, 10), (0, 8, 10), (6, 4, 30)])
def test_fresh_per_epoch_pools_whole_passes_of_new_sequences(steps, batch, pool):
    """steps x batch samples over 10 per pass: that many new ones per pass, rounded up to whole passes."""
    fresh = CFG.model_copy(update={"fresh_per_epoch": True})
    m = MethodCfg(steps=steps, batch_size=batch, seed_data=fresh)
    assert pool_cfg(m).num_sequences == pool
    assert pool_cfg(m.model_copy(update={"seed_data": CFG})) is CFG  # without it, the set as configured
    # the pool is the set of a plain run of its size: one cache entry, whose first pass is the plain set
    plain = CFG.model_copy(update={"num_sequences": pool})
    assert cache_key("fp", pool_cfg(m), 12, 3) == cache_key("fp", plain, 12, 3)
    assert (cache_key("fp", plain, 12, 3) == cache_key("fp", CFG, 12, 3)) == (pool == 10)


def test_fingerprint_refuses_a_partitioned_embedding():
    """Under ZeRO-3 the embedding holds no values: a fingerprint of the config alone would mix up models."""
    model = make_tiny_llama(hidden=32)
    model.get_input_embeddings().weight.data = torch.empty(0)
    with pytest.raises(ValueError, match="gather it first"):
        model_fingerprint(model)
