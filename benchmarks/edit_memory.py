"""Peak memory of the edit step versus model depth (streaming editor vs a naive full load).

Builds random Llama-shaped checkpoint trios with the same width and 4 or 32 layers, then, each in
a fresh subprocess, runs (a) ``write_edited_checkpoint`` on a fixed 2-layer band selection and
(b) a naive editor that loads all three state dicts, projects, and saves. Reports peak RSS
(``VmHWM`` of the child; ``ru_maxrss`` would inherit the parent's peak
across fork+exec) and wall time side by side, and their ratios.

    python benchmarks/edit_memory.py [--hidden 384] [--intermediate 1536] [--layers 4 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def build(root: Path, layers: int, hidden: int, intermediate: int, vocab: int = 4096) -> dict[str, Path]:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    paths = {}
    g = torch.Generator().manual_seed(0)
    for k, seed in (("base", 0), ("aligned", 1), ("finetuned", 2)):
        d = root / k
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(cfg))
        g.manual_seed(seed)
        save_file(
            {n: torch.randn(s, generator=g) for n, s in shapes.items()},
            str(d / "model.safetensors"),
            metadata={"format": "pt"},
        )
        paths[k] = d
    return paths


CHILD = r"""
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads(2)
mode, root, intermediate = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
band_layers = [1, 2]
indices = list(range(0, intermediate, 20))  # 5% of the neurons in each band layer
t0 = time.perf_counter()
if mode == "streaming":
    from fgsn_daemon.engine.pipeline import ModelTrio, write_edited_checkpoint
    from fgsn_daemon.core.records import Band
    trio = ModelTrio.open(root / "base", root / "aligned", root / "finetuned")
    neurons = {(l, "mlp"): indices for l in band_layers}
    band = Band(start=1, end=2, source="override")
    write_edited_checkpoint(trio, neurons, "safe_lora", root / "out_streaming", band, ["mlp"],
                            max_shard_bytes=256 * 1024**2)
else:
    from safetensors.torch import load_file, save_file
    from fgsn_daemon.engine.projection import Operator, TensorTriple, project_tensor
    sd = {k: load_file(str(root / k / "model.safetensors")) for k in ("base", "aligned", "finetuned")}
    out = dict(sd["finetuned"])
    for l in band_layers:
        for name, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            n = f"model.layers.{l}.mlp.{name}.weight"
            triple = TensorTriple(sd["finetuned"][n], sd["aligned"][n], sd["base"][n])
            out[n] = project_tensor(Operator.SAFE_LORA, triple, axis, indices)
    (root / "out_naive").mkdir()
    save_file(out, str(root / "out_naive" / "model.safetensors"), metadata={"format": "pt"})
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": hwm / 1024}))
"""


def measure(mode: str, root: Path, intermediate: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(root), str(intermediate)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    args = ap.parse_args()
    baseline = measure_import_only()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            root = Path(tmp) / f"L{layers}"
            build(root, layers, args.hidden, args.intermediate)
            size_mib = (root / "finetuned" / "model.safetensors").stat().st_size / 1024**2
            for mode in ("streaming", "naive"):
                r = measure(mode, root, args.intermediate)
                rows.append((layers, size_mib, mode, r["peak_rss_mib"], r["seconds"]))
    print(f"python+torch import alone: {baseline:.0f} MiB peak RSS")
    print(
        f"{'layers':>6} {'ckpt MiB':>9} {'mode':>10} {'peak RSS MiB':>13} {'above import':>13} {'seconds':>8}"
    )
    for layers, size, mode, rss, sec in rows:
        print(f"{layers:>6} {size:>9.0f} {mode:>10} {rss:>13.0f} {rss - baseline:>13.0f} {sec:>8.2f}")
    by = {(r[0], r[2]): r[3] - baseline for r in rows}
    lo, hi = min(args.layers), max(args.layers)
    for mode in ("streaming", "naive"):
        print(f"{mode}: peak above import, {hi} vs {lo} layers: x{by[(hi, mode)] / by[(lo, mode)]:.2f}")


def measure_import_only() -> float:
    code = (
        "import torch, fgsn_daemon.engine.pipeline\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)"
    )
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


if __name__ == "__main__":
    main()
