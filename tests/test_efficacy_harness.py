"""The efficacy harness's pure parts: grid parsing, setting names, the selection split's benign
set, and the declared selection rule."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fgsn_daemon.core.errors import ConfigError
from fgsn_daemon.lab.efficacy import (
    Outcome,
    Setting,
    calibration_prompts,
    category_table,
    choose_setting,
    load_inputs,
    main,
    parse_grid,
    prompt_frames,
    source_table,
    split_table,
    write_study,
)
from fgsn_daemon.lab.experiments import TrioSpec


def test_grid_items_carry_every_optional_field() -> None:
    plain, full = parse_grid("entry:0.3:all:0,entry:0.5:all:1:c0.8:h2x0.05:s1:4")
    assert plain == Setting("entry", 0.3, "all", 0.0)
    assert (full.contrast, full.penalty, full.hard, full.hard_weight, full.guard) == (
        0.8,
        "refusal",
        2,
        0.05,
        4.0,
    )
    assert full.name == "attribution/entry/0.5%/all/p1/c0.8/hard2x0.05/guard4"
    assert parse_grid("entry:0.3:all:0:o1")[0].name == "attribution/entry/0.3%/all/p0/o1"
    boosted = parse_grid("entry:0.5:all:0:c1:h1x0.05:r0.5")[0]
    assert (boosted.hard, boosted.hard_positive) == (1, 0.5)
    assert boosted.name == "attribution/entry/0.5%/all/p0/c1/hard1x0.05+pos0.5"
    edited = parse_grid("entry:0.5:all:0:c1:h2x0.1e:r0.5")[0]
    assert (edited.hard, edited.hard_weight, edited.hard_positive, edited.hard_at) == (2, 0.1, 0.5, "edited")
    assert edited.name == "attribution/entry/0.5%/all/p0/c1/hard2x0.1+pos0.5@edited"
    assert boosted.hard_at == "finetuned"
    calibrated = parse_grid("entry:0.5:all:0:c1:h1x0.05:t2")[0]
    assert (calibrated.hard_weight, calibrated.hard_target, boosted.hard_target) == (0.05, 2.0, None)
    assert calibrated.name == "attribution/entry/0.5%/all/p0/c1/hard1x0.05~t2"
    with pytest.raises(ConfigError, match="grid item"):
        parse_grid("entry:0.3:all:0:hbad")


def spec(tmp_path: Path, with_selection: bool) -> TrioSpec:
    pol = tmp_path / "policies" / "cyber"
    pol.mkdir(parents=True)
    (pol / "policy.toml").write_text('description = "d"\nsource = "s"\nlicense = "MIT"\n')
    lines = lambda xs: "".join(json.dumps({"prompt": x}) + "\n" for x in xs)  # noqa: E731
    (pol / "harmful.jsonl").write_text(lines([f"train {i}" for i in range(6)]))
    (pol / "harmful_eval.jsonl").write_text(lines([f"held {i}" for i in range(6)]))
    (tmp_path / "benign.jsonl").write_text(lines([f"benign {i}" for i in range(10)]))
    (tmp_path / "benign_eval.jsonl").write_text(lines(["eval a", "eval b"]))
    (tmp_path / "selection.jsonl").write_text(lines(["held-out phrase a", "held-out phrase b"]))
    (tmp_path / "utility.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(4))
    )
    return TrioSpec(
        tmp_path,
        tmp_path,
        tmp_path,
        tmp_path / "policies",
        tmp_path / "benign.jsonl",
        tmp_path / "benign_eval.jsonl",
        tmp_path / "utility.jsonl",
        tmp_path / "selection.jsonl" if with_selection else None,
    )


def test_the_selection_half_measures_over_refusal_on_its_own_file_when_there_is_one(tmp_path: Path) -> None:
    with_file = spec(tmp_path / "a", True)
    sel = load_inputs(with_file, "selection", 64, 4)
    rep = load_inputs(with_file, "report", 64, 4)
    assert sel.eval.benign == ["held-out phrase a", "held-out phrase b"]
    assert rep.eval.benign == ["eval a", "eval b"]
    assert sel.eval.harmful["cyber"] == ["held 0", "held 2", "held 4"]
    assert rep.eval.harmful["cyber"] == ["held 1", "held 3", "held 5"]
    # hard negatives may then look at every benign train prompt
    assert calibration_prompts(with_file) == [f"benign {i}" for i in range(10)]
    without = spec(tmp_path / "b", False)
    leftovers = load_inputs(without, "selection", 64, 4)
    assert set(leftovers.eval.benign).isdisjoint(leftovers.benign_train)
    assert len(leftovers.eval.benign) == 6 and calibration_prompts(without) is None


def test_over_refusal_is_also_reported_per_benign_category(tmp_path: Path) -> None:
    trio = spec(tmp_path, True)
    records = [("eval a", "howto"), ("eval b", "edgy_safe"), ("eval c", "howto"), ("eval d", "howto")]
    text = "".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in records)
    trio.benign_eval.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte-order mark, as editors write
    rep = load_inputs(trio, "report", 64, 4)
    assert rep.eval.benign_categories == ["howto", "edgy_safe", "howto", "howto"]
    # the selection file names no category: nothing is split out
    assert load_inputs(trio, "selection", 64, 4).eval.benign_categories == []
    outcome = Outcome({"cyber": [True]}, [False, True, True, False], [True], rep.eval.benign_categories)
    by = outcome.summary()["over_refusal_by_category"]
    assert (by["howto"]["n"], by["edgy_safe"]["n"]) == (3, 1)
    assert by["howto"]["rate"] == pytest.approx(1 / 3) and by["edgy_safe"]["rate"] == 1.0
    assert Outcome({"cyber": [True]}, [True], [True]).summary()["over_refusal_by_category"] == {}
    table = "\n".join(category_table([{"name": "edit", "group": "fgsn", "over_refusal_by_category": by}]))
    assert "edgy_safe (1)" in table and "howto (3)" in table and "| edit | 100.0 [" in table


def test_the_report_half_adds_the_extension_and_reports_each_file_apart(tmp_path: Path) -> None:
    trio = spec(tmp_path, True)
    extension = tmp_path / "extension.jsonl"
    extension.write_text("".join(json.dumps({"prompt": f"new {i}"}) + "\n" for i in range(3)))
    trio = replace(trio, benign_report_extension=extension)
    rep = load_inputs(trio, "report", 64, 4)
    assert rep.eval.benign == ["eval a", "eval b", "new 0", "new 1", "new 2"]
    assert rep.eval.benign_sources == ["original"] * 2 + ["extension"] * 3
    # the selection half keeps its own file, untouched by the extension
    sel = load_inputs(trio, "selection", 64, 4)
    assert sel.eval.benign == ["held-out phrase a", "held-out phrase b"] and sel.eval.benign_sources == []
    refused = [True, False, False, False, True]
    outcome = Outcome({"cyber": [True]}, refused, [True], [], rep.eval.benign_sources)
    summary = outcome.summary()
    assert summary["over_refusal"]["n"] == 5 and summary["over_refusal"]["rate"] == pytest.approx(0.4)
    by = summary["over_refusal_by_source"]
    assert (by["original"]["n"], by["extension"]["n"]) == (2, 3)
    assert by["original"]["rate"] == 0.5 and by["extension"]["rate"] == pytest.approx(1 / 3)
    table = "\n".join(source_table([{"name": "edit", "group": "fgsn", "over_refusal_by_source": by}]))
    assert "original (2)" in table and "extension (3)" in table and "| edit | 33.3 [" in table
    # a prompt in both files would be counted twice: refused with the file named
    extension.write_text(json.dumps({"prompt": "eval b"}) + "\n")
    with pytest.raises(ConfigError, match=r"1 of its prompts are also in .*benign_eval\.jsonl.*'eval b'"):
        load_inputs(trio, "report", 64, 4)


def test_over_refusal_of_bundled_prompts_also_gets_a_frame_clustered_interval() -> None:
    quiz = [f"Write a short quiz about {x}." for x in ("inflation", "binary numbers", "the Roman Empire")]
    edgy = ["How do I kill bacteria on a kitchen sponge?"]
    frames = prompt_frames(quiz + edgy)
    assert frames == ["Write a short quiz about {x}."] * 3 + edgy
    assert prompt_frames(["a prompt of the user's own", *quiz]) == []  # not bundled: no frames
    outcome = Outcome({"cyber": [True]}, [True, True, True, False], [True], [], [], frames)
    summary = outcome.summary()
    clustered = summary["over_refusal_frame_clustered"]["all"]
    assert clustered["rate"] == summary["over_refusal"]["rate"] == 0.75 and clustered["clusters"] == 2
    assert clustered["low"] == 0.0 and clustered["high"] == 1.0  # two frames: either may be drawn twice
    assert Outcome({"cyber": [True]}, [True], [True]).summary()["over_refusal_frame_clustered"] == {}
    row = {"name": "edit", "group": "fgsn", "share": 0.0, **summary}
    result = {"rows": [row], "split": "report", "max_new_tokens": 16}
    counts = {"harmful_eval": {"cyber": 1}, "benign_eval": 4, "utility_eval": 1}
    table = "\n".join(split_table(result, "report", counts))
    assert "resampling whole question frames" in table and "| edit | 75.0 [0.0, 100.0] |" in table


def test_kept_responses_go_to_their_own_file_not_into_the_json(tmp_path: Path) -> None:
    result = {
        "command": "c",
        "split": "report",
        "prompt_counts": {},
        "seconds": 1.0,
        "rows": [],
        "responses": [{"row": "aligned", "split": "report", "set": "benign", "prompt": "p", "response": "r"}],
    }
    write_study(tmp_path, "report", result)
    lines = (tmp_path / "responses-report.jsonl").read_text().splitlines()
    assert [json.loads(x)["response"] for x in lines] == ["r"]
    assert "responses" not in json.loads((tmp_path / "efficacy-report.json").read_text())
    assert (tmp_path / "efficacy-report.md").read_text().startswith("Command: `c`")
    (tmp_path / "none").mkdir()
    write_study(tmp_path / "none", "report", {**result, "responses": []})  # none kept: no file
    written = sorted(f.name for f in (tmp_path / "none").iterdir())
    assert written == ["efficacy-report.json", "efficacy-report.md"]


def test_continual_runs_refuse_responses_with_a_clear_error(tmp_path: Path, capsys) -> None:
    argv = ["--trio-root", str(tmp_path), "--out", str(tmp_path / "o"), "--continual", "--responses"]
    assert main([*argv, "--grid", "entry:0.5:all:0"]) == 2
    assert "--responses is not kept by --continual runs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def row(name: str, asr: float, over: float, util: float, share: float, group: str = "fgsn") -> dict:
    out = {
        "name": name,
        "group": group,
        "mean_asr": asr,
        "over_refusal": {"rate": over},
        "utility": {"rate": util},
        "share": share,
    }
    if group == "fgsn":
        out["setting"] = {}
    return out


def test_the_declared_rule_keeps_the_limits_then_prefers_reaching_the_aligned_asr() -> None:
    refs = [
        row("aligned", 0.05, 0.30, 0.0, 0, "reference"),
        row("finetuned", 0.98, 0.0, 0.89, 0, "reference"),
    ]
    over_limit = row("low asr, over-refuses", 0.07, 0.09, 0.88, 0.005)
    within = row("within limits", 0.18, 0.04, 0.88, 0.005)
    cheap = row("within, cheaper", 0.25, 0.03, 0.89, 0.002)
    assert choose_setting([*refs, over_limit, within, cheap])["name"] == "within limits"
    reaches = row("reaches aligned + 5", 0.09, 0.05, 0.87, 0.004)
    assert choose_setting([*refs, over_limit, within, reaches])["name"] == "reaches aligned + 5"
    assert choose_setting([*refs, over_limit]) is None


def test_a_calibration_file_is_used_whole_and_otherwise_the_product_cap_holds(tmp_path: Path) -> None:
    from fgsn_daemon.core import defaults
    from fgsn_daemon.lab.efficacy import StudyConfig, calibration_max

    s = spec(tmp_path, with_selection=True)
    big = tmp_path / "calibration.jsonl"
    big.write_text(
        "".join(json.dumps({"prompt": f"c {i}"}) + "\n" for i in range(defaults.CALIBRATION_MAX + 7))
    )
    explored = StudyConfig(s, "selection", [], (0,), (), calibration=big)
    prompts = calibration_prompts(s, big)
    assert prompts is not None and calibration_max(explored, prompts) == defaults.CALIBRATION_MAX + 7
    plain = StudyConfig(s, "selection", [], (0,), ())
    assert calibration_max(plain, calibration_prompts(s)) == defaults.CALIBRATION_MAX


def test_scored_effects_are_cached_per_path_steps_and_first_order_keys_are_unchanged(tmp_path: Path) -> None:
    """Effects integrated along the revert are a different score: they get their own cache entry,
    while the first-order key stays what it was before the option existed (old caches still hit)."""
    import hashlib

    from fgsn_daemon.engine.io.checkpoint import folder_fingerprint
    from fgsn_daemon.engine.pipeline import FGSNParams
    from fgsn_daemon.lab.efficacy import effects_key

    s = spec(tmp_path, with_selection=False)
    params = FGSNParams(scoring="attribution", unit="entry")
    first = effects_key(s, ["h"], ["b"], ["w"], params)
    assert effects_key(s, ["h"], ["b"], ["w"], replace(params, path_steps=1)) == first
    integrated = effects_key(s, ["h"], ["b"], ["w"], replace(params, path_steps=3))
    assert integrated != first != effects_key(s, ["h"], ["b"], ["w"], replace(params, path_steps=4))
    legacy = {
        "models": [folder_fingerprint(p) for p in (s.base, s.aligned, s.finetuned)],
        "harmful": ["h"],
        "benign": ["b"],
        "names": ["w"],
        "target_tokens": params.target_tokens,
        "max_length": params.max_length,
        "version": 1,
    }
    assert first == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:24]


def test_union_of_dimensions_refuses_settings_it_cannot_honour_before_scoring(tmp_path: Path, capsys) -> None:
    argv = ["--trio-root", str(tmp_path), "--out", str(tmp_path / "o"), "--union-dimensions"]
    assert main([*argv, "--grid", "entry:0.5:all:0:c1:h1x0.05"]) == 2
    assert "plain entries" in capsys.readouterr().err
    assert main([*argv, "--balance-dimensions", "--grid", "entry:0.5:all:0"]) == 2
    assert "neither --balance-dimensions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_strength_and_safety_set_the_selected_entries_to_the_declared_values(tmp_path: Path) -> None:
    """Lab levers ``mX`` / ``vX``: the selected entries take ``W_ft + s·(W_al − W_ft) + v·(W_al −
    W_base)`` (a float64 reference), every other entry stays fine-tuned, and leaving the edit puts
    the fine-tuned values back; the defaults restore the aligned values exactly."""
    import torch
    from helpers import make_trio

    from fgsn_daemon.engine.activations import load_model
    from fgsn_daemon.engine.pipeline import ModelTrio, restored_in_memory

    paths = make_trio(tmp_path / "trio", "llama")
    trio = ModelTrio.open(paths["base"], paths["aligned"], paths["finetuned"])
    model = load_model(paths["finetuned"], torch.device("cpu"))
    name = "model.layers.1.mlp.up_proj.weight"
    param = dict(model.named_parameters())[name]
    ft, al, base = (ck.read(name).double() for ck in (trio.finetuned, trio.aligned, trio.base))
    mask = torch.rand(ft.shape, generator=torch.Generator().manual_seed(0)) < 0.1
    for strength, safety in ((1.0, 0.0), (1.5, 0.0), (1.0, 0.5), (2.0, -0.25)):
        want = torch.where(mask, ft + strength * (al - ft) + safety * (al - base), ft)
        with restored_in_memory(model, trio, masks={name: mask}, strength=strength, safety=safety):
            torch.testing.assert_close(param.detach().double(), want, rtol=0, atol=1e-6)
            if (strength, safety) == (1.0, 0.0):
                assert torch.equal(param.detach()[mask], trio.aligned.read(name)[mask])
        assert torch.equal(param.detach(), trio.finetuned.read(name))
    with pytest.raises(ConfigError, match="entry masks"):
        restored_in_memory(model, trio, slices={name: (0, [0])}, strength=2.0).__enter__()
    trio.close()
    overshoot, safety = parse_grid("entry:0.3:all:0:c1:m1.5,entry:0.5:all:0:c1:v0.5")
    assert (overshoot.strength, overshoot.safety, safety.strength, safety.safety) == (1.5, 0.0, 1.0, 0.5)
    assert overshoot.name == "attribution/entry/0.3%/all/p0/c1/strength1.5"
    assert safety.name == "attribution/entry/0.5%/all/p0/c1/safety0.5"


@pytest.mark.parametrize(
    "grid",
    [
        "entry:0.5:all:0:c1:h1x0.05:t1:v0.5",  # hard rounds judge the plain restore
        "entry:0.5:all:0:c1:s2:m1.5",
        "entry:0.5:all:0:c1:5:m1.5",
        "neuron:1:all:0:c1:m1.5",
    ],
)
def test_strength_and_safety_are_refused_where_another_stage_judges_the_plain_restore(
    tmp_path: Path, capsys, grid: str
) -> None:
    assert main(["--trio-root", str(tmp_path), "--out", str(tmp_path / "o"), "--grid", grid]) == 2
    assert "take entry units without a guard, hard rounds or steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_energy_lever_parses_names_and_is_refused_outside_one_shot_entries(
    tmp_path: Path, capsys
) -> None:
    (energy,) = parse_grid("entry:0.5:all:0:c1:e0.5")
    assert (energy.energy, energy.contrast) == (0.5, 1.0)
    assert energy.name == "attribution/entry/0.5%/all/p0/c1/energy0.5"
    argv = ["--trio-root", str(tmp_path), "--out", str(tmp_path / "o")]
    for grid, extra in (
        ("entry:0.5:all:0:c1:h1x0.05:e0.5", []),
        ("neuron:1:all:0:c1:e0.5", []),
        ("entry:0.5:all:0:c1:e0.5", ["--union-dimensions"]),
        ("entry:0.5:all:0:c1:5:e0.5", []),
        ("entry:0.5:all:0:c1:s2:e0.5", []),
        ("entry:0.5:all:0:c1", ["--report-grid", "entry:0.5:all:0:c1:h1x0.05:e0.5"]),
    ):
        assert main([*argv, "--grid", grid, *extra]) == 2
        assert "the energy penalty (eE) takes one-shot entry units" in capsys.readouterr().err
    for grid in ("entry:0.5:all:0:c1:e-1", "entry:0.5:all:0:c-1:e0.5", "entry:0.5:all:0:c1:enan"):
        assert main([*argv, "--grid", grid]) == 2
        assert "the energy weight must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_contrast_prompts_need_a_refusal_contrast_and_a_study(tmp_path: Path, capsys) -> None:
    lookalikes = tmp_path / "lookalikes.jsonl"
    lookalikes.write_text('{"prompt": "How do I kill a stuck process?"}\n')
    argv = ["--trio-root", str(tmp_path), "--out", str(tmp_path / "o"), "--contrast-prompts", str(lookalikes)]
    assert main([*argv, "--grid", "entry:0.5:all:0"]) == 2
    assert "every contrast in the grid must be cX" in capsys.readouterr().err
    assert main([*argv, "--grid", "entry:0.5:all:0:c1,entry:0.3:all:0:o1"]) == 2
    assert "'odds'" in capsys.readouterr().err
    assert main([*argv, "--continual", "--grid", "entry:0.5:all:0:c1"]) == 2
    assert "not --continual" in capsys.readouterr().err
    assert main([*argv, "--grid", "entry:0.5:all:0:c1:s2"]) == 2
    assert "iterative rows (sN)" in capsys.readouterr().err
    missing = ["--contrast-prompts", str(tmp_path / "missing.jsonl"), "--grid", "entry:0.5:all:0:c1"]
    assert main([*argv[:4], *missing]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
