"""Class-specific damage (issue #18): the most fragile layer, the classes it hurts most, the
leaderboard line and the per-class heatmap, from a per-class accuracy table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionbench.class_damage import classes_hurt, fragile_layers, hurt_lines, retention_grid
from lesionbench.class_plots import class_retention_heatmaps


def table(retentions: dict, model="m", perturbation="p", n_images=None) -> pd.DataFrame:
    """retentions: layer -> {level: [retention of class 0, 1, 2]}; accuracy = 0.9 × retention."""
    rows = []
    for i, (layer, levels) in enumerate(retentions.items()):
        for level, per_class in levels.items():
            for c, r in enumerate(per_class):
                rows.append(
                    dict(
                        model=model,
                        dataset="d",
                        layer=layer,
                        layer_index=i,
                        relative_depth=i / 2,
                        perturbation=perturbation,
                        level=level,
                        **{"class": c},
                        n_images=(n_images or [10, 10, 10])[c],
                        accuracy=0.9 * r,
                        clean=0.9,
                        retention=r,
                    )
                )
    return pd.DataFrame(rows)


def test_the_most_fragile_layer_has_the_lowest_image_weighted_mean_retention():
    df = table(
        {
            "conv1": {0.0: [1, 1, 1], 0.5: [0.9, 0.9, 0.0]},  # level means 1, 0.6 -> 0.8
            "fc6": {0.0: [1, 1, 1], 0.5: [0.7, 0.7, 0.7]},
        }
    )  # 1, 0.7 -> 0.85
    f = fragile_layers(df)
    assert f[["model", "perturbation", "layer"]].values.tolist() == [["m", "p", "conv1"]]
    assert f["fragility"].iloc[0] == pytest.approx(0.8)
    # weighting by images: class 2 nearly empty, so conv1's collapse on it barely counts
    light = table(
        {"conv1": {0.0: [1, 1, 1], 0.5: [0.9, 0.9, 0.0]}, "fc6": {0.0: [1, 1, 1], 0.5: [0.7, 0.7, 0.7]}},
        n_images=[10, 10, 1],
    )
    assert fragile_layers(light)["layer"].iloc[0] == "fc6"


def test_ties_go_to_the_earlier_layer_and_the_lower_class():
    df = table({"b": {0.5: [0.5, 0.5, 0.5]}, "a": {0.5: [0.5, 0.5, 0.5]}})
    assert fragile_layers(df)["layer"].iloc[0] == "b"  # layer_index 0
    hurt = classes_hurt(df)
    assert hurt["class"].tolist() == [0, 1, 2] and hurt["rank"].tolist() == [1, 2, 3]


def test_classes_hurt_most_are_ranked_by_mean_retention_at_the_fragile_layer():
    df = table(
        {
            "conv1": {0.0: [1, 1, 1], 0.5: [0.8, 0.2, 0.5], 1.0: [0.6, 0.0, 0.1]},
            "fc6": {0.0: [1, 1, 1], 0.5: [0.0, 1, 1], 1.0: [1, 1, 1]},
        }
    )
    hurt = classes_hurt(df)
    assert (hurt["layer"] == "conv1").all()
    assert hurt["class"].tolist() == [1, 2, 0]
    assert hurt["retention"].tolist() == pytest.approx([0.4, 1.6 / 3, 0.8])
    assert hurt["accuracy"].tolist() == pytest.approx([0.36, 0.48, 0.72])
    # a layer named from elsewhere (the leaderboard's, by layer score) is read instead
    chosen = classes_hurt(df, pd.DataFrame({"model": ["m"], "perturbation": ["p"], "layer": ["fc6"]}))
    assert chosen["class"].iloc[0] == 0 and (chosen["layer"] == "fc6").all()


def test_the_leaderboard_line_names_the_classes_hurt_most_and_least():
    df = pd.concat([table({"conv1": {0.5: [0.8, 0.2, 0.5]}}), table({"fc6": {0.5: [0.1, 0.9, 0.3]}}, perturbation="q")])
    lines = hurt_lines(classes_hurt(df), k=2, class_names=["T-shirt", "Trouser", "Pullover"])
    assert lines == [
        "- **m**, p at conv1: hurt most Trouser (0.20), Pullover (0.50); least T-shirt (0.80) — mean retention over levels",
        "- **m**, q at fc6: hurt most T-shirt (0.10), Pullover (0.30); least Trouser (0.90) — mean retention over levels",
    ]
    assert "class 1 (0.20)" in hurt_lines(classes_hurt(df))[0]  # no names: labels


def test_the_heatmap_draws_each_models_fragile_layer_classes_by_levels(tmp_path):
    df = pd.concat(
        [
            table({"conv1": {0.0: [1, 1, 1], 1.0: [1.0, 0.0, 0.5]}, "fc6": {0.0: [1, 1, 1], 1.0: [1, 1, 1]}}),
            table({"conv1": {0.0: [1, 1, 1], 1.0: [1, 1, 1]}}, model="other"),
        ]
    )
    grid = retention_grid(df, "m", "p", "conv1")
    assert grid.index.tolist() == [0, 1, 2] and grid.columns.tolist() == [0.0, 1.0]
    assert grid[1.0].tolist() == [1.0, 0.0, 0.5]
    paths = class_retention_heatmaps(df, tmp_path, class_names=["a", "b", "c"])
    assert [p.name for p in paths] == ["d__m__classes.png", "d__other__classes.png"]
    for path in paths:
        with Image.open(path) as im:
            assert im.width > 300 and im.height > 200
            assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # something drawn


def test_a_heatmap_of_many_perturbations_stays_readable_at_1200_px(tmp_path):
    """At most 4 panels a row, so a model studied under 13 perturbations still fits 1,210 px."""
    df = pd.concat([table({"conv1": {0.0: [1, 1, 1], 1.0: [1.0, 0.0, 0.5]}}, perturbation=f"p{i}") for i in range(13)])
    (path,) = class_retention_heatmaps(df, tmp_path)
    with Image.open(path) as im:
        assert im.width <= 1210 and im.height > 4 * 200  # four rows of panels


def test_a_table_without_the_columns_is_refused():
    with pytest.raises(ValueError, match="needs the columns"):
        fragile_layers(pd.DataFrame({"model": ["m"]}))


def _one_weak_unit(per_class: int) -> tuple:
    """A linear read-out whose unit 1 has the smallest weight norm, on images of three classes that
    each light up their own input: pruning one unit by norm silences exactly class 1."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(per_class)
    x = torch.nn.functional.one_hot(y, 3).float() + 0.01 * torch.randn(len(y), 3, generator=gen)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.diag(torch.tensor([1.0, 0.5, 1.0])))
        net[1].bias.zero_()
    return net, x, y


def _run_and_publish(tmp_path, per_class: int) -> str:
    """The leaderboard page (``LB.md`` in ``tmp_path``) published from a run (``tmp_path/run``) of
    :func:`_one_weak_unit` on ``per_class`` images a class, filter pruning at 0 and one unit of 3."""
    import lesionbench
    from lesionbench.publish import publish

    net, x, y = _one_weak_unit(per_class=per_class)
    lesionbench.run(
        model=net,
        data=(x, y),
        out=tmp_path / "run",
        perturbations=["filter_prune"],
        levels=[0.0, 1 / 3],
        layers=["1"],
        seed=0,
        device="cpu",
    )
    return publish([tmp_path / "run"], tmp_path / "LB.md").read_text()


def test_a_published_leaderboard_names_the_class_the_fragile_layer_hurts(tmp_path):
    """End to end: run → outcomes → publish: the class-damage line names class 1 (the silenced unit's
    class) as hurt most, and the per-class heatmap is drawn and linked."""
    text = _run_and_publish(tmp_path, per_class=20)
    line = next(ln for ln in text.splitlines() if ln.startswith(r"- **model**, filter\_prune at 1:"))
    assert "hurt most class 1 (0.50)" in line  # retention 1 at level 0, 0 at one unit pruned
    assert "20 images per class" in text
    heatmap = tmp_path / "plots" / "tensors__model__classes.png"
    page = (tmp_path / "models" / "tensors--model.md").read_text()  # the model's own page links its figures
    assert heatmap.is_file() and "(../plots/tensors__model__classes.png)" in page


def test_too_few_images_per_class_are_not_read_as_class_damage(tmp_path):
    text = _run_and_publish(tmp_path, per_class=4)
    assert "Classes hurt most: not named — this track has 4 image(s) of some classes" in text
    assert not list((tmp_path / "plots").glob("*__classes.png"))


def test_plugin_names_in_the_class_damage_lines_are_escaped_for_markdown():
    from lesionbench.leaderboard import _class_damage
    from lesionbench.reporters.markdown import _class_damage as markdown_lines

    df = table(
        {"a|b": {0.0: [1, 1, 1], 1.0: [0.2, 0.9, 0.5]}}, model="net*", perturbation="p_[x]", n_images=[10, 10, 10]
    )
    scores = pd.DataFrame(
        {"model": ["net*"], "perturbation": ["p_[x]"], "layer": ["a|b"], "layer_index": [0], "score": [0.5]}
    )
    lines = markdown_lines(_class_damage(df, scores, ["p_[x]"], ["c|0", "c1", "c2"]))
    (line,) = [ln for ln in lines if ln.startswith("- ")]
    assert line.startswith(r"- **net\***, p\_\[x\] at a\|b: hurt most c\|0 (0.60), c2 (0.75); least c1 (0.95)")
