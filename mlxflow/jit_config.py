"""JiT ("Just image Transformer", Li & He 2025, "Back to Basics") model config and presets.

One dataclass drives both twins (mlxflow/models/jit.py, mlxflow/torch_ref/jit.py). The
network maps a noisy image straight to a predicted clean image (`prediction = "x"`);
flow.py turns that into a velocity.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MlxflowError

CONDITIONINGS = ("class", "text", "none")


@dataclass
class JiTConfig:
    """Pixel-space ViT denoiser. Defaults are the paper's JiT-B/16 at 256x256 (~131M params).

    Images are cut into patch_size x patch_size patches every patch_stride pixels
    (stride < patch: overlapping patches, averaged back when folding).
    """

    image_size: int = 256
    in_channels: int = 3
    patch_size: int = 16
    patch_stride: int = 16
    bottleneck: int = 128  # width of the low-rank patch embedding (p*p*C -> bottleneck -> dim)
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0  # SwiGLU hidden is 2/3 of dim * mlp_ratio (same params as a GELU MLP)
    in_context_tokens: int = 32  # copies of the condition embedding prepended as tokens (0: off)
    in_context_start: int = 4  # block index at which they join the sequence
    conditioning: str = "class"  # class | text | none
    num_classes: int = 1000  # class labels 0..num_classes-1; num_classes itself is the null class
    text_dim: int = 384  # D of the frozen text embedding
    text_tokens: int = 1  # L of the frozen text embedding (the text path flattens L*D)
    qkv_bias: bool = True
    prediction: str = "x"

    @property
    def grid(self) -> int:
        """Patches per side."""
        return (self.image_size - self.patch_size) // self.patch_stride + 1

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        """Length of one patch vector, ordered (p, p, C) row-major."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_hidden(self) -> int:
        # int(dim * ratio) first, then 2/3: avoids 2047.99.. -> 2047 float truncation (B/16: 2048).
        return int(int(self.dim * self.mlp_ratio) * 2 / 3)

    def validate(self) -> "JiTConfig":
        p, s = self.patch_size, self.patch_stride
        if not 1 <= s <= p <= self.image_size:
            raise MlxflowError(f"need 1 <= patch_stride ({s}) <= patch_size ({p}) <= image_size ({self.image_size})")
        if (self.image_size - p) % s:
            raise MlxflowError(f"image_size - patch_size ({self.image_size} - {p}) must be divisible by patch_stride {s}")
        if self.dim % self.heads:
            raise MlxflowError(f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.head_dim % 4:
            raise MlxflowError(f"head dim {self.head_dim} (dim/heads) must be divisible by 4 for 2-D axial RoPE")
        if self.dim % 4:
            raise MlxflowError(f"dim {self.dim} must be divisible by 4 for the 2-D sin-cos position embedding")
        if self.conditioning not in CONDITIONINGS:
            raise MlxflowError(f"unknown conditioning '{self.conditioning}' (known: {', '.join(CONDITIONINGS)})")
        if self.conditioning == "class" and self.num_classes < 2:
            raise MlxflowError(f"class conditioning needs num_classes >= 2, got {self.num_classes}")
        if self.in_context_tokens < 0:
            raise MlxflowError(f"in_context_tokens must be >= 0, got {self.in_context_tokens}")
        if self.in_context_tokens and not 0 <= self.in_context_start < self.depth:
            raise MlxflowError(f"in_context_start {self.in_context_start} must be a block index in [0, {self.depth})")
        if self.prediction not in ("x", "velocity"):
            raise MlxflowError(f"unknown prediction '{self.prediction}' (known: x, velocity)")
        return self


# Field overrides per named preset.
JIT_PRESETS: dict[str, dict] = {
    # The paper's JiT-B/16 at 256x256, ImageNet classes: ~131M params, ~25 GMACs per forward.
    "B/16": dict(),
    # The blog (seed 003): 12 layers, dim 768, patch 16 every 12 px (21x21 = 441 tokens),
    # unconditional faces. ~130M here (adaLN-Zero and SwiGLU as in the paper; the blog's
    # own network was ~114M). No in-context tokens: there is no condition to repeat.
    "seed": dict(image_size=256, patch_size=16, patch_stride=12, dim=768, depth=12, heads=12,
                 conditioning="none", in_context_tokens=0),
    # ~1.9k emoji at 64x64, text-conditioned (MiniLM sentence embedding, 384-d):
    # patch 8 every 4 px = 15x15 tokens, ~17M params.
    "emoji64": dict(image_size=64, patch_size=8, patch_stride=4, bottleneck=96, dim=384, depth=6,
                    heads=6, in_context_tokens=8, in_context_start=2, conditioning="text",
                    text_dim=384, text_tokens=1),
    # Tests and 2-core CPU runs: 32x32, patch 8 every 4 px (7x7 tokens), ~0.4M params.
    "tiny": dict(image_size=32, patch_size=8, patch_stride=4, bottleneck=32, dim=64, depth=4, heads=4,
                 in_context_tokens=4, in_context_start=1, conditioning="text", text_dim=384, text_tokens=1),
}


def jit_macs_per_image(cfg: JiTConfig) -> float:
    """Multiply-accumulates of one forward pass of one image: every matmul, analytic.

    Elementwise work (norms, RoPE, softmax, fold) is left out. The JiT/DiT papers'
    "Gflops" are this number (fvcore counts one fused multiply-add as one flop).
    """
    d, n, n_ctx = cfg.dim, cfg.num_patches, cfg.in_context_tokens
    macs = n * (cfg.patch_dim * cfg.bottleneck + cfg.bottleneck * d)  # bottleneck patch embedding
    macs += 256 * d + d * d  # timestep MLP (256 sinusoidal features)
    if cfg.conditioning == "text":
        macs += cfg.text_tokens * cfg.text_dim * d
    per_token = 4 * d * d + 3 * d * cfg.mlp_hidden  # q, k, v, out + SwiGLU (w1, w3, w2)
    for i in range(cfg.depth):
        tokens = n + (n_ctx if n_ctx and i >= cfg.in_context_start else 0)
        macs += tokens * per_token + 2 * tokens * tokens * d  # projections + QK^T and AV
        macs += 6 * d * d  # adaLN modulation (once per image, not per token)
    macs += 2 * d * d + n * d * cfg.patch_dim  # final adaLN + projection to patches
    return float(macs)


def jit_flops_per_image(cfg: JiTConfig) -> float:
    """Forward matmul FLOPs of one image (2 * MACs). Note: the paper's "25 Gflops" for B/16 are MACs."""
    return 2.0 * jit_macs_per_image(cfg)
