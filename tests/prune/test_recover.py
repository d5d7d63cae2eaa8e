"""recover: distillation toward the input model keeps the zeros and lowers the KL; errors without a teacher."""

import math

import pytest
import torch

import bitsmith
from bitsmith.compress.errors import RecipeError
from bitsmith.compress.recipe import parse_recipe
from bitsmith.prune.recover import Recover, distill, lr_at, tensor_rates


def test_recover_keeps_masks_and_lowers_kl(tiny_lm, calib_text, tmp_path, caplog):
    from safetensors.torch import load_file

    r = parse_recipe(
        "version: 1\npasses:\n"
        "  - {type: block_sparse, sparsity: 0.7, block: [16, 16], score: magnitude}\n"
        f"  - {{type: recover, steps: 6, lr: 0.005, text: {calib_text}, samples: 4, seq_len: 32, batch_size: 2}}\n")
    import logging

    with caplog.at_level(logging.INFO, logger="bitsmith"):
        bitsmith.compress(r, tiny_lm, tmp_path / "out", progress=False)
    line = next(rec.message for rec in caplog.records if rec.message.startswith("recover:"))
    first, last = (float(v) for v in line.split("KL ")[1].split(" (")[0].split(" -> "))
    assert last < first
    before = load_file(tiny_lm / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    w = after["model.layers.0.mlp.up_proj.weight"]  # [96, 64]
    zero_blocks = (w.reshape(6, 16, 4, 16) == 0).all(-1).all(1)
    assert float(zero_blocks.float().mean()) == pytest.approx(0.7, abs=0.05)  # still block-sparse after training
    assert not torch.equal(w, before["model.layers.0.mlp.up_proj.weight"])
    assert w.dtype == torch.bfloat16
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # only the targeted Linears train


def test_recover_needs_a_teacher_outside_compress(tiny_lm, calib_text):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with pytest.raises(RecipeError, match="teacher"):
        bitsmith.apply(model, [Recover(steps=1, text=str(calib_text))])


def test_recover_with_explicit_teacher_in_memory(tiny_lm, calib_text):
    from transformers import AutoModelForCausalLM

    from bitsmith.prune.block_sparse import BlockSparse

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    bitsmith.apply(model, [BlockSparse(sparsity=0.5, block=(4, 4), score="magnitude"),
                           Recover(steps=2, text=str(calib_text), teacher=str(tiny_lm), samples=4, seq_len=32,
                                   batch_size=2, micro_batch=2)])
    w = model.model.layers[1].self_attn.o_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_lr_schedule():
    steps, peak = 100, 1e-4
    lrs = [lr_at(i, steps, peak) for i in range(steps)]
    assert lrs[0] == pytest.approx(peak / 5) and max(lrs) == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(peak * (0.1 + 0.45 * (1 + math.cos(math.pi * 94 / 95))))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_rms_rates_scale_with_each_tensors_kept_weights():
    big = torch.tensor([[0.0, 3.0], [-4.0, 0.0]])  # nonzeros 3, -4: RMS sqrt(12.5)
    small = torch.full((3, 3), 0.01)
    params = {"big": big, "small": small, "empty": torch.zeros(2, 2)}
    assert tensor_rates(params, Recover(lr=2e-4)) == {"big": 2e-4, "small": 2e-4, "empty": 2e-4}
    rates = tensor_rates(params, Recover(lr=1e-3, lr_scale="rms"))
    assert rates["big"] == pytest.approx(1e-3 * math.sqrt(12.5))
    assert rates["small"] == pytest.approx(1e-5)
    assert rates["empty"] == 1e-3
    with pytest.raises(ValueError, match="lr_scale"):
        Recover(lr_scale="relative")


def test_rms_rates_reach_the_optimizer(tiny_lm, calib_text):
    """Each tensor trains at its own peak (Adam's first step moves a weight by about the rate); zeros stay zero."""
    from transformers import AutoModelForCausalLM

    from bitsmith.compress import calibration
    from bitsmith.prune.recover import TeacherLogits

    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    a, b = student.model.layers[0].mlp.up_proj.weight, student.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        a.mul_(10.0)
        a[:, :2] = 0.0
        b.mul_(0.1)
    params = {"a": a, "b": b}
    before = {n: p.detach().clone() for n, p in params.items()}
    cfg = Recover(steps=1, lr=1e-2, lr_scale="rms", samples=2, seq_len=16, batch_size=2, micro_batch=2)
    peaks = tensor_rates(params, cfg)
    from transformers import AutoTokenizer
    batches = calibration.calibration_batches(str(calib_text), AutoTokenizer.from_pretrained(tiny_lm), 2, 16, 0)
    report = distill(student, teacher, batches, cfg, params, teacher_cache=TeacherLogits(teacher))
    assert report["peak_lr_max"] == pytest.approx(max(peaks.values()))
    assert report["peak_lr_min"] == pytest.approx(min(peaks.values()))
    for n, p in params.items():
        moved = (p.detach() - before[n]).abs()
        kept = before[n] != 0
        assert torch.all(moved[~kept] == 0)
        # one step at warm-up rate = peak (1 step): Adam's update is at most about the rate per weight
        assert moved[kept].max() <= peaks[n] * 1.01
        assert moved[kept].max() >= peaks[n] * 0.5
    assert peaks["a"] > 50 * peaks["b"]


def test_recover_config_checks(tiny_lm, tmp_path):
    with pytest.raises(RecipeError, match="micro_batch"):
        bitsmith.compress(parse_recipe("version: 1\npasses:\n  - {type: recover, batch_size: 2, micro_batch: 4}\n"),
                          tiny_lm, tmp_path / "o", progress=False)
    with pytest.raises(RecipeError, match="teacher"):
        bitsmith.compress(parse_recipe(f"version: 1\npasses:\n  - {{type: recover, teacher: {tmp_path}}}\n"),
                          tiny_lm, tmp_path / "o", progress=False)


def _pruned_and_teacher(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitsmith.prune.block_sparse import BlockSparse

    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    bitsmith.apply(student, [BlockSparse(sparsity=0.5, block=(16, 16), score="magnitude")])
    return student, teacher, AutoTokenizer.from_pretrained(tiny_lm)


def test_teacher_cache_same_training_fewer_teacher_forwards(tiny_lm, calib_text):
    from bitsmith.prune.recover import recover_model

    runs = []
    for gb in (0.0, 1.0):
        student, teacher, tok = _pruned_and_teacher(tiny_lm)
        # 4 samples, 5 steps x 2: every sequence comes back (10 sequences drawn)
        cfg = Recover(steps=5, lr=0.01, text=str(calib_text), samples=4, seq_len=32, batch_size=2, micro_batch=1,
                      teacher_cache_gb=gb)
        report = recover_model(student, cfg, teacher, tok)
        runs.append((report, {n: p.detach().clone() for n, p in student.named_parameters()}))
    (plain, w_plain), (cached, w_cached) = runs
    assert plain["teacher_forwards"] == 10 and cached["teacher_forwards"] == 4
    assert cached["kl_first"] == pytest.approx(plain["kl_first"], rel=1e-5)
    assert cached["kl_last"] == pytest.approx(plain["kl_last"], rel=1e-4)
    for n, w in w_plain.items():
        torch.testing.assert_close(w_cached[n], w, rtol=1e-4, atol=1e-6)
        assert torch.equal(w_cached[n] == 0, w == 0)  # same masks kept
    assert not torch.equal(w_plain["model.layers.0.mlp.up_proj.weight"],
                           _pruned_and_teacher(tiny_lm)[0].model.layers[0].mlp.up_proj.weight)  # it trained


def test_teacher_cache_shared_between_runs_and_bounded(tiny_lm, calib_text):
    from bitsmith.prune.recover import TeacherLogits, recover_model

    student, teacher, tok = _pruned_and_teacher(tiny_lm)
    cfg = Recover(steps=2, lr=0.01, text=str(calib_text), samples=4, seq_len=32, batch_size=2)
    cache = TeacherLogits(teacher)
    assert recover_model(student, cfg, teacher, tok, teacher_cache=cache)["teacher_forwards"] == 4
    student2 = _pruned_and_teacher(tiny_lm)[0]
    assert recover_model(student2, cfg, teacher, tok, teacher_cache=cache)["teacher_forwards"] == 0
    ids = torch.randint(0, 256, (2, 32))
    with pytest.raises(ValueError, match="other tokens"):
        cache(ids, [0, 1])
    # a budget of one sequence's logits: the second is computed but not kept, and still returned right
    small = TeacherLogits(teacher, max_bytes=32 * 256 * 4)
    out = small(ids, [0, 1])
    assert small.bytes == 32 * 256 * 4 and list(small.store) == [0]
    with torch.no_grad():
        torch.testing.assert_close(out, teacher(input_ids=ids).logits.float())


def test_teacher_topk_over_the_whole_vocabulary_is_the_full_kl(tiny_lm, calib_text):
    """k = the vocabulary (256): the renormalized top-k KL is the full KL, so training matches teacher_topk 0."""
    from bitsmith.prune.recover import recover_model

    runs = []
    for k in (0, 256):
        student, teacher, tok = _pruned_and_teacher(tiny_lm)
        cfg = Recover(steps=3, lr=0.01, text=str(calib_text), samples=4, seq_len=32, batch_size=2, micro_batch=1,
                      teacher_topk=k)
        runs.append((recover_model(student, cfg, teacher, tok), dict(student.named_parameters())))
    (full, w_full), (topk, w_topk) = runs
    assert topk["teacher_topk"] == 256 and topk["topk_mass"] == pytest.approx(1.0, abs=1e-5)
    assert topk["kl_first"] == pytest.approx(full["kl_first"], rel=1e-4)
    assert topk["kl_last"] == pytest.approx(full["kl_last"], rel=1e-3)
    for n, w in w_full.items():
        torch.testing.assert_close(w_topk[n], w, rtol=1e-3, atol=1e-4)  # Adam magnifies float noise a little


def test_teacher_topk_trains_keeps_masks_and_runs_the_teacher_once_per_sequence(tiny_lm, calib_text):
    from bitsmith.prune.recover import TeacherTopK, recover_model

    student, teacher, tok = _pruned_and_teacher(tiny_lm)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = Recover(steps=8, lr=0.003, text=str(calib_text), samples=4, seq_len=32, batch_size=2, teacher_topk=32)
    report = recover_model(student, cfg, teacher, tok)
    assert report["teacher_forwards"] == 4  # 12 sequences drawn, 4 distinct: top-k kept for each
    assert 0.0 < report["topk_mass"] < 1.0 and report["kl_last"] < report["kl_first"]
    w, w0 = student.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(w == 0, w0 == 0) and not torch.equal(w, w0)
    assert torch.equal(student.lm_head.weight, before["lm_head.weight"])  # the head is not trained
    # the cache: the teacher's k largest logits and their ids
    cache = TeacherTopK(teacher, 8)
    ids = torch.randint(0, 256, (2, 32))
    words, vals = cache(ids, [0, 1])
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits.float().topk(8, dim=-1)
    torch.testing.assert_close(vals, ref.values)
    assert torch.equal(words, ref.indices)
    with pytest.raises(ValueError, match="other tokens"):
        cache(torch.randint(0, 256, (1, 32)), [0])


def test_teacher_topk_checks():
    with pytest.raises(ValueError, match="teacher_cache_gb: 0"):
        Recover(teacher_topk=64, teacher_cache_gb=1.0)
    with pytest.raises(ValueError):
        Recover(teacher_topk=-1)
    from bitsmith.prune.recover import head_of

    with pytest.raises(RecipeError, match="teacher_topk"):
        head_of(torch.nn.Linear(4, 4))
