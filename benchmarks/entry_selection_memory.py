"""Peak memory of global entry selection: the two-pass selection (``select_entries``) against the
usual one-shot way (concatenate every tensor's scores, ``topk`` over all of them), side by side.

Each mode runs in a fresh subprocess on the same synthetic scores: the MLP and attention weights of
``--layers`` layers of a Llama-3.1-8B-shaped model (hidden 4096, intermediate 14336; 8 layers are
1.7 G entries), random gains and a cost that excludes nothing (p = 0, the default). What is
reported is the peak RSS (``VmHWM``) above the inputs (gains and the returned masks are the same
in both modes), the wall time, and whether the two selections are identical.

    python benchmarks/entry_selection_memory.py [--layers 2] [--budget-percent 0.5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, math, sys, time
import torch

mode, layers, percent = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(2)
hidden, inter, kv = 4096, 14336, 1024
shapes = {}
for i in range(layers):
    p = f"model.layers.{i}."
    shapes |= {
        p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
        p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
        p + "mlp.down_proj.weight": (hidden, inter),
    }
g = torch.Generator().manual_seed(0)
gain = {n: torch.randn(s, generator=g) for n, s in sorted(shapes.items())}
zero = torch.zeros(())
cost = {n: zero.expand(s) for n, s in shapes.items()}  # p = 0: nothing is excluded
total = sum(t.numel() for t in gain.values())
budget = int(total * percent / 100)
hwm = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
rss = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
inputs = rss()
t0 = time.perf_counter()
if mode == "two-pass":
    from fgsn_daemon.engine.delta_selection import select_entries
    masks = select_entries(gain, cost, budget, 0.0)
else:  # one shot: every score in one tensor, one topk
    names = sorted(gain)
    flat = torch.cat([torch.where(gain[n] > 0, gain[n], 0.0).flatten() for n in names])
    picked = torch.zeros(flat.numel(), dtype=torch.bool)
    picked[torch.topk(flat, budget).indices] = True
    del flat
    masks, offset = {}, 0
    for n in names:
        masks[n] = picked[offset : offset + gain[n].numel()].reshape(gain[n].shape).clone()
        offset += gain[n].numel()
    del picked
seconds = time.perf_counter() - t0
# the selected scores as a multiset (count and float64 sum): equal scores at the k-th value may be
# picked at different positions (the one-shot topk breaks ties arbitrarily, the two-pass by position)
picked_sum = sum(float(gain[n][masks[n]].double().sum()) for n in masks)
digest = [sum(int(m.sum()) for m in masks.values()), picked_sum]
masks_mib = sum(m.numel() for m in masks.values()) / 1024**2
print(json.dumps({"entries": total, "budget": budget, "inputs_mib": inputs, "peak_mib": hwm(),
                  "masks_mib": masks_mib, "seconds": seconds, "digest": digest}))
"""


def measure(mode: str, layers: int, percent: float) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(layers), str(percent)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--budget-percent", type=float, default=0.5)
    args = ap.parse_args()
    rows = {mode: measure(mode, args.layers, args.budget_percent) for mode in ("two-pass", "one-shot")}
    first = rows["two-pass"]
    print(
        f"{first['entries'] / 1e9:.2f} G entries ({args.layers} layers of Llama-3.1-8B's shape), "
        f"budget {args.budget_percent:g} % = {first['budget']:,} entries"
    )
    print(f"{'mode':>9} {'peak above inputs + masks, MiB':>31} {'seconds':>8}")
    extra = {}
    for mode, r in rows.items():
        extra[mode] = r["peak_mib"] - r["inputs_mib"] - r["masks_mib"]
        print(f"{mode:>9} {extra[mode]:>31.0f} {r['seconds']:>8.1f}")
    same = rows["two-pass"]["digest"] == rows["one-shot"]["digest"]
    print(
        f"two-pass / one-shot: memory x{extra['two-pass'] / extra['one-shot']:.2f}, "
        f"time x{rows['two-pass']['seconds'] / rows['one-shot']['seconds']:.2f}; "
        f"same selected scores (ties at the k-th value may sit elsewhere): {same}"
    )


if __name__ == "__main__":
    main()
