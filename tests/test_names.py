"""Results written before the naming rule (lesionbench.names) still read, with the rule's names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lesionbench
from lesionbench.names import legacy_layer_names

REPO = Path(__file__).resolve().parents[1]
LLM_TRACK = REPO / "leaderboard" / "results" / "llm-track"


def test_a_model_sources_wrapper_prefix_is_dropped_from_stored_keys_of_its_models_only():
    models = ["smollm2_135m", "smollm2_135m", "hf:/some/dir", "model", "alexnet", "smollm2_135m"]
    layers = ["lm.model.layers.1", "model.layers.0", "lm.transformer.h.3", "lm.fc", "lm.x", ""]
    assert list(legacy_layer_names(models, layers)) == [
        "model.layers.1",
        "model.layers.0",
        "transformer.h.3",
        "lm.fc",
        "lm.x",
        "",
    ]


@pytest.mark.skipif(
    not (LLM_TRACK / "results.csv").is_file(), reason="the committed text track is not in this checkout"
)
def test_the_committed_text_track_reads_with_every_block_named_as_transformers_names_it():
    """Its file stores 18 of SmolLM2's 30 blocks as ``lm.model.layers.N`` (those holding no studied
    layer) and the others as ``model.layers.N``; read, all 30 are ``model.layers.N`` and every row
    still finds its per-image outcomes."""
    raw = (LLM_TRACK / "results.csv").read_text()
    assert "lm.model.layers.1," in raw  # the file is as it was committed
    df, outcomes = lesionbench.load_outcomes(LLM_TRACK)
    blocks = set(df.loc[df["perturbation"] == "block_drop", "layer"])
    assert blocks == {f"model.layers.{i}" for i in range(30)}
    assert not any(name.startswith("lm.") for name in df["layer"])
    ok = df["error"].fillna("") == ""
    assert (df.loc[ok, "outcome"] >= 0).all()
    assert len(np.unique(df.loc[ok, "outcome"])) == ok.sum() <= len(outcomes.top1)
