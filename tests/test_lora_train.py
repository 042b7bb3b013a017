"""The lab's LoRA fine-tuning: wrapping, training only the adapter, merging, PEFT export."""

from __future__ import annotations

import pytest
import torch

from fgsn_daemon.core.errors import FGSNError
from fgsn_daemon.engine.io.checkpoint import Checkpoint, open_finetuned
from fgsn_daemon.lab.lora_train import attach_lora, merge_lora, save_peft_adapter
from tests.helpers import make_model

TARGETS = ("q_proj", "v_proj", "gate_proj", "down_proj")


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def train_a_little(model, steps: int = 3) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(4, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture
def aligned(tmp_path):
    make_model("llama", tmp_path / "aligned", seed=3)
    return tmp_path / "aligned"


def test_only_the_adapter_trains_and_merge_keeps_the_function(aligned):
    model = load(aligned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = attach_lora(model, TARGETS, rank=4, alpha=8.0, seed=0)
    assert len(wrapped) == 4 * len(TARGETS)  # 4 layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    ids = torch.randint(4, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        at_start = model(input_ids=ids).logits
    train_a_little(model)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, at_start)  # B moved off zero
    base_weights = {f"{p}.base.weight" for p in wrapped}
    for name, value in model.state_dict().items():
        if name in base_weights:
            key = name.replace(".base.weight", ".weight")
            assert torch.equal(value, before[key]), f"{key} changed under LoRA"
    merge_lora(model, wrapped)
    assert set(model.state_dict()) == set(before)  # plain layers are back
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    changed = {k for k in before if not torch.equal(model.state_dict()[k], before[k])}
    assert changed == {f"{p}.weight" for p in wrapped}


def test_peft_export_reads_back_as_the_merged_weights(aligned, tmp_path):
    model = load(aligned)
    wrapped = attach_lora(model, TARGETS, rank=4, alpha=8.0, seed=0)
    train_a_little(model)
    save_peft_adapter(wrapped, 4, 8.0, TARGETS, tmp_path / "adapter")
    merge_lora(model, wrapped)
    merged = model.state_dict()
    reader = open_finetuned(tmp_path / "adapter", Checkpoint(aligned))
    assert set(reader.modules) == {f"{p}.weight" for p in wrapped}
    for name in reader.names():
        torch.testing.assert_close(reader.read(name), merged[name], rtol=0, atol=1e-6)
    reader.close()


def test_bad_lora_settings_are_refused(aligned):
    model = load(aligned)
    with pytest.raises(FGSNError, match="rank"):
        attach_lora(model, TARGETS, rank=0, alpha=8.0, seed=0)
    with pytest.raises(FGSNError, match="no nn"):
        attach_lora(model, ("nonexistent_proj",), rank=4, alpha=8.0, seed=0)
