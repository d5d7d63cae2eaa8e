"""Per tensor: relative int4/int3 g128 RTN error and mean max|w|/rms per group, before vs after DeepShape.

    python benchmarks/deepshape_grid.py MODEL_DIR      # every third *proj weight of the safetensors in MODEL_DIR
"""
import glob
import statistics as st
import sys

import torch
from safetensors.torch import load_file

from bitsmith.prune.deepshape import DeepShape, reshape_tensor

torch.set_num_threads(1)
path = sys.argv[1]
sd = {}
for f in glob.glob(path + "/*.safetensors"):
    sd.update(load_file(f))
cfg = DeepShape()
rows = {"before": {"e4": [], "e3": [], "ratio": []}, "after": {"e4": [], "e3": [], "ratio": []}}
names = [n for n, t in sd.items() if t.dim() == 2 and "proj" in n][::3]
for n in names:
    w = sd[n].float()
    for tag, t in (("before", w), ("after", reshape_tensor(w, cfg)[0].float())):
        K = t.shape[1] // 128 * 128
        g = t[:, :K].reshape(t.shape[0], -1, 128)
        rows[tag]["ratio"].append(float((g.abs().amax(-1) / g.pow(2).mean(-1).sqrt()).mean()))
        for b in (4, 3):
            gq = g.abs().amax(-1, keepdim=True) / (2 ** (b - 1) - 1)
            q = torch.clamp(torch.round(g / gq), -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1) * gq
            rows[tag][f"e{b}"].append(float((q - g).pow(2).sum() / g.pow(2).sum()))
print(f"{len(names)} tensors (every third *proj weight), int-b symmetric absmax g128 round-to-nearest, no clipping search")
for tag in rows:
    print(tag, {k: round(st.median(v), 5) for k, v in rows[tag].items()})
