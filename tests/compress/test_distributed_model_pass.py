"""A model pass (activation-aware block_sparse) under torchrun with 2 ranks writes the bytes of one process.

The ranks share the calibration batches (partial statistics summed on rank 0 in batch order), rank 0 allocates
the masks, the refits are shared by Gram matrix, and the sweep after the model pass is shared as for tensor passes.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.prune.conftest import TEXT, make_calibrated_llama

# Two model passes, then tensor passes (shared by the ranks like any sweep). The first: activation scores, a
# global threshold, no refit (every rank masks every weight from rank 0's masks); the second: a refit (work shared
# by Gram matrix, weights broadcast). 5 calibration batches of 2: the second rank sits out the last round.
RECIPE = """\
version: 1
name: dist-block-sparse
passes:
  - {{type: block_sparse, targets: "re:.*mlp.*", sparsity: 0.4, block: [16, 16], score: activation,
     scope: global, text: {text}, samples: 6, seq_len: 32, batch_size: 2}}
  - {{type: block_sparse, sparsity: 0.5, block: [16, 16], score: activation, refit: true, text: {text},
     samples: 10, seq_len: 32, batch_size: 2}}
  - {{type: finequant, bits: 4, group_size: 32, symmetric: true}}
  - {{type: pack_bsr}}
"""
RECOVER = """\
version: 1
name: dist-recover
passes:
  - {{type: block_sparse, sparsity: 0.5, block: [16, 16], score: activation, text: {text}, samples: 4, seq_len: 32}}
  - {{type: recover, steps: 1, text: {text}, seq_len: 32}}
"""

# the 2-rank runs go through the Python API so that each rank can report whether it tore its group down
RANK_SCRIPT = textwrap.dedent("""\
    import sys

    import torch.distributed as dist

    import bitsmith

    recipe, model, out = sys.argv[1:4]
    bitsmith.compress(recipe, model, out, progress=False, shard_size="20KB")
    print("group left initialized" if dist.is_initialized() else "group destroyed", flush=True)
""")

# torchrun gives each rank OMP_NUM_THREADS=1; the 1-rank runs get the same so the CPU kernels are the same
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_model_pass")
    model = make_calibrated_llama(root / "model", layers=3)
    text = root / "calib.txt"
    text.write_text(TEXT)
    script = root / "rank.py"
    script.write_text(RANK_SCRIPT)
    recipes = {}
    for name, body in (("block_sparse", RECIPE), ("recover", RECOVER)):
        recipes[name] = root / f"{name}.yaml"
        recipes[name].write_text(body.format(text=text))
    return model, recipes, script


def one_process(recipe, model, out):
    r = subprocess.run([sys.executable, "-m", "bitsmith.cli", "compress", str(recipe), str(model), "-o", str(out),
                        "--no-progress", "--shard-size", "20KB"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]


def two_ranks(args, port):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun ships with torch"
    return subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(port), *args],
                          capture_output=True, text=True, timeout=300, env=ENV)


def test_two_ranks_identical_and_torn_down(setup, tmp_path):
    model, recipes, script = setup
    one_process(recipes["block_sparse"], model, tmp_path / "one")
    r = two_ranks([str(script), str(recipes["block_sparse"]), str(model), str(tmp_path / "two")], 29541)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("group destroyed") == 2 and "left initialized" not in r.stdout, r.stdout
    one, two = contents(tmp_path / "one"), contents(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert sum(n.endswith(".safetensors") for n in one) > 1  # several shards, all compared
    differ = [n for n in one if one[n] != two[n]]
    assert not differ, differ


def test_two_ranks_refuse_a_model_pass_without_rank_support(setup, tmp_path):
    model, recipes, _ = setup
    r = two_ranks(["-m", "bitsmith.cli", "compress", str(recipes["recover"]), str(model), "-o",
                   str(tmp_path / "out"), "--no-progress"], 29543)
    assert r.returncode != 0
    assert "multi-rank run" in r.stderr and "recover" in r.stderr
    assert not (tmp_path / "out").exists()
