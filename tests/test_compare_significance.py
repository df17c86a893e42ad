"""The compare gate with significance, end to end: a small network trained here on separable data,
studied twice with different seeds (other draws, the same images) and once with one layer damaged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lesionbench
from lesionbench.cli import main
from lesionbench.compare import compare
from lesionbench.store import read_results_with_outcomes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A network this small runs fastest on one thread (and is not slowed by a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained():
    """A 3-layer MLP at about 90% on 10 Gaussian classes (1,600 points)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 16, generator=g) * 1.6
    y = torch.arange(1600) % 10
    x = centres[y] + torch.randn(1600, 16, generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    assert (net(x).argmax(1) == y).float().mean() > 0.8
    return net, x, y


def study(net, x, y, out, seed, **options):
    return lesionbench.run(
        model=net,
        data=(x, y),
        out=out,
        seed=seed,
        draws=3,
        n_images=800,
        device="cpu",
        perturbations=["synapse_knockout", "weight_noise"],
        **options,
    )


def test_a_rerun_with_another_seed_passes_and_a_damaged_layer_fails(trained, tmp_path, capsys):
    net, x, y = trained
    study(net, x, y, tmp_path / "base", seed=0)
    study(net, x, y, tmp_path / "rerun", seed=1)  # other draws; the same 800 of 1,600 images (subset_seed)
    assert main(["compare", str(tmp_path / "rerun"), str(tmp_path / "base")]) == 0
    out = capsys.readouterr().out
    assert "significant (paired bootstrap test" in out and "[" in out  # each change with its interval

    # noise is there: by the threshold alone a small --max-drop would have failed the rerun
    (new, no), (base, bo) = (
        read_results_with_outcomes(tmp_path / "rerun"),
        read_results_with_outcomes(tmp_path / "base"),
    )
    threshold_only = compare(new.drop(columns="outcome"), base.drop(columns="outcome"), 0.01)
    with_test = compare(new, base, 0.01, new_outcomes=no, base_outcomes=bo)
    assert len(threshold_only.regressions) > len(with_test.regressions)
    assert with_test.tested and with_test.table["low"].notna().all()

    damaged = copy.deepcopy(net)
    with torch.no_grad():
        w = damaged[2].weight
        w.mul_((torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.6).float())  # 60% of layer 2 gone
    study(damaged, x, y, tmp_path / "damaged", seed=1)
    assert main(["compare", str(tmp_path / "damaged"), str(tmp_path / "base")]) == 1
    out = capsys.readouterr().out
    assert "❌ regression" in out and "clean top-1" in out


def test_runs_on_other_images_are_said_so_and_not_paired(trained, tmp_path, capsys):
    """Another subset seed: the two runs share only part of their images, and compare says so; each
    run's images are then resampled on their own, and every change still gets its interval."""
    net, x, y = trained
    base = study(net, x, y, tmp_path / "base", seed=0)
    study(net, x, y, tmp_path / "same", seed=1)
    other = study(net, x, y, tmp_path / "other", seed=1, subset_seed=5)
    assert set(base["n_images"]) == set(other["n_images"]) == {800}
    assert main(["compare", str(tmp_path / "same"), str(tmp_path / "base")]) == 0
    assert "the runs evaluated different images" not in capsys.readouterr().out
    main(["compare", str(tmp_path / "other"), str(tmp_path / "base")])
    out = capsys.readouterr().out
    assert "the runs evaluated different images" in out and "800 in new, 800 in baseline" in out and "not paired" in out
    (b, bo), (s, so), (o, oo) = (read_results_with_outcomes(tmp_path / d) for d in ("base", "same", "other"))
    paired, unpaired = (
        compare(s, b, new_outcomes=so, base_outcomes=bo),
        compare(o, b, new_outcomes=oo, base_outcomes=bo),
    )
    assert unpaired.tested and unpaired.table["low"].notna().all() and paired.warnings == []
    assert any("not paired" in w for w in unpaired.warnings)
