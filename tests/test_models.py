"""Model sources: torchvision and timm weights offline, checkpoint refusals, unknown names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from lesionbench.errors import LesionbenchError
from lesionbench.graph import discover_layers
from lesionbench.model_sources import ModelSpec, create_model, load_checkpoint_into, load_state_dict
from lesionbench.models import fashion as default_models
from lesionbench.models.fashion import FashionAlexNet
from lesionbench.registry import create_registry

ALEXNET_FILE = Path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url).name
PAPER_NAMES = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
ALEXNET_PATHS = [
    "features.0",
    "features.3",
    "features.6",
    "features.8",
    "features.10",
    "classifier.1",
    "classifier.4",
    "classifier.6",
]


@pytest.fixture(scope="module")
def sources():
    return {k: c.obj for k, c in create_registry().contributions("models").items()}


def assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = module.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


class NotATensor:
    """A custom class: weights_only=True must refuse to unpickle it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


# ---------------------------------------------------------------- torchvision, offline


@pytest.fixture(scope="module")
def torchvision_alexnet(tmp_path_factory, sources):
    """AlexNet built through torchvision's real IMAGENET1K_V1 path from a file in $TORCH_HOME."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, checkpoints / ALEXNET_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        loaded = create_model(ModelSpec("torchvision:alexnet", weights="IMAGENET1K_V1"), sources)
    return loaded, state


def test_torchvision_weights_come_from_torch_home(torchvision_alexnet):
    loaded, state = torchvision_alexnet
    assert_same_state(loaded.module, state)
    assert not loaded.module.training
    assert loaded.module(torch.zeros(1, *loaded.input_size)).shape[-1] == 1000
    assert loaded.input_size == (3, 224, 224)
    assert loaded.name == "torchvision:alexnet"
    assert "IMAGENET1K_V1" in loaded.preprocess_key


def test_torchvision_alexnet_has_paper_aliases(torchvision_alexnet):
    loaded, _ = torchvision_alexnet
    assert loaded.aliases == dict(zip(ALEXNET_PATHS, PAPER_NAMES))
    modules = dict(loaded.module.named_modules())
    for path in ALEXNET_PATHS[:5]:
        assert isinstance(modules[path], torch.nn.Conv2d)
    for path in ALEXNET_PATHS[5:]:
        assert isinstance(modules[path], torch.nn.Linear)
    layers = discover_layers(loaded.module, torch.zeros(1, *loaded.input_size), loaded.aliases)
    assert [l.display for l in layers] == PAPER_NAMES
    assert [l.name for l in layers] == ALEXNET_PATHS


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_torchvision_preprocess_gives_3x224x224(torchvision_alexnet, mode):
    loaded, _ = torchvision_alexnet
    rng = np.random.default_rng(0)
    shape = (300, 260, 3) if mode == "RGB" else (300, 260)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)
    out = loaded.preprocess(image)
    assert out.shape == (3, 224, 224)
    assert out.dtype == torch.float32
    expected = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()(image.convert("RGB"))
    assert torch.allclose(out, expected)


def test_torchvision_corrupt_cached_weights_say_where_to_put_them(tmp_path, monkeypatch, sources):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # a cached file exists, so nothing is downloaded; it is not a checkpoint and must not load:
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / ALEXNET_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(LesionbenchError) as info:
        create_model(ModelSpec("torchvision:alexnet", weights="IMAGENET1K_V1"), sources)
    assert ALEXNET_FILE in str(info.value)
    assert "TORCH_HOME" in str(info.value)


def test_torchvision_without_weights_uses_imagenet_transform(sources):
    torch.manual_seed(0)
    loaded = create_model(ModelSpec("torchvision:resnet18", weights="none", options={"num_classes": 7}), sources)
    assert loaded.module(torch.zeros(1, *loaded.input_size)).shape[-1] == 7
    assert loaded.aliases == {}
    assert loaded.preprocess_key == "imagenet:256:224:meanstd"
    assert loaded.preprocess(Image.new("L", (64, 80), 100)).shape == (3, 224, 224)


# ---------------------------------------------------------------- timm, local weights file


def test_timm_local_weights_file(tmp_path, sources):
    torch.manual_seed(1)
    state = timm.create_model("resnet18", num_classes=10).state_dict()
    path = tmp_path / "resnet18-10.pth"
    torch.save(state, path)
    loaded = create_model(ModelSpec("timm:resnet18", weights=str(path), options={"num_classes": 10}), sources)
    assert_same_state(loaded.module, state)  # the classifier too, not a fresh random head
    assert loaded.module(torch.zeros(1, *loaded.input_size)).shape[-1] == 10
    assert loaded.input_size == (3, 224, 224)
    assert loaded.preprocess_key.startswith("timm:")
    assert loaded.preprocess(Image.new("L", (50, 40), 30)).shape == (3, 224, 224)
    assert not loaded.module.training


def test_timm_local_weights_file_sets_the_class_count(tmp_path, sources):
    torch.manual_seed(2)
    state = timm.create_model("resnet18", num_classes=10).state_dict()
    path = tmp_path / "resnet18-10.pth"
    torch.save(state, path)
    loaded = create_model(ModelSpec("timm:resnet18", weights=str(path)), sources)
    assert loaded.module(torch.zeros(1, *loaded.input_size)).shape[-1] == 10
    assert_same_state(loaded.module, state)


def test_timm_weights_of_another_architecture_are_refused(tmp_path, sources):
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", num_classes=4).state_dict(), path)
    with pytest.raises(LesionbenchError, match="does not fit timm:resnet18"):
        create_model(ModelSpec("timm:resnet18", weights=str(path)), sources)


def test_timm_refuses_a_pickled_weights_file(tmp_path, sources):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "x": NotATensor()}, path)
    with pytest.raises(LesionbenchError, match="weights_only"):
        create_model(ModelSpec("timm:resnet18", weights=str(path)), sources)


# ---------------------------------------------------------------- checkpoint loading and refusals


def test_load_state_dict_round_trip_and_wrappers(tmp_path):
    state = FashionAlexNet().state_dict()
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(state, plain)
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        loaded = load_state_dict(path)
        assert set(loaded) == set(state)
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_load_checkpoint_strips_data_parallel_prefix(tmp_path):
    torch.manual_seed(3)
    state = FashionAlexNet().state_dict()
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model = FashionAlexNet()
    load_checkpoint_into(model, path)
    assert_same_state(model, state)


def test_pickled_custom_object_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    state = dict(FashionAlexNet().state_dict())
    state["extra"] = NotATensor()
    torch.save(state, path)
    with pytest.raises(LesionbenchError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert "weights_only" in msg and "pickled" in msg
    assert str(path) in msg
    with pytest.raises(LesionbenchError, match="weights_only"):
        load_checkpoint_into(FashionAlexNet(), path)


def test_truncated_checkpoint_is_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(FashionAlexNet().state_dict(), good)
    blob = good.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(LesionbenchError, match="unreadable or truncated"):
        load_state_dict(path)
    with pytest.raises(LesionbenchError, match="unreadable or truncated"):
        load_checkpoint_into(FashionAlexNet(), path)


@pytest.mark.parametrize(
    "blob",
    [b"", b"hello world, not a checkpoint", bytes(range(256)) * 3, b"\x80\x02}q\x00(X"],
    ids=["empty", "text", "bytes", "cut-pickle"],
)
def test_junk_files_are_refused_cleanly(tmp_path, blob):
    path = tmp_path / "junk.pt"
    path.write_bytes(blob)
    with pytest.raises(LesionbenchError, match=r"junk\.pt"):
        load_state_dict(path)


def test_legacy_format_truncations_are_refused_cleanly(tmp_path):
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buf, _use_new_zipfile_serialization=False)
    blob = buf.getvalue()
    path = tmp_path / "legacy.pt"
    path.write_bytes(blob)
    assert torch.equal(load_state_dict(path)["w"], torch.arange(6.0))
    for cut in range(1, len(blob), max(1, len(blob) // 40)):
        path.write_bytes(blob[:cut])
        with pytest.raises(LesionbenchError):
            load_state_dict(path)


def test_tensor_list_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(3), torch.zeros(2)], path)
    with pytest.raises(LesionbenchError, match="not a state dict"):
        load_state_dict(path)


@pytest.mark.parametrize("obj", [{}, {"w": [1.0, 2.0]}, {1: torch.ones(1)}], ids=["empty", "lists", "int-keys"])
def test_other_non_state_dicts_are_refused(tmp_path, obj):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(LesionbenchError, match="not a state dict"):
        load_state_dict(path)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(LesionbenchError, match="does not exist") as info:
        load_checkpoint_into(FashionAlexNet(), path)
    assert "absent.pt" in str(info.value)
    with pytest.raises(LesionbenchError, match="does not exist"):
        load_state_dict(tmp_path)  # a directory is not a checkpoint file either


def test_wrong_keys_do_not_fit(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    with pytest.raises(LesionbenchError) as info:
        load_checkpoint_into(FashionAlexNet(), path)
    msg = str(info.value)
    assert "does not fit" in msg
    assert "missing" in msg and "unexpected" in msg
    assert "'conv1.weight'" in msg


def test_partial_state_dict_does_not_fit(tmp_path):
    state = FashionAlexNet().state_dict()
    del state["fc8.bias"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(LesionbenchError, match=r"does not fit the model: missing 1 keys \(e\.g\. 'fc8\.bias'\)"):
        load_checkpoint_into(FashionAlexNet(), path)


def test_wrong_shapes_do_not_fit(tmp_path):
    path = tmp_path / "five.pt"
    torch.save(FashionAlexNet(num_classes=5).state_dict(), path)
    with pytest.raises(LesionbenchError) as info:
        load_checkpoint_into(FashionAlexNet(num_classes=10), path)
    assert "does not fit" in str(info.value)
    assert "fc8" in str(info.value)


def test_fashion_alexnet_checkpoint_loads_and_file_is_untouched(tmp_path, sources):
    torch.manual_seed(4)
    state = FashionAlexNet().state_dict()
    path = tmp_path / "mine.pt"
    torch.save(state, path)
    before = path.read_bytes()
    stat_before = path.stat()
    loaded = create_model(ModelSpec("fashion_alexnet", checkpoint=str(path)), sources)
    assert_same_state(loaded.module, state)
    assert loaded.module(torch.zeros(1, *loaded.input_size)).shape[-1] == 10
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stat_before.st_mtime_ns  # file untouched
    assert loaded.input_size == (1, 28, 28)
    assert not loaded.module.training
    out = loaded.preprocess(Image.new("RGB", (40, 30), (10, 200, 30)))
    assert out.shape == (1, 28, 28)


def test_checkpoint_files_are_never_written_by_a_study_that_damages_every_layer(tmp_path):
    """Through every loading path (a fashion net's checkpoint, its init_checkpoint, a timm weights
    file), a study that damages every layer in place, rerandomises and reinitialises them, leaves
    each file's bytes and modification time as they were."""
    from conftest import write_fashion
    from lesionbench.api import run

    torch.manual_seed(4)
    files = {"ckpt": tmp_path / "alexnet.pt", "init": tmp_path / "alexnet_init.pt", "timm": tmp_path / "timm.pt"}
    torch.save(FashionAlexNet().state_dict(), files["ckpt"])
    torch.save(FashionAlexNet().state_dict(), files["init"])
    torch.save(timm.create_model("test_resnet", num_classes=10, in_chans=1).state_dict(), files["timm"])
    before = {k: (p.read_bytes(), p.stat().st_mtime_ns) for k, p in files.items()}
    data = write_fashion(tmp_path / "fashion", n=20)
    study = {
        "models": [
            {"ref": "fashion_alexnet", "checkpoint": str(files["ckpt"]), "init_checkpoint": str(files["init"])},
            {"ref": "timm:test_resnet", "weights": str(files["timm"]), "options": {"num_classes": 10, "in_chans": 1}},
        ],
        "perturbations": ["node_knockout", "bit_flip", "rerandomize"],
        "levels": {"node_knockout": [1.0], "bit_flip": [1e-2], "rerandomize": [1.0]},
        "draws": 1,
        "device": "cpu",
        "dataset": {"name": "fashion_mnist", "path": str(data), "n_images": 4},
    }
    df = run(study, tmp_path / "run")
    assert (df["perturbation"] != "clean").sum() > 40  # every layer of both models damaged, norms too
    reinit = run(study | {"models": study["models"][:1], "perturbations": ["reinit"], "levels": {"reinit": [1.0]}})
    assert len(reinit) > 1
    assert {k: (p.read_bytes(), p.stat().st_mtime_ns) for k, p in files.items()} == before


def test_fashion_alexnet_by_prefix_and_without_weights(sources):
    loaded = create_model(ModelSpec("fashion:fashion_alexnet", weights="none"), sources)
    assert isinstance(loaded.module, FashionAlexNet)
    assert loaded.module(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_fashion_alexnet_without_shipped_weights_says_how_to_train(tmp_path, monkeypatch, sources):
    monkeypatch.setattr(default_models, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(LesionbenchError, match="lesionbench train fashion_alexnet"):
        create_model("fashion_alexnet", sources)


def test_fashion_alexnet_uses_shipped_weights_file(tmp_path, monkeypatch, sources):
    torch.manual_seed(5)
    state = FashionAlexNet().state_dict()
    torch.save(state, tmp_path / "fashion_alexnet.pt")
    monkeypatch.setattr(default_models, "WEIGHTS_DIR", tmp_path)
    loaded = create_model("fashion_alexnet", sources)
    assert_same_state(loaded.module, state)


# ---------------------------------------------------------------- names


def test_model_spec_parsing():
    spec = ModelSpec("timm:resnet18")
    assert (spec.source, spec.arch) == ("timm", "resnet18")
    spec = ModelSpec("fashion_alexnet")
    assert (spec.source, spec.arch) == (None, "fashion_alexnet")


def test_unknown_bare_model_name(sources):
    with pytest.raises(LesionbenchError) as info:
        create_model("fashion_alexnt", sources)
    msg = str(info.value)
    assert "unknown model 'fashion_alexnt'" in msg
    assert "Did you mean 'fashion_alexnet'?" in msg
    assert "fashion_alexnet" in msg.split("Valid:")[1]
    assert "timm:<name>" in msg and "torchvision:<name>" in msg


def test_unknown_source_prefix(sources):
    with pytest.raises(LesionbenchError) as info:
        create_model("torchvison:alexnet", sources)
    msg = str(info.value)
    assert "unknown model source 'torchvison'" in msg
    assert "Did you mean 'torchvision'?" in msg
    assert "Valid: efficientnet_lite, fashion, hf, int8, timm, torchvision" in msg


def test_unknown_torchvision_model(sources):
    with pytest.raises(LesionbenchError) as info:
        create_model("torchvision:alexnt", sources)
    msg = str(info.value)
    assert "Did you mean 'alexnet'?" in msg
    assert "resnet18" in msg.split("Valid:")[1]


def test_unknown_torchvision_weights(sources):
    with pytest.raises(LesionbenchError) as info:
        create_model(ModelSpec("torchvision:alexnet", weights="IMAGENET1K_V2"), sources)
    msg = str(info.value)
    assert "unknown weights for torchvision:alexnet 'IMAGENET1K_V2'" in msg
    assert "Did you mean 'IMAGENET1K_V1'?" in msg
    assert "DEFAULT" in msg.split("Valid:")[1]


@pytest.mark.parametrize("typo", ["resnet81", "rsenet18"])
def test_unknown_timm_model(sources, typo):
    with pytest.raises(LesionbenchError) as info:
        create_model(f"timm:{typo}", sources)
    msg = str(info.value)
    assert f"unknown timm model {typo!r}" in msg
    assert "Did you mean 'resnet18'?" in msg
    assert "resnet18" in msg.split("Valid:")[1]
