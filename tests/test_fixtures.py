"""conftest's study factories: ``study_file`` writes, as TOML for ``lesionbench run``, the study that
``study`` gives as a dict, module defaults (``STUDY_DEFAULTS``) included."""

from __future__ import annotations

from lesionbench.study import load_study, parse_study

STUDY_DEFAULTS = {"name": "fixtures", "draws": 3, "n_images": 20}


def test_a_study_file_is_the_study_dict_the_cli_would_read(study, study_file, tmp_path):
    args = (
        {"ref": "fashion_alexnet", "weights": "none"},
        ["conv1", "fc8"],
        ["weight_noise", "synapse_knockout"],
        {"weight_noise": [0.5, 1.0], "synapse_knockout": [0.5]},
        tmp_path / "data",
    )
    path = study_file(tmp_path / "s.toml", *args, seed=3, batch_size=20)
    read = load_study(str(path), {})
    assert read == parse_study(study(*args, seed=3, batch_size=20))
    assert (read.name, read.draws, read.seed, read.batch_size) == ("fixtures", 3, 3, 20)  # defaults and keywords
    assert read.models[0].weights == "none" and read.levels["synapse_knockout"] == (0.5,)
