"""`esa perturb` end to end: causal separation on a planted super weight, honest nulls, resume, exact restore."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from esa.cli.main import app
from esa.config import DataConfig, ModelConfig, PerturbConfig, SelectionConfig
from esa.errors import EsaError
from esa.commands.perturb import run_perturb
from helpers import REPO, planted_super_weight_model, random_model, save_model

runner = CliRunner()
DATA = dict(seq_len=64, max_samples=12, batch_size=6)


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    model, info = planted_super_weight_model()
    return save_model(model, tmp_path_factory.mktemp("planted") / "model"), info


def perturb_config(model_dir, out_dir, **kw) -> PerturbConfig:
    sel = kw.pop("selection", SelectionConfig(metric="grad_x_weight", mode="global", topk=1))
    return PerturbConfig(model=ModelConfig(model=str(model_dir)), data=DataConfig(**DATA), selection=sel,
                         out_dir=str(out_dir), n_bootstrap=2000, **{"control_sets": 19, **kw})


@pytest.mark.parametrize("kind", ["zero", "sign_flip"])
def test_planted_super_weight_separates_from_controls(planted_dir, tmp_path, kind):
    model_dir, info = planted_dir
    result = run_perturb(perturb_config(model_dir, tmp_path / kind, perturb=kind))
    r = result["results"]
    sets = (tmp_path / kind / "sets" / "super_seed0.csv").read_text().splitlines()
    assert info["tensor"] in sets[1] and f",{info['row']},{info['col']},{info['flat_index']}," in sets[1]
    d_super = r["conditions"]["super"]["delta_ppl"]
    d_random = r["conditions"]["random_k"]["delta_ppl"]
    assert d_super > 10 * abs(d_random) and d_super > 1.0
    test = r["tests"]["super_vs_random_k"]
    assert test["unit"] == "weight set" and test["n_control_sets"] == 19
    assert test["p_value"] == pytest.approx(1 / 20)  # the smallest a rank test over 19 control sets can give
    assert test["per_window"]["p_paired_t"] < 0.05 and test["per_window"]["p_wilcoxon"] < 0.05
    assert r["effect_ratio"]["value"] > 10 or r["effect_ratio"]["value"] == float("inf")
    assert r["effect_ratio"]["lower_bound_95"] > 2
    # Every parameter is as it was on disk.
    fresh = type(result["session"].loaded.model).from_pretrained(model_dir)
    for (n, p), (_, q) in zip(result["session"].loaded.model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p.cpu().view(torch.int32), q.view(torch.int32)), n


def test_random_set_as_super_is_not_called_significant(tmp_path):
    """No planted weight and a 'super' set that is itself random: the test must not report a separation."""
    model_dir = save_model(random_model("llama", vocab_size=2048, seed=3), tmp_path / "model")
    g = torch.Generator().manual_seed(11)
    rows = ["tensor,flat_index"]
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        for idx in torch.randperm(1024, generator=g)[:20].tolist():
            rows.append(f"{name},{idx}")
    (tmp_path / "weights.csv").write_text("\n".join(rows) + "\n")
    cfg = perturb_config(model_dir, tmp_path / "run", perturb="gauss_noise", perturb_scale=1.0,
                         weights_file=str(tmp_path / "weights.csv"))
    r = run_perturb(cfg)["results"]
    assert "bottom_k" not in r["conditions"]
    assert r["tests"]["super_vs_random_k"]["p_value"] > 0.05


def test_bit_flip_on_embedded_model_through_the_cli(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["perturb", "--perturb", "bit_flip", "--perturb-prob", "0.05", "--topk", "20",
                                 "--seq-len", "64", "--max-samples", "6", "--seeds", "0,1", "--save-plots",
                                 "--control-sets", "4", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("config.json", "trials.jsonl", "results.json", "experiment_manifest.json", "plots/delta_ppl.png",
                 "plots/delta_ppl.pdf", "sets/super_seed0.csv", "sets/random_k_set3.csv", "sets/bottom_k_seed0.csv"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["conditions"]) == {"super", "random_k", "bottom_k"}
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 + 4  # baseline, super and bottom_k per seed, the control sets
    assert results["conditions"]["random_k"]["n_trials"] == 4
    assert results["conditions"]["super"]["mean_bits_flipped"] >= 0
    assert "effect ratio" in result.output


def test_finished_run_needs_overwrite_and_changed_config_is_refused(planted_dir, tmp_path):
    model_dir, _ = planted_dir
    cfg = perturb_config(model_dir, tmp_path / "run", seeds=[0])
    run_perturb(cfg)
    with pytest.raises(EsaError, match="finished run"):
        run_perturb(cfg)
    # An unfinished run with another configuration is not resumed silently.
    (tmp_path / "run" / "experiment_manifest.json").unlink()
    with pytest.raises(EsaError, match="another configuration"):
        run_perturb(perturb_config(model_dir, tmp_path / "run", seeds=[0], perturb="sign_flip"))


def test_sigkilled_run_resumes_to_the_same_results(planted_dir, tmp_path):
    model_dir, _ = planted_dir
    args = [sys.executable, "-m", "esa.cli.main", "perturb", "--model", str(model_dir), "--metric", "grad_squared",
            "--mode", "global", "--topk", "3", "--perturb", "gauss_noise", "--perturb-scale", "2.0",
            "--seq-len", "64", "--max-samples", "12", "--batch-size", "6", "--seeds", "0,1,2", "--n-bootstrap", "500",
            "--control-sets", "5"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ESA_PROGRESS="0")
    full = subprocess.run(args + ["--out-dir", str(tmp_path / "full")], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert full.returncode == 0, full.stderr
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out-dir", str(killed_dir)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    trials = killed_dir / "trials.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if trials.exists() and len(trials.read_text().splitlines()) >= 4:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_dir / "results.json").exists()
    resumed = subprocess.run(args + ["--out-dir", str(killed_dir)], env=env, capture_output=True, text=True,
                             cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((killed_dir / "results.json").read_text())
    assert a == b
    manifest = json.loads((killed_dir / "experiment_manifest.json").read_text())
    assert manifest["resumed"] is True


def test_from_profile_reuses_the_profile_selection(planted_dir, tmp_path):
    from esa.config import ProfileConfig
    from esa.commands.profile import run_profile

    model_dir, info = planted_dir
    prof = ProfileConfig(model=ModelConfig(model=str(model_dir)), data=DataConfig(**DATA),
                         selection=SelectionConfig(metric="grad_squared", mode="global", topk=4),
                         out_dir=str(tmp_path / "profile"))
    run_profile(prof)
    r = run_perturb(perturb_config(model_dir, tmp_path / "perturb", from_profile=str(tmp_path / "profile"),
                                   seeds=[0]))["results"]
    assert r["source"] == "from_profile" and r["set_sizes"]["super"] == 4
    top = (tmp_path / "profile" / "top_weights.csv").read_text().splitlines()[1:]
    used = (tmp_path / "perturb" / "sets" / "super_seed0.csv").read_text().splitlines()[1:]
    assert [l.split(",")[1] + l.split(",")[7] for l in top] == [l.split(",")[1] + l.split(",")[7] for l in used]


def test_stability_check_reselects_per_seed_as_profile_does(planted_dir, tmp_path):
    """perturb --stability-check re-selects the top-k on each seed's subset of windows: the same sets as
    profile --stability-check with the same selection and seeds, and their Jaccard in results.json."""
    from esa.config import ProfileConfig
    from esa.commands.profile import run_profile

    model_dir, _ = planted_dir
    sel = SelectionConfig(metric="grad_squared", mode="global", topk=6)
    run_profile(ProfileConfig(model=ModelConfig(model=str(model_dir)), data=DataConfig(**DATA), selection=sel,
                              seeds=[0, 1], stability_check=True, out_dir=str(tmp_path / "profile")))
    r = run_perturb(perturb_config(model_dir, tmp_path / "perturb", selection=sel, seeds=[0, 1],
                                   stability_check=True, controls=["random_k"]))["results"]
    for s in (0, 1):
        profiled = (tmp_path / "profile" / "stability" / f"top_weights_seed{s}.csv").read_text().splitlines()[1:]
        used = (tmp_path / "perturb" / "sets" / f"super_seed{s}.csv").read_text().splitlines()[1:]
        assert [l.split(",")[1:8] for l in profiled] == [l.split(",")[1:8] for l in used]
    profile_jaccard = json.loads((tmp_path / "profile" / "stability.json").read_text())["pairwise_jaccard"]
    assert r["stability"]["pairwise_jaccard"] == profile_jaccard


# ------------------------------------------------------------------ end to end on a real pretrained model
def _stories_config(out_dir, **kw) -> PerturbConfig:
    from helpers import STORIES260K, TINYSTORIES_VAL

    if not (STORIES260K / "model.safetensors").exists() or not TINYSTORIES_VAL.exists():
        pytest.skip("../shared/models/stories260K or ../shared/data absent")
    return PerturbConfig(model=ModelConfig(model=str(STORIES260K)),
                         data=DataConfig(text_file=str(TINYSTORIES_VAL), seq_len=128, max_samples=8, batch_size=8),
                         selection=SelectionConfig(metric="grad_x_weight", mode="global", topk=20), seeds=[0],
                         n_bootstrap=500, out_dir=str(out_dir), **kw)


def _checklist(label: str, results: dict, config: PerturbConfig):
    from esa.config import to_dict
    from esa.reporting import checklist as cl

    rows = cl.apply_holm(cl.perturb_criteria(label, results, to_dict(config)))
    return {c.name: c for c in rows}, cl


def test_stories260k_true_top_set_is_still_met(tmp_path):
    """Power: zeroing the grad_x_weight top-20 of stories260K is set-level evidence with 39 control sets; the
    bottom_k control, 20 weights that change nothing, is 'not informative' rather than 'met'."""
    cfg = _stories_config(tmp_path / "power", control_sets=39)
    r = run_perturb(cfg)["results"]
    rows, cl = _checklist("power", r, cfg)
    assert rows[cl.RANK].status == cl.MET and rows[cl.RANK].value == pytest.approx(1 / 40)
    assert rows[cl.EFFECT].status == cl.MET
    assert rows[cl.ORDER].status in (cl.NOT_INFORMATIVE, cl.MET, cl.NOT_MET)
    if r["conditions"]["bottom_k"]["unchanged_in_every_trial"]:
        assert rows[cl.ORDER].status == cl.NOT_INFORMATIVE


def test_stories260k_random_super_sets_are_not_evidence(tmp_path):
    """Null: 'super' sets that are themselves 20 random weights (esa perturb --weights), three of them: the old
    rows (per-window paired p, point ratio) were met in about 40% of such runs; the set-level rows about 5%."""
    from esa.scoreselect import open_for_selection

    cfg = _stories_config(tmp_path / "n0", control_sets=19, controls=["random_k"])
    session = open_for_selection(cfg.model, cfg.data, cfg.selection)
    params = dict(session.loaded.model.named_parameters())
    names = [n for n, p in params.items() if p.ndim == 2]
    met = 0
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        lines = ["tensor,flat_index"]
        for _ in range(20):
            name = names[int(torch.randint(len(names), (1,), generator=g))]
            lines.append(f"{name},{int(torch.randint(params[name].numel(), (1,), generator=g))}")
        if len(set(lines)) < len(lines):
            continue
        (tmp_path / f"w{i}.csv").write_text("\n".join(lines) + "\n")
        cfg = _stories_config(tmp_path / f"n{i}", control_sets=19, controls=["random_k"],
                              weights_file=str(tmp_path / f"w{i}.csv"))
        r = run_perturb(cfg, session=session)["results"]
        rows, cl = _checklist(f"n{i}", r, cfg)
        assert r["tests"]["super_vs_random_k"]["n_control_sets"] == 19
        met += any(rows[n].status == cl.MET for n in (cl.RANK, cl.EFFECT))
    assert met <= 1
