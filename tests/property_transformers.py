"""The transformer and residual-stage patterns of the property harness's grammar (see :mod:`property_models`).

- ``dec``: a decoder stack as Hugging Face writes one — a token embedding (Linear), then identical
  pre-norm decoder layers ``x + attn(norm(x))``, ``x + mlp(norm(x))`` in a ``ModuleList``, and a final
  norm. Two layouts: **LLaMA** (RMSNorm; q/k/v/o ``Linear`` without bias, grouped-query attention with
  fewer key/value heads, rotary position embeddings; gated MLP ``down(silu(gate(x))·up(x))``; layers
  called with keyword arguments) and **GPT-2** (LayerNorm; transformers' ``Conv1D`` for the fused
  ``c_attn`` and ``c_proj``; MLP ``c_proj(gelu(c_fc(x)))``; layers returning tuples).
- ``stage``: a ResNet stage, ``nn.Sequential`` of ``BasicBlock`` s (conv-BN-ReLU-conv-BN plus the
  shortcut), some with a projecting ``downsample`` (not removable), the rest identity shortcuts.

Besides each layer's :class:`property_models.Expect`, the builders record in a :class:`Parts` what the
transformer perturbations' oracles need, by construction: each attention module's output projection
and head layout, each MLP's output projection, the block lists, each stage's removable blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

WIDTH, HIDDEN, TOKENS = 8, 8, 16  # decoder width, MLP neurons, tokens per image (4 × 4)


@dataclass
class Parts:
    """What the transformer-level oracles know by construction (module paths in the built model).

    ``attention``: (module path, output projection's weight, its input-feature axis, heads, head dim);
    ``mlps``: (module path, output projection's weight, its input-feature axis, neurons);
    ``block_lists``: (list path, child paths) for each ModuleList of one class whose children each hold
    attention; ``stages``: (stage path, its removable blocks' paths)."""

    attention: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    mlps: list[tuple[str, str, int, int]] = field(default_factory=list)
    block_lists: list[tuple[str, list[str]]] = field(default_factory=list)
    stages: list[tuple[str, list[str]]] = field(default_factory=list)


def _conv1d(nf: int, nx: int) -> nn.Module:
    from property_models import Conv1D

    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight, std=0.4)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RotaryEmbedding(nn.Module):
    """LLaMA's rotary position embedding: cos and sin [L, head_dim] of positions × inverse frequencies."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.outer(torch.arange(x.shape[1], device=x.device).float(), self.inv_freq)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class LlamaStyleAttention(nn.Module):
    def __init__(self, heads: int, kv_heads: int, rotary: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_key_value_groups = heads, WIDTH // heads, heads // kv_heads
        self.kv_heads, self.rotary = kv_heads, rotary
        self.q_proj = nn.Linear(WIDTH, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(WIDTH, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(WIDTH, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, WIDTH, bias=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None):
        n, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(n, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(n, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            cos, sin = position_embeddings
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)  # grouped-query attention
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, -1)), None


class GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(WIDTH, HIDDEN, bias=False), nn.Linear(WIDTH, HIDDEN, bias=False)
        self.down_proj = nn.Linear(HIDDEN, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaStyleDecoderLayer(nn.Module):
    def __init__(self, heads: int, kv_heads: int, rotary: bool) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(WIDTH), nn.RMSNorm(WIDTH)
        self.self_attn, self.mlp = LlamaStyleAttention(heads, kv_heads, rotary), GatedMLP()

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class GPT2StyleAttention(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.n_head, self.head_dim = heads, WIDTH // heads
        self.c_attn, self.c_proj = _conv1d(3 * WIDTH, WIDTH), _conv1d(WIDTH, WIDTH)

    def forward(self, hidden_states: torch.Tensor):
        n, length, _ = hidden_states.shape
        q, k, v = (
            t.view(n, length, self.n_head, self.head_dim).transpose(1, 2)
            for t in self.c_attn(hidden_states).split(WIDTH, dim=2)
        )
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)  # eager attention's mask
        out = scores.softmax(dim=-1) @ v
        return self.c_proj(out.transpose(1, 2).reshape(n, length, WIDTH)), None


class GPT2StyleMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = _conv1d(HIDDEN, WIDTH), _conv1d(WIDTH, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2StyleBlock(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = (
            nn.LayerNorm(WIDTH),
            GPT2StyleAttention(heads),
            nn.LayerNorm(WIDTH),
            GPT2StyleMLP(),
        )

    def forward(self, hidden_states: torch.Tensor):
        attended, _ = self.attn(self.ln_1(hidden_states))
        hidden_states = hidden_states + attended
        return (hidden_states + self.mlp(self.ln_2(hidden_states)),)  # transformers' blocks return tuples


class DecoderStack(nn.Module):
    """Image [N, C, 4, 4] → tokens [N, 16, C] → embedding → decoder layers → final norm → image [N, 8, 4, 4]."""

    def __init__(self, cin: int, style: str, layers: int, heads: int, kv_heads: int, rotary: bool) -> None:
        super().__init__()
        self.style = style
        self.embed = nn.Linear(cin, WIDTH)
        if style == "llama":
            self.layers = nn.ModuleList(LlamaStyleDecoderLayer(heads, kv_heads, rotary) for _ in range(layers))
            self.rotary_emb = RotaryEmbedding(WIDTH // heads) if rotary else None
            self.norm = nn.RMSNorm(WIDTH)
        else:
            self.layers = nn.ModuleList(GPT2StyleBlock(heads) for _ in range(layers))
            self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from property_models import image, tokens

        hidden = self.embed(tokens(x))
        if self.style == "llama":
            position = self.rotary_emb(hidden) if self.rotary_emb is not None else None
            for layer in self.layers:
                hidden = layer(hidden_states=hidden, position_embeddings=position)  # as transformers calls them
        else:
            for layer in self.layers:
                hidden = layer(hidden)[0]
        return image(self.norm(hidden))


def decoder(spec: tuple, c: int, p: str, parts: Parts):
    """A ``dec`` block, its output channels and its layers' expectations (see :mod:`property_models`)."""
    from property_models import Expect, _plain

    _, style, count, heads, kv_heads, rotary = spec
    kv_heads = kv_heads if style == "llama" and heads % kv_heads == 0 else heads
    m = DecoderStack(c, style, count, heads, kv_heads, rotary)
    first_norm = f"{p}.layers.0.input_layernorm" if style == "llama" else f"{p}.layers.0.ln_1"
    expects = [_plain(f"{p}.embed", [(first_norm, -1, list(range(WIDTH)))])]  # its units go straight into the norm
    for i in range(count):
        q = f"{p}.layers.{i}"
        if style == "llama":
            names = [f"{q}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            names += [f"{q}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
            expects += [Expect((n,), (f"{n}.weight",)) for n in names]  # no biases
            parts.attention.append((f"{q}.self_attn", f"{q}.self_attn.o_proj.weight", 1, heads, WIDTH // heads))
            parts.mlps.append((f"{q}.mlp", f"{q}.mlp.down_proj.weight", 1, HIDDEN))
        else:
            expects += [_plain(f"{q}.{n}") for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
            parts.attention.append((f"{q}.attn", f"{q}.attn.c_proj.weight", 0, heads, WIDTH // heads))  # [in, out]
            parts.mlps.append((f"{q}.mlp", f"{q}.mlp.c_proj.weight", 0, HIDDEN))
    parts.block_lists.append((f"{p}.layers", [f"{p}.layers.{i}" for i in range(count)]))
    return m, WIDTH, expects, False


class BasicBlock(nn.Module):
    """torchvision's BasicBlock layout (``downsample`` None: an identity shortcut)."""

    def __init__(self, c: int, project: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.downsample = nn.Conv2d(c, c, 1) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def stage(spec: tuple, c: int, p: str, parts: Parts):
    """A ``stage`` block: BasicBlocks, those with ``project`` True having a 1×1 conv shortcut."""
    from property_models import Expect

    _, projects = spec
    m = nn.Sequential(*(BasicBlock(c, project) for project in projects))
    everything = list(range(c))
    expects = []
    for i, project in enumerate(projects):
        q = f"{p}.{i}"
        expects += [
            Expect((f"{q}.conv1",), (f"{q}.conv1.weight",), None, [(f"{q}.bn1", 1, everything)]),
            Expect((f"{q}.conv2",), (f"{q}.conv2.weight",), None, [(f"{q}.bn2", 1, everything)]),
        ]
        if project:
            expects.append(Expect((f"{q}.downsample",), (f"{q}.downsample.weight", f"{q}.downsample.bias")))
    parts.stages.append((p, [f"{p}.{i}" for i, project in enumerate(projects) if not project]))
    return m, c, expects, False
