"""Stage 1b (functional alignment: symphony.build.capture, correlate, permute, align) and the hidden-state centroids, on the fixture factory's small sources."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from symphony.build.align import align_sources
from symphony.build.capture import calibration_windows, capture_ffn_activations, decoder_layers
from symphony.build.correlate import (align_models, auto_layers_per_pass, chunk_plan, default_update_tokens,
                                      memory_budget, pass_memory)
from symphony.build.permute import apply_ffn_permutation, permute_ffn, permute_ffn_biases
from symphony.build.router_init import hidden_centroids, router_from_centroids
from symphony.data import token_stream
from symphony.errors import SymphonyError
from symphony.testing import domain_text, make_family


@pytest.fixture(scope="module")
def calib_ids(source_family):
    """A mix of the three domains in the family's (shared) vocabulary, about 7000 tokens."""
    tok = AutoTokenizer.from_pretrained(source_family[0])
    return token_stream(tok, ["\n".join(domain_text(d, 100, seed=7)) for d in ("prose", "code", "math")])


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """Two tiny Llama sources whose FFNs carry biases (mlp_bias), to cover the bias path."""
    return make_family(tmp_path_factory.mktemp("llama_bias"), arch="llama", domains=("prose", "code"), steps=3,
                       base_steps=3, n_lines=60, mlp_bias=True)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _random_perms(model, seed):
    layers = decoder_layers(model)
    f = layers[0].mlp.gate_proj.out_features
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(f, generator=g) for _ in layers])


def _ffn_state(model):
    return {k: v for k, v in model.state_dict().items() if ".mlp." in k}


def test_capture_gives_the_down_proj_input(source_family):
    model = _load(source_family[1])
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = {}
    layer = decoder_layers(model)[1]
    handle = layer.mlp.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad(), capture_ffn_activations(model) as cap:
        model(input_ids=ids)
        acts = cap.pop()
        with pytest.raises(RuntimeError, match="no complete forward"):
            cap.pop()  # one batch at a time: popped activations are gone
    handle.remove()
    mlp = layer.mlp
    x = seen["x"].reshape(-1, seen["x"].shape[-1])
    expected = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    assert acts.shape == (2, 18, mlp.gate_proj.out_features)
    torch.testing.assert_close(acts[1], expected, rtol=0, atol=0)
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed on exit
    with capture_ffn_activations(model, [1], stop_early=True) as cap:
        only = cap.run(ids)  # stops after layer 1's FFN activations
    torch.testing.assert_close(only[0], acts[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="subset"):
        capture_ffn_activations(model, [2]).__enter__()


def test_permuted_copy_is_recovered_exactly(source_family, calib_ids, tmp_path):
    anchor = _load(source_family[0])
    P = _random_perms(anchor, seed=1)
    permuted = apply_ffn_permutation(copy.deepcopy(anchor), P)
    permuted.save_pretrained(tmp_path / "permuted")
    res = align_sources([source_family[0], tmp_path / "permuted"], 0, calib_ids, seq_len=64, batch_size=16,
                        max_tokens=4096, progress=False)
    perm = res.perms[1]
    # source neuron j is anchor neuron P[j], so anchor neuron i is matched to source neuron P^-1[i]
    assert torch.equal(perm, torch.argsort(P, dim=1))
    assert torch.equal(res.perms[0], torch.arange(P.shape[1]).expand_as(P))
    entry = res.report["sources"][1]
    assert entry["tokens"] == 4096 and entry["dropped_tokens"] == 0
    for layer in entry["layers"]:
        assert layer["after"] == pytest.approx(1.0, abs=1e-4)
        assert layer["before"] < 0.5  # a random order matches nothing
    # permuting the copy with the recovered perm gives the anchor's weights back, bit for bit
    restored = apply_ffn_permutation(_load(tmp_path / "permuted"), perm)
    for k, v in _ffn_state(anchor).items():
        assert torch.equal(restored.state_dict()[k], v), k
    assert "->" in res.table() and "mean" in res.table()


def test_permutation_keeps_the_dense_function(source_family, calib_ids):
    anchor, source = _load(source_family[0]), _load(source_family[2])
    batches = calibration_windows(calib_ids, seq_len=32, batch_size=8, max_tokens=1024)
    pair = align_models(anchor, source, batches)
    assert not torch.equal(pair.perm, torch.arange(pair.perm.shape[1]).expand_as(pair.perm))
    ids = calib_ids[:96].view(3, 32)
    with torch.no_grad():
        before = source(input_ids=ids).logits
        after = apply_ffn_permutation(source, pair.perm)(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=2e-6)


def test_permutation_with_biases(llama_pair):
    model = _load(llama_pair[0])
    assert model.model.layers[0].mlp.gate_proj.bias is not None
    with torch.no_grad():
        for p in model.parameters():  # make the (zero-initialised) biases matter
            if p.dim() == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = apply_ffn_permutation(model, _random_perms(model, seed=4))(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=2e-6)


def test_permute_ffn_is_an_exact_reindexing():
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g), torch.randn(5, 12, generator=g)
    x = torch.randn(7, 5, generator=g)
    perm = torch.randperm(12, generator=g)
    pg, pu, pd = permute_ffn(gate, up, down, perm)
    assert torch.equal(pg[3], gate[perm[3]]) and torch.equal(pd[:, 3], down[:, perm[3]])
    ref = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    torch.testing.assert_close((F.silu(x @ pg.t()) * (x @ pu.t())) @ pd.t(), ref, rtol=1e-6, atol=1e-6)
    gb, ub = permute_ffn_biases(torch.arange(12.0), None, perm)
    assert torch.equal(gb, perm.float()) and ub is None
    with pytest.raises(ValueError, match="not a permutation"):
        permute_ffn(gate, up, down, torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="entries"):
        permute_ffn(gate, up, down, torch.arange(11))
    with pytest.raises(ValueError, match="down"):
        permute_ffn(gate, up, down.t(), perm)
    with pytest.raises(TypeError):
        permute_ffn(gate, up, down, perm.float())


def test_alignment_raises_matched_correlation(source_family, calib_ids):
    res = align_sources(source_family, 0, calib_ids, seq_len=64, batch_size=16, max_tokens=4096, progress=False)
    assert res.report["anchor"] == "qwen2-prose"
    for entry in res.report["sources"][1:]:
        for layer in entry["layers"]:  # the identity is one of the matchings, so the optimum cannot be lower
            assert layer["after"] >= layer["before"] - 1e-6
        assert entry["mean_after"] > entry["mean_before"] + 0.01, entry
        assert entry["mean_after"] < 0.99  # genuinely different sources: no perfect match
    for perm in res.perms:
        assert perm.dtype == torch.int64 and perm.shape == (2, 128)
        assert torch.equal(perm.sort(dim=1).values, torch.arange(128).expand(2, 128))


def test_streaming_matches_one_batch(source_family, calib_ids):
    anchor, source = _load(source_family[0]), _load(source_family[1])
    windows = calibration_windows(calib_ids, seq_len=32, batch_size=1000, max_tokens=2048)
    assert len(windows) == 1 and windows[0].shape == (64, 32)
    one = align_models(anchor, source, windows)
    many = align_models(anchor, source, calibration_windows(calib_ids, seq_len=32, batch_size=5, max_tokens=2048))
    assert one.tokens == many.tokens == 2048
    assert torch.equal(one.perm, many.perm)
    assert one.after == pytest.approx(many.after, abs=1e-5)
    assert one.before == pytest.approx(many.before, abs=1e-5)
    by_layer = align_models(anchor, source, windows, layers_per_pass=1)  # one pass per layer, forwards cut short
    assert torch.equal(by_layer.perm, one.perm) and by_layer.tokens == 2048
    assert by_layer.after == pytest.approx(one.after, abs=1e-6)


def test_chunked_updates_give_the_same_alignment(source_family, calib_ids, monkeypatch):
    """Concatenating batches into chunks of >= update_tokens tokens changes nothing but rounding, and the
    accumulator really gets the chunks."""
    from symphony_kernels.correlation import CorrelationAccumulator

    anchor, source = _load(source_family[0]), _load(source_family[1])
    windows = calibration_windows(calib_ids, seq_len=32, batch_size=5, max_tokens=3000)  # 160-token batches
    sizes = [w.numel() for w in windows]
    assert sizes[-1] < 160  # a short last batch too
    seen = []
    real_update = CorrelationAccumulator.update
    monkeypatch.setattr(CorrelationAccumulator, "update", lambda self, xa, xb=None: (
        seen.append((xa.shape[1], xb.shape[1])), real_update(self, xa, xb))[1])
    single = align_models(anchor, source, windows, update_tokens=1)
    assert seen == [(n, n) for n in sizes]  # one update per batch
    seen.clear()
    chunked = align_models(anchor, source, windows, update_tokens=700)
    assert [a for a, _ in seen] == [800] * (len(sizes) // 5) + [sum(sizes[-(len(sizes) % 5):])]
    assert chunked.tokens == single.tokens == sum(sizes)
    assert torch.equal(chunked.perm, single.perm)
    assert chunked.after == pytest.approx(single.after, abs=1e-6)
    assert chunked.before == pytest.approx(single.before, abs=1e-6)
    seen.clear()
    whole = align_models(anchor, source, windows, update_tokens=10**9, layers_per_pass=1)  # one update per pass
    assert [a for a, _ in seen] == [sum(sizes)] * 2
    assert torch.equal(whole.perm, single.perm) and whole.after == pytest.approx(single.after, abs=1e-6)
    with pytest.raises(ValueError, match="update_tokens"):
        align_models(anchor, source, windows, update_tokens=0)


def test_chunk_plan_and_update_defaults():
    assert chunk_plan([4, 4, 4, 4, 2], 8) == [[0, 1], [2, 3], [4]]
    assert chunk_plan([4, 4, 3], 1) == [[0], [1], [2]]
    assert chunk_plan([4, 4, 3], 100) == [[0, 1, 2]]
    assert chunk_plan([], 8) == []
    with pytest.raises(ValueError, match="update_tokens"):
        chunk_plan([4], 0)
    assert default_update_tokens("cpu") == 1 and default_update_tokens(torch.device("cuda", 0)) == 16384


def test_pass_memory_and_layers_per_pass():
    # per layer: 12 f^2 of float64 state + float32 correlation, and one batch of both models' activations
    f, batch = 1000, 64
    per_layer = 12 * f * f + batch * 2 * f * 4
    one = pass_memory(1, f, batch_tokens=batch)
    assert pass_memory(3, f, batch_tokens=batch) - one == 2 * per_layer
    assert one - per_layer == 512 << 20  # the accumulator's CPU scratch bound
    # chunking adds a chunk buffer of ceil(update / batch) batches per layer
    chunked = pass_memory(3, f, batch_tokens=batch, update_tokens=200, device="cpu")
    assert chunked - pass_memory(3, f, batch_tokens=batch) == 3 * 256 * 2 * f * 4
    # 7B on CUDA (f = 11008, bf16, 8 x 512-token batches into 16384-token updates): 2.36 GB per layer
    big = pass_memory(2, 11008, batch_tokens=4096, update_tokens=16384, itemsize=2, device="cuda")
    step = big - pass_memory(1, 11008, batch_tokens=4096, update_tokens=16384, itemsize=2, device="cuda")
    assert step == 12 * 11008**2 + (4096 + 16384) * 2 * 11008 * 2
    # the most layers that fit, then spread evenly over the passes that takes
    kw = dict(batch_tokens=batch)
    fixed = one - per_layer
    assert auto_layers_per_pass(32, f, budget_bytes=fixed + 12 * per_layer, **kw) == 11  # 3 passes: 11, 11, 10
    assert auto_layers_per_pass(32, f, budget_bytes=fixed + 32 * per_layer, **kw) == 32
    assert auto_layers_per_pass(4, f, budget_bytes=10**15, **kw) == 4
    assert auto_layers_per_pass(32, f, budget_bytes=0, **kw) == 1  # never below one layer
    assert pass_memory(auto_layers_per_pass(24, f, budget_bytes=fixed + 7 * per_layer, **kw), f, **kw) \
        <= fixed + 7 * per_layer
    with pytest.raises(ValueError, match="budget_bytes"):
        auto_layers_per_pass(4, f, budget_bytes=-1, **kw)
    with pytest.raises(ValueError, match="batch_tokens"):
        pass_memory(4, f, batch_tokens=0)
    budget = memory_budget("cpu")
    assert 0 < budget <= 4 << 30


def test_calibration_windows_spread_and_rest():
    ids = torch.arange(100)
    out = calibration_windows(ids, seq_len=8, batch_size=4)
    assert [b.shape for b in out] == [(4, 8), (4, 8), (4, 8), (1, 4)]
    assert torch.equal(torch.cat([b.flatten() for b in out]), ids)  # every token once, in order
    spread = calibration_windows(ids, seq_len=8, batch_size=4, max_tokens=24)
    assert [b.shape for b in spread] == [(3, 8)]
    assert spread[0][0, 0] == 0 and spread[0][-1, 0] == 88  # first and last full windows kept
    assert calibration_windows(ids, seq_len=8, batch_size=4, max_tokens=5)[0].tolist() == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="seq_len"):
        calibration_windows(ids, seq_len=0, batch_size=4)


def test_bad_calibration_fails_before_loading_any_model(source_family, tmp_path):
    missing = [tmp_path / "no-such-model", tmp_path / "nor-this"]
    with pytest.raises(SymphonyError, match="empty"):
        align_sources(missing, 0, torch.zeros(0, dtype=torch.long), progress=False)
    with pytest.raises(TypeError, match="integer"):
        align_sources(missing, 0, torch.zeros(5), progress=False)
    with pytest.raises(ValueError, match="anchor_index"):
        align_sources(missing, 2, torch.arange(5), progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        align_sources(missing, 0, torch.arange(5), max_tokens=0, progress=False)
    with pytest.raises(SymphonyError, match="outside the vocabulary"):
        align_sources(source_family[:2], 0, torch.tensor([1, 2, 10_000]), progress=False)


def test_non_finite_activations_name_the_source_and_layer(source_family, calib_ids):
    anchor, source = _load(source_family[0]), _load(source_family[1])
    with torch.no_grad():
        source.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SymphonyError, match="'code' gives non-finite FFN activations in layer 1"):
        align_models(anchor, source, calibration_windows(calib_ids, seq_len=16, batch_size=4, max_tokens=64),
                     source_name="code")


def test_id_maps_drop_unshared_tokens(source_family, calib_ids, tmp_path):
    anchor = _load(source_family[0])
    P = _random_perms(anchor, seed=5)
    apply_ffn_permutation(copy.deepcopy(anchor), P).save_pretrained(tmp_path / "permuted")
    vocab = int(calib_ids.max()) + 1
    id_map = torch.arange(vocab)
    missing = int(calib_ids[10])
    id_map[missing] = -1  # the "source" lacks one token that the text uses
    ids = calib_ids[:3000]
    res = align_sources([source_family[0], tmp_path / "permuted"], 0, ids, id_maps=[None, id_map], seq_len=64,
                        batch_size=16, progress=False)
    dropped = int((ids == missing).sum())
    entry = res.report["sources"][1]
    assert entry["dropped_tokens"] == dropped > 0 and entry["tokens"] == ids.numel() - dropped
    assert torch.equal(res.perms[1], torch.argsort(P, dim=1))
    with pytest.raises(ValueError, match="id_maps"):
        align_sources(source_family[:2], 0, ids, id_maps=[None], progress=False)


def test_hidden_centroids_shape_and_determinism(source_family):
    toks = [AutoTokenizer.from_pretrained(p) for p in source_family]
    texts = [token_stream(t, domain_text(d, 40, seed=3)) for t, d in zip(toks, ("prose", "code", "math"))]
    c1, norms = hidden_centroids(source_family, texts, seq_len=32, batch_size=4, return_norms=True, progress=False)
    c2 = hidden_centroids(source_family, texts, seq_len=32, batch_size=8, progress=False)
    assert c1.shape == (2, 3, 64) and c1.dtype == torch.float32 and norms.shape == (2, 3)
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-6)  # batching does not matter either
    assert (c1.norm(dim=2) <= 1 + 1e-5).all() and (c1.norm(dim=2) > 0.1).all()  # means of unit vectors
    assert (norms > 0).all()
    assert (c1[:, 0] - c1[:, 1]).norm(dim=1).min() > 1e-3  # different domains, different centroids
    # one runner for every text: the anchor's hidden space
    c_anchor = hidden_centroids(source_family, texts, seq_len=32, batch_size=4, runner=0, progress=False)
    torch.testing.assert_close(c_anchor[:, 0], c1[:, 0])
    c_path = hidden_centroids(source_family[1:], texts[1:], seq_len=32, batch_size=4, runner=source_family[0],
                              progress=False)
    torch.testing.assert_close(c_path, c_anchor[:, 1:])
    assert not torch.allclose(c_anchor[:, 1:], c1[:, 1:])
    with pytest.raises(SymphonyError, match="empty"):
        hidden_centroids(source_family, [texts[0], texts[1], torch.zeros(0, dtype=torch.long)], progress=False)

    rows = router_from_centroids(c1, experts_per_source=[1, 2, 1], norms=norms, scale=4.0)
    assert rows.shape == (2, 4, 64)
    assert torch.equal(rows[:, 1], rows[:, 2])  # the two experts of source 1 share its row
    # a token of the typical norm: logit differences are scale * cosine differences to the centroids
    R = norms.mean(dim=1)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    x = x / x.norm(dim=1, keepdim=True) * R[:, None]
    logits = torch.einsum("ld,led->le", x, rows)
    cos = torch.einsum("ld,lnd->ln", x / R[:, None], c1 / c1.norm(dim=2, keepdim=True))
    torch.testing.assert_close(logits[:, 0] - logits[:, 3], 4.0 * (cos[:, 0] - cos[:, 2]), rtol=1e-4, atol=1e-5)
    per_source = logits[:, [0, 1, 3]]
    torch.testing.assert_close(per_source.sum(dim=1), torch.zeros(2), atol=1e-5, rtol=0)  # centred over sources
    # a token in the direction of a source's centroid scores that source's experts highest
    x = c1 / c1.norm(dim=2, keepdim=True) * R[:, None, None]
    logits = torch.einsum("lnd,led->lne", x, rows)
    assert torch.equal(logits.argmax(dim=2), torch.tensor([[0, 1, 3]] * 2))
    # softmax routing does not depend on centring
    uncentred = router_from_centroids(c1, experts_per_source=[1, 2, 1], norms=norms, scale=4.0, center=False)
    torch.testing.assert_close(torch.softmax(logits, 2), torch.softmax(torch.einsum("lnd,led->lne", x, uncentred), 2))
    with pytest.raises(ValueError, match="experts_per_source"):
        router_from_centroids(c1, experts_per_source=[1, 2])
    with pytest.raises(ValueError, match="scale"):
        router_from_centroids(c1, scale=0.0)
