"""Diffusion Transformer (Peebles & Xie, 2023) with adaLN-Zero conditioning on time and class."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genfoundry.errors import ConfigError


@dataclass
class DiTArch:
    """Shape of a DiT; everything needed to rebuild the network from saved weights."""

    image_size: int
    in_channels: int
    num_classes: int
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    freq_dim: int = 256  # sinusoidal time-embedding width

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"image size {self.image_size} is not divisible by patch size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(embed_dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, [grid*grid, embed_dim]."""
    assert embed_dim % 4 == 0
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = []
    for pos in (xx.reshape(-1), yy.reshape(-1)):
        angles = pos[:, None] * omega[None]
        out += [angles.sin(), angles.cos()]
    return torch.cat(out, dim=1).float()


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t -> MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Predicts a velocity of the same shape as its input from (x_t, t, class).

    The label embedding has one extra row, index `num_classes`, for the dropped ("null") class that
    classifier-free guidance needs; `drop` marks which labels to replace by it.
    """

    def __init__(self, arch: DiTArch):
        super().__init__()
        self.arch = arch
        d, p = arch.hidden_size, arch.patch_size
        self.x_embedder = nn.Conv2d(arch.in_channels, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d, arch.freq_dim)
        self.y_embedder = nn.Embedding(arch.num_classes + 1, d)
        self.register_buffer("pos_embed", sincos_2d(d, arch.image_size // p)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(d, arch.num_heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.final_layer = FinalLayer(d, p, arch.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, c = x.shape[0], self.arch.patch_size, self.arch.in_channels
        g = self.arch.image_size // p
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.arch.num_classes), y)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def flops_per_forward(self) -> int:
        """FLOPs (2 x multiply-adds) of one forward pass for one image; training costs 3 x this."""
        a = self.arch
        d, n, p, c = a.hidden_size, a.num_tokens, a.patch_size, a.in_channels
        mlp = int(d * a.mlp_ratio)
        macs = n * p * p * c * d                      # patch embedding
        macs += a.freq_dim * d + d * d                # time embedding MLP
        per_block = n * (3 * d * d + d * d + 2 * d * mlp)  # qkv, out projection, MLP
        per_block += 2 * n * n * d                    # q k^T and attention x v
        per_block += d * 6 * d                        # adaLN modulation, once per image
        macs += a.depth * per_block
        macs += d * 2 * d + n * d * p * p * c         # final modulation and projection
        return 2 * macs


# Presets: name -> (hidden_size, depth, num_heads), combined with a patch size in MODELS.
SIZES = {
    "T": (128, 6, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}

MODELS = {
    f"DiT-{size}/{patch}": dict(hidden_size=h, depth=depth, num_heads=heads, patch_size=patch)
    for size, (h, depth, heads) in SIZES.items()
    for patch in (2, 4, 8)
}


def build_model(preset: str, image_size: int, in_channels: int, num_classes: int) -> DiT:
    if preset not in MODELS:
        raise ConfigError(f"unknown model preset '{preset}'; choose one of {sorted(MODELS)}")
    return DiT(DiTArch(image_size=image_size, in_channels=in_channels, num_classes=num_classes, **MODELS[preset]))
