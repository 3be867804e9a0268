"""The latent-variable simulation of Jiang et al. 2024: metrics on planted vectors, the two data conditions,
the m = 4 result the issue asks for, determinism, and the `sim` command's files and refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from lenscache.analysis import latent_sim as ls
from lenscache.analysis.latent_sim import SimConfig, SimConfigError
from lenscache.tools.linrep_sim_cli import sim

M = 4


def planted_linear(m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """g(y) = a + Σ_i y_i γ_i for random a, γ: an exactly linear unembedding, and its Γ."""
    gen = torch.Generator().manual_seed(seed)
    gamma = torch.randn(m, d, generator=gen, dtype=torch.float64)
    a = torch.randn(d, generator=gen, dtype=torch.float64)
    return a + ls.token_bits(m) @ gamma, gamma


# --- metrics on planted vectors ---------------------------------------------------------------------


def test_an_exactly_linear_unembedding_has_within_cosine_one_and_its_own_directions():
    g, gamma = planted_linear(M, 8)
    assert torch.allclose(ls.within_cosines(g, M), torch.ones(M, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ls.concept_directions(g, M), gamma, atol=1e-12)


def test_random_and_shuffled_unembeddings_have_low_within_cosine():
    gen = torch.Generator().manual_seed(1)
    random_g = torch.randn(2**M, 64, generator=gen, dtype=torch.float64)
    assert ls.within_cosines(random_g, M).abs().max() < 0.2
    g, _ = planted_linear(M, 64, seed=2)
    g = g - g.mean(0)  # without the shared offset a shuffled g keeps no concept structure
    shuffled = g[torch.randperm(2**M, generator=gen)]
    assert ls.within_cosines(shuffled, M).mean() < 0.5
    assert ls.within_cosines(shuffled, M).mean() < ls.within_cosines(g, M).mean() - 0.5


def test_within_cosine_averages_distinct_pairs_only():
    """m = 2 with g = (0, e1, e3, e2): both concepts' two differences are orthogonal, so exactly 0
    (a mean that also counted each difference with itself would give 0.5)."""
    eye = torch.eye(3, dtype=torch.float64)
    g = torch.stack([torch.zeros(3, dtype=torch.float64), eye[0], eye[2], eye[1]])
    assert torch.allclose(ls.within_cosines(g, 2), torch.zeros(2, dtype=torch.float64), atol=1e-12)


def test_the_differences_pair_tokens_that_differ_in_one_concept_only():
    g = torch.zeros(2**M, 2**M, dtype=torch.float64)
    g[torch.arange(2**M), torch.arange(2**M)] = 1  # token t is the basis vector e_t
    diffs = ls.concept_differences(g, M)
    assert diffs.shape == (M, 2 ** (M - 1), 2**M)
    for i in range(M):
        for row in diffs[i]:
            plus, minus = int(row.argmax()), int(row.argmin())
            assert plus ^ minus == 1 << i and (plus >> i) & 1 == 1


def test_orthogonal_concept_directions_have_cross_cosine_zero_and_parallel_ones_one():
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    g = ls.token_bits(M) @ (q[:M] * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)[:, None])
    assert ls.cross_cosine(ls.concept_directions(g, M)) == pytest.approx(0, abs=1e-12)
    same = torch.stack([q[0], -q[0], 2 * q[0], q[1]])
    # pairs: (0,1) 1, (0,2) 1, (0,3) 0, (1,2) 1, (1,3) 0, (2,3) 0 -> mean 0.5 (absolute values)
    assert ls.cross_cosine(same) == pytest.approx(0.5, abs=1e-12)


def test_embedding_directions_recover_a_planted_map_and_alignment_is_its_cosine():
    gen = torch.Generator().manual_seed(4)
    prob = torch.rand(200, M, generator=gen, dtype=torch.float64)
    beta = torch.randn(M, 8, generator=gen, dtype=torch.float64)
    f = 0.3 + (2 * prob - 1) @ beta
    assert torch.allclose(ls.embedding_directions(f, prob), beta, atol=1e-10)
    assert torch.allclose(ls.alignments(beta, 5 * beta), torch.ones(M, dtype=torch.float64), atol=1e-12)
    other = torch.randn(M, 8, generator=gen, dtype=torch.float64)
    expected = torch.nn.functional.cosine_similarity(beta, other, dim=1)
    assert torch.allclose(ls.alignments(beta, other), expected, atol=1e-12)


def test_hand_written_gradients_match_autograd():
    gen = torch.Generator().manual_seed(5)
    targets, _ = ls.make_targets(SimConfig(log_odds_matching=False, n_contexts=64), gen)
    f = torch.randn(64, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2**M, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = -(targets * torch.log_softmax(f @ g.T, 1)).sum(1).mean()
    loss.backward()
    value, grad_f, grad_g = ls.loss_and_grads(f.detach(), g.detach(), targets)
    assert value == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(grad_f, f.grad, atol=1e-14) and torch.allclose(grad_g, g.grad, atol=1e-14)


def test_t_interval():
    assert ls.t_quantile_975(1) == 12.706 and ls.t_quantile_975(4) == 2.776
    assert ls.t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)
    assert ls.t_quantile_975(1000) == pytest.approx(1.962, abs=1e-3)
    ci = ls.mean_ci([1.0, 2.0, 3.0])  # mean 2, s = 1, half = 4.303 / sqrt(3)
    assert ci["mean"] == 2.0 and ci["hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert ls.mean_ci([0.5]) == {"mean": 0.5, "lo": None, "hi": None}


# --- the two data conditions ------------------------------------------------------------------------


def _log_ratios(targets: torch.Tensor, i: int) -> torch.Tensor:
    """(n, 2^(m-1)): ln p(c with C_i=0 | x) − ln p(c with C_i=1 | x), one column per base assignment c."""
    tokens = torch.arange(targets.shape[1])
    base = tokens[((tokens >> i) & 1) == 0]
    return targets[:, base].log() - targets[:, base | (1 << i)].log()


def test_matching_targets_satisfy_log_odds_matching_for_every_base_assignment():
    config = SimConfig(n_contexts=64)
    targets, prob = ls.make_targets(config, torch.Generator().manual_seed(0))
    assert torch.allclose(targets.sum(1), torch.ones(64, dtype=torch.float64))
    for i in range(M):
        ratios = _log_ratios(targets, i)
        assert ratios.isfinite().all()
        truth = (1 - prob[:, i]).log() - prob[:, i].log()  # ln p(C_i=0|x)/p(C_i=1|x)
        assert torch.allclose(ratios, truth[:, None].expand_as(ratios), atol=1e-9)


def test_conditional_targets_do_not_force_log_odds_matching():
    config = SimConfig(n_contexts=256, log_odds_matching=False)
    targets, prob = ls.make_targets(config, torch.Generator().manual_seed(0))
    assert torch.allclose(targets.sum(1), torch.ones(256, dtype=torch.float64))
    assert ((targets == 0).sum(1) > 0).float().mean() > 0.8  # revealed concepts rule tokens out
    revealed = (prob < 1e-12) | (prob > 1 - 1e-12)
    assert (~revealed).any(1).all()  # every context leaves a concept open
    # where concept i is open, its log-odds depends on the revealed values: it differs across contexts
    # that reveal the same other concepts with different values (the couplings at work)
    i = 0
    open_i = ~revealed[:, i] & revealed[:, 1:].all(1)
    odds = (1 - prob[open_i, i]).log() - prob[open_i, i].log()
    assert odds.max() - odds.min() > 0.1


def test_sampled_targets_are_empirical_distributions():
    config = SimConfig(n_contexts=8, samples_per_context=10)
    targets, _ = ls.make_targets(config, torch.Generator().manual_seed(0))
    assert torch.allclose(targets.sum(1), torch.ones(8, dtype=torch.float64))
    assert torch.equal(targets * 10, (targets * 10).round())


# --- the simulation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def m4_runs() -> dict[bool, dict]:
    """The default m = 4 configuration (2,000 steps), two seeds, with and without matching (a few s)."""
    return {lom: ls.run_seeds(SimConfig(m=M, steps=2000, eval_every=500, log_odds_matching=lom), [0, 1])
            for lom in (True, False)}  # fmt: skip


def test_m4_with_log_odds_matching_is_linear_orthogonal_and_aligned(m4_runs):
    final = m4_runs[True]["final"]
    assert min(final["within"]["values"]) >= 0.9
    assert max(final["cross"]["values"]) <= 0.1
    assert min(final["alignment"]["values"]) >= 0.9
    assert max(final["kl"]["values"]) < 1e-3  # it did fit the data
    assert m4_runs[True]["curves"]["within"]["mean"][0] < 0.2  # and linearity is learned, not initial


def test_without_matching_linearity_is_weaker(m4_runs):
    """The conditional model forces no matching: its within-concept cosine stays clearly below."""
    assert m4_runs[False]["final"]["within"]["mean"] < m4_runs[True]["final"]["within"]["mean"] - 0.05


def test_a_result_has_every_evaluated_step_and_serialises(m4_runs):
    result = ls.simulate(SimConfig(steps=120, eval_every=50))
    assert result.steps == [0, 50, 100, 120]
    record = json.loads(json.dumps(result.to_dict()))
    assert record["config"]["m"] == M and len(record["within_per_concept"][-1]) == M
    assert m4_runs[True]["steps"] == [0, 500, 1000, 1500, 2000]
    json.dumps(m4_runs)


def test_a_seed_determines_the_run():
    a, b = (ls.simulate(SimConfig(steps=200, eval_every=100, seed=7)).to_dict() for _ in range(2))
    c = ls.simulate(SimConfig(steps=200, eval_every=100, seed=8)).to_dict()
    for run in (a, b, c):
        run.pop("seconds")
    assert a == b
    assert a["within"] != c["within"]


def test_adam_is_available_and_bad_settings_are_refused():
    assert ls.simulate(SimConfig(steps=5, optimiser="adam", lr=0.01)).steps == [0, 5]
    for bad in ({"m": 1}, {"steps": 0}, {"d": 3}, {"lr": float("nan")}, {"optimiser": "sgd"},
                {"missing_prob": 0.0}, {"eval_every": 0}):  # fmt: skip
        with pytest.raises(SimConfigError, match=next(iter(bad))):
            SimConfig(**bad)
    with pytest.raises(SimConfigError, match="seeds"):
        ls.run_seeds(SimConfig(), [])


# --- the command ------------------------------------------------------------------------------------


def test_sim_writes_json_png_and_markdown(tmp_path):
    out = tmp_path / "res"
    result = CliRunner().invoke(sim, ["--out", str(out), "--steps", "60", "--seeds", "2", "--eval-every", "20",
                                      "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["sim.json", "sim.md", "sim.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # no temporary directory left
    record = json.loads((out / "sim.json").read_text())
    assert set(record["conditions"]) == {"log-odds matching", "no log-odds matching"}
    assert record["conditions"]["log-odds matching"]["seeds"] == [0, 1]
    assert record["options"]["steps"] == 60
    assert (out / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "sim.md").read_text()
    assert "| log-odds matching |" in text and "| no log-odds matching |" in text
    # an existing result is kept unless --overwrite
    again = CliRunner().invoke(sim, ["--out", str(out), "--steps", "5", "--seeds", "1", "--no-progress"])
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert json.loads((out / "sim.json").read_text())["options"]["steps"] == 60
    over = CliRunner().invoke(sim, ["--out", str(out), "--steps", "5", "--seeds", "1", "--condition", "matching",
                                    "--overwrite", "--no-progress"])  # fmt: skip
    assert over.exit_code == 0, over.output
    assert list(json.loads((out / "sim.json").read_text())["conditions"]) == ["log-odds matching"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


@pytest.mark.parametrize(
    "args",
    [["--m", "1"], ["--m", "13"], ["--steps", "0"], ["--seeds", "0"], ["--d", "3"], ["--lr", "0"],
     ["--lr", "nan"], ["--n-contexts", "1"], ["--eval-every", "0"], ["--condition", "maybe"], ["--m", "x"]],
)  # fmt: skip
def test_sim_refuses_bad_arguments_and_writes_nothing(tmp_path, args):
    out = tmp_path / "res"
    result = CliRunner().invoke(sim, ["--out", str(out), "--no-progress", *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_sim_refuses_a_file_as_out(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = CliRunner().invoke(sim, ["--out", str(target), "--steps", "2", "--seeds", "1"])
    assert result.exit_code == 2 and "not a directory" in result.output
    assert target.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def broken_plot(results, path):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ls, "plot", broken_plot)
    result = CliRunner().invoke(sim, ["--out", str(tmp_path / "res"), "--steps", "2", "--seeds", "1",
                                      "--no-progress"])  # fmt: skip
    assert isinstance(result.exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []
