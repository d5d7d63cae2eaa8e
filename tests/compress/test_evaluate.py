"""Perplexity / bits-per-char on a tiny random Llama with a tiny byte-level BPE tokenizer built in the test."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bitsmith.compress.errors import BitsmithError, CheckpointError
from bitsmith.compress.evaluate import evaluate_path, perplexity, read_text, record_result, uses_bos

TEXT = (
    "It was the best of weather, and the garden was full of roses. She walked slowly along the path, "
    "thinking of the letter she had read that morning; then she turned, and went back to the house.\n\n"
    "\"Anne!\" he said. \"There you are at last.\"  The evening came on, quiet and cool.\n"
) * 3


def make_tokenizer(with_bos: bool):
    """A 300-token byte-level BPE trained on TEXT; with_bos: it adds <s> when encoding with special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_model(vocab: int, max_pos: int = 512, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=max_pos,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many small forwards: one thread avoids OpenMP overhead (20x faster on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok_bos():
    return make_tokenizer(True)


@pytest.fixture(scope="module")
def tok_nobos():
    return make_tokenizer(False)


@pytest.fixture(scope="module")
def model(tok_bos):
    return make_model(len(tok_bos))


def direct_nll(model, seq: list[int]) -> float:
    """Summed NLL of seq[1:] given the prefix, from one full forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    return F.cross_entropy(logits[:-1], torch.tensor(seq[1:]), reduction="sum").item()


def test_bos_detection(tok_bos, tok_nobos):
    assert uses_bos(tok_bos) is True
    assert uses_bos(tok_nobos) is False


def test_single_window_matches_direct_computation_with_bos(model, tok_bos):
    ids = tok_bos(TEXT, add_special_tokens=False)["input_ids"]
    assert 100 < len(ids) < 500  # the whole text fits one window of 512
    r = perplexity(model, tok_bos, TEXT, window=512, progress=False)
    ref = direct_nll(model, [tok_bos.bos_token_id] + ids)
    assert r["bos"] is True and r["windows"] == 1
    assert r["tokens"] == len(ids)
    assert r["nll_sum"] == pytest.approx(ref, rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(ref / len(ids)), rel=1e-6)
    assert r["chars"] == len(TEXT) and r["bytes"] == len(TEXT.encode())
    assert r["bits_per_char"] == pytest.approx(ref / math.log(2) / len(TEXT), rel=1e-6)
    assert r["bits_per_token"] == pytest.approx(r["nll_per_token"] / math.log(2))
    assert r["truncated"] is False


def test_single_window_without_bos_skips_first_token_and_its_chars(model, tok_nobos):
    enc = tok_nobos(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    r = perplexity(model, tok_nobos, TEXT, window=512, progress=False)
    ref = direct_nll(model, ids)
    assert r["bos"] is False
    assert r["tokens"] == len(ids) - 1
    assert r["nll_sum"] == pytest.approx(ref, rel=1e-6)
    first_token_chars = enc["offset_mapping"][0][1]
    assert first_token_chars == len("It")  # "It" is one token of the trained vocabulary
    assert r["chars"] == len(TEXT) - first_token_chars


def test_non_overlapping_chunks_default_stride(model, tok_bos):
    ids = tok_bos(TEXT, add_special_tokens=False)["input_ids"]
    w = 33
    r = perplexity(model, tok_bos, TEXT, window=w, progress=False)
    bos = tok_bos.bos_token_id
    starts = list(range(0, len(ids), w - 1))
    ref = sum(direct_nll(model, [bos] + ids[i:i + w - 1]) for i in starts[:-1])
    # the last, shorter chunk is filled back to a full window with the tokens before it, which are not scored again
    tail = len(ids) - starts[-1]
    assert 0 < tail < w - 1
    with torch.no_grad():
        logits = model(torch.tensor([[bos] + ids[-(w - 1):]])).logits[0].float()
    ref += F.cross_entropy(logits[-tail - 1:-1], torch.tensor(ids[-tail:]), reduction="sum").item()
    assert r["stride"] == w - 1 and r["windows"] == math.ceil(len(ids) / (w - 1))
    assert r["tokens"] == len(ids)
    assert r["nll_sum"] == pytest.approx(ref, rel=1e-6)


def test_stride_one_gives_each_token_the_last_window_of_context(model, tok_nobos):
    text = TEXT[:300]
    ids = tok_nobos(text, add_special_tokens=False)["input_ids"]
    w = 9
    r = perplexity(model, tok_nobos, text, window=w, stride=1, progress=False)
    ref = 0.0
    for i in range(1, len(ids)):  # token i predicted from the (at most) w-1 tokens before it
        ctx = ids[max(0, i - (w - 1)):i]
        with torch.no_grad():
            logits = model(torch.tensor([ctx])).logits[0, -1].float()
        ref -= torch.log_softmax(logits, -1)[ids[i]].item()
    assert r["tokens"] == len(ids) - 1 and r["windows"] == len(ids) - 1
    assert r["nll_sum"] == pytest.approx(ref, rel=1e-5)


def test_overlapping_windows_score_every_token_once(model, tok_bos):
    ids = tok_bos(TEXT, add_special_tokens=False)["input_ids"]
    r = perplexity(model, tok_bos, TEXT, window=64, stride=20, progress=False)
    assert r["tokens"] == len(ids) and r["windows"] == math.ceil(len(ids) / 20)
    full = perplexity(model, tok_bos, TEXT, window=512, progress=False)
    # more context than the chunked default; a random model still gives a finite, different figure
    assert math.isfinite(r["nll_sum"]) and r["nll_sum"] != full["nll_sum"]


def test_max_tokens_cuts_the_text_and_counts_exact_chars(model, tok_bos, tok_nobos):
    for tok in (tok_bos, tok_nobos):
        r = perplexity(model, tok, TEXT, max_tokens=50, window=16, progress=False)
        assert 48 <= r["tokens"] <= 50 and r["truncated"] is True
        head = 0 if r["bos"] else len(tok.decode(tok(TEXT, add_special_tokens=False)["input_ids"][:1]))
        cut = TEXT[:r["chars"] + head]
        assert cut == cut.rstrip() and TEXT.startswith(cut)
        again = perplexity(model, tok, cut, window=16, progress=False)  # the cut text, scored whole
        assert again["truncated"] is False
        assert again["tokens"] == r["tokens"] and again["chars"] == r["chars"]
        assert again["nll_sum"] == pytest.approx(r["nll_sum"], rel=1e-9)
        assert r["bits_per_char"] == pytest.approx(r["nll_sum"] / math.log(2) / r["chars"])


def test_max_tokens_larger_than_text_scores_everything(model, tok_bos):
    a = perplexity(model, tok_bos, TEXT, max_tokens=10_000, window=64, progress=False)
    b = perplexity(model, tok_bos, TEXT, window=64, progress=False)
    assert a["truncated"] is False and a == b


def test_deterministic_and_restores_training_mode(tok_bos):
    m = make_model(len(tok_bos), seed=1)
    m.train()
    a = perplexity(m, tok_bos, TEXT, window=40, stride=13, progress=False)
    assert m.training is True
    b = perplexity(m, tok_bos, TEXT, window=40, stride=13, progress=False)
    assert a == b


def test_model_without_logits_to_keep(model, tok_bos):
    class Plain(torch.nn.Module):  # a forward() that does not know logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    a = perplexity(Plain(model), tok_bos, TEXT, window=48, stride=30, progress=False)
    b = perplexity(model, tok_bos, TEXT, window=48, stride=30, progress=False)
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 64, "stride": 64}, "stride must be an integer from 1 to 63"),
    ({"window": 64, "stride": 0}, "stride must be"),
    ({"window": 1}, "window must be"),
    ({"window": 1024}, "longer than the model's context"),
    ({"max_tokens": 0}, "max_tokens must be"),
])
def test_bad_settings(model, tok_bos, kwargs, match):
    with pytest.raises(BitsmithError, match=match):
        perplexity(model, tok_bos, TEXT, progress=False, **{"window": 64, **kwargs})


def test_too_short_text(model, tok_nobos, tok_bos):
    with pytest.raises(BitsmithError, match="too short"):
        perplexity(model, tok_nobos, "It", window=64, progress=False)
    with pytest.raises(BitsmithError, match="too short"):
        perplexity(model, tok_bos, "", window=64, progress=False)
    assert perplexity(model, tok_bos, "It", window=64, progress=False)["tokens"] == 1


def test_evaluate_path_and_record(tmp_path, model, tok_bos):
    folder = tmp_path / "tiny"
    model.to(torch.bfloat16).save_pretrained(folder)
    model.float()
    tok_bos.save_pretrained(folder)
    text_file = tmp_path / "book.txt"
    text_file.write_text(TEXT)
    r = evaluate_path(folder, text_file, max_tokens=60, window=32, device="cpu", progress=False)
    assert r["text"] == "book.txt" and r["model"] == "tiny" and r["dtype"] == "float32"
    # same numbers as scoring in memory with the bf16-rounded weights upcast to float32
    ref_model = make_model(len(tok_bos))
    ref_model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    ref = perplexity(ref_model, tok_bos, TEXT, max_tokens=60, window=32, progress=False)
    assert r["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-5) and r["tokens"] == ref["tokens"]

    path = record_result(folder, r)
    record_result(folder, {**r, "text": str(tmp_path / "deep" / "other.txt")})
    records = json.loads(path.read_text())
    assert [x["text"] for x in records] == ["book.txt", "other.txt"]
    assert str(tmp_path) not in path.read_text()
    first = records[0]
    assert first["metric"] == "perplexity" and first["ppl"] == r["ppl"] and first["window"] == 32
    assert first["tokens"] == r["tokens"] and first["bits_per_char"] == r["bits_per_char"]
    assert first["bitsmith_version"] and first["date"].endswith("Z")


def test_evaluate_path_errors(tmp_path):
    with pytest.raises(BitsmithError, match="no such text file"):
        read_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(BitsmithError, match="not UTF-8"):
        read_text(bad)
    text_file = tmp_path / "t.txt"
    text_file.write_text("hello")
    with pytest.raises(CheckpointError, match="no config.json"):
        evaluate_path(tmp_path, text_file, progress=False)
    with pytest.raises(BitsmithError, match="dtype 'int4'"):
        evaluate_path(tmp_path, text_file, dtype="int4", progress=False)


def test_record_result_errors(tmp_path):
    rec = {"text": "a.txt", "tokens": 3, "window": 8, "ppl": 2.0, "bits_per_char": 1.0}
    with pytest.raises(CheckpointError, match="no such model folder"):
        record_result(tmp_path / "nope", rec)
    with pytest.raises(BitsmithError, match="lacks ppl"):
        record_result(tmp_path, {k: v for k, v in rec.items() if k != "ppl"})
    (tmp_path / "eval_results.json").write_text('{"not": "a list"}')
    with pytest.raises(CheckpointError, match="expected a JSON list"):
        record_result(tmp_path, rec)
    (tmp_path / "eval_results.json").write_text("[{]")
    with pytest.raises(CheckpointError, match="unreadable"):
        record_result(tmp_path, rec)
