"""Post-training-quantized int8 models: ``int8:<model>`` is any other model quantized to int8.

``int8:fashion_alexnet``, ``int8:efficientnet_lite0``, ``int8:timm:resnet18``… build the float
model through its own source, then quantize it with PyTorch's post-training static quantization
(``torch.ao.quantization.quantize_fx``: ``prepare_fx`` → calibration → ``convert_fx``, the
``x86`` backend (fbgemm kernels), its default QConfigMapping: weights int8 symmetric per output
channel, activations uint8 affine per tensor from histogram observers, BatchNorm folded into the
conv before it). The result runs real int8 kernels on the CPU (quantized tensors have no CUDA
kernels: study such a model with ``device = "cpu"``).

Every quantized Conv2d/Linear of the converted model is replaced by :class:`Int8Conv2d` /
:class:`Int8Linear`, which keep the layer's **stored int8 weight codes as a plain int8
Parameter** ``weight`` (plus the float32 ``bias`` fbgemm keeps, and the per-channel scale and zero
point as buffers). The kernel's packed weights are a cache of those tensors, packed again
(``set_weight_bias``) at the first forward call after they changed (their version counter moves
with every in-place write). So every weight perturbation acts on the stored int8 codes as it acts
on float weights (bit flips flip the code's 8 bits, stuck-at forces them, knockouts zero codes,
i.e. zero weights as the zero point is 0), the harness's snapshot restores them bit for bit like
any Parameter, and layer discovery finds them as Conv2d/Linear layers.

Calibration images come from a dataset plugin, through the float model's own preprocessing:
``options = {calibration_dataset = "image_folder", calibration_data = PATH, calibration_images = 256,
calibration_split = "train"}``. The Fashion-MNIST nets calibrate on 256 images of the
Fashion-MNIST *training* split by default (disjoint from the test images a study evaluates).
Other options go to the float model's source. Results say the dtype through the model's name
(``int8:…``).

torch 2.14 warns that ``torch.ao.quantization`` and quantized tensors are deprecated in favour of
torchao; torchao 0.18's int8 tensor subclasses have no convolution on the CPU and its PT2E flow
gives a graph without modules, so this module keeps the still-working torch.ao path.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from lesionbench.errors import LesionbenchError
from lesionbench.hookspecs import hookimpl
from lesionbench.model_sources import LoadedModel, ModelSpec, create_model

BACKEND = "x86"
CALIBRATION_OPTIONS = ("calibration_dataset", "calibration_data", "calibration_split", "calibration_images")
DEFAULT_CALIBRATION_IMAGES = 256


def _quantized_classes() -> tuple[type, type]:
    import torch.ao.nn.quantized as nnq

    return nnq.Conv2d, nnq.Linear


class _Int8Weights:
    """What Int8Conv2d and Int8Linear share: int8 codes as the Parameter ``weight``, the quantized
    module (held outside the module tree, so it is neither a submodule nor in the state dict) as a
    cache of them, packed again after every change."""

    def _take(self, quantized: nn.Module) -> None:
        qweight, bias = quantized.weight(), quantized.bias()
        if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale, zero_point = qweight.q_per_channel_scales(), qweight.q_per_channel_zero_points()
            if qweight.q_per_channel_axis() != 0:
                raise LesionbenchError(f"int8 weights quantized along axis {qweight.q_per_channel_axis()}, not 0")
        else:
            n = qweight.shape[0]
            scale = torch.full((n,), qweight.q_scale(), dtype=torch.float64)
            zero_point = torch.full((n,), qweight.q_zero_point(), dtype=torch.int64)
        self.weight = nn.Parameter(qweight.int_repr(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.register_buffer("weight_scale", scale.to(torch.float64))
        self.register_buffer("weight_zero_point", zero_point.to(torch.int64))
        self.per_channel = qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        object.__setattr__(self, "quantized", quantized)
        self._packed_key = self._key()

    def _key(self) -> tuple:
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def dequantized_weight(self) -> torch.Tensor:
        """The real weights the codes stand for: (code − zero point) · scale, float64, per output unit."""
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return (self.weight.double() - self.weight_zero_point.view(shape)) * self.weight_scale.view(shape)

    def quantized_weight(self) -> torch.Tensor:
        """The codes as a quantized qint8 tensor (what the kernel packs), built exactly from them."""
        codes = self.weight.detach().cpu()
        if self.per_channel:
            return torch._make_per_channel_quantized_tensor(codes, self.weight_scale, self.weight_zero_point, 0)
        return torch._make_per_tensor_quantized_tensor(
            codes, float(self.weight_scale[0]), int(self.weight_zero_point[0])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise LesionbenchError(
                f'int8 models run on the CPU only (torch.ao\'s int8 kernels), not on {x.device}: use device = "cpu"'
            )
        key = self._key()  # reads the weight (the graph probe sees the layer used here)
        if key != self._packed_key:
            bias = self.bias.detach().cpu() if self.bias is not None else None
            self.quantized.set_weight_bias(self.quantized_weight(), bias)
            self._packed_key = key
        return self.quantized(x)


class Int8Conv2d(_Int8Weights, nn.Conv2d):
    """A quantized (torch.ao) Conv2d whose int8 weight codes are the Parameter ``weight``."""

    def __init__(self, quantized: nn.Module) -> None:
        nn.Conv2d.__init__(
            self,
            quantized.in_channels,
            quantized.out_channels,
            quantized.kernel_size,
            stride=quantized.stride,
            padding=quantized.padding,
            dilation=quantized.dilation,
            groups=quantized.groups,
            bias=False,
            device="meta",
        )
        self._take(quantized)

    def extra_repr(self) -> str:
        return f"int8, {type(self.quantized).__name__}: " + nn.Conv2d.extra_repr(self)


class Int8Linear(_Int8Weights, nn.Linear):
    """A quantized (torch.ao) Linear whose int8 weight codes are the Parameter ``weight``."""

    def __init__(self, quantized: nn.Module) -> None:
        nn.Linear.__init__(self, quantized.in_features, quantized.out_features, bias=False, device="meta")
        self._take(quantized)

    def extra_repr(self) -> str:
        return f"int8, {type(self.quantized).__name__}: " + nn.Linear.extra_repr(self)


def expose_int8_weights(model: nn.Module) -> list[str]:
    """Replace every quantized Conv2d/Linear of ``model`` by Int8Conv2d/Int8Linear, in place; their names."""
    conv, linear = _quantized_classes()
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (conv, linear)) and not isinstance(module, _Int8Weights):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int8Conv2d(module) if isinstance(module, conv) else Int8Linear(module))
            replaced.append(name)
    return replaced


class PaddedConv2d(nn.Module):
    """A TF-"SAME" conv (timm's ``Conv2dSame``) for one fixed input size: a ZeroPad2d, then the conv
    with no padding of its own. Same numbers; no size-dependent control flow, so torch.fx traces it."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d(pad)
        self.conv = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        self.conv.load_state_dict(conv.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial dim: as timm's ``pad_same``."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def fix_same_padding(module: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Replace every timm ``Conv2dSame`` of ``module`` by a :class:`PaddedConv2d` for ``example``'s
    size, in place; returns aliases (``name.conv`` → ``name``) so the layer keeps its name."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return {}
    same = {name: m for name, m in module.named_modules() if isinstance(m, Conv2dSame)}
    sizes: dict[str, tuple[int, int]] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: sizes.__setitem__(n, tuple(args[0].shape[-2:])))
        for n, m in same.items()
    ]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    aliases = {}
    for name, conv in same.items():
        if name not in sizes:
            continue
        (top, bottom), (left, right) = (
            same_padding(sizes[name][i], conv.kernel_size[i], conv.stride[i], conv.dilation[i]) for i in range(2)
        )
        parent_name, _, child = name.rpartition(".")
        setattr(
            module.get_submodule(parent_name) if parent_name else module,
            child,
            PaddedConv2d(conv, (left, right, top, bottom)),
        )
        aliases[f"{name}.conv"] = name
    return aliases


def split_batchnorm_act(module: nn.Module) -> int:
    """Replace every timm ``BatchNormAct2d`` (BatchNorm and activation in one module, traced as a
    functional batch_norm that torch.ao cannot fold) by ``Sequential(BatchNorm2d, act)``, in place,
    so that the conv before it is fused with its BatchNorm as in deployment; returns how many."""
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return 0
    found = [(name, m) for name, m in module.named_modules() if isinstance(m, BatchNormAct2d)]
    for name, m in found:
        bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        bn.load_state_dict({k: v for k, v in m.state_dict().items() if k in bn.state_dict()})
        parent_name, _, child = name.rpartition(".")
        setattr(
            module.get_submodule(parent_name) if parent_name else module, child, nn.Sequential(bn.eval(), m.drop, m.act)
        )
    return len(found)


def quantize_int8(module: nn.Module, calibration: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Post-training static int8 quantization of ``module`` (float, eval mode) with torch.ao FX.

    ``calibration``: preprocessed float images [N, C, H, W] that the observers see. Returns the
    converted model with its weights exposed (:func:`expose_int8_weights`), on the CPU.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = BACKEND
    module = module.cpu().eval()
    with warnings.catch_warnings():  # torch 2.14 announces the deprecation at every call
        warnings.simplefilter("ignore")
        try:
            prepared = prepare_fx(module, get_default_qconfig_mapping(BACKEND), example_inputs=(calibration[:1],))
        except Exception as exc:  # untraceable control flow, unsupported op…
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LesionbenchError(f"torch.ao cannot quantize this model ({type(exc).__name__}: {first})") from None
        with torch.no_grad():
            for b in range(0, len(calibration), batch_size):
                prepared(calibration[b : b + batch_size])
        converted = convert_fx(prepared)
    expose_int8_weights(converted)
    return converted.eval()


def calibration_images(loaded: LoadedModel, options: Mapping[str, Any], arch: str) -> torch.Tensor:
    """The preprocessed calibration images the options name (a class-stratified subset, seed 0)."""
    from lesionbench.data import stratified_subset
    from lesionbench.registry import get_registry

    fashion = arch.startswith("fashion_")
    dataset = options.get("calibration_dataset", "fashion_mnist" if fashion else None)
    if dataset is None:
        raise LesionbenchError(
            f"int8:{arch} needs calibration images: give options calibration_dataset (e.g. 'image_folder') "
            "and calibration_data (its path)"
        )
    count = int(options.get("calibration_images", DEFAULT_CALIBRATION_IMAGES))
    if count < 1:
        raise LesionbenchError(f"calibration_images must be at least 1, not {count}")
    source = get_registry().get("datasets", str(dataset))
    split = str(options.get("calibration_split", "train" if fashion else "test"))
    raw = source.load(options.get("calibration_data"), split)
    indices = stratified_subset(raw.labels, min(count, len(raw)), 0)
    return torch.stack([loaded.preprocess(raw.decode(int(i))) for i in np.asarray(indices)])


class Int8Models:
    name = "int8"
    description = "Any model post-training quantized to int8 (torch.ao FX, x86/fbgemm): int8:<model>, CPU only."

    def claims(self, arch: str) -> bool:
        return False  # only through the prefix: int8:<model>

    def examples(self) -> list[str]:
        return ["fashion_alexnet", "efficientnet_lite0"]

    def build(self, spec: ModelSpec) -> LoadedModel:
        from lesionbench.registry import get_registry

        if not spec.arch or spec.arch.startswith("int8:"):
            raise LesionbenchError(f"int8 takes a float model's name: int8:<model>, not {spec.ref!r}")
        inner_options = {k: v for k, v in spec.options.items() if k not in CALIBRATION_OPTIONS}
        sources = {k: c.obj for k, c in get_registry().contributions("models").items()}
        inner = ModelSpec(spec.arch, spec.weights, spec.checkpoint, inner_options)
        with torch.random.fork_rng(devices=[]):
            loaded = create_model(inner, sources)
        images = calibration_images(loaded, spec.options, ModelSpec(spec.arch).arch)
        renamed = fix_same_padding(loaded.module, images[:1])  # TF-"SAME" convs: fixed padding, traceable
        split_batchnorm_act(loaded.module)  # timm's BatchNormAct2d: a BatchNorm torch.ao can fold
        module = quantize_int8(loaded.module, images)
        return LoadedModel(
            name=spec.ref,
            module=module,
            input_size=loaded.input_size,
            preprocess=loaded.preprocess,
            preprocess_key=loaded.preprocess_key,
            aliases={**{k: loaded.aliases.get(v, v) for k, v in renamed.items()}, **loaded.aliases},
            devices=("cpu",),
        )


@hookimpl
def lesionbench_models():
    return [Int8Models()]
