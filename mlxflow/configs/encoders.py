"""Configs of the frozen encoders' networks: T5's encoder and the SD VAE (AutoencoderKL).

Shared by the MLX networks (models/t5.py, models/vae.py) and their torch twins; read from
Hugging Face / diffusers config.json dicts (finding and reading the files is
mlxflow/encoders.py's and convert/'s business). Not a family: registers nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import MlxflowError

FEED_FORWARD = ("relu", "gated-gelu")
# model_types with T5's encoder layout (mT5 is T5 v1.1 with another vocabulary).
MODEL_TYPES = ("t5", "mt5")


@dataclass(frozen=True)
class T5Config:
    """The T5 encoder's hyper-parameters, named as in HF `config.json` (t5-small defaults)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD:
            raise MlxflowError(f"T5 feed_forward_proj '{self.feed_forward_proj}' is not supported "
                               f"(supported: {', '.join(FEED_FORWARD)})")
        if self.relative_attention_num_buckets < 4:
            raise MlxflowError(f"T5 relative_attention_num_buckets must be >= 4, "
                               f"got {self.relative_attention_num_buckets}")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def inner_dim(self) -> int:
        """Width of q/k/v: heads * d_kv (need not equal d_model, e.g. T5 v1.1)."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "T5Config":
        """From a parsed HF config.json; unknown keys are ignored, missing ones are an error."""
        if hf.get("model_type", "t5") not in MODEL_TYPES:
            raise MlxflowError(f"{where}: model_type '{hf.get('model_type')}' is not a T5 encoder")
        # The layer count and width have no sensible default: a config without them is not T5's.
        needed = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
        missing = [k for k in needed if k not in hf]
        if missing:
            raise MlxflowError(f"{where}: not a T5 config (missing {', '.join(missing)})")
        defaults = cls()
        return cls(**{f: type(getattr(defaults, f))(hf.get(f, getattr(defaults, f)))
                      for f in cls.__dataclass_fields__})

    def to_hf(self) -> dict:
        """A config.json that transformers' T5EncoderModel loads (model_type t5)."""
        return {"model_type": "t5", "architectures": ["T5EncoderModel"], **asdict(self),
                "num_decoder_layers": self.num_layers, "dropout_rate": 0.0, "initializer_factor": 1.0,
                "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
                "tie_word_embeddings": True, "use_cache": False}


@dataclass
class VAEConfig:
    """The fields of a diffusers AutoencoderKL config.json that shape the network.

    Defaults are stabilityai/sd-vae-ft-mse's. Unknown keys of config.json are ignored.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels:
            raise MlxflowError("VAE config: block_out_channels is empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise MlxflowError(f"VAE config: block_out_channels {bad} not divisible by norm_num_groups "
                               f"{self.norm_num_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        # Refuse what this network does not implement rather than load weights into the wrong graph.
        if d.get("act_fn", "silu") != "silu":
            raise MlxflowError(f"VAE config: act_fn '{d['act_fn']}' is not supported (silu only)")
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            other = [t for t in d.get(key, ()) if t != kind]
            if other:
                raise MlxflowError(f"VAE config: {key} {other[0]} is not supported ({kind} only)")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
