"""bfloat16 / float16 checkpoints: read, edited and written in their own dtype.

Edits are computed in float64 and rounded once to the checkpoint's dtype; untouched tensors are
copied bit for bit; a trio whose models disagree on a tensor's dtype is refused; a float32 LoRA
adapter over a half-precision model gives fine-tuned weights in the model's dtype.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BENIGN, HARMFUL, cast_checkpoint, make_trio
from safetensors.torch import load_file, save_file

from fgsn_daemon.core.defaults import preset
from fgsn_daemon.core.errors import IncompatibleCheckpointsError
from fgsn_daemon.core.precision import round_to
from fgsn_daemon.core.records import ApplyResult
from fgsn_daemon.engine.pipeline import FGSNParams, ModelTrio, apply_dimension, neuron_slices
from fgsn_daemon.engine.projection import TensorTriple, project_tensor

HALF = [torch.bfloat16, torch.float16]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
ENTRY = {
    "scoring": "attribution",
    "contrast": 0.0,  # the random trio's aligned model refuses nothing
    "operator": "restore",
    "unit": "entry",
    "budget": 2.0,
    "target_tokens": 4,
    "batch_size": 8,
    "max_length": 32,
}


def reference_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> ``dtype`` rounded once (nearest, ties to even), independently of ``round_to``:
    numpy rounds float64 to float16 directly; bfloat16 is float64 with its significand cut to 8
    bits, rounded on the integer bits (valid for normal values, which every weight here is)."""
    if dtype == torch.float16:
        return torch.from_numpy(x.numpy().astype(np.float16))
    assert dtype == torch.bfloat16
    drop = 52 - 7
    bits = x.view(torch.int64)
    half = (1 << (drop - 1)) - 1 + ((bits >> drop) & 1)  # ties go to the even neighbour
    rounded = ((bits + half) >> drop) << drop
    return rounded.view(torch.float64).to(dtype)  # exact: the value is representable


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module", params=HALF, ids=["bf16", "fp16"])
def trio(request, tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp("half"), "llama", dtype=request.param)


def apply(trio: dict[str, Path], out: Path, **params) -> ApplyResult:
    return apply_dimension(
        trio["base"],
        trio["aligned"],
        trio["finetuned"],
        HARMFUL,
        BENIGN,
        out,
        params=FGSNParams(**params),
        device="cpu",
    )


def selected_slices(trio: dict[str, Path], result: ApplyResult) -> dict[str, tuple[int, list[int]]]:
    neurons: dict[tuple[int, str], list[int]] = {}
    for n in result.selected:
        neurons.setdefault((n.layer, n.space), []).append(n.index)
    opened = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    try:
        return neuron_slices(opened, neurons)
    finally:
        opened.close()


def dense_reference(operator: str, ft: torch.Tensor, al: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The operator's new value for *every* neuron, in float64, without blocks."""
    ft64, al64 = ft.double().reshape(ft.shape[0], -1), al.double().reshape(al.shape[0], -1)
    if operator == "restore":
        return al64
    assert operator == "safe_lora"
    v = al64 - base.double().reshape(al64.shape)
    return al64 + (v @ v.T) @ (ft64 - al64) / torch.linalg.norm(v)


# ------------------------------------------------------------------------------------ rounding


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_round_to_rounds_float64_once(dtype):
    """torch goes float64 -> float32 -> half (two roundings); ``round_to`` rounds once."""
    g = torch.Generator().manual_seed(0)
    grid = (0.05 * torch.randn(20_000, generator=g, dtype=torch.float64)).to(dtype)
    upper = (grid.view(torch.int16) + 1).view(dtype)
    mid = (grid.double() + upper.double()) / 2  # exact midpoints between neighbours
    nudge = mid.abs() * 2.0**-35 * torch.randn(mid.shape, generator=g, dtype=torch.float64)
    x = torch.cat(
        [mid, mid + nudge, mid - nudge, 0.05 * torch.randn(20_000, generator=g, dtype=torch.float64)]
    )
    assert same_bits(round_to(x, dtype), reference_round(x, dtype))
    assert not same_bits(x.to(dtype), reference_round(x, dtype))  # the double rounding it avoids
    step = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # spacing of the grid just above 1
    just_above_midpoint = torch.tensor([1 + step / 2 + 2.0**-40], dtype=torch.float64)
    assert float(round_to(just_above_midpoint, dtype)) == 1 + step
    assert float(just_above_midpoint.to(dtype)) == 1.0


def test_round_to_edge_values():
    x = torch.tensor(
        [0.0, -0.0, 1e-50, -1e-50, 1e300, -1e300, float("inf"), float("nan")], dtype=torch.float64
    )
    for dtype in HALF:
        got = round_to(x, dtype).double()
        assert got[:4].tolist() == [0.0] * 4  # underflow keeps the sign
        assert torch.signbit(got[:4]).tolist() == [False, True, False, True]
        assert got[4:7].tolist() == [float("inf"), float("-inf"), float("inf")] and got[7].isnan()
    assert same_bits(round_to(x, torch.float32), x.float())


# ------------------------------------------------------------------------------------ editing


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_projection_rounds_once(dtype, axis):
    """Safe-LoRA on a 1024×512 half-precision triple, every neuron selected: equal to the dense
    float64 result rounded once, on a tensor large enough that rounding twice gets some wrong."""
    g = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(1024, 512, generator=g)).to(dtype)
    al = (base.float() + 0.02 * torch.randn(1024, 512, generator=g)).to(dtype)
    ft = (al.float() + 0.02 * torch.randn(1024, 512, generator=g)).to(dtype)
    out = project_tensor("safe_lora", TensorTriple(ft, al, base), axis, range(ft.shape[axis]))
    dense = dense_reference("safe_lora", ft, al, base)
    assert same_bits(out, reference_round(dense, dtype))
    assert not same_bits(dense.to(dtype), reference_round(dense, dtype))  # the test can tell


@pytest.mark.parametrize("operator", ["restore", "safe_lora"])
def test_neuron_edits_keep_the_dtype_and_round_once(trio, tmp_path, operator):
    params = {**preset("activation"), "q": 20.0, "p": 10.0, "operator": operator}
    result = apply(trio, tmp_path / "out", **params)
    slices = selected_slices(trio, result)
    assert slices and sorted(slices) == result.edited_tensors
    out, ft = load_all(tmp_path / "out"), load_all(trio["finetuned"])
    al, base = load_all(trio["aligned"]), load_all(trio["base"])
    dtype = ft["model.embed_tokens.weight"].dtype
    assert out.keys() == ft.keys() and {t.dtype for t in out.values()} == {dtype}
    for name in out.keys() - slices.keys():
        assert same_bits(out[name], ft[name]), name  # untouched: bit for bit
    for name, (axis, idx) in slices.items():
        dense = dense_reference(operator, ft[name], al[name], base[name])
        expected = ft[name].clone()
        if axis == 0:
            expected[idx] = reference_round(dense[idx], dtype).reshape(expected[idx].shape)
        else:
            expected[:, idx] = reference_round(dense[:, idx], dtype)
        assert same_bits(out[name], expected), name
    assert result.modification.changed_parameters > 0


def test_entry_units_restore_aligned_bits(trio, tmp_path):
    result = apply(trio, tmp_path / "out", **ENTRY)
    out, ft, al = load_all(tmp_path / "out"), load_all(trio["finetuned"]), load_all(trio["aligned"])
    dtype = ft["model.embed_tokens.weight"].dtype
    assert {t.dtype for t in out.values()} == {dtype} and result.edited_tensors
    changed = 0
    for name in out:
        if name not in result.edited_tensors:
            assert same_bits(out[name], ft[name]), name
            continue
        moved = out[name].view(torch.int16) != ft[name].view(torch.int16)
        assert same_bits(out[name][moved], al[name][moved]), name
        changed += int(moved.sum())
    assert changed == result.modification.changed_parameters > 0


# ------------------------------------------------------------------------------------ mixed dtypes


def test_mixed_dtype_trio_is_refused(trio, tmp_path):
    ft32 = tmp_path / "ft32"
    shutil.copytree(trio["finetuned"], ft32)
    cast_checkpoint(ft32, torch.float32)
    dtype = load_all(trio["base"])["model.norm.weight"].dtype
    half = {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    with pytest.raises(IncompatibleCheckpointsError) as err:
        ModelTrio.open(trio["base"], trio["aligned"], ft32)
    message = str(err.value)
    assert f"model.embed_tokens.weight: dtype {half} in base, F32 in finetuned" in message
    assert "more tensors whose dtype differs in finetuned" in message and "one dtype" in message
    out = tmp_path / "out"
    with pytest.raises(IncompatibleCheckpointsError, match=f"dtype {half} in base, F32 in finetuned"):
        apply({**trio, "finetuned": ft32}, out, **preset("activation"))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".staging" in p.name]


def make_fp32_adapter(
    trio: dict[str, Path], out: Path, rank: int = 4, alpha: float = 8.0
) -> dict[str, torch.Tensor]:
    """A float32 PEFT adapter over the (half-precision) aligned model; returns, per target, the
    merge in float64 (not yet rounded)."""
    out.mkdir()
    aligned = load_all(trio["aligned"])
    g = torch.Generator().manual_seed(5)
    adapter, merged = {}, {}
    for name in [n for n in aligned if n.endswith(("q_proj.weight", "up_proj.weight", "down_proj.weight"))]:
        d_out, d_in = aligned[name].shape
        a, b = 0.1 * torch.randn(rank, d_in, generator=g), 0.1 * torch.randn(d_out, rank, generator=g)
        module = name.removesuffix(".weight")
        adapter[f"base_model.model.{module}.lora_A.weight"] = a
        adapter[f"base_model.model.{module}.lora_B.weight"] = b
        merged[name] = aligned[name].double() + (alpha / rank) * (b.double() @ a.double())
    save_file(adapter, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "up_proj", "down_proj"],
    }
    (out / "adapter_config.json").write_text(json.dumps(config))
    return merged


def test_fp32_lora_over_half_model_merges_in_the_model_dtype(trio, tmp_path):
    merged = make_fp32_adapter(trio, tmp_path / "adapter")
    lora = {**trio, "finetuned": tmp_path / "adapter"}
    params = {**preset("activation"), "q": 20.0, "p": 10.0, "score_model": "finetuned"}
    result = apply(lora, tmp_path / "out", **params)
    slices = selected_slices(lora, result)
    out, al = load_all(tmp_path / "out"), load_all(trio["aligned"])
    dtype = al["model.embed_tokens.weight"].dtype
    assert {t.dtype for t in out.values()} == {dtype}
    for name in out:
        rounded_merge = reference_round(merged[name], dtype) if name in merged else al[name]
        expected = rounded_merge.clone()
        axis, idx = slices.get(name, (0, []))
        if idx and axis == 0:
            expected[idx] = al[name][idx]  # restore: the selected neurons take the aligned bits
        elif idx:
            expected[:, idx] = al[name][:, idx]
        assert same_bits(out[name], expected), name
    assert any(name in merged for name in slices)


def test_lora_merge_is_rounded_once(trio, tmp_path):
    """An adapter whose merge lies just above a half-precision midpoint: rounding through float32
    would land on the midpoint and tie to even; the merge must round up."""
    name = "model.layers.0.self_attn.q_proj.weight"
    w = load_all(trio["aligned"])[name]
    dtype = w.dtype
    flat = w.flatten()
    i = next(
        k for k in range(flat.numel()) if flat[k] > 0 and int(flat[k : k + 1].view(torch.int16)) % 2 == 0
    )
    row, col = divmod(i, w.shape[1])
    up = (flat[i : i + 1].view(torch.int16) + 1).view(dtype)
    half_step = (up.double() - flat[i].double()) / 2
    b = torch.zeros(w.shape[0], 1)
    a = torch.zeros(1, w.shape[1])
    b[row, 0], a[0, col] = float(half_step * (1 + 2.0**-20)), 1.0  # exact in float32
    out = tmp_path / "adapter"
    out.mkdir()
    module = "base_model.model." + name.removesuffix(".weight")
    save_file(
        {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}, str(out / "adapter_model.safetensors")
    )
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    opened = ModelTrio.open(trio["base"], trio["aligned"], out)
    try:
        merged = opened.finetuned.read(name)
        exact = w[row, col].double() + float(b[row, 0])
        assert merged.dtype == dtype and same_bits(merged[row, col], up[0])
        assert same_bits(merged[row, col], reference_round(exact.reshape(1), dtype)[0])
        assert not same_bits(exact.to(dtype), up[0])  # what a plain ``.to(dtype)`` would give
        assert same_bits(opened.finetuned.read_rows(name, [row])[0], merged[row])
        merged[row, col] = w[row, col]
        assert same_bits(merged, w)  # every other entry is the aligned one
    finally:
        opened.close()


# ------------------------------------------------------------------------------------ daemon

SAFE_LORA_PARAMS = 'preset = "activation"\noperator = "safe_lora"\n'


@pytest.mark.slow
@pytest.mark.parametrize("params", ["safe_lora", "entry"])
def test_daemon_rollback_is_bit_identical_in_bf16(tmp_path, params):
    """Two dimensions applied by ``fgsn run --once``, the first rolled back: the published bf16
    checkpoint equals, bit for bit, a from-scratch run with only the second."""
    from test_daemon import ENTRY_PARAMS, current_tensors, fgsn, run_once

    extra = SAFE_LORA_PARAMS if params == "safe_lora" else ENTRY_PARAMS

    trio = make_trio(tmp_path / "trio", "llama", dtype=torch.bfloat16)
    scratch, scratch_state = run_once(tmp_path, trio, ["c_drugs"], "scratch", extra_params=extra)
    assert scratch.returncode == 0, scratch.stderr
    both, state = run_once(tmp_path, trio, ["a_cyber", "c_drugs"], "state", extra_params=extra)
    assert both.returncode == 0, both.stderr
    ft, now = load_all(trio["finetuned"]), current_tensors(state)
    assert now.keys() == ft.keys() and {t.dtype for t in now.values()} == {torch.bfloat16}
    assert any(not same_bits(now[k], ft[k]) for k in now)

    rolled = fgsn("rollback", "a_cyber", "--config", str(tmp_path / "fgsn-state.toml"))
    assert rolled.returncode == 0, rolled.stderr
    after, expected = current_tensors(state), current_tensors(scratch_state)
    assert any(not same_bits(after[k], now[k]) for k in now)  # the rollback changed something
    assert after.keys() == expected.keys()
    assert all(same_bits(after[k], expected[k]) for k in after)


def test_lora_merge_in_fixed_row_blocks_reads_the_same_rows_either_way(trio, tmp_path, monkeypatch):
    """The merge runs in fixed blocks of ``MERGE_ROWS`` rows to bound its float64 scratch. With a
    block size that leaves a short last block, every row is still the float64 sum rounded once,
    and ``read_rows`` (rows from several blocks, the short one included, in any order) gives the
    very bits ``read`` gives."""
    from fgsn_daemon.engine.io import checkpoint

    merged = make_fp32_adapter(trio, tmp_path / "adapter")
    monkeypatch.setattr(checkpoint, "MERGE_ROWS", 7)
    opened = ModelTrio.open(trio["base"], trio["aligned"], tmp_path / "adapter")
    try:
        dtype = load_all(trio["aligned"])["model.embed_tokens.weight"].dtype
        for n in sorted(merged):
            blocked = opened.finetuned.read(n)
            n_rows = blocked.shape[0]
            assert n_rows > 7 and n_rows % 7 != 0, n  # several blocks and a short last one
            assert same_bits(blocked, reference_round(merged[n], dtype)), n
            rows = [n_rows - 1, 0, 8, 3, 8]
            assert same_bits(opened.finetuned.read_rows(n, rows), blocked[rows]), n
            assert opened.finetuned.read_rows(n, []).shape == (0, blocked.shape[1])
            with pytest.raises(IndexError, match="row outside"):
                opened.finetuned.read_rows(n, [n_rows])
    finally:
        opened.close()
