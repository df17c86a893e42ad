"""The AlexNet baseline, ready for the day the weights are there: the ``alexnet-baseline`` preset end to
end, with a weights file written where torchvision looks for ``alexnet-owt-7be5be79.pth``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import FINISHED  # noqa: E402
from lesionbench.cli import main
from lesionbench.models.torchvision_models import ALEXNET_ALIASES
from lesionbench.store import read_results

WEIGHTS_FILE = "alexnet-owt-7be5be79.pth"
PAPER_LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # ImageNet classes 0, 1, 2, 3


@pytest.fixture
def alexnet_home(tmp_path, monkeypatch):
    """$TORCH_HOME with a state dict of AlexNet's shapes under torchvision's file name; the state."""
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    torch.manual_seed(1)
    state = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(state, home / "hub" / "checkpoints" / WEIGHTS_FILE)
    return state


def image_folder(root, per_class: int = 2):
    """ImageNet-val layout: one sub-folder per wnid, random RGB JPEGs of several sizes."""
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (200 + 40 * i, 300, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG")
    return root


def test_weights_enum_points_at_the_file_the_readme_names():
    url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    assert url.rsplit("/", 1)[-1] == WEIGHTS_FILE


def test_alexnet_baseline_runs_end_to_end_on_the_placed_weights(alexnet_home, tmp_path):
    data = image_folder(tmp_path / "val")
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "alexnet-baseline",
            "--data",
            str(data),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--draws",
            "1",
            "--levels",
            "0,0.5",
            "--n-images",
            "8",
            "--no-plots",
        ]
    )
    assert code in FINISHED
    rows = read_results(out)
    damaged = rows[rows["perturbation"] != "clean"]
    assert sorted(set(damaged["layer"]), key=PAPER_LAYERS.index) == PAPER_LAYERS  # the paper's names
    assert set(damaged["perturbation"]) == {"synapse_knockout", "node_knockout", "weight_noise"}
    assert len(damaged[damaged["level"] == 0.5]) == 8 * 3 and (damaged["error"].fillna("") == "").all()

    # The clean row is the placed file's AlexNet on the folder's images, prepared by the weights' own
    # transforms (resize 256, centre crop 224, ImageNet mean/std) — not a randomly initialised one.
    model = torchvision.models.alexnet(weights=None).eval()
    model.load_state_dict(alexnet_home)
    prepare = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()
    files = sorted(data.glob("*/*.JPEG"))
    images = torch.stack([prepare(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([WNIDS.index(f.parent.name) for f in files])
    with torch.no_grad():
        logits = model(images)
    clean = rows[rows["perturbation"] == "clean"].iloc[0]
    assert clean["n_images"] == 8
    assert clean["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()
    assert clean["top5"] == pytest.approx(top5)

    board = (out / "LEADERBOARD.md").read_text()
    assert "scores from top5" in board  # the paper's metric
    manifest = (out / "manifest.json").read_text()
    assert '"metric": "top5"' in manifest


def test_alexnet_aliases_are_the_papers_names():
    model = torchvision.models.alexnet(weights=None)
    modules = dict(model.named_modules())
    assert list(ALEXNET_ALIASES.values()) == PAPER_LAYERS
    kinds = [type(modules[path]).__name__ for path in ALEXNET_ALIASES]
    assert kinds == ["Conv2d"] * 5 + ["Linear"] * 3
    assert modules["classifier.6"].out_features == 1000


def test_without_the_file_offline_the_error_names_it(tmp_path, monkeypatch, capsys):
    """No weights file and no network: one line naming the file and the folder it belongs in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))

    def offline(*_args, **_kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    data = image_folder(tmp_path / "val", per_class=1)
    assert (
        main(
            [
                "run",
                "alexnet-baseline",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--device",
                "cpu",
                "--n-images",
                "4",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert WEIGHTS_FILE in err and "$TORCH_HOME/hub/checkpoints" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
