"""What a resumed run keeps and what follows the command line (`mlxflow train ... --resume`)."""

from __future__ import annotations

from dataclasses import replace

from ..checkpoint import list_checkpoints
from ..config import TrainConfig
from ..errors import MlxflowError
from ..families import Family, load_checkpoint


# On resume, the step budget and the logging / checkpoint / sample cadence follow the command
# line, and so does the peak lr (the schedule continues at the new peak). Everything else
# (preset, batch size, accumulation, encoder, optimiser, time sampler, ...) is the run's:
# a different value is refused, never silently dropped.
RESUME_FOLLOWS = ("steps", "log_every", "ckpt_every", "sample_every", "lr", "compile", "fused_adamw",
                  "fused_attention", "device_data")


def resume_rules(fam: Family, out_dir, resume: str, tcfg: TrainConfig, preset: str | None, text_encoder: str | None,
                 overrides: dict, on_message=None) -> TrainConfig:
    """The train config a resumed run continues with; MlxflowError naming a setting it keeps."""
    try:
        ckpt = load_checkpoint(out_dir if resume == "latest" else resume, family=fam.name)
    except MlxflowError:
        if resume == "latest" and not list_checkpoints(out_dir):
            return tcfg  # nothing to resume yet: a fresh start (the trainer says so)
        raise
    kept = ckpt.train_config
    if preset and preset != kept.preset:
        raise MlxflowError(f"--preset {preset}: a resumed run keeps its preset '{kept.preset}' "
                           "(start a new --out to change it)")
    if text_encoder and text_encoder != ckpt.text_encoder:
        raise MlxflowError(f"--text-encoder {text_encoder}: a resumed run keeps its encoder '{ckpt.text_encoder}'")
    for key, value in overrides.items():
        if key not in RESUME_FOLLOWS and value is not None and value != getattr(kept, key):
            flag = "--" + key.replace("_", "-")
            raise MlxflowError(f"{flag} {value}: a resumed run keeps its {key.replace('_', ' ')} "
                               f"{getattr(kept, key)} (start a new --out to change it)")
    lr = overrides.get("lr") or kept.lr
    if lr != kept.lr and on_message:
        on_message(f"resuming with lr {lr:g} (the run had {kept.lr:g}); the schedule continues at the new peak")
    return replace(tcfg, lr=lr)
