"""Partial rotary (only the first rotary_dim of d_head coordinates rotate, an odd number does not) through a
family of its own: a tiny model written here with its own adapter, so the test also shows that a new family
describes its form through the adapter protocol alone (the registry knows no family)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qkdissect import dissect
from qkdissect.adapters import AttentionLayer, ModelAdapter, register_adapter, wrap_model
from qkdissect.forms import AttentionForm, RotaryTable
from qkdissect.projection import attention_from_modes, capture_attention_inputs

D_MODEL, HEADS, D_HEAD, ROTARY, TOKENS = 22, 3, 7, 4, 11  # 3 coordinates per head never rotate


class PartialRopeAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D_MODEL, HEADS * D_HEAD)
        self.k = nn.Linear(D_MODEL, HEADS * D_HEAD)
        self.register_buffer("inv_freq", torch.tensor([0.9, 0.23], dtype=torch.float64))
        self.probs = None

    def rotation(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.arange(n, dtype=torch.float64)[:, None] * self.inv_freq  # (N, ROTARY/2)
        return angles.cos(), angles.sin()

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, HEADS, D_HEAD).transpose(1, 2)
        k = self.k(x).reshape(B, N, HEADS, D_HEAD).transpose(1, 2)
        cos, sin = self.rotation(N)

        def rotate(t):  # interleaved pairs (0,1), (2,3) of the first ROTARY coordinates
            a, b = t[..., 0:ROTARY:2], t[..., 1:ROTARY:2]
            rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
            return torch.cat([rotated, t[..., ROTARY:]], dim=-1)

        self.probs = (rotate(q) @ rotate(k).transpose(-1, -2) * D_HEAD ** -0.5).softmax(-1)
        return self.probs @ k  # any value path


class PartialRopeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([PartialRopeAttention() for _ in range(2)])
        self.proj = nn.Linear(D_HEAD * HEADS, D_MODEL)

    def forward(self, x):
        for layer in self.layers:
            out = layer(x)
            x = x + self.proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return x


@register_adapter
class PartialRopeAdapter(ModelAdapter):
    family = "test-partial-rope"
    modality = "text"

    @classmethod
    def matches(cls, model):
        return isinstance(model, PartialRopeModel)

    def attention_modules(self):
        return list(self.model.layers)

    def attention_form(self, layer: int) -> AttentionForm:
        cos, sin = self.model.layers[layer].rotation(TOKENS)
        return AttentionForm(rotary=RotaryTable(cos=cos[None], sin=sin[None], layout="interleaved", rotary_dim=ROTARY,
                                                positions=torch.arange(TOKENS, dtype=torch.float64)[:, None]))

    def attention_layers(self):
        out = []
        for index, layer in enumerate(self.model.layers):
            out.append(AttentionLayer(
                W_q=layer.q.weight.detach().reshape(HEADS, D_HEAD, D_MODEL).clone(),
                W_k=layer.k.weight.detach().reshape(HEADS, D_HEAD, D_MODEL).clone(),
                b_q=layer.q.bias.detach().reshape(HEADS, D_HEAD).clone(),
                b_k=layer.k.bias.detach().reshape(HEADS, D_HEAD).clone(), scale=D_HEAD ** -0.5,
                form=self.attention_form(index)))
        return out

    def forward(self, inputs):
        return self.model(inputs)

    @contextlib.contextmanager
    def eager_attention(self):
        store = [[]]
        yield store
        store[0].extend(layer.probs for layer in self.model.layers)


def test_partial_rotary_with_odd_unrotated_coordinates_is_exact():
    torch.manual_seed(0)
    model = PartialRopeModel().double()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.7)
    loaded = wrap_model(model)
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    x = torch.randn(2, TOKENS, D_MODEL, dtype=torch.float64)
    captured = capture_attention_inputs(loaded, x)
    own = loaded.adapter.attention_probabilities(x)
    for layer in range(2):
        assert float((attention_from_modes(atlas, layer, captured[layer]) - own[layer]).abs().max()) < 1e-10
    # M̄ over all ordered token pairs against dense rotation matrices
    layer = loaded.adapter.attention_layers()[1]
    cos, sin = model.layers[1].rotation(TOKENS)
    R = torch.eye(D_HEAD, dtype=torch.float64).repeat(TOKENS, 1, 1)
    for f in range(ROTARY // 2):
        a, b = 2 * f, 2 * f + 1
        R[:, a, a], R[:, a, b], R[:, b, a], R[:, b, b] = cos[:, f], -sin[:, f], sin[:, f], cos[:, f]
    A = torch.einsum("tab,hbd->htad", R, layer.W_q)
    B = torch.einsum("tab,hbd->htad", R, layer.W_k)
    M_bar = torch.einsum("hiam,hjan->hmn", A, B) / TOKENS ** 2
    stats = atlas.layers[1].positional
    torch.testing.assert_close(stats.U_bar @ torch.diag_embed(stats.S_bar) @ stats.V_bar.transpose(-1, -2), M_bar,
                               rtol=1e-9, atol=1e-10)
    assert stats.coherence.shape == (1, ROTARY // 2)  # one coherence per rotary pair; unrotated ones are 1
