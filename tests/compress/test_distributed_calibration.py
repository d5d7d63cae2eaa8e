"""`collect_stats(distributed=True)` on 2 gloo ranks: bitwise the statistics of one process, or a clear error."""

import pytest
import torch
import torch.multiprocessing as mp

from bitsmith.compress.calibration import collect_stats


class Toy(torch.nn.Module):
    """Embedding -> a -> c, d and b, all three on a's output (b only on batches whose first token is odd, with
    `branch`: the forward then calls one more module on some batches, at its end)."""

    def __init__(self, branch: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 24)
        self.a, self.b = torch.nn.Linear(24, 24), torch.nn.Linear(24, 24)
        self.c, self.d = torch.nn.Linear(24, 16), torch.nn.Linear(24, 8)
        self.branch = branch

    def forward(self, input_ids, use_cache=False):
        h = self.a(self.emb(input_ids))
        y = self.c(h).sum() + self.d(h).sum()
        if not self.branch or int(input_ids[0, 0]) % 2:
            y = y + self.b(h).sum()
        return y


NAMES = ["a", "b", "c", "d"]


def batches():  # 4 batches of 2, 2, 2, 1 rows: rank 1 sits out the last round; odd first token in batch 1 only
    ids = torch.randint(0, 50, (7, 33), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = torch.tensor([2, 4, 3, 5, 6, 8, 10])
    return ids


def _worker(rank, port, branch, path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        try:
            stats = collect_stats(Toy(branch), NAMES, batches(), batch_size=2, gram=True, distributed=True)
        except Exception as e:  # the spawner may report the other rank's broken connection first
            with open(f"{path}.{rank}.err", "w") as f:
                f.write(str(e))
            raise
        if rank == 0:
            torch.save({n: (s.sumsq, s.gram, s.tokens, s.shares_gram_with) for n, s in stats.items()}, path)
        else:
            assert stats == {}
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_statistics_of_one_process(tmp_path):
    torch.set_num_threads(1)
    ref = collect_stats(Toy(False), NAMES, batches(), batch_size=2, gram=True)
    mp.spawn(_worker, args=(29551, False, str(tmp_path / "s.pt")), nprocs=2)
    got = torch.load(tmp_path / "s.pt")
    assert sorted(got) == NAMES
    for n in NAMES:
        sumsq, gram, tokens, shares = got[n]
        assert torch.equal(sumsq, ref[n].sumsq) and torch.equal(gram, ref[n].gram)
        assert tokens == ref[n].tokens == 7 * 33 and shares == ref[n].shares_gram_with
    assert got["d"][3] == got["b"][3] == "c" and got["a"][3] is None  # c, d, b see one input: one Gram


def test_ranks_whose_forwards_differ_are_refused(tmp_path):
    with pytest.raises(Exception):
        mp.spawn(_worker, args=(29552, True, str(tmp_path / "s.pt")), nprocs=2)
    msg = (tmp_path / "s.pt.0.err").read_text()  # rank 1's extra call to b meets rank 0's end of batch
    assert "in batch 1 rank 1 reached b (hook call 4) where rank 0, in batch 0, reached the end of its forward" in msg
    assert "run this pass in one process" in msg
