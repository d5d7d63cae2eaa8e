"""bitsmith.compress.calibration: deterministic token sampling, text sources, and per-Linear input statistics."""

import pytest
import torch

from bitsmith.compress import calibration as cal
from bitsmith.compress.errors import RecipeError
from tests.prune.conftest import TEXT


@pytest.fixture
def tok(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


def test_sampling_is_deterministic_and_in_range(tok):
    a = cal.sample_tokens(TEXT, tok, 5, 40, seed=3)
    b = cal.sample_tokens(TEXT, tok, 5, 40, seed=3)
    c = cal.sample_tokens(TEXT, tok, 5, 40, seed=4)
    assert a.shape == (5, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    row = a[0].tolist()  # every sample is a contiguous window of the text
    assert any(ids[i:i + 40] == row for i in range(len(ids) - 39))
    assert len({tuple(r) for r in a.tolist()}) == 5  # distinct offsets when the text has enough


def test_bos_is_prepended_when_the_tokenizer_uses_it(tok):
    tok.bos_token = "!"
    tok.add_bos_token = True
    if not cal.tokenizer_adds_bos(tok):  # a fast tokenizer without a post-processor ignores add_bos_token
        pytest.skip("this tokenizer build does not add BOS")
    s = cal.sample_tokens(TEXT, tok, 2, 16, seed=0)
    assert (s[:, 0] == tok.bos_token_id).all()


def test_short_text_and_missing_sources(tok, tmp_path):
    with pytest.raises(RecipeError, match="fewer than seq_len"):
        cal.sample_tokens("too short", tok, 1, 64)
    with pytest.raises(RecipeError, match="neither"):
        cal.load_text(tmp_path / "nope.txt")
    with pytest.raises(RecipeError, match="does not exist"):
        cal.check_text_source(str(tmp_path / "nope.txt"), "here")
    assert "Anne" in cal.load_text(None)  # the bundled sample


def test_local_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["one", "", "two"], "n": [1, 2, 3]}),
                              "test": datasets.Dataset.from_dict({"text": ["three"], "n": [4]})})
    d.save_to_disk(str(tmp_path / "ds"))
    assert cal.load_text(tmp_path / "ds") == "one\n\ntwo"
    assert cal.load_text(tmp_path / "ds", split="test") == "three"
    with pytest.raises(RecipeError, match="no column"):
        cal.load_text(tmp_path / "ds", text_field="body")
    with pytest.raises(RecipeError, match="no split"):
        cal.load_text(tmp_path / "ds", split="dev")


def test_stats_match_manual_and_share_grams(tiny_lm, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    batches = cal.sample_tokens(TEXT, tok, 3, 24, seed=0)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"]
    stats = cal.collect_stats(model, names, batches, batch_size=2, gram=True)
    captured = []
    h = model.get_submodule(names[2]).register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, 96)))
    with torch.no_grad():
        model(input_ids=batches)
    h.remove()
    X = torch.cat(captured).double()
    st = stats[names[2]]
    assert st.tokens == 72
    assert torch.allclose(st.sumsq, (X**2).sum(0), rtol=1e-5)
    assert torch.allclose(st.gram.double(), X.t() @ X, rtol=1e-4, atol=1e-4)
    q, k = stats[names[0]], stats[names[1]]  # same input tensor: one Gram matrix
    assert k.shares_gram_with == names[0] and k.gram is q.gram
    assert cal.activation_bytes(stats) == 2 * 64 * 8 + 96 * 8 + (64 * 64 + 96 * 96) * 4


def test_ridge_solve():
    g = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # singular: the ridge makes it solvable
    x = cal.ridge_solve(g, torch.tensor([[2.0], [0.0]]), 0.01)
    assert torch.allclose(x, torch.tensor([[2.0 / 2.01], [0.0]]), atol=1e-6)
