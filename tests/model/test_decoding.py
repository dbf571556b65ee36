"""Decoding against teacher-forced forward passes, exhaustive search and hand-made invariants.

The tests against a reference decode on both paths (the `kernels` fixture: XLA's ops, and the
compiled CPU kernels where they build); the reference is always XLA's full forward pass."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.model import decoding
from gqa_t5x.model.config import TransformerConfig
from gqa_t5x.model.network import Transformer

CFG = TransformerConfig(vocab_size=24, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=48, num_encoder_layers=2, num_decoder_layers=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16)
L = 7


def _params(module, seed=0):
    tokens = jnp.ones((1, 3), jnp.int32)
    init = jax.jit(functools.partial(module.init, enable_dropout=False))  # eager init is slow
    return init(jax.random.PRNGKey(seed), tokens, tokens, tokens)["params"]


@pytest.fixture(scope="module")
def model():
    module = Transformer(CFG)
    params = _params(module)
    enc = np.random.RandomState(1).randint(2, CFG.vocab_size, (3, 9)).astype(np.int32)
    enc[1, 6:] = 0  # padding in one example
    return module, params, jnp.asarray(enc)


def _teacher_forced_log_probs(module, params, enc, tokens):
    """log_softmax of the full (uncached) forward pass on decoder inputs [0, tokens[:-1]]."""
    tokens = np.asarray(tokens)
    dec_in = np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
    # All-ones targets: no decoder position is masked as padding.
    logits = module.apply({"params": params}, enc, jnp.asarray(dec_in),
                          jnp.ones_like(jnp.asarray(dec_in)), enable_dropout=False)
    logits = np.asarray(logits, np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                           ) - logits.max(-1, keepdims=True)


def _first_eos(row, eos):
    hits = np.flatnonzero(np.asarray(row) == eos)
    return int(hits[0]) if hits.size else None


def test_greedy_equals_argmax_of_teacher_forced_logits(model, kernels):
    module, params, enc = model  # the reference: XLA's full forward pass
    decoder = Transformer(CFG.replace(kernels=kernels))
    tokens, scores = decoding.generate(decoder, params, enc, max_decode_length=L, eos_id=-1)
    tokens = np.asarray(tokens)
    assert tokens.shape == (3, L) and tokens.dtype == np.int32
    logp = _teacher_forced_log_probs(module, params, enc, tokens)
    np.testing.assert_array_equal(tokens, logp.argmax(-1))
    expected = np.take_along_axis(logp, tokens[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)


def test_eos_pads_and_stops_early(model):
    module, params, enc = model
    free, _ = decoding.generate(module, params, enc[:1], max_decode_length=L, eos_id=-1)
    free = np.asarray(free)[0]
    eos = int(free[2])
    stop = _first_eos(free, eos)  # <= 2
    cache = decoding.init_cache(module, params, decoding.encode(module, params, enc[:1]),
                                enc[:1], max_decode_length=L)
    result = decoding.decode_loop(module, params, cache,
                                  decoding.encode(module, params, enc[:1]), enc[:1],
                                  max_decode_length=L, eos_id=eos)
    out = np.asarray(result.tokens)[0]
    np.testing.assert_array_equal(out[: stop + 1], free[: stop + 1])
    np.testing.assert_array_equal(out[stop + 1:], 0)
    assert int(result.steps) == stop + 1
    assert int(result.cache["decoder"]["cache_index"]) == stop + 1


def test_force_steps_runs_exactly_n_steps(model):
    module, params, enc = model
    free, _ = decoding.generate(module, params, enc[:1], max_decode_length=L, eos_id=-1)
    eos = int(np.asarray(free)[0, 0])  # ends at the first step
    encoded = decoding.encode(module, params, enc[:1])
    for force, steps in ((False, 1), (True, L)):
        cache = decoding.init_cache(module, params, encoded, enc[:1], max_decode_length=L)
        result = decoding.decode_loop(module, params, cache, encoded, enc[:1],
                                      max_decode_length=L, eos_id=eos, force_steps=force)
        assert int(result.steps) == steps
        assert int(result.cache["decoder"]["cache_index"]) == steps
        np.testing.assert_array_equal(np.asarray(result.tokens)[0], [eos] + [0] * (L - 1))
    encoded, enc3 = jnp.repeat(encoded, 3, 0), jnp.repeat(enc[:1], 3, 0)
    cache = decoding.init_cache(module, params, encoded, enc3, max_decode_length=L)
    result = decoding.beam_search(module, params, cache, encoded, enc3, max_decode_length=L,
                                  num_beams=3,
                                  eos_id=-1, force_steps=True)
    assert int(result.steps) == L


def test_each_example_keeps_its_own_eos(model):
    module, params, enc = model
    free, _ = decoding.generate(module, params, enc, max_decode_length=L, eos_id=-1)
    free = np.asarray(free)
    eos = int(free[0, 3])
    tokens, _ = decoding.generate(module, params, enc, max_decode_length=L, eos_id=eos)
    for row_free, row in zip(free, np.asarray(tokens)):
        stop = _first_eos(row_free, eos)
        stop = L - 1 if stop is None else stop
        np.testing.assert_array_equal(row[: stop + 1], row_free[: stop + 1])
        np.testing.assert_array_equal(row[stop + 1:], 0)


def test_recompute_cross_kv_gives_identical_tokens(model):
    module, params, enc = model
    tokens, scores = decoding.generate(module, params, enc, max_decode_length=L)
    other = Transformer(CFG, recompute_cross_kv=True)
    tokens2, scores2 = decoding.generate(other, params, enc, max_decode_length=L)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(tokens2))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(scores2), rtol=1e-5)
    beam, _ = decoding.generate(module, params, enc, max_decode_length=L, method="beam")
    beam2, _ = decoding.generate(other, params, enc, max_decode_length=L, method="beam")
    np.testing.assert_array_equal(np.asarray(beam), np.asarray(beam2))


def test_sampling_temperature_zero_and_top_k_one_equal_greedy(model):
    module, params, enc = model
    greedy, _ = decoding.generate(module, params, enc, max_decode_length=L)
    rng = jax.random.PRNGKey(3)
    cold, _ = decoding.generate(module, params, enc, max_decode_length=L, method="sample",
                                temperature=0.0, rng=rng)
    top1, _ = decoding.generate(module, params, enc, max_decode_length=L, method="sample",
                                top_k=1, rng=rng)
    np.testing.assert_array_equal(np.asarray(cold), np.asarray(greedy))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))


def test_sampling_is_reproducible_and_respects_top_k(model):
    module, params, enc = model
    kw = dict(max_decode_length=L, method="sample", temperature=2.0, eos_id=-1)
    a, sa = decoding.generate(module, params, enc, rng=jax.random.PRNGKey(5), **kw)
    b, sb = decoding.generate(module, params, enc, rng=jax.random.PRNGKey(5), **kw)
    c, _ = decoding.generate(module, params, enc, rng=jax.random.PRNGKey(6), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(sa), np.asarray(sb))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # The scores are the untempered log probabilities of the sampled tokens.
    logp = _teacher_forced_log_probs(module, params, enc, a)
    a = np.asarray(a)
    expected = np.take_along_axis(logp, a[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(np.asarray(sa), expected, rtol=1e-5, atol=1e-5)
    # top_k=3: every sampled token is among the 3 most likely under teacher forcing.
    t3, _ = decoding.generate(module, params, enc, rng=jax.random.PRNGKey(7), top_k=3, **kw)
    t3 = np.asarray(t3)
    logp = _teacher_forced_log_probs(module, params, enc, t3)
    rank = (logp > np.take_along_axis(logp, t3[..., None], -1)).sum(-1)
    assert rank.max() < 3


def test_beam_with_one_beam_equals_greedy(model):
    # Without EOS: with it, t5x's 2 x beams candidates can finish a better sequence than greedy.
    module, params, enc = model
    greedy, gscore = decoding.generate(module, params, enc, max_decode_length=L, eos_id=-1)
    beam, bscore = decoding.generate(module, params, enc, max_decode_length=L, method="beam",
                                     num_beams=1, eos_id=-1)
    np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))
    np.testing.assert_allclose(np.asarray(bscore), np.asarray(gscore), rtol=1e-5)


def _beam_result(module, params, enc, *, shared, num_beams, eos_id):
    """beam_search with the cross-attention cache once per example (shared) or, as before
    sharing, with every example repeated per beam and its own cross cache (copies)."""
    encoded = decoding.encode(module, params, enc)
    if shared:
        cache = decoding.init_cache(module, params, encoded, enc, max_decode_length=L,
                                    num_beams=num_beams)
    else:
        encoded, enc = jnp.repeat(encoded, num_beams, 0), jnp.repeat(enc, num_beams, 0)
        cache = decoding.init_cache(module, params, encoded, enc, max_decode_length=L)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, cache)
    result = decoding.beam_search(module, params, cache, encoded, enc, max_decode_length=L,
                                  num_beams=num_beams, eos_id=eos_id)
    return result, shapes


def test_shared_cross_cache_beam_search_equals_per_beam_copies(model):
    module, params, enc = model
    free, _ = decoding.generate(module, params, enc, max_decode_length=L, eos_id=-1)
    eos = int(np.asarray(free)[0, 1])  # a token the model likes: some beams end early
    w = 4
    shared, _ = _beam_result(module, params, enc, shared=True, num_beams=w, eos_id=eos)
    copies, _ = _beam_result(module, params, enc, shared=False, num_beams=w, eos_id=eos)
    tokens = np.asarray(shared.tokens)  # [B, W, L]
    assert tokens.shape == (enc.shape[0], w, L)
    np.testing.assert_array_equal(tokens, np.asarray(copies.tokens))
    np.testing.assert_allclose(np.asarray(shared.scores), np.asarray(copies.scores), rtol=1e-5)
    assert int(shared.steps) == int(copies.steps)
    ended = [(row[:-1] == eos).any() for row in tokens.reshape(-1, L)]
    assert any(ended)  # the comparison covers beams that ended before the last step


def test_beam_cache_is_per_beam_for_self_and_per_example_for_cross(model):
    module, params, enc = model
    b, s = enc.shape
    w, k, h = 3, CFG.num_kv_heads, CFG.head_dim
    for shared, cross_rows in ((True, b), (False, b * w)):
        result, shapes = _beam_result(module, params, enc, shared=shared, num_beams=w,
                                      eos_id=-1)
        for i in range(CFG.num_decoder_layers):
            layer = shapes["decoder"][f"layers_{i}"]
            for name in ("cached_key", "cached_value"):
                assert layer["self_attention"][name] == (b * w, k, L, h)
                assert layer["encoder_decoder_attention"][name] == (cross_rows, k, s, h)
        assert shapes["decoder"]["cache_index"] == ()
        # The search hands back a cache of the same layout.
        assert jax.tree_util.tree_map(lambda x: x.shape, result.cache) == shapes


@pytest.mark.slow
def test_beam_search_matches_exhaustive_search(kernels):
    cfg = TransformerConfig(vocab_size=6, emb_dim=16, num_heads=2, num_kv_heads=1, head_dim=8,
                            mlp_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                            relative_attention_num_buckets=4, relative_attention_max_distance=8,
                            kernels="xla")
    module = Transformer(cfg)  # the reference: XLA's full forward pass
    params = _params(module, seed=2)
    # Sharper distributions make the search non-trivial.
    params = jax.tree_util.tree_map(lambda x: x, params)  # a copy to edit
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 4
    enc = jnp.asarray(np.random.RandomState(4).randint(2, 6, (4, 5)), jnp.int32)
    eos, alpha, length, v = 1, 0.6, 3, cfg.vocab_size
    # 2 x beams >= 25 live prefixes x 6 tokens: the search keeps every candidate.
    tokens, scores = decoding.generate(Transformer(cfg.replace(kernels=kernels)), params, enc,
                                       max_decode_length=length, method="beam", num_beams=75,
                                       alpha=alpha, eos_id=eos)
    seqs = np.array(list(itertools.product(range(v), repeat=length)), np.int32)  # [216, 3]
    n, m = enc.shape[0], len(seqs)
    logp = _teacher_forced_log_probs(module, params, jnp.repeat(enc, m, 0), np.tile(seqs, (n, 1)))
    step = np.take_along_axis(logp, np.tile(seqs, (n, 1))[..., None], -1)[..., 0]  # [n*216, 3]
    for i in range(n):
        best, best_score = None, -np.inf
        for seq, lp in zip(seqs, step[i * m:(i + 1) * m]):
            stop = _first_eos(seq, eos)
            if stop is None:
                continue  # never finished
            score = lp[: stop + 1].sum() / ((5.0 + stop + 1) / 6.0) ** alpha
            if score > best_score + 1e-9:
                best_score = score
                best = np.concatenate([seq[: stop + 1], np.zeros(length - stop - 1, np.int32)])
        np.testing.assert_array_equal(np.asarray(tokens)[i], best)
        np.testing.assert_allclose(float(scores[i]), best_score, rtol=1e-5)


def test_generate_rejects_bad_arguments(model):
    module, params, enc = model
    with pytest.raises(ValueError, match="method"):
        decoding.generate(module, params, enc, max_decode_length=L, method="nucleus")
    with pytest.raises(ValueError, match="top_k"):
        decoding.generate(module, params, enc, max_decode_length=L, method="sample", top_k=99)
    with pytest.raises(ValueError, match="encoder_input_tokens"):
        decoding.generate(module, params, enc[0], max_decode_length=L)


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_decode_loop_keeps_the_cross_cache_in_place(num_kv_heads, kernels):
    """Compiled loop: the cross-attention projection sits in one conditional per layer (run at
    the first step only) and no step copies the cross cache (a layout conversion XLA inserts when
    the projection's layout leaks into the loop)."""
    import re

    cfg = CFG.replace(num_kv_heads=num_kv_heads, kernels=kernels)
    module = Transformer(cfg)
    params = _params(module)
    enc = jnp.ones((3, 11), jnp.int32)
    encoded = decoding.encode(module, params, enc)
    cross = f"f32[3,{num_kv_heads},11,{cfg.head_dim}]"
    for beams in (1, 2):
        cache = decoding.init_cache(module, params, encoded, enc, max_decode_length=L,
                                    num_beams=beams)
        if beams == 1:
            lowered = decoding.decode_loop.lower(module, params, cache, encoded, enc,
                                                 max_decode_length=L)
        else:
            lowered = decoding.beam_search.lower(module, params, cache, encoded, enc,
                                                 max_decode_length=L, num_beams=beams)
        hlo = lowered.compile().as_text().splitlines()
        copies = [line for line in hlo if cross in line and re.search(r"= \S+ copy\(", line)]
        assert not copies, copies[:2]
        assert sum(" conditional(" in line for line in hlo) == cfg.num_decoder_layers
