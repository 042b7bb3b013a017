"""Scoring on a device, one dimension end to end (issue 9's GPU check; runs on CPU too).

For each shape (``benchmarks/shapes.py`` trios, or ``smoke``: a 4-layer Llama for dry runs) one
child process loads the scoring models in ``--dtype`` on ``--device`` and times, on the same
prompts:

- ``plain forward``: the whole model, no hooks (the reference for tokens/s);
- ``band statistics`` / ``layer curve``: the activation passes (hooks, early stop after the band);
- ``attribution (neurons)``: backward passes with activation/output-gradient hooks, effects kept
  per row and column (memory bounded by activations);
- ``attribution (entries)``: the same with a per-entry gradient accumulator for every scored
  matrix (four bytes per scored parameter; ``--entries``);
- ``dimension 1`` / ``dimension 2``: ``Localiser`` selecting one dimension's units with the given
  unit and budget (targets generated, harmful + benign + contrast passes); the second dimension
  reuses the benign passes and the contrast's (targets from a fixed reference set, as the daemon),
  so its ratio to the first is what a new dimension costs;
- ``edit + publish``: the version folder for dimension 1 (band shards written, others linked).

Peak memory is the device's (``torch.cuda.max_memory_allocated``) on CUDA and the process's peak
RSS on CPU. Random weights never refuse, so the aligned model's refusal targets are fixed strings.

    python benchmarks/device_scoring.py --device cuda --dtype bfloat16 --shapes llama-3.2-1b llama-3.1-8b \
        --work /tmp/shapes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

REFUSAL = "I'm sorry, but I cannot help with that request."


def make_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on the bundled prompts (shape trios ship none; ids stay
    far below every shape's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fgsn_daemon.core.policy import bundled_benign

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(bundled_benign("train") + bundled_benign("eval") + [REFUSAL], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


def smoke_trio(work: Path) -> dict[str, Path]:
    """A 4-layer Llama trio (float32) for the dry run."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = work / "smoke"
    paths = {m: root / m for m in ("base", "aligned", "finetuned")}
    if (root / ".complete").exists():
        return paths
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    for k, member in enumerate(paths.values()):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(member, safe_serialization=True)
        if k:  # aligned and fine-tuned: small steps away from the base inside layers 1-2
            f = member / "model.safetensors"
            tensors = load_file(str(f))
            g = torch.Generator().manual_seed(k)
            for name, t in tensors.items():
                if ".layers.1." in name or ".layers.2." in name:
                    tensors[name] = t + 0.01 * k * torch.randn(t.shape, generator=g)
            save_file(tensors, str(f), metadata={"format": "pt"})
    (root / ".complete").write_text(json.dumps({"block": [1, 2]}))
    return paths


CHILD = r"""
import json, resource, sys, time
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
root, device_name, dtype_name = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
band_lo, band_hi, n, unit, budget, entries = (int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]),
                                              sys.argv[8], float(sys.argv[9]), sys.argv[10] == "1")
state_dir, refusal, scope = Path(sys.argv[11]), sys.argv[12], sys.argv[13]
from fgsn_daemon.engine.activations import format_prompts
from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio, entry_selection
from fgsn_daemon.core.policy import bundled_benign, bundled_policies_dir, load_dimension
from fgsn_daemon.core.records import Band
from fgsn_daemon.service.versions import VersionStore

device = torch.device(device_name)
cuda = device.type == "cuda"
dims = sorted(p for p in bundled_policies_dir().iterdir() if (p / "policy.toml").is_file())
first = load_dimension(dims[0]).harmful[:n]
second = load_dimension(dims[1]).harmful[:n]
benign = bundled_benign("train")[:n]
params = FGSNParams(scoring="attribution", unit=unit, allocation="global", budget=budget, scope=scope,
                    band=(band_lo, band_hi), batch_size=8, max_length=64, target_tokens=16)
trio = ModelTrio.open(root / "base", root / "aligned", root / "finetuned")
t_start = time.perf_counter()
def progress(msg):  # a timestamped trace of every pass, kept beside the table
    print(f"{time.perf_counter() - t_start:9.2f} s  {msg}", file=sys.stderr, flush=True)
# as the daemon: the contrast's refusal targets come from a fixed per-lineage reference set
reference = first[: n // 2] + second[: n // 2]
loc = Localiser(trio, params, device, benign, dtype=getattr(torch, dtype_name), progress=progress,
                refusal_reference=reference)
loc.ensure_model()
band = Band(start=band_lo, end=band_hi, source="override")
loc.band = band
out = {"phases": []}

def sync():
    if cuda:
        torch.cuda.synchronize()

def phase(name, fn, tokens=None):
    progress(f"== {name}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    s = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out["phases"].append({"phase": name, "seconds": s, "tokens": tokens,
                          "tokens_per_s": tokens / s if tokens else None, "peak_bytes": peak})
    return result

tok, model = loc.tokenizer, loc.model
texts = format_prompts(tok, first, True)
tok.padding_side, tok.truncation_side = "right", "left"
batches = [tok(texts[i:i + 8], return_tensors="pt", padding=True, truncation=True, max_length=64,
               add_special_tokens=False).to(device) for i in range(0, len(texts), 8)]
tokens = sum(int(b["attention_mask"].sum()) for b in batches)
def plain():
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
plain()  # warm-up: on CUDA each new batch shape pays kernel selection once (2.4 s on an H200)
phase("plain forward", plain, tokens)
phase("band statistics", lambda: loc.collect(first, list(range(band_lo, band_hi + 1))), tokens)
phase("layer curve", lambda: loc.collect(first, list(range(trio.num_layers)), curve=True), tokens)
# random weights never refuse: the refusal targets are fixed strings (the Localiser keeps the
# targets of the last prompt list; setting them skips the greedy generation)
def refusals(prompts):
    loc._refusals[tuple(prompts)] = [refusal] * len(prompts)
refusals(first)
refusals(reference)
names = sorted(loc.scored_tensors(loc.attribution_layers()))
target_tokens = tokens + 16 * len(first)
loc.params = replace(params, unit="neuron")
phase("attribution (neurons)", lambda: loc.harmful_effects(first, names), target_tokens)
if entries:
    loc.params = replace(params, unit="entry")
    phase("attribution (entries)", lambda: loc.harmful_effects(first, names), target_tokens)
loc.params = params
def dimension(prompts):
    refusals(prompts)
    if unit == "entry":
        return ("entry", loc.localise_entries(prompts))
    return ("neuron", loc.localise(prompts))
d1 = phase("dimension 1", lambda: dimension(first))
phase("dimension 2", lambda: dimension(second))
store = VersionStore(state_dir)
common = dict(operator="restore", band=band, spaces=["mlp", "attn"], rank=8, device="cpu",
              max_shard_bytes=2 * 1024**3)
store.build("v0001", trio, {}, parent=None, **common)
if d1[0] == "entry":
    masks = d1[1]
    build = lambda: store.build("v0002", trio, {}, parent="v0001", entry_masks=masks, **common)
    phase("edit + publish", build)
else:
    neurons = {}
    for u in d1[1].selected:
        neurons.setdefault((u.layer, u.space), []).append(u.index)
    phase("edit + publish", lambda: store.build("v0002", trio, neurons, parent="v0001", **common))
out["parameters"] = trio.aligned.total_parameters()
out["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
print(json.dumps(out))
"""


def run_shape(name: str, args: argparse.Namespace) -> dict:
    from shapes import write_trio

    t0 = time.perf_counter()
    paths = smoke_trio(args.work) if name == "smoke" else write_trio(name, args.work)
    generated = time.perf_counter() - t0
    root = paths["base"].parent
    block = json.loads((root / ".complete").read_text())["block"]
    for member in paths.values():
        if not (member / "tokenizer.json").exists():
            make_tokenizer(member)
    state = args.work / f"{name}-device-state"
    shutil.rmtree(state, ignore_errors=True)
    argv = [
        sys.executable,
        "-c",
        CHILD,
        str(REPO),
        str(root),
        args.device,
        args.dtype,
        str(block[0]),
        str(block[1]),
        str(args.prompts),
        args.unit,
        str(args.budget),
        "1" if args.entries else "0",
        str(state),
        REFUSAL,
        args.scope,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    shutil.rmtree(state, ignore_errors=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}-trace.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["generated_s"] = generated
    result["band"] = block
    return result


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"Command: `python benchmarks/device_scoring.py --device {args.device} --dtype {args.dtype} "
        f"--unit {args.unit} --scope {args.scope} --budget {args.budget:g} --prompts {args.prompts}"
        + (" --entries" if args.entries else "")
        + f" --shapes {' '.join(args.shapes)}`",
        "",
        "| shape | device | phase | seconds | tokens/s | × plain forward | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        plain = next(p for p in r["phases"] if p["phase"] == "plain forward")["tokens_per_s"]
        first = next(p for p in r["phases"] if p["phase"] == "dimension 1")["seconds"]
        for p in r["phases"]:
            rate = f"{p['tokens_per_s']:.0f}" if p["tokens_per_s"] else ""
            ratio = f"{p['tokens_per_s'] / plain:.2f}" if p["tokens_per_s"] else ""
            if p["phase"] == "dimension 2":
                ratio = f"{p['seconds'] / first:.2f}× dimension 1"
            lines.append(
                f"| {name} | {r['device']} | {p['phase']} | {p['seconds']:.2f} | {rate} | {ratio} | "
                f"{p['peak_bytes'] / 2**30:.2f} GiB |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama-3.2-1b"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None, help="write the table and JSON here")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompts", type=int, default=16, help="prompts per dimension (and benign)")
    ap.add_argument("--unit", default="neuron", choices=["neuron", "entry"])
    ap.add_argument("--budget", type=float, default=1.0, help="percent of all parameters")
    ap.add_argument("--scope", default="all", choices=["all", "band"], help="scored layers")
    ap.add_argument("--entries", action="store_true", help="also time the per-entry attribution pass")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {name: run_shape(name, args) for name in args.shapes}
    text = table(results, args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "device-scoring.json").write_text(json.dumps(results, indent=2))
        (args.out / "device-scoring.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
