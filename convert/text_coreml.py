"""Core ML export of the MiniLM / BERT sentence encoder, so an app can embed free text on device.

The exported ML Program (fixed sequence length T, batch 1; the app tokenises):

    input_ids      (1, T) int32   WordPiece ids: [CLS] tokens... [SEP], right-padded with [PAD]=0
    attention_mask (1, T) int32   1 for real tokens (incl. [CLS]/[SEP]), 0 for padding
    embedding      (1, D) float32 mean-pooled (over mask) and L2-normalised sentence embedding

The denoiser's ``text`` input is this embedding as (B, 1, D). A per-token encoder
(``minilm-tokens``, ``minilm-tokens:DIR``) exports its last hidden states instead,

    embedding      (1, T, D) float32 per-token states, padding rows exactly 0

which is the denoiser's ``text`` input as is (T = the encoder's token count). Next to the package go
``vocab.txt`` (one WordPiece token per line, line number = id) and ``text_encoder.json``
(tokenisation rules, I/O names, seq_len, spec), enough to reimplement the tokenizer in Swift.

Only BERT-family encoders (``minilm[-tokens]``, ``minilm[-tokens]:DIR``) export; any other spec (CLIP) is
skipped, not an error: the app then uses the label table from convert/coreml.py.

Before anything is written the package is run (``MLModel.predict`` on macOS, the numpy MIL
evaluator in convert/mil_eval.py elsewhere) on real tokenised prompts and compared with the
MLX encoder: PSNR (peak = range of the MLX embeddings) and minimum cosine similarity.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from convert.coreml import _dir_size_mb, _replace_dir, _require_coremltools, psnr
from mlxflow.encoders import load_bert_encoder, load_text_encoder
from mlxflow.errors import MlxflowError

__all__ = [
    "PACKAGE_NAME",
    "VERIFY_PROMPTS",
    "export_text_encoder",
    "verify_text_encoder",
    "exportable",
    "per_token",
]

PACKAGE_NAME = "TextEncoder.mlpackage"
VOCAB_NAME = "vocab.txt"
CONFIG_NAME = "text_encoder.json"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
VERIFY_PROMPTS = (
    "red heart",
    "grinning face",
    "smiling face with sunglasses",
    "face with tears of joy",
    "flag: Japan",
    "thumbs up: medium-dark skin tone",
)
_PRECISIONS = ("fp16", "fp32")


_BERT_ENCODERS = ("minilm", "minilm-tokens")


def exportable(spec) -> bool:
    """True for specs this module can export (``minilm``, ``minilm:DIR``, ``minilm-tokens[:DIR]``)."""
    s = _spec_string(spec)
    return s is not None and s.partition(":")[0] in _BERT_ENCODERS


def per_token(spec) -> bool:
    """True for a spec whose encoder outputs per-token states (``minilm-tokens[:DIR]``)."""
    s = _spec_string(spec)
    return s is not None and s.partition(":")[0] == "minilm-tokens"


def _spec_string(spec) -> str | None:
    if spec is None:
        return None
    return str(getattr(spec, "spec", spec))


# ----------------------------------------------------------------------------- torch wrapper


def _export_module(twin, tokens: bool = False):
    """Wrap the torch twin for tracing: Core ML passes int32 token ids, nn.Embedding wants int64.

    tokens: output the per-token states (1, T, D), padding rows 0, instead of the pooled (1, D).
    """
    import torch
    import torch.nn as nn

    class TextEncoderForExport(nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            if tokens:
                return self.bert.token_states(input_ids.long(), attention_mask)
            return self.bert(input_ids.long(), attention_mask)

    return TextEncoderForExport(twin).eval()


def _convert(twin, *, seq_len: int, precision: str, tokens: bool = False):
    """Trace + convert in memory; returns the MLModel."""
    ct = _require_coremltools()
    import torch

    module = _export_module(twin, tokens)
    example = (torch.zeros(1, seq_len, dtype=torch.int32), torch.ones(1, seq_len, dtype=torch.int32))
    with torch.no_grad():
        try:
            traced = torch.jit.trace(module, example, check_trace=False)
        except Exception as e:
            raise MlxflowError(f"could not trace the text encoder with inputs (1, {seq_len}): {e}") from e
    try:
        return ct.convert(
            traced,
            inputs=[ct.TensorType(name=n, shape=(1, seq_len), dtype=np.int32) for n in INPUT_NAMES],
            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS17,
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            skip_model_load=sys.platform != "darwin",
        )
    except Exception as e:
        raise MlxflowError(f"coremltools could not convert the text encoder: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- tokenizer side


def _fixed_tokenizer(folder: Path, seq_len: int):
    """The folder's tokenizer, truncating to and padding to exactly ``seq_len`` (what the app does)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def _vocab_text(folder: Path) -> str:
    """vocab.txt content: the folder's own file, else the WordPiece vocab of tokenizer.json."""
    vocab = folder / VOCAB_NAME
    if vocab.is_file():
        return vocab.read_text(encoding="utf-8")
    try:
        doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        table = doc["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MlxflowError(f"cannot read a WordPiece vocabulary from {folder / 'tokenizer.json'}: {e}") from e
    if not isinstance(table, dict) or not table:
        raise MlxflowError(f"{folder / 'tokenizer.json'} has no WordPiece vocabulary (model.vocab)")
    by_id = sorted(table.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise MlxflowError(f"the vocabulary in {folder / 'tokenizer.json'} is not numbered 0..{len(by_id) - 1}")
    return "".join(f"{t}\n" for t, _ in by_id)


def _tokenizer_rules(folder: Path, tok, seq_len: int) -> dict:
    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    norm = doc.get("normalizer") or {}
    if norm.get("type") == "Sequence":  # take the first BertNormalizer-like entry
        norm = next((n for n in norm.get("normalizers", []) if "lowercase" in n), {})
    lowercase = bool(norm.get("lowercase", tcfg.get("do_lower_case", True)))
    strip = norm.get("strip_accents", tcfg.get("strip_accents"))
    model = doc.get("model") or {}
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]")}
    return {
        "type": model.get("type", "WordPiece"),
        "lowercase": lowercase,
        # BERT semantics: strip_accents unset means "same as lowercase"
        "strip_accents": lowercase if strip is None else bool(strip),
        "clean_text": bool(norm.get("clean_text", True)),
        "split_chinese_chars": bool(norm.get("handle_chinese_chars", tcfg.get("tokenize_chinese_chars", True))),
        "pre_tokenizer": (doc.get("pre_tokenizer") or {}).get("type", "BertPreTokenizer"),
        "continuing_subword_prefix": model.get("continuing_subword_prefix", "##"),
        "max_input_chars_per_word": int(model.get("max_input_chars_per_word", 100)),
        "unk_token": model.get("unk_token", "[UNK]"),
        "special_tokens": ids,
        "template": "[CLS] tokens [SEP]",
        "max_tokens_between_specials": seq_len - 2,
        "truncation": f"keep the first {seq_len - 2} WordPiece tokens, then [SEP]",
        "padding": f"right-pad input_ids with [PAD]={ids['[PAD]']} and attention_mask with 0 to {seq_len}",
        "steps": [
            "clean text (drop control chars, whitespace -> space)",
            "pad CJK characters with spaces",
            "lowercase" if lowercase else "keep case",
            "NFD + drop combining marks" if (lowercase if strip is None else strip) else "keep accents",
            "split on whitespace and punctuation",
            "greedy longest-match-first WordPiece per word ('##' continuation; [UNK] if a word has no "
            "split or is longer than max_input_chars_per_word)",
        ],
    }


# ----------------------------------------------------------------------------- verification


def _runner(package: Path, backend: str | None):
    ct = _require_coremltools()
    backend = backend or ("coreml-predict" if sys.platform == "darwin" else "mil-numpy")
    if backend == "coreml-predict":
        if sys.platform != "darwin":
            raise MlxflowError("Core ML predict runs only on macOS; use backend='mil-numpy'")
        mlmodel = ct.models.MLModel(str(package))
        return backend, lambda feeds: np.asarray(mlmodel.predict(feeds)[OUTPUT_NAME], np.float32)
    if backend == "mil-numpy":
        from convert.mil_eval import evaluate_program, load_program

        prog = load_program(package)
        return backend, lambda feeds: np.asarray(evaluate_program(prog, feeds)[OUTPUT_NAME], np.float32)
    raise MlxflowError(f"unknown backend {backend!r}; choose coreml-predict or mil-numpy")


def verify_text_encoder(package, spec, *, seq_len: int | None = None, prompts: Sequence[str] = VERIFY_PROMPTS,
                        backend: str | None = None) -> dict:
    """Run an exported text encoder on tokenised prompts and compare with the MLX encoder.

    package: a ``TextEncoder.mlpackage``; spec: the ``minilm[-tokens]``/``minilm[-tokens]:DIR`` spec
    it came from (a per-token package is compared row by row, padding rows included).
    seq_len: default read from the package metadata. Prompts longer than seq_len tokens
    are left out (the MLX encoder would see tokens the package cannot).
    Returns {"psnr", "min_cosine", "max_abs_err", "n_prompts", "backend"}.
    """
    ct = _require_coremltools()
    package = Path(package)
    if not package.exists():
        raise MlxflowError(f"no Core ML model at {package}")
    if seq_len is None:
        meta = ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata
        seq_len = int(meta["mlxflow.seq_len"])
    encoder = load_text_encoder(_spec_string(spec))
    tok = _fixed_tokenizer(Path(encoder.folder), seq_len)
    full = _fixed_tokenizer(Path(encoder.folder), seq_len)
    full.no_truncation()
    full.no_padding()
    kept = [p for p in prompts if len(full.encode(p).ids) <= seq_len]
    if not kept:
        raise MlxflowError(f"no verification prompt fits in seq_len {seq_len} tokens")
    backend, run = _runner(package, backend)
    outs = []
    for enc in tok.encode_batch(kept):
        feeds = {"input_ids": np.array([enc.ids], np.int32), "attention_mask": np.array([enc.attention_mask], np.int32)}
        outs.append(run(feeds).reshape(-1))
    out = np.stack(outs).astype(np.float64)
    ref = np.asarray(encoder.encode(kept), np.float64).reshape(len(kept), -1)
    if out.shape != ref.shape:
        raise MlxflowError(f"exported text encoder gives {out.shape[1:]} embeddings, the MLX encoder {ref.shape[1:]}")
    cos = np.sum(ref * out, axis=1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1), 1e-30)
    return {
        "psnr": psnr(ref, out),
        "min_cosine": float(np.min(cos)) if np.all(np.isfinite(out)) else float("nan"),
        "max_abs_err": float(np.max(np.abs(ref - out))),
        "n_prompts": len(kept),
        "backend": backend,
    }


# ----------------------------------------------------------------------------- export


def _describe(mlmodel, *, spec: str, seq_len: int, dim: int, precision: str, pooling: str, normalized: bool,
              tokens: bool = False) -> None:
    import coremltools as ct

    meta = mlmodel.user_defined_metadata
    meta["mlxflow.kind"] = "text_encoder"
    meta["mlxflow.text_encoder"] = spec
    meta["mlxflow.seq_len"] = str(seq_len)
    meta["mlxflow.embedding_dim"] = str(dim)
    meta["mlxflow.pooling"] = pooling
    meta["mlxflow.normalized"] = json.dumps(normalized)
    meta["mlxflow.precision"] = precision
    meta["mlxflow.deployment_target"] = "iOS17"
    meta["mlxflow.coremltools"] = ct.__version__
    meta["mlxflow.tokenizer"] = f"WordPiece, {VOCAB_NAME}, rules in {CONFIG_NAME}"
    meta["mlxflow.output"] = "token_states" if tokens else "pooled"
    pooled = f"{pooling}-pooled" + (", L2-normalised" if normalized else "")
    if tokens:
        mlmodel.short_description = (
            f"mlxflow text encoder ({spec}, {precision}): WordPiece ids -> per-token last hidden states "
            f"({seq_len}x{dim}, padding rows 0), the denoiser's text input as is.")
    else:
        mlmodel.short_description = (
            f"mlxflow text encoder ({spec}, {precision}): WordPiece ids -> {pooled} sentence embedding ({dim}), "
            f"the denoiser's text input as (B,1,{dim})."
        )
    mlmodel.input_description["input_ids"] = (
        f"(1,{seq_len}) int32 WordPiece ids from {VOCAB_NAME}: [CLS] ... [SEP], right-padded with [PAD]=0")
    mlmodel.input_description["attention_mask"] = f"(1,{seq_len}) int32: 1 for tokens incl. [CLS]/[SEP], 0 for padding"
    mlmodel.output_description[OUTPUT_NAME] = (
        f"(1,{seq_len},{dim}) float32 per-token states, rows of padding exactly 0" if tokens
        else f"(1,{dim}) float32 {pooled} sentence embedding")


def export_text_encoder(spec, out_dir, *, precision: str = "fp16", seq_len: int | None = None,
                        min_psnr: float = 35.0, backend: str | None = None) -> str:
    """Export a MiniLM/BERT text encoder to ``out_dir``/TextEncoder.mlpackage (+ vocab.txt, text_encoder.json).

    spec: ``minilm``, ``minilm:DIR``, ``minilm-tokens`` or ``minilm-tokens:DIR`` (or a loaded
        encoder with ``.spec``); anything else (``clip``...) is skipped and the returned
        string says why; out_dir is not touched.
    precision: "fp16" (fp16 compute, fp32 output) or "fp32". seq_len: the fixed token count T
        (default 32 for a pooled encoder; a per-token encoder exports at its own token count,
        the L its denoiser was trained on, and refuses another).
    The package is verified against the MLX encoder before anything lands in out_dir;
    PSNR below ``min_psnr`` dB raises MlxflowError and writes nothing.
    Returns a one-line summary, e.g.
    "TextEncoder.mlpackage (fp16, seq_len 32, 43.7 MB, PSNR 61.2 dB, min cosine 0.99998)".
    """
    s = _spec_string(spec)
    if s is None:
        return "skipped: the checkpoint names no text encoder; the app uses the label table"
    if not exportable(s):
        return (f"skipped: text encoder {s!r} has no Core ML export (only minilm[-tokens] / minilm[-tokens]:DIR); "
                "the app uses the label table")
    if precision not in _PRECISIONS:
        raise MlxflowError(f"unknown precision {precision!r}; choose fp16 or fp32")
    tokens = per_token(s)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer))
                                or seq_len < 3):
        raise MlxflowError(f"seq_len must be an integer >= 3 ([CLS] + token + [SEP]), got {seq_len!r}")
    _require_coremltools()

    encoder = load_text_encoder(s)
    if tokens:
        # The denoiser's text input has the encoder's fixed L; another T would not fit it.
        if seq_len is not None and int(seq_len) != encoder.tokens:
            raise MlxflowError(f"text encoder {s!r} gives {encoder.tokens} token states; "
                               f"it exports with seq_len {encoder.tokens}, not {seq_len}")
        seq_len = encoder.tokens
    seq_len = 32 if seq_len is None else int(seq_len)
    folder = Path(encoder.folder)
    twin = load_bert_encoder(folder)
    max_pos = twin.embeddings.position.num_embeddings
    if seq_len > max_pos:
        raise MlxflowError(f"seq_len {seq_len} exceeds the encoder's {max_pos} position embeddings")
    dim = twin.embeddings.word.embedding_dim
    tok = _fixed_tokenizer(folder, seq_len)
    if tok.token_to_id("[CLS]") is None or tok.token_to_id("[SEP]") is None:
        raise MlxflowError(f"the tokenizer in {folder} has no [CLS]/[SEP] tokens: not a BERT WordPiece tokenizer")
    vocab = _vocab_text(folder)
    n_vocab = vocab.count("\n")
    if n_vocab > twin.embeddings.word.num_embeddings:
        raise MlxflowError(f"vocabulary has {n_vocab} tokens but the encoder embeds only "
                           f"{twin.embeddings.word.num_embeddings}")

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MlxflowError(f"export folder {out_dir} is a file")
    mlmodel = _convert(twin, seq_len=seq_len, precision=precision, tokens=tokens)
    _describe(mlmodel, spec=s, seq_len=seq_len, dim=dim, precision=precision, pooling=twin.pooling,
              normalized=bool(twin.normalize), tokens=tokens)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".text_encoder.", dir=out_dir.parent))
    try:
        staged = tmp / PACKAGE_NAME
        mlmodel.save(str(staged))
        report = verify_text_encoder(staged, s, seq_len=seq_len, backend=backend)
        if not report["psnr"] >= min_psnr:  # also catches NaN
            raise MlxflowError(
                f"text encoder Core ML export rejected: PSNR {report['psnr']:.1f} dB < {min_psnr:g} dB, "
                f"min cosine {report['min_cosine']:.5f} ({precision}, {report['n_prompts']} prompts, "
                f"{report['backend']}); nothing written to {out_dir}")
        size_mb = _dir_size_mb(staged)
        doc = {
            "format": "mlxflow-text-encoder-1",
            "spec": s,
            "model": PACKAGE_NAME,
            "vocab": VOCAB_NAME,
            "vocab_size": n_vocab,
            "seq_len": seq_len,
            "inputs": {
                "input_ids": {"shape": [1, seq_len], "dtype": "int32"},
                "attention_mask": {"shape": [1, seq_len], "dtype": "int32"},
            },
            "output": ({"name": OUTPUT_NAME, "shape": [1, seq_len, dim], "dtype": "float32",
                        "pooling": "none", "padding_rows": "exactly 0",
                        "use": f"the denoiser's text input as is: (B, {seq_len}, {dim})"} if tokens else
                       {"name": OUTPUT_NAME, "shape": [1, dim], "dtype": "float32",
                        "pooling": twin.pooling, "l2_normalized": bool(twin.normalize),
                        "use": f"the denoiser's text input as (B, 1, {dim})"}),
            "tokenizer": _tokenizer_rules(folder, tok, seq_len),
            "precision": precision,
            "deployment_target": "iOS17",
            "verification": {**report, "min_psnr": min_psnr, "reference": "MLX encoder"},
        }
        (tmp / VOCAB_NAME).write_text(vocab, encoding="utf-8")
        (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=1), encoding="utf-8")
        out_dir.mkdir(parents=True, exist_ok=True)
        # text_encoder.json goes last: its presence says the other two are complete.
        _replace_dir(staged, out_dir / PACKAGE_NAME)
        os.replace(tmp / VOCAB_NAME, out_dir / VOCAB_NAME)
        os.replace(tmp / CONFIG_NAME, out_dir / CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (f"{PACKAGE_NAME} ({precision}, seq_len {seq_len}, {size_mb:.1f} MB, PSNR {report['psnr']:.1f} dB, "
            f"min cosine {report['min_cosine']:.6f})")
