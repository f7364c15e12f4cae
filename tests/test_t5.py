"""T5 encoder: MLX and torch twin against transformers' T5EncoderModel, the bucket formula,
the HF key map and folder reading, the tokenizer, padding, errors and the `t5:DIR` spec."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
import torch

from convert.hf_t5 import (T5Config, hf_t5_key, make_tiny_t5, read_hf_t5, t5_key, t5_param_shapes)
from mlxflow.errors import MlxflowError
from mlxflow import encoders
from mlxflow.models import t5 as mt5
from mlxflow.torch_ref import t5 as tt5


def _hf_tiny(folder, feed_forward_proj="relu", fmt="safetensors", seed=0):
    """A tiny random transformers T5 saved with save_pretrained (or as pytorch_model.bin).

    heads * d_kv (24) != d_model (32), few buckets so the log range is used within 12 tokens,
    norm gains moved away from 1 so a swapped norm cannot pass.
    """
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1,
                                num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                feed_forward_proj=feed_forward_proj, dropout_rate=0.0)
    cls = transformers.T5ForConditionalGeneration if fmt == "seq2seq" else transformers.T5EncoderModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    if fmt == "bin":
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
        # state_dict carries both shared.weight and the tied encoder.embed_tokens.weight.
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    encoder = model if fmt != "seq2seq" else model.get_encoder()
    return encoder


def _ids_and_mask(batch=3, length=12, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("feed_forward_proj,fmt", [("relu", "safetensors"), ("gated-gelu", "safetensors"),
                                                   ("gated-gelu", "bin"), ("relu", "seq2seq")])
def test_mlx_and_torch_twin_match_transformers(tmp_path, feed_forward_proj, fmt):
    folder = tmp_path / "hf"
    hf = _hf_tiny(folder, feed_forward_proj, fmt)
    assert (folder / ("pytorch_model.bin" if fmt == "bin" else "model.safetensors")).is_file()
    (folder / "tokenizer.json").write_text("{}")  # the folder locator asks for it; the model does not read it
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    ref = ref.last_hidden_state.numpy()

    mlx_model = encoders.load_t5_mlx(folder)
    out = np.array(mlx_model(mx.array(ids), mx.array(mask)))
    assert out.dtype == np.float32 and out.shape == (3, 12, 32)
    assert np.abs(out - ref).max() < 1e-4

    twin = encoders.load_t5_torch(folder)
    with torch.no_grad():
        out_t = twin(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(out_t - ref).max() < 1e-4
    # The mask matters: without it the padded rows' neighbours see the padding.
    unmasked = np.array(mlx_model(mx.array(ids)))
    assert np.abs(unmasked[1, :7] - ref[1, :7]).max() > 1e-3


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 32), (10, 50), (4, 8)])
def test_bucket_function_matches_transformers(num_buckets, max_distance):
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)
    ref = T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional=True, num_buckets=num_buckets,
                                                max_distance=max_distance).numpy()
    got_mlx = np.array(mt5.relative_position_bucket(mx.array(rel), num_buckets, max_distance))
    got_torch = tt5.relative_position_bucket(torch.from_numpy(rel), num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(got_mlx, ref)
    np.testing.assert_array_equal(got_torch, ref)
    assert ref.min() == 0 and ref.max() == num_buckets - 1  # the range really spans every bucket


def test_tiny_folder_loads_in_transformers_and_tokenizers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    folder = make_tiny_t5(tmp_path / "tiny", feed_forward_proj="gated-gelu", seed=3)
    assert json.loads((folder / "config.json").read_text())["mlxflow_random"] is True
    enc = encoders.T5TextEncoder(folder)
    assert enc.random and enc.tokens == 16 and enc.dim == 32
    texts = ["A red cat, smiling!", "big blue fish in water with an open mouth"]
    ids, mask = enc.tokenize(texts)
    plain = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(texts[0])
    assert list(ids[0, :len(plain.ids)]) == plain.ids and plain.ids[-1] == 1

    hf = transformers.T5EncoderModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    ref = ref.last_hidden_state.numpy() * mask[..., None]
    assert np.abs(enc.encode(texts) - ref).max() < 1e-4
    twin = encoders.load_t5_torch(folder)
    with torch.no_grad():
        out_t = twin(torch.from_numpy(ids), torch.from_numpy(mask)).numpy() * mask[..., None]
    assert np.abs(out_t - ref).max() < 1e-4


def test_tokenizer_padding_truncation_and_eos(tmp_path):
    folder = make_tiny_t5(tmp_path / "tiny", max_length=8)
    enc = encoders.T5TextEncoder(folder)
    vocab = enc.tokenizer.get_vocab()
    ids, mask = enc.tokenize(["Red CAT", "", "zebra", "a " * 20])
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (4, 8)
    assert list(ids[0]) == [vocab["red"], vocab["cat"], 1, 0, 0, 0, 0, 0]
    assert list(mask[0]) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert list(ids[1]) == [1] + [0] * 7 and mask[1].sum() == 1  # empty caption: just EOS
    assert list(ids[2, :2]) == [2, 1]  # unknown word -> <unk>, then EOS
    assert list(ids[3]) == [vocab["a"]] * 7 + [1] and mask[3].all()  # truncated, EOS kept last
    # An explicit max_length overrides the folder's.
    assert encoders.T5TextEncoder(folder, max_length=5).tokenize(["red cat"])[0].shape == (1, 5)


def test_encode_zeroes_padding_rows_and_ignores_padding(tmp_path):
    folder = make_tiny_t5(tmp_path / "tiny", max_length=8)
    enc = encoders.T5TextEncoder(folder)
    texts = ["red heart", "green tree with a yellow sun"]
    out = enc.encode(texts)
    ids, mask = enc.tokenize(texts)
    assert out.shape == (2, 8, 32) and out.dtype == np.float32
    assert np.all(out[mask == 0] == 0)
    assert np.all(np.abs(out[mask == 1]).sum(-1) > 0)
    np.testing.assert_array_equal(out, enc.encode_ids(ids, mask))
    # The real tokens' states do not depend on how much padding follows them.
    longer = encoders.T5TextEncoder(folder, max_length=12).encode(texts)
    assert np.abs(longer[:, :8] - out).max() < 1e-5 and np.all(longer[:, 8:] == 0)
    assert enc.encode([]).shape == (0, 8, 32)


def test_fully_padded_row_stays_finite(tmp_path):
    folder = make_tiny_t5(tmp_path / "tiny")
    ids = np.zeros((2, 6), np.int32)
    mask = np.zeros((2, 6), np.int32)
    mask[0, :2] = 1
    out = np.array(encoders.load_t5_mlx(folder)(mx.array(ids), mx.array(mask)))
    with torch.no_grad():
        out_t = encoders.load_t5_torch(folder)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.isfinite(out).all() and np.isfinite(out_t).all()
    assert np.abs(out - out_t).max() < 1e-4


def test_key_map_covers_both_twins():
    for proj in ("relu", "gated-gelu"):
        cfg = T5Config(vocab_size=20, d_model=16, d_kv=4, d_ff=24, num_layers=3, num_heads=2,
                       relative_attention_num_buckets=8, feed_forward_proj=proj)
        shapes = t5_param_shapes(cfg)
        from mlx.utils import tree_flatten

        assert {k: tuple(v.shape) for k, v in tree_flatten(mt5.T5Encoder(cfg).parameters())} == shapes
        assert {k: tuple(v.shape) for k, v in tt5.T5Encoder(cfg).state_dict().items()} == shapes
        for k in shapes:
            assert t5_key(hf_t5_key(k)) == k
    assert t5_key("shared.weight") == "embed.weight"
    assert t5_key("encoder.embed_tokens.weight") == "embed.weight"
    assert t5_key("decoder.block.0.layer.1.EncDecAttention.q.weight") is None
    assert t5_key("lm_head.weight") is None
    # umT5 keeps a bias table in every block: not this architecture, so it must not load silently.
    with pytest.raises(MlxflowError, match="unexpected weight"):
        t5_key("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight")


def test_folder_mismatches_are_one_line_errors(tmp_path):
    folder = make_tiny_t5(tmp_path / "tiny")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "d_ff": 65}))
    with pytest.raises(MlxflowError, match="does not fit the model: 'layers.0.ffn.wi.weight' has shape"):
        encoders.load_t5_mlx(folder)
    with pytest.raises(MlxflowError, match="does not fit"):
        encoders.load_t5_torch(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-silu"}))
    with pytest.raises(MlxflowError, match="feed_forward_proj 'gated-silu' is not supported"):
        read_hf_t5(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(MlxflowError, match="not a T5 encoder"):
        read_hf_t5(folder)


def test_missing_folder_and_missing_weights_say_what_and_where(tmp_path, monkeypatch):
    cache, home = tmp_path / "hub-cache", tmp_path / "home"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    needed = "config.json, model.safetensors or pytorch_model.bin, tokenizer.json"
    with pytest.raises(MlxflowError) as err:
        encoders.T5TextEncoder()
    msg = str(err.value)
    assert "\n" not in msg and needed in msg and "google-t5/t5-small" in msg
    assert str(cache / "models--google-t5--t5-small") in msg and str(home) in msg

    # A cached snapshot without weights is looked at, named, and not used.
    snap = cache / "models--google-t5--t5-small" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    with pytest.raises(MlxflowError, match=re.escape(str(snap))):
        encoders.T5TextEncoder()

    with pytest.raises(MlxflowError, match="T5 encoder folder not found"):
        encoders.T5TextEncoder(tmp_path / "nowhere")
    bare = make_tiny_t5(tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    with pytest.raises(MlxflowError, match=re.escape(f"{bare} is not a T5 encoder folder: it needs {needed}")):
        encoders.T5TextEncoder(bare)
    with pytest.raises(MlxflowError, match="is not a T5 encoder folder"):
        encoders.load_t5_torch(bare)

    # ...and the default location is really used once a snapshot has the files.
    full = make_tiny_t5(cache / "models--google-t5--t5-small" / "snapshots" / "def456")
    enc = encoders.T5TextEncoder()
    assert enc.folder == full.resolve() and enc.spec == "t5" and enc.id == "t5-small"


def test_load_text_encoder_spec(tmp_path):
    from mlxflow.encoders import ENCODERS, known_encoders, load_text_encoder

    assert "t5" in known_encoders() and "t5:DIR" in known_encoders()
    assert (ENCODERS["t5"].tokens, ENCODERS["t5"].dim) == (128, 512)  # t5-small, what the dit family expects
    folder = make_tiny_t5(tmp_path / "tiny", d_model=24, num_heads=3, d_kv=8, max_length=10)
    enc = load_text_encoder(f"t5:{folder}")
    assert isinstance(enc, encoders.T5TextEncoder)
    assert (enc.dim, enc.tokens, enc.random) == (24, 10, True)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", enc.id) and "random" in enc.id
    e = enc.encode(["a happy dog", "sun"])
    assert e.shape == (2, 10, 24) and e.dtype == np.float32
    again = load_text_encoder(enc.spec)  # the spec a checkpoint records loads the same encoder
    assert again.id == enc.id and np.array_equal(again.encode(["a happy dog", "sun"]), e)
