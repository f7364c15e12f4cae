"""What a network is conditioned on, per sample, and what "unconditional" means for it.

    kind     per-sample table (N, ...)          dropped / unconditional
    "text"   (N, L, D) float32 frozen embedding  the zero embedding
    "class"  (N,) int32 label in 0..K-1           the null class K (= num_classes)
    "none"   (N,) int32 zeros (a placeholder)     the network is given None

Condition dropout during training replaces a sample's condition by the unconditional one,
which is what classifier-free guidance contrasts with at sampling time. The functions here
use only ops that mlx.core, torch and numpy spell the same way (`where`, `zeros_like`,
arithmetic), so both trainers and the sampler share them.
"""

from __future__ import annotations

from .errors import MlxflowError
from .flow import _xp as xp_of

KINDS = ("text", "class", "none")


def kind_of(family, model_config) -> str:
    """A config may choose its conditioning (JiT: class, text or none); else the family's."""
    kind = getattr(model_config, "conditioning", None) or family.conditioning
    if kind not in KINDS:
        raise MlxflowError(f"unknown conditioning '{kind}' (known: {', '.join(KINDS)})")
    return kind


def null_class(model_config) -> int:
    return int(getattr(model_config, "num_classes", 0))


def _xp(a):
    return xp_of(a)


def unconditional(kind: str, cond, model_config):
    """The unconditional counterpart of a batch of conditions (same shape and dtype)."""
    xp = _xp(cond)
    if kind == "text":
        return xp.zeros_like(cond)
    if kind == "class":
        return xp.zeros_like(cond) + null_class(model_config)
    return cond


def drop(kind: str, cond, keep, model_config):
    """Condition dropout: rows where `keep` (B,) is false become unconditional."""
    if kind == "text":
        return cond * keep.reshape((-1,) + (1,) * (cond.ndim - 1))  # bool x float keeps the float dtype
    if kind == "class":
        xp = _xp(cond)
        return xp.where(keep, cond, unconditional(kind, cond, model_config))
    return cond


def network_input(kind: str, cond):
    """What the network's third argument gets: the condition, or None for unconditional families."""
    return None if kind == "none" else cond


def check_table(kind: str, table, model_config, n: int) -> None:
    """One line naming the mismatch between a per-sample condition table and the model."""
    import numpy as np

    table = np.asarray(table)
    if len(table) != n:
        raise MlxflowError(f"{len(table)} conditions for {n} images")
    if kind == "text":
        want = (model_config.text_tokens, model_config.text_dim)
        if table.ndim != 3 or table.shape[1:] != want:
            raise MlxflowError(f"text embeddings are {table.shape[1:]} but the model expects {want} "
                               "(a different text encoder?)")
    elif kind == "class":
        k = null_class(model_config)
        if table.ndim != 1 or (len(table) and (table.min() < 0 or table.max() >= k)):
            raise MlxflowError(f"class labels must be integers in 0..{k - 1} for a {k}-class model")


def random_table(kind: str, n: int, model_config, rng):
    """Random conditions of the right kind and shape (benchmarks, cross-checks): numpy (n, ...)."""
    import numpy as np

    if kind == "text":
        return rng.standard_normal((n, model_config.text_tokens, model_config.text_dim)).astype(np.float32)
    if kind == "class":
        return rng.integers(0, null_class(model_config), size=n).astype(np.int32)
    return np.zeros(n, np.int32)
