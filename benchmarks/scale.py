"""Edit + publish at real model sizes (issue 9), side by side with a naive editor, in one run.

For each shape (``benchmarks/shapes.py``: bf16, sharded, the exact configs of Llama-3.2-1B,
Qwen2.5-1.5B, Llama-3.1-8B), each phase runs in a fresh child process and reports wall time, peak
RSS (``VmHWM``), bytes read and written (``/proc/self/io`` rchar/wchar) and the bytes the new
version adds on disk (files that are not hard links):

- ``initial``: the first version (the fine-tuned model re-sharded: a full copy);
- ``dimension 1`` / ``dimension 2``: a version restoring 5 % of the MLP and attention neurons of
  each band layer (the perturbed block), then 5 % more — written next to its parent, hard-linking
  every shard outside the band;
- ``lora``: dimension 1 with the fine-tune given as a LoRA adapter (merged tensor by tensor);
- ``naive``: load all three state dicts (safetensors ``load_file``), edit in memory, save the
  whole model — what the usual tools do. Skipped ("does not fit") when three copies exceed RAM.

    python benchmarks/scale.py --shapes llama-3.2-1b qwen2.5-1.5b llama-3.1-8b --work /tmp/shapes

``--scoring-shapes`` also times, on those shapes, plain forward passes of the whole model against
the daemon's forward-only scoring passes (band statistics with early stop; the layer curve), in
tokens per second; the attribution scoring's backward passes are not timed yet.
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

SCORING_CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(2)
root, band_lo, band_hi, n = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
from fgsn_daemon.engine.activations import format_prompts
from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio
from fgsn_daemon.core.policy import bundled_benign

prompts = bundled_benign("train")[:n]
trio = ModelTrio.open(root / "base", root / "aligned", root / "finetuned")
loc = Localiser(trio, FGSNParams(batch_size=8, max_length=64), torch.device("cpu"), prompts)
loc.ensure_model()
tok, model = loc.tokenizer, loc.model
texts = format_prompts(tok, prompts, True)
tok.padding_side, tok.truncation_side = "right", "left"
batches = [tok(texts[i:i + 8], return_tensors="pt", padding=True, truncation=True, max_length=64,
               add_special_tokens=False) for i in range(0, len(texts), 8)]
tokens = sum(int(b["attention_mask"].sum()) for b in batches)
out = {"tokens": tokens}
with torch.no_grad():
    first = batches[0]  # warm-up
    model(input_ids=first["input_ids"], attention_mask=first["attention_mask"], use_cache=False)
    t0 = time.perf_counter()
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    out["plain_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loc.collect(prompts, list(range(band_lo, band_hi + 1)))
    out["band_stats_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loc.collect(prompts, list(range(trio.num_layers)), curve=True)
    out["curve_s"] = time.perf_counter() - t0
print(json.dumps(out))
"""

CHILD = r"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(2)
phase, root, state = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
band_lo, band_hi = int(sys.argv[5]), int(sys.argv[6])
t0 = time.perf_counter()
from fgsn_daemon.engine.pipeline import ModelTrio
from fgsn_daemon.core.records import Band
from fgsn_daemon.service.versions import VersionStore

band = Band(start=band_lo, end=band_hi, source="override")
def neurons(trio, offset):
    out = {}
    for layer in range(band_lo, band_hi + 1):
        for space in ("mlp", "attn"):
            name, axis = trio.space_tensors(layer, space)[0]
            n = trio.aligned.info(name).shape[axis]
            out[(layer, space)] = list(range(offset, n, 20))  # 5 %
    return out

if phase == "naive":
    from safetensors.torch import load_file, save_file
    sd = {}
    for k in ("base", "aligned", "finetuned"):
        sd[k] = {}
        for f in sorted((root / k).glob("*.safetensors")):
            sd[k].update(load_file(str(f)))
    out = dict(sd["finetuned"])
    for layer in range(band_lo, band_hi + 1):
        p = f"model.layers.{layer}."
        for name, axis in (("mlp.gate_proj", 0), ("mlp.up_proj", 0), ("mlp.down_proj", 1),
                           ("self_attn.q_proj", 0), ("self_attn.o_proj", 1)):
            n = p + name + ".weight"
            idx = torch.arange(0, sd["aligned"][n].shape[axis], 20)
            t = out[n].clone()
            t.index_copy_(axis, idx, sd["aligned"][n].index_select(axis, idx))
            out[n] = t
    dest = state / "naive"
    dest.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})
else:
    ft = root / "finetuned-lora" if phase == "lora" else root / "finetuned"
    trio = ModelTrio.open(root / "base", root / "aligned", ft)
    store = VersionStore(state)
    common = dict(operator="restore", band=band, spaces=["mlp", "attn"], rank=8, device="cpu",
                  max_shard_bytes=2 * 1024**3)
    if phase == "initial":
        store.build("v0001", trio, {}, parent=None, **common)
    elif phase in ("dimension1", "lora"):
        store.build("v0002", trio, neurons(trio, 0), parent="v0001", **common)
    else:
        both = {k: sorted(set(v) | set(neurons(trio, 10)[k])) for k, v in neurons(trio, 0).items()}
        store.build("v0003", trio, both, parent="v0002", **common)
io = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": hwm / 1024,
                  "read_mb": int(io["rchar"]) / 1e6, "written_mb": int(io["wchar"]) / 1e6}))
"""


def run_phase(phase: str, root: Path, state: Path, band: tuple[int, int]) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), phase, str(root), str(state), str(band[0]), str(band[1])],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_scoring(root: Path, band: tuple[int, int], prompts: int) -> dict[str, float]:
    """Plain forward passes vs the scoring passes (band statistics with early stop, layer curve)."""
    tokenizer_source = next(Path.home().glob(".cache/fgsn/lab/smollm2-*/aligned"), None)
    if tokenizer_source is None:
        raise RuntimeError(
            "no SmolLM2 lab trio to borrow a tokenizer from: run `fgsn lab build --model smollm2`"
        )
    for member in ("base", "aligned", "finetuned"):
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tokenizer_source / f).exists():
                shutil.copyfile(tokenizer_source / f, root / member / f)
    proc = subprocess.run(
        [sys.executable, "-c", SCORING_CHILD, str(REPO), str(root), str(band[0]), str(band[1]), str(prompts)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scoring failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def new_bytes(folder: Path) -> int:
    """Bytes of a version folder's files that are not hard links to another version."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.stat().st_nlink == 1)


def band_bytes(root: Path, band: tuple[int, int]) -> int:
    from fgsn_daemon.engine.pipeline import ModelTrio

    trio = ModelTrio.open(root / "base", root / "aligned", root / "finetuned")
    try:
        names = {
            n
            for layer in range(band[0], band[1] + 1)
            for s in ("mlp", "attn")
            for n, _ in trio.space_tensors(layer, s)
        }
        return sum(trio.finetuned.info(n).nbytes for n in names), max(
            trio.finetuned.info(n).nbytes for n in names
        )
    finally:
        trio.close()


def import_baseline() -> float:
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "import torch, fgsn_daemon.engine.pipeline, fgsn_daemon.service.versions\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)"
    )
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def main() -> None:
    from shapes import write_trio

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["llama-3.2-1b", "qwen2.5-1.5b", "llama-3.1-8b"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--ram-gb", type=float, default=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    )
    ap.add_argument(
        "--scoring-shapes", nargs="*", default=["llama-3.2-1b"], help="shapes whose scoring passes are timed"
    )
    ap.add_argument("--scoring-prompts", type=int, default=32)
    args = ap.parse_args()
    baseline = import_baseline()
    rows = []
    scoring = []
    for name in args.scoring_shapes:
        paths = write_trio(name, args.work, lora=True)
        block = json.loads((paths["base"].parent / ".complete").read_text())["block"]
        scoring.append(
            (name, block, run_scoring(paths["base"].parent, (block[0], block[1]), args.scoring_prompts))
        )
    for name in args.shapes:
        t0 = time.perf_counter()
        paths = write_trio(name, args.work, lora=True)
        generated = time.perf_counter() - t0
        block = json.loads((paths["base"].parent / ".complete").read_text())["block"]
        band = (block[0], block[1])
        model_bytes = sum(f.stat().st_size for f in paths["finetuned"].glob("*.safetensors"))
        band_b, largest = band_bytes(paths["base"].parent, band)
        state = args.work / f"{name}-state"
        shutil.rmtree(state, ignore_errors=True)
        for phase, folder in (("initial", "v0001"), ("dimension1", "v0002"), ("dimension2", "v0003")):
            r = run_phase(phase, paths["base"].parent, state, band)
            r["version_bytes"] = new_bytes(state / "versions" / folder)
            rows.append((name, phase, r))
        lora_state = args.work / f"{name}-lora-state"
        shutil.rmtree(lora_state, ignore_errors=True)
        (lora_state / "versions").mkdir(parents=True)
        # the LoRA fine-tune differs from the full one only inside the band (by construction), so
        # both share the initial version as parent
        os.symlink(state / "versions" / "v0001", lora_state / "versions" / "v0001")
        r = run_phase("lora", paths["base"].parent, lora_state, band)
        r["version_bytes"] = new_bytes(lora_state / "versions" / "v0002")
        rows.append((name, "lora", r))
        if 3 * model_bytes / 1e9 < 0.8 * args.ram_gb:
            r = run_phase("naive", paths["base"].parent, args.work / f"{name}-naive", band)
            r["version_bytes"] = new_bytes(args.work / f"{name}-naive" / "naive")
            rows.append((name, "naive", r))
            shutil.rmtree(args.work / f"{name}-naive", ignore_errors=True)
        else:
            rows.append((name, "naive", None))
        rows.append(
            (
                name,
                "_meta",
                {
                    "model_gb": model_bytes / 1e9,
                    "band_mb": band_b / 1e6,
                    "largest_mb": largest / 1e6,
                    "generated_s": generated,
                    "band": band,
                },
            )
        )
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(lora_state, ignore_errors=True)
    lines = [
        "Command: `python benchmarks/scale.py "
        + " ".join(["--shapes", *args.shapes, "--scoring-shapes", *args.scoring_shapes])
        + " --work <folder>`",
        "",
        f"CPU machine: {os.cpu_count()} cores, {args.ram_gb:.0f} GB RAM; python + torch + fgsn import alone: "
        f"{baseline:.0f} MiB peak RSS (subtracted below).",
        "",
        "| shape | bf16 model | band tensors (largest) | phase | wall s | peak RSS above import | read "
        "| written | version adds on disk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    meta = {n: r for n, p, r in rows if p == "_meta"}
    for name, phase, r in rows:
        if phase == "_meta":
            continue
        m = meta[name]
        sizes = f"{m['model_gb']:.2f} GB | {m['band_mb']:.0f} MB ({m['largest_mb']:.0f} MB)"
        head = f"| {name} | {sizes} | {phase} |"
        if r is None:
            lines.append(head + " does not fit (3 state dicts > 80 % of RAM) | | | | |")
            continue
        lines.append(
            head
            + f" {r['seconds']:.1f} | {r['peak_rss_mib'] - baseline:.0f} MiB | {r['read_mb'] / 1e3:.2f} GB | "
            f"{r['written_mb'] / 1e3:.2f} GB | {r['version_bytes'] / 1e6:.0f} MB "
            f"({r['version_bytes'] / (m['band_mb'] * 1e6):.2f}× band) |"
        )
    if scoring:
        lines += [
            "",
            f"Scoring passes on CPU ({args.scoring_prompts} bundled benign prompts, batches of 8, up to 64 "
            "tokens, float32 compute): plain forward passes of the whole model against the daemon's "
            "two forward-only scoring passes, in tokens per second.",
            "",
            "| shape | band | tokens | plain forward | band statistics (stops after the band) | "
            "layer curve (all layers) |",
            "|---|---|---|---|---|---|",
        ]
        for name, block, r in scoring:
            plain = r["tokens"] / r["plain_s"]
            stats, curve = r["tokens"] / r["band_stats_s"], r["tokens"] / r["curve_s"]
            lines.append(
                f"| {name} | {block[0]}–{block[1]} | {r['tokens']} | {plain:.0f} tok/s | "
                f"{stats:.0f} tok/s ({stats / plain:.2f}×) | {curve:.0f} tok/s ({curve / plain:.2f}×) |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.md").write_text(text)
        (args.out / "scale.json").write_text(
            json.dumps({"rows": rows, "import_mib": baseline}, indent=1, default=str)
        )


if __name__ == "__main__":
    main()
