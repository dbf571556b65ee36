"""Aligned pooling and similarity grouping (conversion.alignment, conversion.grouping) on
hand-made arrays and whole tiny models; the other methods' outputs are pinned by hashes of what
they gave before aligned pooling existed."""

import hashlib
import itertools
import json
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5x.checkpoints import load_checkpoint, open_checkpoint, save_checkpoint
from gqa_t5x.cli import convert as convert_cli
from gqa_t5x.conversion import alignment, grouping, pooling, streaming
from gqa_t5x.model.config import TransformerConfig, with_kv_heads
from gqa_t5x.model.network import Transformer

CONFIG = TransformerConfig(vocab_size=50, emb_dim=32, num_heads=4, num_kv_heads=4, head_dim=8,
                           mlp_dim=48, num_encoder_layers=2, num_decoder_layers=2,
                           relative_attention_num_buckets=8, relative_attention_max_distance=16)
ALL = ("encoder_self", "decoder_self", "cross")
MODULES = {"encoder_self": "attention", "decoder_self": "self_attention",
           "cross": "encoder_decoder_attention"}


def orthogonal(h, seed):
    """A random orthogonal [h, h] matrix (QR of a normal matrix, signs fixed by R's diagonal)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((h, h)))
    return q * np.sign(np.diag(r))


def init_params(config, seed=0):
    tokens = jnp.ones((1, 4), jnp.int32)
    variables = Transformer(config).init(jax.random.PRNGKey(seed), tokens, tokens, tokens,
                                         enable_dropout=False)
    return jax.tree_util.tree_map(np.array, variables["params"])  # writable copies


def logits(params, config):
    rng = np.random.default_rng(0)
    enc = rng.integers(1, 50, (2, 7)).astype(np.int32)
    enc[1, 5:] = 0
    dec_tgt = rng.integers(1, 50, (2, 5)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((2, 1), np.int32), dec_tgt[:, :-1]], axis=1)
    return np.asarray(Transformer(config).apply({"params": params}, enc, dec_in, dec_tgt,
                                                enable_dropout=False))


def rel_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def modules(params, config, kinds):
    for kind in kinds:
        stack = "encoder" if kind == "encoder_self" else "decoder"
        layers = config.num_encoder_layers if stack == "encoder" else config.num_decoder_layers
        for i in range(layers):
            yield kind, i, params[stack][f"layers_{i}"][MODULES[kind]]


def rotated_heads(params, config, groups_of, kinds=("decoder_self", "cross"), noise=0.0,
                  seed=0):
    """Params whose key (value) heads in each group are the group's first head times a random
    orthogonal matrix (plus `noise` times a standard normal): exactly what aligned pooling can
    undo and mean pooling cannot. `groups_of(kind, layer)` gives the groups."""
    rng = np.random.default_rng(seed)
    h = config.head_dim
    for kind, i, module in modules(params, config, kinds):
        for proj in ("key", "value"):
            kernel = module[proj]["kernel"]
            scale = kernel.std()
            for group in groups_of(kind, i):
                base = kernel[:, group[0] * h:(group[0] + 1) * h].copy()
                for head in group[1:]:
                    q = orthogonal(h, rng)
                    new = base @ q + noise * scale * rng.standard_normal(base.shape)
                    kernel[:, head * h:(head + 1) * h] = new
    return params


def contiguous(k):
    return lambda kind, layer: [list(range(j * (4 // k), (j + 1) * (4 // k))) for j in range(k)]


# ---- Procrustes on hand-made arrays -------------------------------------------------------------


def test_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 5))
    q = orthogonal(5, 1)
    r = alignment.procrustes(a, a @ q)
    np.testing.assert_allclose(r, q, atol=1e-10)
    np.testing.assert_allclose(r @ r.T, np.eye(5), atol=1e-12)


def test_align_heads_brings_rotated_heads_together():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((10, 4))
    qs = [np.eye(4)] + [orthogonal(4, s) for s in (2, 3)]
    heads = np.stack([base @ q for q in qs])  # [3, 10, 4]
    rotations = alignment.align_heads(heads)
    for head, r in zip(heads, rotations):
        np.testing.assert_allclose(head @ r, base, atol=1e-10)


def test_aligned_distances_equal_the_residual_of_the_best_rotation():
    rng = np.random.default_rng(2)
    heads = rng.standard_normal((3, 9, 4))
    d = alignment.aligned_distances(heads)
    for i, j in itertools.product(range(3), repeat=2):
        r = alignment.procrustes(heads[i], heads[j])
        assert d[i, j] == pytest.approx(np.sum((heads[i] @ r - heads[j]) ** 2), rel=1e-9,
                                        abs=1e-9)
    base = rng.standard_normal((9, 4))
    same = np.stack([base, base @ orthogonal(4, 4)])
    assert alignment.aligned_distances(same)[0, 1] < 1e-9


# ---- similarity groups --------------------------------------------------------------------------


def brute_force_cost(d, size):
    best = np.inf
    k = d.shape[0]
    for perm in itertools.permutations(range(k)):
        groups = [perm[i:i + size] for i in range(0, k, size)]
        if any(list(g) != sorted(g) for g in groups) or \
                [g[0] for g in groups] != sorted(g[0] for g in groups):
            continue
        best = min(best, sum(d[a, b] for g in groups for a, b in itertools.combinations(g, 2)))
    return best


def cost(d, groups):
    return sum(d[a, b] for g in groups for a, b in itertools.combinations(g, 2))


def test_similarity_groups_find_planted_groups():
    rng = np.random.default_rng(5)
    planted = [[0, 3, 5], [1, 2, 4]]
    label = np.zeros(6, int)
    label[planted[1]] = 1
    d = np.where(label[:, None] == label[None, :], 0.1, 1.0) + 0.05 * rng.random((6, 6))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    assert grouping.similarity_groups(d, 2) == planted


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("size", [2, 3])
def test_similarity_groups_reach_the_brute_force_optimum(seed, size):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 3))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)  # squared distances of random points
    groups = grouping.similarity_groups(d, 6 // size)
    assert sorted(h for g in groups for h in g) == list(range(6))
    assert all(len(g) == size for g in groups)
    assert cost(d, groups) == pytest.approx(brute_force_cost(d, size), rel=1e-9)


# ---- function-preserving steps on whole models --------------------------------------------------


def align_without_pooling(params, config, target, groups):
    """Permute and rotate every grouped attention as aligned conversion does, but keep all kv
    heads: the model function must not change."""
    out = jax.tree_util.tree_map(np.array, params)
    for name, module_groups in groups.items():
        stack, layer, module = name.split("/")
        node = out[stack][layer][module]
        kernels = grouping.permute_attention({k: node[k]["kernel"] for k in grouping.KERNELS},
                                             config.num_heads, module_groups)
        rotated = alignment.rotate_attention(*(kernels[k] for k in grouping.KERNELS),
                                             config.num_heads, len(module_groups[0]))
        for k, array in zip(grouping.KERNELS, rotated):
            node[k]["kernel"] = array
    for path, bias_group in grouping.bias_groups(groups, target).items():
        out[path[0]][path[1]][path[2]] = grouping.permute_bias(params[path[0]][path[1]][path[2]],
                                                               bias_group)
    return out


@pytest.mark.parametrize("k", [2, 1])
def test_alignment_alone_changes_no_logit(k):
    params = init_params(CONFIG, seed=1)
    target = with_kv_heads(CONFIG, k, ALL)
    groups = pooling.head_groups(params, CONFIG, target, "contiguous")
    aligned = align_without_pooling(params, CONFIG, target, groups)
    changed = aligned["decoder"]["layers_1"]["self_attention"]["query"]["kernel"]
    assert np.abs(changed - params["decoder"]["layers_1"]["self_attention"]["query"]
                  ["kernel"]).max() > 1e-2  # the rotations are not the identity
    np.testing.assert_allclose(logits(aligned, CONFIG), logits(params, CONFIG), atol=2e-5)


def test_similarity_permutation_changes_no_logit():
    params = init_params(CONFIG, seed=2)
    # heads {0, 2} and {1, 3} agree in the self-attentions; cross layers differ from each other
    cross = {0: [[0, 2], [1, 3]], 1: [[0, 3], [1, 2]]}
    params = rotated_heads(params, CONFIG, lambda kind, i: cross[i] if kind == "cross"
                           else [[0, 2], [1, 3]], kinds=ALL, noise=0.1)
    target = with_kv_heads(CONFIG, 2, ALL)
    groups = pooling.head_groups(params, CONFIG, target, "similarity")
    assert groups["encoder/layers_1/attention"] == [[0, 2], [1, 3]]
    assert groups["decoder/layers_0/self_attention"] == [[0, 2], [1, 3]]
    assert groups["decoder/layers_0/encoder_decoder_attention"] == [[0, 2], [1, 3]]
    assert groups["decoder/layers_1/encoder_decoder_attention"] == [[0, 3], [1, 2]]
    aligned = align_without_pooling(params, CONFIG, target, groups)
    bias = aligned["decoder"]["relpos_bias"]["rel_embedding"]
    np.testing.assert_array_equal(bias, params["decoder"]["relpos_bias"]["rel_embedding"][
        [0, 2, 1, 3]])
    np.testing.assert_allclose(logits(aligned, CONFIG), logits(params, CONFIG), atol=2e-5)


# ---- aligned conversion -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 1])
def test_exact_rotations_convert_losslessly_with_aligned_but_not_with_mean(k):
    params = rotated_heads(init_params(CONFIG, seed=3), CONFIG, contiguous(k))
    target = with_kv_heads(CONFIG, k)
    reference = logits(params, CONFIG)
    aligned = pooling.convert_params(params, CONFIG, target, "aligned")
    assert aligned["decoder"]["layers_0"]["self_attention"]["key"]["kernel"].shape == (32, k * 8)
    assert rel_error(logits(aligned, target), reference) < 1e-5
    mean = pooling.convert_params(params, CONFIG, target, "mean")
    assert rel_error(logits(mean, target), reference) > 1e-2


@pytest.mark.parametrize("k", [2, 1])
def test_with_noise_aligned_keeps_a_smaller_error_than_mean(k):
    params = rotated_heads(init_params(CONFIG, seed=4), CONFIG, contiguous(k), noise=0.3)
    target = with_kv_heads(CONFIG, k)
    reference = logits(params, CONFIG)
    errors = {m: rel_error(logits(pooling.convert_params(params, CONFIG, target, m), target),
                           reference) for m in ("aligned", "mean")}
    assert errors["aligned"] < 0.5 * errors["mean"], errors


def test_similarity_grouping_finds_rotated_heads_that_contiguous_groups_miss():
    params = rotated_heads(init_params(CONFIG, seed=5), CONFIG,
                           lambda kind, i: [[0, 3], [1, 2]])
    target = with_kv_heads(CONFIG, 2)
    reference = logits(params, CONFIG)
    similar = pooling.convert_params(params, CONFIG, target, "aligned", grouping="similarity")
    assert rel_error(logits(similar, target), reference) < 1e-5
    contiguous_ = pooling.convert_params(params, CONFIG, target, "aligned")
    assert rel_error(logits(contiguous_, target), reference) > 1e-2


def test_gqa_source_with_similar_kv_heads_converts_losslessly():
    # 8 query heads reading 4 kv heads (2 each); kv heads {0, 3} and {1, 2} are rotations of
    # each other, so similarity groups pool them exactly, moving query heads two at a time.
    source = CONFIG.replace(num_heads=8, num_kv_heads=4, grouped=ALL)
    params = init_params(source, seed=10)
    rng = np.random.default_rng(10)
    h = source.head_dim
    for _, _, module in modules(params, source, ALL):
        for proj in ("key", "value"):
            kernel = module[proj]["kernel"]  # [D, 4*H]
            for a, b in ((0, 3), (1, 2)):
                kernel[:, b * h:(b + 1) * h] = kernel[:, a * h:(a + 1) * h] @ orthogonal(h, rng)
    target = source.replace(num_kv_heads=2)
    groups = pooling.head_groups(params, source, target, "similarity")
    assert all(g == [[0, 3], [1, 2]] for g in groups.values()) and len(groups) == 6
    converted = pooling.convert_params(params, source, target, "aligned", grouping="similarity")
    np.testing.assert_array_equal(converted["encoder"]["relpos_bias"]["rel_embedding"],
                                  params["encoder"]["relpos_bias"]["rel_embedding"][
                                      [0, 1, 6, 7, 2, 3, 4, 5]])
    reference = logits(params, source)
    assert rel_error(logits(converted, target), reference) < 1e-5
    mean = pooling.convert_params(params, source, target, "mean")
    assert rel_error(logits(mean, target), reference) > 1e-2


def test_aligned_is_deterministic_and_leaves_other_arrays_alone():
    params = init_params(CONFIG, seed=6)
    target = with_kv_heads(CONFIG, 2)
    a = pooling.convert_params(params, CONFIG, target, "aligned", grouping="similarity")
    b = pooling.convert_params(params, CONFIG, target, "aligned", grouping="similarity")
    assert digest(a) == digest(b)
    assert a["encoder"]["layers_0"]["attention"]["key"]["kernel"] is \
        params["encoder"]["layers_0"]["attention"]["key"]["kernel"]
    assert a["decoder"]["layers_0"]["mlp"]["wo"]["kernel"] is \
        params["decoder"]["layers_0"]["mlp"]["wo"]["kernel"]


def test_aligned_with_as_many_kv_heads_changes_nothing():
    params = init_params(CONFIG, seed=7)
    out = pooling.convert_params(params, CONFIG, with_kv_heads(CONFIG, 4), "aligned",
                                 grouping="similarity")
    assert digest(out) == digest(params)


def test_method_and_grouping_errors_name_the_problem():
    params = init_params(CONFIG)
    target = with_kv_heads(CONFIG, 2)
    with pytest.raises(ValueError, match="grouping 'similarity' .* needs method 'aligned'"):
        pooling.convert_params(params, CONFIG, target, "mean", grouping="similarity")
    with pytest.raises(ValueError, match="unknown grouping 'random'"):
        pooling.convert_params(params, CONFIG, target, "aligned", grouping="random")
    with pytest.raises(ValueError, match="unknown pooling method 'median'"):
        pooling.convert_params(params, CONFIG, target, "median")


# ---- streaming ----------------------------------------------------------------------------------


class CountingReader:
    """A checkpoint reader that records the most arrays it handed out that were alive at once."""

    def __init__(self, reader):
        self._reader = reader
        self.alive, self.most = 0, 0

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def _released(self):
        self.alive -= 1

    def read(self, path):
        array = self._reader.read(path)
        self.alive += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(array, self._released)
        return array


def test_streaming_aligned_equals_in_memory(tmp_path, monkeypatch):
    params = rotated_heads(init_params(CONFIG, seed=8), CONFIG, lambda kind, i: [[0, 3], [1, 2]],
                           kinds=ALL, noise=0.2)
    save_checkpoint(str(tmp_path / "src"), params, CONFIG)
    readers = []

    def counting_open(*args):
        readers.append(CountingReader(open_checkpoint(*args)))
        return readers[-1]

    monkeypatch.setattr(streaming, "open_checkpoint", counting_open)
    summary = streaming.convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), 2,
                                           method="aligned", grouping="similarity", grouped=ALL)
    target = with_kv_heads(CONFIG, 2, ALL)
    expected = pooling.convert_params(params, CONFIG, target, "aligned", grouping="similarity")
    loaded, config = load_checkpoint(str(tmp_path / "out"))
    assert config == target
    assert digest(loaded) == digest(expected)
    # one attention's four kernels at a time, never more
    assert readers[0].most == 4
    recorded = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert recorded["grouping"] == "similarity"
    assert recorded["groups"] == pooling.head_groups(params, CONFIG, target, "similarity")
    assert recorded["groups"]["decoder/layers_1/self_attention"] == [[0, 3], [1, 2]]
    assert summary.groups == recorded["groups"]


@pytest.mark.parametrize("k,grouped", [(2, ALL), (2, None), (1, ALL), (4, ALL)])
def test_similarity_kinds_count_the_kernels_the_grouping_pass_reads(k, grouped):
    params = init_params(CONFIG, seed=11)
    target = with_kv_heads(CONFIG, k, grouped)
    reads = []

    def read(path):
        reads.append(path)
        return params[path[0]][path[1]][path[2]][path[3]][path[4]]

    grouping.head_groups_of(read, CONFIG, target, "similarity")
    kinds = grouping.similarity_kinds(CONFIG, target, "similarity")
    assert len(reads) == sum(2 * len(grouping.attention_paths(CONFIG, kind)) for kind in kinds)
    assert len(reads) == {(2, ALL): 12, (2, None): 8, (1, ALL): 0, (4, ALL): 0}[(k, grouped)]


def test_cli_converts_with_aligned(tmp_path, capsys):
    params = init_params(CONFIG, seed=9)
    save_checkpoint(str(tmp_path / "src"), params, CONFIG)
    rc = convert_cli.main(["--input", str(tmp_path / "src"), "--output", str(tmp_path / "out"),
                           "--num_kv_heads", "1", "--method", "aligned"])
    assert rc == 0
    assert "method aligned (contiguous groups)" in capsys.readouterr().out
    loaded, _ = load_checkpoint(str(tmp_path / "out"))
    expected = pooling.convert_params(params, CONFIG, with_kv_heads(CONFIG, 1), "aligned")
    assert digest(loaded) == digest(expected)
    rc = convert_cli.main(["--input", str(tmp_path / "src"), "--output", str(tmp_path / "o2"),
                           "--num_kv_heads", "2", "--grouping", "similarity"])
    assert rc == 1
    assert "needs method 'aligned', not 'mean'" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


# ---- the other methods are unchanged -----------------------------------------------------------


def numpy_params(config, seed):
    rng = np.random.default_rng(seed)
    tree = {}
    for path, shape in pooling.param_shapes(config).items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = rng.standard_normal(shape).astype(np.float32)
    return tree


def digest(tree):
    h = hashlib.sha256()
    for path in sorted(pooling.tree_shapes(tree)):
        node = tree
        for key in path:
            node = node[key]
        h.update("/".join(path).encode())
        h.update(np.ascontiguousarray(node).tobytes())
    return h.hexdigest()[:16]


# Digests of convert_params outputs computed by the code before aligned pooling was added.
BEFORE = {
    ("mean", 2, False): "9d6166d0c88e1698", ("mean", 1, False): "e30d6ff564340434",
    ("mean", 2, True): "5dc4d08796783b2e", ("first", 2, False): "b07541d92ba98b82",
    ("first", 1, False): "e16797d68aa8d12d", ("first", 2, True): "d9431d5c228f5332",
    ("random", 2, False): "e1ff088d58290a7e", ("random", 1, False): "ad7b5fbbfae76993",
    ("random", 2, True): "1856ca148d84c612",
}


@pytest.mark.parametrize("method,k,encoder", sorted(BEFORE))
def test_first_random_and_mean_are_bit_identical_to_before(method, k, encoder):
    params = numpy_params(CONFIG, 0)
    target = with_kv_heads(CONFIG, k, ALL if encoder else None)
    out = pooling.convert_params(params, CONFIG, target, method, seed=3)
    assert digest(out) == BEFORE[(method, k, encoder)]
