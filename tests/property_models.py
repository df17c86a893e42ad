"""A grammar of small networks built from the patterns real model code uses, for the property harness.

A model is described by a :class:`Spec` (plain tuples, so Hypothesis can draw and shrink it) and
built by :func:`build`, which also returns what the harness's oracles need to know *by construction*
about every weight-bearing layer (:class:`Expect`): the names lesionbench may give it, the tensors
that make its effective weight and bias zero, the module whose output is the layer's output (a LoRA
wrapper), and the channels of every per-channel norm its output units feed. Nothing here asks
lesionbench anything.

Images are [N, C, 4, 4]; token blocks see them as [N, 16, C]. The block kinds (conv, res, cat,
shared, tied, mha, tok, param; dec and stage from :mod:`property_transformers`) and what each
exercises: docs/explanation/property-harness.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.parametrizations import weight_norm

from property_transformers import Parts, decoder, stage

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # the same layout: weight [in, out], y = x @ W + b

    class Conv1D(nn.Module):
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.empty(nx, nf).normal_(std=0.5))
            self.bias = nn.Parameter(torch.zeros(nf))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


N_IMAGES, SIDE, IN_CHANNELS, CLASSES = 6, 4, 3, 5
NORMS = ("none", "bn", "gn", "in", "ln", "rms")
ACTS = ("relu", "relu_inplace", "gelu", "silu", "tanh", "none")


@dataclass(frozen=True)
class Spec:
    blocks: tuple[tuple, ...]
    head_norm: bool = False
    output: str = "tensor"  # "tuple", "dict"
    dtype: str = "float32"
    train_mode: bool = False
    seed: int = 0
    pool: str = "avg"  # the head's pooling: "avg", "max" (adaptive pools), "mean", "amax" (reductions)


@dataclass
class Expect:
    """What the oracles know about one weight-bearing layer, by construction."""

    names: tuple[str, ...]  # what lesionbench may call it (the first is its module path)
    zero: tuple[str, ...]  # Parameters whose zeroing makes the effective weight and bias zero
    site: str | None = None  # a module whose output is the layer's output (beyond the plain module)
    norms: list[tuple[str, int, list[int]]] = field(default_factory=list)  # (norm path, axis, channels)


def _act(kind: str) -> nn.Module:
    return {
        "relu": nn.ReLU(),
        "relu_inplace": nn.ReLU(inplace=True),
        "gelu": nn.GELU(),
        "silu": nn.SiLU(),
        "tanh": nn.Tanh(),
        "none": nn.Identity(),
    }[kind]


def _norm(kind: str, c: int) -> tuple[nn.Module, int]:
    """A per-channel norm for [N, C, H, W] values and the axis its output carries the channels on."""
    if kind == "bn":
        return nn.BatchNorm2d(c), 1
    if kind == "gn":
        return nn.GroupNorm(2 if c % 2 == 0 else 1, c), 1
    if kind == "in":
        return nn.InstanceNorm2d(c, affine=True), 1
    if kind == "ln":
        return nn.LayerNorm(c), -1
    return nn.RMSNorm(c), -1


def _apply_norm(norm: nn.Module, axis: int, x: torch.Tensor) -> torch.Tensor:
    if axis == 1:
        return norm(x)
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # ConvNeXt-style channels-last norm


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, act: str, act_first: bool, call: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm, self.axis = _norm(norm, cout) if norm != "none" else (nn.Identity(), 1)
        self.act, self.act_first, self.call = _act(act), act_first, call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.call == "functional":
            x = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        elif self.call == "forward":
            x = self.conv.forward(x)
        else:
            x = self.conv(x)
        if self.act_first:
            return _apply_norm(self.norm, self.axis, self.act(x))
        return self.act(_apply_norm(self.norm, self.axis, x))


class ResBlock(nn.Module):
    def __init__(self, c: int, norm: str, add: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm, self.axis = _norm(norm, c) if norm != "none" else (nn.Identity(), 1)
        self.add = add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _apply_norm(self.norm, self.axis, self.conv(x))
        if self.add == "iadd":
            out += x
        elif self.add == "add_":
            out.add_(x)  # a statement: its result is what later code reads
        else:
            out = out + x
        return F.relu(out)


class CatBlock(nn.Module):
    def __init__(self, cin: int, c1: int, c2: int, cut: tuple[int, int] | None) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(cin, c1, 1), nn.Conv2d(cin, c2, 3, padding=1)
        self.cut = cut
        width = (cut[1] - cut[0]) if cut else c1 + c2
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        if self.cut:
            y = y[:, self.cut[0] : self.cut[1]]
        return self.bn(y)


class SharedBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv(F.relu(self.bn1(self.conv(x))))))


class TiedBlock(nn.Module):
    def __init__(self, c: int, storage: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.storage = storage
        self.b.weight = nn.Parameter(self.a.weight.data) if storage else self.a.weight

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` converts each Parameter on its own, which unties two Parameters sharing one
        storage (the same Parameter object stays tied): tie them again, as the spec says."""
        super()._apply(fn, recurse)
        if self.storage:
            self.b.weight = nn.Parameter(self.a.weight.data, requires_grad=self.a.weight.requires_grad)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2).contiguous()


def image(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], SIDE, SIDE)


class MHABlock(nn.Module):
    def __init__(self, c: int, heads: int, ln: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.ln = nn.LayerNorm(c) if ln else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = tokens(x)
        return image(t + self.ln(self.attn(t, t, t, need_weights=False)[0]))


class LoraLinear(nn.Module):
    """peft's layout: ``base_layer`` plus ``lora_A``/``lora_B`` ModuleDicts and a ``scaling`` dict."""

    def __init__(self, cin: int, cout: int, r: int = 2) -> None:
        super().__init__()
        self.base_layer = nn.Linear(cin, cout)
        self.lora_dropout = nn.ModuleDict({"default": nn.Identity()})
        self.lora_A = nn.ModuleDict({"default": nn.Linear(cin, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, cout, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.5)  # a trained adapter: B is not zero
        self.scaling = {"default": 2.0}
        self.active_adapters = ["default"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in self.active_adapters:
            out = out + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
        return out


class TokenBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kind: str, norm: str) -> None:
        super().__init__()
        if kind == "linear":
            self.fc = nn.Linear(cin, cout)
        elif kind == "conv1d":
            self.fc = Conv1D(cout, cin)
            nn.init.normal_(self.fc.weight, std=0.5)
            nn.init.normal_(self.fc.bias, std=0.1)
        elif kind == "lora":
            self.fc = LoraLinear(cin, cout)
        else:  # QAT: fake-quantised weight, and a fake-quant observer on the activations
            qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
            self.fc = torch.ao.nn.qat.Linear(cin, cout, qconfig=qconfig)
            self.fq = qconfig.activation()
        self.kind, self.norm_kind = kind, norm
        self.norm = {
            "bn": lambda: nn.BatchNorm1d(cout),
            "ln": lambda: nn.LayerNorm(cout),
            "rms": lambda: nn.RMSNorm(cout),
        }.get(norm, nn.Identity)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.fc(tokens(x))
        if self.kind == "qat":
            t = self.fq(t)
        if self.norm_kind == "bn":
            return F.gelu(self.norm(t.transpose(1, 2))).reshape(t.shape[0], -1, SIDE, SIDE)
        return image(F.gelu(self.norm(t)))


class ParamBlock(nn.Module):
    def __init__(self, c: int, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        if kind == "weight_norm":
            weight_norm(self.conv)
        else:
            prune.random_unstructured(self.conv, "weight", amount=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class Head(nn.Module):
    def __init__(self, c: int, norm: bool, output: str, pool: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(c) if norm else nn.Identity()
        self.fc = nn.Linear(c, CLASSES)
        self.output, self.pool = output, pool

    def forward(self, x: torch.Tensor):
        if self.pool in ("avg", "max"):
            pooled = (F.adaptive_avg_pool2d if self.pool == "avg" else F.adaptive_max_pool2d)(x, 1).flatten(1)
        else:
            pooled = x.mean(dim=(2, 3)) if self.pool == "mean" else x.amax(dim=(2, 3))
        features = self.bn(pooled)
        logits = self.fc(features)
        if self.output == "tuple":
            return logits, features
        if self.output == "dict":
            return {"features": features, "logits": logits}
        return logits


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], head: Head) -> None:
        super().__init__()
        self.blocks, self.head = nn.ModuleList(blocks), head

    def forward(self, x: torch.Tensor):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _plain(path: str, norms=()) -> Expect:
    return Expect((path,), (f"{path}.weight", f"{path}.bias"), None, list(norms))


def _block(spec: tuple, c: int, p: str, parts: Parts) -> tuple[nn.Module, int, list[Expect], bool]:
    """One block from its spec, the channels it outputs, its layers' expectations (paths under ``p``),
    and whether the last layer's units are the block's output channels (only elementwise ops after it:
    a norm behind the block is then one that layer feeds). Transformer parts go into ``parts``."""
    kind = spec[0]
    if kind == "dec":
        return decoder(spec, c, p, parts)
    if kind == "stage":
        return stage(spec, c, p, parts)
    if kind == "conv":
        _, cout, norm, act, act_first, call = spec
        m = ConvBlock(c, cout, norm, act, act_first, call)
        fed = [(f"{p}.norm", m.axis, list(range(cout)))] if norm != "none" else []
        return m, cout, [_plain(f"{p}.conv", fed)], norm == "none"
    if kind == "res":
        _, norm, add = spec
        m = ResBlock(c, norm, add)
        return m, c, [_plain(f"{p}.conv", [(f"{p}.norm", m.axis, list(range(c)))] if norm != "none" else [])], False
    if kind == "cat":
        _, c1, c2, cut = spec
        cut = (cut[0], min(cut[1], c1 + c2)) if cut else None
        lo, hi = cut if cut else (0, c1 + c2)
        m = CatBlock(c, c1, c2, cut)
        a = [u - lo for u in range(c1) if lo <= u < hi]
        b = [c1 + u - lo for u in range(c2) if lo <= c1 + u < hi]
        return (
            m,
            hi - lo,
            [_plain(f"{p}.a", [(f"{p}.bn", 1, a)] if a else []), _plain(f"{p}.b", [(f"{p}.bn", 1, b)] if b else [])],
            False,
        )
    if kind == "shared":
        everything = list(range(c))
        fed = [(f"{p}.bn1", 1, everything), (f"{p}.bn2", 1, everything)]
        return SharedBlock(c), c, [_plain(f"{p}.conv", fed)], False
    if kind == "tied":
        _, storage = spec
        both = (f"{p}.a.weight", f"{p}.b.weight")  # zeroing the shared weight zeroes it for both users
        return (
            TiedBlock(c, storage),
            c,
            [Expect((f"{p}.a",), both + (f"{p}.a.bias",)), Expect((f"{p}.b",), both + (f"{p}.b.bias",))],
            True,
        )
    if kind == "mha":
        _, heads, ln = spec
        heads = heads if c % heads == 0 else 1
        m = MHABlock(c, heads, ln)
        parts.attention.append((f"{p}.attn", f"{p}.attn.out_proj.weight", 1, heads, c // heads))
        return m, c, [_plain(f"{p}.attn.out_proj", [(f"{p}.ln", -1, list(range(c)))] if ln else [])], False
    if kind == "tok":
        _, cout, layer, norm = spec
        m = TokenBlock(c, cout, layer, norm)
        fed = [(f"{p}.norm", 1 if norm == "bn" else -1, list(range(cout)))] if norm != "none" else []
        fc = f"{p}.fc"
        if layer == "lora":  # one layer, its effective weight base + s·B·A
            zero = (f"{fc}.base_layer.weight", f"{fc}.base_layer.bias", f"{fc}.lora_B.default.weight")
            return m, cout, [Expect((f"{fc}.base_layer", fc), zero, fc, fed)], norm == "none"
        return m, cout, [_plain(fc, fed)], norm == "none"
    _, how = spec
    m = ParamBlock(c, how)
    g = f"{p}.conv.parametrizations.weight.original0" if how == "weight_norm" else f"{p}.conv.weight_orig"
    return m, c, [Expect((f"{p}.conv",), (g, f"{p}.conv.bias"))], True


def build(spec: Spec) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[Expect], Parts]:
    """The model (in the spec's dtype and mode), images [6, 3, 4, 4], labels [6], its layers'
    expectations and its transformer parts."""
    torch.manual_seed(spec.seed)
    blocks, expects, c, parts = [], [], IN_CHANNELS, Parts()
    for i, b in enumerate(spec.blocks):
        module, c, found, open_end = _block(b, c, f"blocks.{i}", parts)
        blocks.append(module)
        expects += found
    shapes = {tuple((n, tuple(t.shape)) for n, t in b.named_parameters()) for b in blocks}
    if len({type(b) for b in blocks}) == 1 and len(shapes) == 1 and spec.blocks[0][0] in ("mha", "dec"):
        # the model's blocks: one class, alike in their parameters, each holding attention
        parts.block_lists.insert(0, ("blocks", [f"blocks.{i}" for i in range(len(blocks))]))
    if spec.head_norm and open_end:  # pooled and flattened, the last layer's units are the head norm's channels
        expects[-1].norms.append(("head.bn", 1, list(range(c))))
    head = Head(c, spec.head_norm, spec.output, spec.pool)
    expects.append(_plain("head.fc"))
    model = Net(blocks, head)
    for m in model.modules():  # trained-looking statistics and affine parameters
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.InstanceNorm2d)):
            for name in ("weight", "bias", "running_mean"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    t.data.normal_(mean=1.0 if name == "weight" else 0.0, std=0.3)
            if getattr(m, "running_var", None) is not None:
                m.running_var.data.uniform_(0.5, 1.5)
    images = torch.randn(N_IMAGES, IN_CHANNELS, SIDE, SIDE)
    labels = torch.randint(0, CLASSES, (N_IMAGES,))
    model.train()
    with torch.no_grad():
        model(images)  # QAT observers calibrated, as after training
    dtype = getattr(torch, spec.dtype)
    model = model.to(dtype).train(spec.train_mode)
    return model, images.to(dtype), labels, expects, parts


def reference_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode with fake-quant observers frozen: the network a cell should evaluate."""
    twin = copy.deepcopy(model).eval()
    twin.apply(torch.ao.quantization.disable_observer)
    return twin


def logits(output) -> torch.Tensor:
    return output["logits"] if isinstance(output, dict) else output[0] if isinstance(output, tuple) else output


# ------------------------------------------------------------------------------------ the strategy

_conv = st.tuples(
    st.just("conv"),
    st.sampled_from((4, 6)),
    st.sampled_from(NORMS),
    st.sampled_from(ACTS),
    st.booleans(),
    st.sampled_from(("module", "functional", "forward")),
)
_res = st.tuples(st.just("res"), st.sampled_from(NORMS), st.sampled_from(("add", "iadd", "add_")))
_cat = st.tuples(
    st.just("cat"),
    st.sampled_from((2, 3)),
    st.sampled_from((2, 3)),
    st.one_of(st.none(), st.sampled_from(((0, 3), (1, 4), (2, 5)))),
)
_shared = st.tuples(st.just("shared"))
_tied = st.tuples(st.just("tied"), st.booleans())
_mha = st.tuples(st.just("mha"), st.sampled_from((1, 2)), st.booleans())
_tok = st.tuples(
    st.just("tok"),
    st.sampled_from((4, 6)),
    st.sampled_from(("linear", "conv1d", "lora", "qat")),
    st.sampled_from(("none", "bn", "ln", "rms")),
)
_param = st.tuples(st.just("param"), st.sampled_from(("weight_norm", "prune")))
_dec = st.tuples(
    st.just("dec"),
    st.sampled_from(("llama", "gpt2")),
    st.sampled_from((1, 2)),
    st.sampled_from((2, 4)),
    st.sampled_from((1, 2)),
    st.booleans(),
)  # style, layers, query heads, key/value heads, rotary
_stage = st.tuples(st.just("stage"), st.lists(st.booleans(), min_size=1, max_size=3).map(tuple))  # projecting shortcuts
BLOCKS = st.one_of(_conv, _res, _cat, _shared, _tied, _mha, _tok, _param, _dec, _stage)
TRANSFORMER_BLOCKS = st.one_of(_dec, _mha, _tok, _stage)


@st.composite
def specs(draw, max_blocks: int = 3, blocks=BLOCKS) -> Spec:
    """Hypothesis strategy: a :class:`Spec` of 1 to ``max_blocks`` blocks drawn from ``blocks`` (every
    kind, or :data:`TRANSFORMER_BLOCKS`); QAT only in float32."""
    dtype = draw(st.sampled_from(("float32", "float32", "float16", "bfloat16")))
    blocks = draw(st.lists(blocks, min_size=1, max_size=max_blocks))
    if dtype != "float32":  # fake quantisation is float32-only in PyTorch
        blocks = [("tok", b[1], "linear", b[3]) if b[0] == "tok" and b[2] == "qat" else b for b in blocks]
    return Spec(
        tuple(blocks),
        draw(st.booleans()),
        draw(st.sampled_from(("tensor", "tuple", "dict"))),
        dtype,
        draw(st.booleans()),
        draw(st.integers(0, 2**16)),
        draw(st.sampled_from(("avg", "max", "mean", "amax"))),
    )
