"""`mlxflow export coreml`: a checkpoint -> the folder an app ships, verified before it is written.

convert/coreml.py converts and verifies the denoiser; convert/text_coreml.py the MiniLM
text encoder; this module puts them together with the label table and export.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxflow.data.dataset import ImageTextDataset
from mlxflow.encoders import load_text_encoder
from mlxflow.errors import MlxflowError
from mlxflow.families import family_names, get_family

from .coreml import (PSNR_GATE_DB, TIME_CONVENTION, export_and_verify, export_label_table, solver_advice,
                     velocity_model)
from .text_coreml import export_text_encoder
from .torch_mlx import load_torch_model


def export_app(ck, out_dir, *, precision: str = "fp16", compress: str | None = None,
               batch_sizes=(1, 2), min_psnr: float = PSNR_GATE_DB, data=None, text_encoder: bool = True,
               deployment_target: str = "iOS17", overwrite: bool = False) -> dict:
    """`mlxflow export coreml`: a loaded Checkpoint -> the app bundle in `out_dir`, verified.

    Output folder:
        EmojiDenoiser.mlpackage   (x_t, t, text) -> velocity, verified against the torch twin
        labels.json + label_embeddings.bin   the training prompts and their frozen embeddings,
                                  so an app can draw every training emoji with no text encoder
        TextEncoder.mlpackage     the MiniLM text encoder, when the checkpoint uses it
        vocab.txt                 its WordPiece vocabulary (tokenisation happens in the app)
        export.json               what was exported, sizes, PSNRs, the family's sampling defaults
    Returns a flat report dict. Errors: MlxflowError for a family without Core ML support,
    a PSNR below `min_psnr` (dB) or a label table that does not fit the model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise MlxflowError(f"{out_dir} already exists and is not empty: choose another folder or pass --overwrite")
    fam = get_family(ck.family)
    if not fam.coreml:
        supported = [f for f in family_names() if get_family(f).coreml]
        raise MlxflowError(f"Core ML export supports the {', '.join(supported)} family, not '{ck.family}'")
    torch_model, ck = load_torch_model(ck, device="cpu", use_ema=True)
    cfg = ck.model_config
    out_dir = Path(out_dir)
    d = fam.sample_defaults
    advice = solver_advice(ck.family)
    metadata = {"family": ck.family, "preset": ck.train_config.preset, "train_steps": ck.step,
                "text_encoder": ck.text_encoder, "time_convention": TIME_CONVENTION, "solver_advice": advice,
                "sample_steps": d["steps"], "sample_solver": d["solver"], "sample_cfg": d["cfg"],
                "image_size": cfg.image_size, "prediction": fam.prediction}
    report = export_and_verify(velocity_model(torch_model, fam.prediction), out_path=out_dir / "EmojiDenoiser.mlpackage", image_size=cfg.image_size,
                               channels=cfg.in_channels, text_tokens=cfg.text_tokens, text_dim=cfg.text_dim,
                               precision=precision, compress=compress, batch_sizes=tuple(batch_sizes),
                               metadata=metadata, psnr_gate=min_psnr, deployment_target=deployment_target)
    result = {"denoiser": str(report["path"]), "size_mb": report["size_mb"],
              "denoiser_psnr_db": report["denoiser_psnr"], "trajectory_psnr_db": report["trajectory_psnr"],
              "verified_with": report["backend"], "precision": precision, "compress": compress or "none"}

    labels = _export_labels(ck, out_dir, data, export_label_table)
    result["label_table"] = labels
    if text_encoder:
        result["text_encoder"] = _export_text_encoder(ck, out_dir, precision)
    (out_dir / "export.json").write_text(json.dumps({**result, "metadata": metadata}, indent=2, default=str))
    return result


def _export_labels(ck, out_dir: Path, data, export_label_table) -> str:
    data = data or ck.state.get("dataset")
    if not data or not Path(data).exists():
        where = f" at {Path(data).resolve()}" if data else " (the checkpoint names none)"
        return f"skipped: training dataset not found{where}; pass --data DIR"
    dataset = ImageTextDataset.load(data)
    emb = dataset.text_embeddings(load_text_encoder(ck.text_encoder))
    cfg = ck.model_config
    if emb.shape[1:] != (cfg.text_tokens, cfg.text_dim):
        raise MlxflowError(f"{data}: text embeddings {emb.shape[1:]} do not fit the model's text input "
                           f"{(cfg.text_tokens, cfg.text_dim)}")
    export_label_table(emb, dataset.captions, out_dir, metadata={"text_encoder": ck.text_encoder})
    return f"{len(dataset)} prompts"


def _export_text_encoder(ck, out_dir: Path, precision: str) -> str:
    return export_text_encoder(ck.text_encoder, out_dir, precision=precision)
