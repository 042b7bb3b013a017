"""Delta attribution: hook sums equal the full gradient, and the first-order prediction agrees with
the loss change of an explicit revert."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import BENIGN, HARMFUL, make_trio

from fgsn_daemon.core.prompts import spread
from fgsn_daemon.engine.activations import load_model, load_tokenizer
from fgsn_daemon.engine.attribution import delta_effects, encode_targets
from fgsn_daemon.engine.io.checkpoint import Checkpoint

RESPONSES = ["i do not help", "tell story about cats", "plan trip", "sum numbers", "write poem"] * 2


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trio(request, tmp_path_factory) -> dict[str, Path]:
    return make_trio(tmp_path_factory.mktemp(f"attr-{request.param}"), request.param)


def revert_deltas(trio: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    al, ft = Checkpoint(trio["aligned"]), Checkpoint(trio["finetuned"])
    try:
        return {n: (al.read(n).double() - ft.read(n).double()).float() for n in names}
    finally:
        al.close()
        ft.close()


def scored_names(trio: dict[str, Path]) -> list[str]:
    ck = Checkpoint(trio["aligned"])
    try:
        return [
            n
            for n in ck.names()
            if n.startswith("model.layers.") and (n.endswith("proj.weight") or n.endswith("proj.bias"))
        ]
    finally:
        ck.close()


def mean_nll(model, tokenizer, prompts, responses) -> float:
    """The loss ``delta_effects`` differentiates, computed directly (float64 model)."""
    total = 0.0
    encoded = encode_targets(tokenizer, prompts, responses, 64)
    for ids, n_prompt in encoded:
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1].double()
        target = x[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        total += float(nll[n_prompt - 1 :].sum())
    return total / len(encoded)


def test_hook_sums_equal_the_full_gradient(trio):
    model = load_model(trio["finetuned"], torch.device("cpu"), dtype=torch.float64)
    tok = load_tokenizer(trio["finetuned"])
    names = scored_names(trio)
    deltas = revert_deltas(trio, names)
    eff = delta_effects(model, tok, HARMFUL, RESPONSES, deltas, entries=True, batch_size=3, max_length=64)
    # reference: autograd on the weights themselves, with the same loss
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    loss = torch.zeros((), dtype=torch.float64)
    for ids, n_prompt in encode_targets(tok, HARMFUL, RESPONSES, 64):
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1]
        loss = (
            loss + torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")[n_prompt - 1 :].sum()
        )
    (loss / len(HARMFUL)).backward()
    assert eff.loss == pytest.approx(float(loss.detach()) / len(HARMFUL), rel=1e-5)
    for n in names:
        ref = (params[n].grad * deltas[n].double()).float()
        scale = float(ref.abs().max()) + 1e-12
        if ref.dim() == 2:
            torch.testing.assert_close(eff.entries[n], ref, atol=1e-5 * scale, rtol=1e-4)
            torch.testing.assert_close(eff.cols[n].float(), ref.sum(0), atol=1e-4 * scale, rtol=1e-4)
        torch.testing.assert_close(
            eff.rows[n].float(), ref.sum(-1) if ref.dim() == 2 else ref, atol=1e-4 * scale, rtol=1e-4
        )


def test_first_order_prediction_matches_an_explicit_revert(trio):
    """Revert the top units one at a time: the predicted and real loss changes agree in sign, and
    the ranking of the predicted top units is the real ranking (Spearman-like check on the top)."""
    model = load_model(trio["finetuned"], torch.device("cpu"), dtype=torch.float64)
    tok = load_tokenizer(trio["finetuned"])
    names = [n for n in scored_names(trio) if n.endswith("mlp.gate_proj.weight")]
    deltas = revert_deltas(trio, names)
    eff = delta_effects(model, tok, BENIGN, RESPONSES, deltas, batch_size=4, max_length=64)
    base_loss = mean_nll(model, tok, BENIGN, RESPONSES)
    params = dict(model.named_parameters())
    units = [(n, i, float(eff.rows[n][i])) for n in names for i in range(eff.rows[n].shape[0])]
    top = sorted(units, key=lambda u: -abs(u[2]))[:8]
    predicted, real = [], []
    for name, row, pred in top:
        w = params[name]
        saved = w.data[row].clone()
        w.data[row] += deltas[name][row].double()
        real.append(mean_nll(model, tok, BENIGN, RESPONSES) - base_loss)
        w.data[row] = saved
        predicted.append(pred)
    signs = sum((p > 0) == (r > 0) for p, r in zip(predicted, real, strict=True))
    assert signs >= 7, (predicted, real)
    # the largest predicted effect is among the two largest real ones
    order_real = sorted(range(len(real)), key=lambda i: -abs(real[i]))
    assert 0 in order_real[:2], (predicted, real)
    # and the whole delta's first-order effect has the sign of the real change of reverting it all
    for name in names:
        params[name].data += deltas[name].double()
    whole = mean_nll(model, tok, BENIGN, RESPONSES) - base_loss
    assert (eff.total() > 0) == (whole > 0)


def test_mismatched_targets_are_refused(trio):
    tok = load_tokenizer(trio["finetuned"])
    with pytest.raises(Exception, match="prompts but"):
        encode_targets(tok, HARMFUL, RESPONSES[:3], 64)


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(folder)
    try:
        return {n: ck.read(n) for n in ck.names()}
    finally:
        ck.close()


@pytest.mark.parametrize("steps", [1, 2], ids=["one-shot", "iterative"])
def test_apply_with_entry_units_restores_only_selected_entries(trio, tmp_path, steps):
    from fgsn_daemon.engine.pipeline import FGSNParams, apply_dimension

    params = FGSNParams(
        scoring="attribution",
        operator="restore",
        unit="entry",
        allocation="global",
        budget=1.0,
        batch_size=4,
        steps=steps,
        contrast=0.0,  # the random trio's aligned model refuses nothing: no refusal to contrast
    )
    result = apply_dimension(
        trio["base"],
        trio["aligned"],
        trio["finetuned"],
        HARMFUL,
        BENIGN,
        tmp_path / "out",
        params,
        device="cpu",
    )
    out, ft, al = read_all(tmp_path / "out"), read_all(trio["finetuned"]), read_all(trio["aligned"])
    changed = 0
    for name, t in out.items():
        diff = t != ft[name]
        changed += int(diff.sum())
        # every changed entry now holds its aligned value
        assert torch.equal(t[diff], al[name][diff])
    total = sum(t.numel() for t in ft.values())
    assert 0 < changed <= total // 100
    assert result.modification.modified_parameters == changed
    assert result.params.unit == "entry" and result.params.steps == steps and result.selected
    if steps == 1:  # iterative records carry one-shot effects, which later steps may not share
        assert all(n.harmful_score > 0 for n in result.selected)


def test_apply_with_a_global_budget_spends_at_most_the_budget_over_all_layers(trio, tmp_path):
    from fgsn_daemon.engine.pipeline import FGSNParams, apply_dimension

    params = FGSNParams(
        scoring="attribution", operator="restore", allocation="global", budget=5.0, p=0.0, contrast=0.0
    )
    result = apply_dimension(
        trio["base"], trio["aligned"], trio["finetuned"], HARMFUL, BENIGN, None, params, device="cpu"
    )
    assert 0 < result.modification.ratio <= 0.05
    # candidates are ranked by gain per parameter and all have a positive gain
    assert all(c.harmful_score > 0 for c in result.candidates)
    assert [c.harmful_rank for c in result.candidates] == list(range(len(result.candidates)))


def test_attribution_settings_are_validated():
    from fgsn_daemon.core.errors import ConfigError
    from fgsn_daemon.engine.pipeline import FGSNParams

    # allocation and unit belong to attribution: an activation scoring selects neurons per layer
    assert FGSNParams(scoring="contrast", allocation="global", unit="entry").allocation == "per_layer"
    with pytest.raises(ConfigError, match="restore"):
        FGSNParams(scoring="attribution", unit="entry", operator="safe_lora").validate()
    with pytest.raises(ConfigError, match="budget"):
        FGSNParams(scoring="attribution", allocation="global", budget=0).validate()


def test_benign_refusal_targets_pair_benign_prompts_with_the_aligned_refusals_round_robin():
    from fgsn_daemon.core.errors import FGSNError
    from fgsn_daemon.engine.pipeline import benign_refusal_targets

    harmful = ["h1", "h2", "h3"]
    responses = ["I'm sorry, but I can't help with that.", "Sure, here is how", "I cannot assist with this."]
    pairs = benign_refusal_targets(["b1", "b2", "b3"], harmful, responses)
    assert pairs == [("b1", responses[0]), ("b2", responses[2]), ("b3", responses[0])]
    with pytest.raises(FGSNError, match="refused none"):
        benign_refusal_targets(["b1"], ["h1"], ["Sure, here is how"])


def test_a_refusal_contrast_without_any_aligned_refusal_is_a_clear_error(trio, tmp_path):
    """The random trio's aligned model never refuses: the contrast has nothing to contrast with."""
    from fgsn_daemon.core.errors import FGSNError
    from fgsn_daemon.engine.pipeline import FGSNParams, apply_dimension

    params = FGSNParams(
        scoring="attribution", operator="restore", unit="entry", budget=1.0, contrast=1.0, batch_size=4
    )
    with pytest.raises(FGSNError, match="contrast = 0"):
        apply_dimension(
            trio["base"], trio["aligned"], trio["finetuned"], HARMFUL, BENIGN, None, params, device="cpu"
        )
    with pytest.raises(Exception, match="contrast"):
        FGSNParams(scoring="attribution", contrast=-1.0).validate()


def test_iterative_entry_selection_starts_with_the_one_shot_step_and_spends_the_budget(trio):
    """Step 1 of an iterative run is the one-shot selection at budget/steps; later steps re-score at
    the edited weights, add only new entries, and the whole run is deterministic."""
    from dataclasses import replace

    from fgsn_daemon.core.errors import ConfigError
    from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio

    params = FGSNParams(
        scoring="attribution",
        operator="restore",
        unit="entry",
        budget=1.0,
        target_tokens=4,
        batch_size=4,
        contrast=0.0,
    )
    opened = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    try:
        loc = Localiser(opened, replace(params, budget=0.5), torch.device("cpu"), BENIGN)
        half = loc.localise_entries(HARMFUL)
        loc.params = replace(params, steps=2)
        runs = [loc.localise_entries(HARMFUL) for _ in range(2)]
    finally:
        opened.close()
    total = sum(m.numel() for m in runs[0].values())
    chosen = sum(int(m.sum()) for m in runs[0].values())
    assert chosen == int(opened.aligned.total_parameters() * 0.01) and chosen <= total
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])  # deterministic
    assert all(bool((half[n] <= runs[0][n]).all()) for n in half)  # step 1 = one shot at budget/2
    # the second step chose on new effects: not simply the one-shot ranking's next entries
    loc2 = Localiser(
        ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"]), params, torch.device("cpu"), BENIGN
    )
    try:
        one_shot = loc2.localise_entries(HARMFUL)
    finally:
        loc2.trio.close()
    assert any(not torch.equal(one_shot[n], runs[0][n]) for n in one_shot)
    with pytest.raises(ConfigError, match="steps"):
        FGSNParams(scoring="attribution", unit="neuron", steps=2).validate()


def test_contrast_penalty_of_each_kind():
    from fgsn_daemon.engine.attribution import DeltaEffects
    from fgsn_daemon.engine.pipeline import contrast_penalty

    refusal = DeltaEffects(entries={"w": torch.tensor([[-2.0, 1.0]])})  # reverting lowers refusal NLL: -2
    answers = DeltaEffects(entries={"w": torch.tensor([[0.5, -0.5]])})  # ... and raises the answer's: +0.5
    assert contrast_penalty(None, answers, ["w"], "refusal") is None
    assert contrast_penalty(refusal, answers, ["w"], "refusal")["w"].tolist() == [[2.0, -1.0]]
    assert contrast_penalty(refusal, answers, ["w"], "odds")["w"].tolist() == [[2.5, -1.5]]


def test_a_refusal_reference_makes_the_contrast_a_lineage_cost(trio, monkeypatch):
    """With a per-lineage reference set, every dimension's contrast uses the reference's refusals
    as targets and the backward passes run once; without one, each dimension uses its own."""
    from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio

    params = FGSNParams(
        scoring="attribution", operator="restore", unit="entry", budget=1.0, contrast=1.0, batch_size=4
    )
    reference = ["reference prompt one", "reference prompt two"]
    refusal = "i can not help with that"
    models = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    loc = Localiser(models, params, torch.device("cpu"), BENIGN, refusal_reference=reference)
    # the random aligned model never refuses: its answers to the reference set are given
    loc._refusals[tuple(reference)] = [refusal, refusal]
    calls: list[list[str]] = []
    real = loc.benign_refusal_effects

    def spy(prompts, names, deltas=None):
        calls.append(list(prompts))
        return real(prompts, names, deltas)

    monkeypatch.setattr(loc, "benign_refusal_effects", spy)
    names = sorted(loc.scored_tensors(loc.attribution_layers()))
    first = loc.contrast_effects(HARMFUL[:3], names)
    second = loc.contrast_effects(HARMFUL[3:], names)
    assert calls == [reference] and first is second
    loc.refusal_reference = None
    loc._refusals[tuple(HARMFUL[:3])] = [refusal] * 3
    loc.contrast_effects(HARMFUL[:3], names)
    assert calls[-1] == HARMFUL[:3]
    models.close()


def test_hard_negative_rounds_penalise_the_entries_behind_calibration_refusals(trio, monkeypatch):
    """The random model never refuses, so the judge is told which calibration prompts it refuses:
    the rounds then run, move the selection away from the entries that drive those answers, spend
    the same budget, and give the same masks every time (rollback stays exact)."""
    from fgsn_daemon.engine import refusal
    from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio

    def judge(self, prompts, answers):  # every other calibration prompt counts as refused
        return [i % 2 == 0 for i in range(len(prompts))]

    monkeypatch.setattr(refusal.KeywordJudge, "judge", judge)
    base = FGSNParams(
        scoring="attribution", operator="restore", unit="entry", budget=2.0, contrast=0.0, hard_target=None
    )
    models = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    one_shot = Localiser(models, base, torch.device("cpu"), BENIGN).localise_entries(HARMFUL)
    runs = []
    for _ in range(2):
        hard = replace(base, hard_rounds=2, hard_weight=50.0)
        loc = Localiser(models, hard, torch.device("cpu"), BENIGN)
        runs.append(loc.localise_entries(HARMFUL))
        assert [t["round"] for t in loc.hard_trace] == [1, 2]
        assert all(t["refused"] == (len(BENIGN) + 1) // 2 for t in loc.hard_trace)
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    spent = [sum(int(m.sum()) for m in masks.values()) for masks in (one_shot, runs[0])]
    assert spent[0] == spent[1] > 0
    moved = sum(int((one_shot[n] & ~runs[0][n]).sum()) for n in one_shot)
    assert moved > 0
    # hard positives: the harmful prompts the edit still answers (the judge above: every other
    # one) raise the gain of the entries behind their refusals, in the same rounds
    boosted = replace(base, hard_rounds=1, hard_weight=50.0, hard_positive_weight=1.0)
    loc = Localiser(models, boosted, torch.device("cpu"), BENIGN)
    with_positives = loc.localise_entries(HARMFUL)
    assert (loc.hard_trace[0]["complied"], loc.hard_trace[0]["harmful"]) == (len(HARMFUL) // 2, len(HARMFUL))
    assert sum(int(m.sum()) for m in with_positives.values()) == spent[0]
    hard_only = replace(base, hard_rounds=1, hard_weight=50.0)
    plain = Localiser(models, hard_only, torch.device("cpu"), BENIGN).localise_entries(HARMFUL)
    assert any(not torch.equal(with_positives[n], plain[n]) for n in plain)
    # a large calibration set is spread down to calibration_max prompts per round
    capped = replace(base, hard_rounds=1, hard_weight=50.0, calibration_max=3)
    loc = Localiser(models, capped, torch.device("cpu"), BENIGN)
    loc.localise_entries(HARMFUL)
    assert len(BENIGN) > 3 and [t["prompts"] for t in loc.hard_trace] == [3]
    # one-shot entry units only: other units and iterative steps leave them out
    assert replace(base, hard_rounds=1, unit="neuron").hard_rounds == 0
    assert replace(base, hard_rounds=1, steps=2).hard_rounds == 0
    models.close()


def test_hard_rounds_at_the_edited_weights_take_their_gradient_there(trio, monkeypatch):
    """``hard_at = "edited"``: the hard-negative penalty is the first-order effect at the round's
    edited weights (the one-shot entries restored), equal to autograd on a float64 model set to
    those weights; it is not the effect at the fine-tuned weights, and the model is left
    fine-tuned afterwards."""
    from fgsn_daemon.engine import delta_selection, refusal
    from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio, restore_entries

    refused: list[tuple[str, str]] = []

    def judge(self, prompts, answers):  # every other calibration prompt counts as refused
        refused[:] = [(p, a) for i, (p, a) in enumerate(zip(prompts, answers, strict=True)) if i % 2 == 0]
        return [i % 2 == 0 for i in range(len(prompts))]

    calls: list[tuple[Any, dict[str, torch.Tensor]]] = []
    select = delta_selection.select_entries

    def spy(gain, cost, budget, p, penalty=None, contrast=0.0):
        masks = select(gain, cost, budget, p, penalty, contrast)
        calls.append((penalty, masks))
        return masks

    monkeypatch.setattr(refusal.KeywordJudge, "judge", judge)
    monkeypatch.setattr(delta_selection, "select_entries", spy)
    models = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    base = FGSNParams(
        scoring="attribution", operator="restore", unit="entry", budget=2.0, contrast=0.0, hard_target=None
    )
    penalties = {}
    for where in ("finetuned", "edited"):
        calls.clear()
        loc = Localiser(
            models, replace(base, hard_rounds=1, hard_weight=2.0, hard_at=where), torch.device("cpu"), BENIGN
        )
        loc.localise_entries(HARMFUL)
        (_, first), (penalties[where], _) = calls
    names = sorted(penalties["edited"])
    # the model the rounds moved is back at the fine-tuned weights
    ft = Checkpoint(trio["finetuned"])
    params = dict(loc._finetuned().named_parameters())
    assert all(torch.equal(params[n].detach(), ft.read(n).to(params[n].dtype)) for n in names)
    ft.close()
    # reference: autograd at the edited weights, in float64
    model = load_model(trio["finetuned"], torch.device("cpu"), dtype=torch.float64)
    tok = load_tokenizer(trio["finetuned"])
    deltas = revert_deltas(trio, names)
    al = Checkpoint(trio["aligned"])
    ref_params = dict(model.named_parameters())
    with torch.no_grad():
        for n, mask in first.items():
            ref_params[n].copy_(restore_entries(ref_params[n], al.read(n).double(), mask))
    al.close()
    for q in model.parameters():
        q.requires_grad_(False)
    for n in names:
        ref_params[n].requires_grad_(True)
    loss = torch.zeros((), dtype=torch.float64)
    prompts, words = [p for p, _ in refused], [a for _, a in refused]
    # (the tiny tokenizer can encode a prompt to no token: then every response token is a target)
    for ids, n_prompt in encode_targets(tok, prompts, words, base.max_length):
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1]
        loss = (
            loss
            + torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")[
                max(n_prompt - 1, 0) :
            ].sum()
        )
    (loss / len(prompts)).backward()
    far = 0.0
    for n in names:
        expected = -2.0 * (ref_params[n].grad * deltas[n].double()).float()
        scale = float(expected.abs().max()) + 1e-12
        torch.testing.assert_close(penalties["edited"][n], expected, atol=1e-4 * scale, rtol=1e-3)
        far = max(far, float((penalties["finetuned"][n] - expected).abs().max()) / scale)
    assert far > 1e-2  # the fine-tuned weights' effect is another quantity
    models.close()


def test_a_calibrated_hard_weight_equals_the_fixed_weight_it_finds(trio, monkeypatch):
    """``hard_target``: the limit is the fine-tuned model's calibration refusal plus the target; a
    round over it searches the weight with real edits and generations (the search is told a rate
    that passes from weight 0.3 on), and the masks equal a fixed-weight run at the weight found. A
    round already within the limit, or a hard weight of 0, changes nothing; the model is left at its
    fine-tuned weights. (With contrast 0, the first judged answers are the fine-tuned model's.)"""
    from fgsn_daemon.engine import delta_selection, refusal
    from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio

    calls = {"n": 0}
    refuses_at_first = {"flag": False}

    def judge(self, prompts, answers):  # the fine-tuned model (first call) refuses nothing
        calls["n"] += 1
        if calls["n"] == 1 and not refuses_at_first["flag"]:
            return [False] * len(prompts)
        return [i % 2 == 0 for i in range(len(prompts))]

    searched: list[float] = []
    nothing_helps = {"flag": False}
    real_search = delta_selection.calibrated_weight

    def search(rate_at, start, limit, **kw):
        def told(w):
            searched.append(w)
            before = calls["n"]
            rate_at(w)  # a real edit, generation and judgement per weight
            assert calls["n"] == before + 1
            if nothing_helps["flag"]:
                return 0.9
            return 0.0 if w >= 0.3 else 0.5

        return real_search(told, start, limit, **kw)

    monkeypatch.setattr(refusal.KeywordJudge, "judge", judge)
    monkeypatch.setattr(delta_selection, "calibrated_weight", search)
    models = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    base = FGSNParams(
        scoring="attribution",
        operator="restore",
        unit="entry",
        budget=2.0,
        contrast=0.0,
        hard_rounds=0,
        hard_weight=0.05,
        hard_target=None,
    )
    loc = Localiser(models, replace(base, hard_rounds=1, hard_target=10.0), torch.device("cpu"), BENIGN)
    calibrated = loc.localise_entries(HARMFUL)
    (trace,) = loc.hard_trace
    assert trace["limit"] == pytest.approx(0.10)
    assert [w for w, _ in trace["search"]] == pytest.approx(searched)
    assert searched[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    found = trace["weight"]
    assert 0.3 <= found <= 0.3 * 2**0.25 and found in searched and trace["within"]
    ft = Checkpoint(trio["finetuned"])
    params = dict(loc._finetuned().named_parameters())
    assert all(torch.equal(params[n].detach(), ft.read(n).to(params[n].dtype)) for n in calibrated)
    ft.close()
    calls["n"], refuses_at_first["flag"] = 0, True
    fixed = Localiser(models, replace(base, hard_rounds=1, hard_weight=found), torch.device("cpu"), BENIGN)
    at_found = fixed.localise_entries(HARMFUL)
    assert all(torch.equal(calibrated[n], at_found[n]) for n in calibrated)
    one_shot = Localiser(models, base, torch.device("cpu"), BENIGN).localise_entries(HARMFUL)
    assert any(not torch.equal(calibrated[n], one_shot[n]) for n in one_shot)
    # within the limit (the fine-tuned model refuses as often as the edit): no search, no change
    calls["n"], searched[:] = 0, []
    loc = Localiser(models, replace(base, hard_rounds=2, hard_target=0.0), torch.device("cpu"), BENIGN)
    within = loc.localise_entries(HARMFUL)
    assert searched == [] and len(loc.hard_trace) == 1 and "weight" not in loc.hard_trace[0]
    assert all(torch.equal(within[n], one_shot[n]) for n in one_shot)
    # no weight gets within the target and every one refuses more than the round's own edit: keep it
    calls["n"], refuses_at_first["flag"], nothing_helps["flag"] = 0, False, True
    loc = Localiser(models, replace(base, hard_rounds=2, hard_target=1.0), torch.device("cpu"), BENIGN)
    kept = loc.localise_entries(HARMFUL)
    assert len(loc.hard_trace) == 1 and loc.hard_trace[0]["kept"] and not loc.hard_trace[0]["within"]
    assert len(searched) == 7 and all(torch.equal(kept[n], one_shot[n]) for n in one_shot)
    calls["n"], searched[:] = 0, []
    loc = Localiser(
        models, replace(base, hard_rounds=1, hard_target=1.0, hard_weight=0.0), torch.device("cpu"), BENIGN
    )
    unweighted = loc.localise_entries(HARMFUL)
    assert searched == [] and loc.hard_trace[0]["refused"] > 0
    assert all(torch.equal(unweighted[n], one_shot[n]) for n in one_shot)
    models.close()


def test_a_later_hard_round_reuses_the_answers_its_weight_search_made(trio, monkeypatch):
    """With a calibrated weight, the search already answered the calibration prompts at the edit
    the next round starts from: the second round judges those answers instead of generating them
    again, so two rounds cost one round plus the second round's search."""
    from fgsn_daemon.engine import delta_selection, evaluation, refusal
    from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio

    judged = {"n": 0}

    def judge(self, prompts, answers):  # the fine-tuned model (first call) refuses nothing, every
        judged["n"] += 1  # edit every other prompt: each round is over the limit
        return [judged["n"] > 1 and i % 2 == 0 for i in range(len(prompts))]

    searched: list[float] = []
    real_search, real_generate = delta_selection.calibrated_weight, evaluation.generate_responses

    def search(rate_at, start, limit, **kw):
        def told(w):
            searched.append(w)
            rate_at(w)
            return 0.0 if w >= 0.3 else 0.5

        return real_search(told, start, limit, **kw)

    generated: list[list[str]] = []

    def generate(model, tokenizer, prompts, *args, **kw):
        generated.append(list(prompts))
        return real_generate(model, tokenizer, prompts, *args, **kw)

    monkeypatch.setattr(refusal.KeywordJudge, "judge", judge)
    monkeypatch.setattr(delta_selection, "calibrated_weight", search)
    monkeypatch.setattr(evaluation, "generate_responses", generate)
    models = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    params = FGSNParams(
        scoring="attribution", operator="restore", unit="entry", budget=2.0, contrast=0.0, hard_weight=0.05
    )
    calibration = spread(BENIGN, params.calibration_max)
    runs = {}
    for rounds in (1, 2):
        generated.clear()
        searched.clear()
        judged["n"] = 0
        setting = replace(params, hard_rounds=rounds, hard_target=10.0)
        loc = Localiser(models, setting, torch.device("cpu"), BENIGN)
        loc.localise_entries(HARMFUL)
        assert len(loc.hard_trace) == rounds and all("weight" in t for t in loc.hard_trace)
        runs[rounds] = (sum(g == calibration for g in generated), len(searched))
    (one_round, searched_once), (two_rounds, searched_twice) = runs[1], runs[2]
    assert searched_twice > searched_once > 0
    assert two_rounds == one_round + (searched_twice - searched_once)
    models.close()


def test_the_refusal_contrast_can_be_measured_on_other_benign_prompts(trio, monkeypatch):
    """``benign_refusal_effects(benign_prompts=…)`` (the harness's ``--contrast-prompts``, e.g.
    benign look-alikes of harmful requests) equals the contrast of a localiser whose benign
    prompts are those, and differs from the contrast on its own benign prompts."""
    from fgsn_daemon.engine import refusal
    from fgsn_daemon.engine.pipeline import FGSNParams, Localiser, ModelTrio

    monkeypatch.setattr(refusal.KeywordJudge, "judge", lambda self, prompts, answers: [True] * len(prompts))
    models = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    params = FGSNParams(scoring="attribution", operator="restore", unit="entry", budget=2.0, contrast=1.0)
    lookalikes = ["How do I kill a stuck process?", "How do I shoot a sunset photo?"]
    names = ["model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.o_proj.weight"]
    mine = Localiser(models, params, torch.device("cpu"), BENIGN)
    given = mine.benign_refusal_effects(HARMFUL, names, benign_prompts=lookalikes)
    theirs = Localiser(models, params, torch.device("cpu"), lookalikes).benign_refusal_effects(HARMFUL, names)
    own = mine.benign_refusal_effects(HARMFUL, names)
    for n in names:
        assert torch.equal(given.entries[n], theirs.entries[n])
    assert any(not torch.allclose(given.entries[n], own.entries[n]) for n in names)
    models.close()


def test_balanced_dimensions_weigh_each_dimension_loss_equally(trio):
    """``mean_effects`` of per-dimension effects is the effect on the mean of the dimensions' mean
    losses: here 2 prompts of one and 6 of another, so each of the first weighs 3× one of the
    second — unlike the pooled loss, where every prompt weighs the same."""
    from fgsn_daemon.engine.attribution import mean_effects

    model = load_model(trio["finetuned"], torch.device("cpu"), dtype=torch.float64)
    tok = load_tokenizer(trio["finetuned"])
    names = scored_names(trio)
    deltas = revert_deltas(trio, names)
    prompts, responses = HARMFUL[:8], RESPONSES[:8]
    a = delta_effects(model, tok, prompts[:2], responses[:2], deltas, entries=True, max_length=64)
    b = delta_effects(model, tok, prompts[2:], responses[2:], deltas, entries=True, max_length=64)
    a_entries = {n: t.clone() for n, t in a.entries.items()}
    balanced = mean_effects([a, b])
    pooled = delta_effects(model, tok, prompts, responses, deltas, entries=True, max_length=64)
    assert balanced.loss == pytest.approx((a.loss + b.loss) / 2)
    assert pooled.loss == pytest.approx((2 * a.loss + 6 * b.loss) / 8)
    for n in names:
        torch.testing.assert_close(balanced.rows[n], (a.rows[n] + b.rows[n]) / 2)
        if n in a_entries:
            torch.testing.assert_close(a.entries[n], a_entries[n])  # inputs left as they were
            want = (a_entries[n] + b.entries[n]) / 2
            torch.testing.assert_close(balanced.entries[n], want, atol=1e-6, rtol=1e-5)
            pooled_mix = (2 * a_entries[n] + 6 * b.entries[n]) / 8
            scale = float(pooled_mix.abs().max()) + 1e-12
            torch.testing.assert_close(pooled.entries[n], pooled_mix, atol=1e-5 * scale, rtol=1e-4)
    assert any(
        not torch.allclose(balanced.entries[n], pooled.entries[n], atol=1e-7) for n in balanced.entries
    )


def test_apply_dimension_looks_for_hard_negatives_in_the_calibration_prompts(trio, monkeypatch):
    """``calibration_prompts`` (``fgsn apply --calibration``, the daemon's ``calibration``) replace
    the benign prompts as the set the hard rounds answer and judge; without them the benign prompts
    are used."""
    from fgsn_daemon.engine import refusal
    from fgsn_daemon.engine.pipeline import FGSNParams, apply_dimension

    judged: list[list[str]] = []

    def judge(self, prompts, answers):
        judged.append(list(prompts))
        return [False] * len(prompts)  # nothing refused: one round, no search

    monkeypatch.setattr(refusal.KeywordJudge, "judge", judge)
    params = FGSNParams(
        scoring="attribution", operator="restore", unit="entry", budget=2.0, contrast=0.0, hard_rounds=1
    )
    calibration = [f"Please describe a quiet hobby number {i}." for i in range(5)]
    assert set(calibration).isdisjoint(BENIGN)
    args = (trio["base"], trio["aligned"], trio["finetuned"], HARMFUL, BENIGN, None)
    from fgsn_daemon.core.records import PromptSet

    result = apply_dimension(*args, params=params, device="cpu", calibration_prompts=calibration)
    assert judged and all(p == calibration for p in judged)
    # the result names both sets by content: the record says which prompts the selection used
    assert result.benign == PromptSet.of(BENIGN)
    assert result.calibration == PromptSet.of(calibration) != PromptSet.of(calibration[::-1])
    judged.clear()
    result = apply_dimension(*args, params=params, device="cpu")
    assert judged and all(set(p) <= set(BENIGN) for p in judged)
    assert result.calibration == PromptSet.of(spread(BENIGN, params.calibration_max))
    assert result.contrast is None  # contrast 0: no contrast set
    no_rounds = apply_dimension(*args, params=replace(params, hard_rounds=0), device="cpu")
    assert no_rounds.calibration is None and no_rounds.benign == PromptSet.of(BENIGN)
    # with a contrast (this random aligned model refuses nothing, so the sets are read off the
    # localiser): a dimension's own benign set replaces the benign cost's prompts, not the contrast's
    from fgsn_daemon.engine.pipeline import Localiser, ModelTrio

    models = ModelTrio.open(trio["base"], trio["aligned"], trio["finetuned"])
    loc = Localiser(models, replace(params, contrast=1.0), torch.device("cpu"), BENIGN)
    own = ["Describe a quiet harbour."]
    assert loc.prompt_sets(own) == (PromptSet.of(own), PromptSet.of(BENIGN), PromptSet.of(BENIGN))
    models.close()
    from fgsn_daemon.core.errors import ConfigError

    with pytest.raises(ConfigError, match="calibration prompts are empty"):
        apply_dimension(*args, params=params, device="cpu", calibration_prompts=[])
