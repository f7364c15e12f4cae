"""The one caption rule (mlxflow.data.inputs.decode_caption) in every caption source.

Sources: captions files (.tsv, .txt, .csv, .json, .jsonl) for `data folder` and `data
latents` folders, per-image sidecar .txt files, tar shard .txt and .json members. Each is
tried with UTF-8, UTF-8 with a BOM, UTF-16 with a BOM (LE and BE), CRLF line endings and a
trailing empty line (all read the same), and with latin-1 (refused, or skipped per image).
"""

import io
import json
import tarfile

import pytest
from PIL import Image

from mlxflow.data.dataset import ImageTextDataset
from mlxflow.data.folder import import_image_folder, read_captions
from mlxflow.data.inputs import CaptionDecodeError, decode_caption, describe_skipped
from mlxflow.data.shards import ImageFolderReader, TarShardReader, caption_from_json
from mlxflow.errors import MlxflowError

CAPTIONS = {"a.png": "café au lait, naïve", "b.png": "日本語のキャプション", "c.png": "plain ascii"}

ENCODINGS = {  # name -> bytes of a text
    "utf-8": lambda t: t.encode("utf-8"),
    "utf-8 BOM": lambda t: t.encode("utf-8-sig"),
    "utf-16 BOM": lambda t: t.encode("utf-16"),  # Python writes the BOM, little-endian here
    "utf-16-be BOM": lambda t: b"\xfe\xff" + t.encode("utf-16-be"),
    "utf-16-le BOM": lambda t: b"\xff\xfe" + t.encode("utf-16-le"),
    "utf-32 BOM": lambda t: t.encode("utf-32"),
}


def caption_file_text(fmt: str, captions=CAPTIONS, newline="\n", trailing=True) -> str:
    if fmt in ("tsv", "txt"):
        lines = [f"{k}\t{v}" for k, v in captions.items()]
    elif fmt == "csv":
        lines = ["file_name,text"] + [f'{k},"{v}"' for k, v in captions.items()]
    elif fmt == "jsonl":
        lines = [json.dumps({"file_name": k, "text": v}, ensure_ascii=False) for k, v in captions.items()]
    else:
        lines = json.dumps(captions, ensure_ascii=False, indent=1).split("\n")
    return newline.join(lines) + (newline if trailing else "")


FORMATS = ("tsv", "txt", "csv", "json", "jsonl")


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_decode_caption_reads_utf8_and_bom_marked_unicode(encoding):
    text = "line one é\nline 二\n"
    assert decode_caption(ENCODINGS[encoding](text)) == text
    assert decode_caption(ENCODINGS[encoding](text.replace("\n", "\r\n"))) == text
    assert decode_caption(ENCODINGS[encoding](text.replace("\n", "\r"))) == text


def test_decode_caption_never_guesses():
    with pytest.raises(CaptionDecodeError) as e:
        decode_caption("ok line\nsecond café line\n".encode("latin-1"))
    assert e.value.line == 2 and str(e.value) == "line 2: not UTF-8 text (byte 0xE9 at column 11)"
    with pytest.raises(CaptionDecodeError, match="line 1: not UTF-8"):
        decode_caption("\ufeffcafé".encode("utf-8")[:3] + "café".encode("cp1252"))  # a BOM, then cp1252
    with pytest.raises(CaptionDecodeError, match="NUL characters .*without a byte-order mark"):
        decode_caption("a.png\tcat\n".encode("utf-16-le"))  # UTF-16 without its BOM
    with pytest.raises(CaptionDecodeError, match="not UTF-16-LE"):
        decode_caption(b"\xff\xfe" + "ab".encode("utf-16-le") + b"\x00\xd8")  # a lone surrogate
    with pytest.raises(CaptionDecodeError):
        decode_caption("テスト".encode("shift_jis"))
    # a U+2028 or NEL inside a caption is not a line break
    assert decode_caption("a\u2028b\x85c".encode()) == "a\u2028b\x85c"


# --------------------------------------------------------------------------- captions files


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_captions_format_in_every_accepted_encoding(tmp_path, fmt, encoding):
    for newline in ("\n", "\r\n"):
        for trailing in (True, False):
            path = tmp_path / f"captions.{fmt}"
            path.write_bytes(ENCODINGS[encoding](caption_file_text(fmt, newline=newline, trailing=trailing)))
            assert read_captions(path) == CAPTIONS, (newline, trailing)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_utf8_captions_file_is_refused_naming_file_and_line(tmp_path, fmt):
    path = tmp_path / f"captions.{fmt}"
    path.write_bytes(caption_file_text(fmt).encode("latin-1", errors="replace"))
    with pytest.raises(MlxflowError) as e:
        read_captions(path)
    msg = str(e.value)
    first_bad_line = next(i for i, line in enumerate(caption_file_text(fmt).split("\n"), 1) if "é" in line)
    assert msg.startswith(f"{path}:{first_bad_line}: not UTF-8 text (byte 0xE9 at column ") and "\n" not in msg
    assert "UTF-16 with a byte-order mark is read too" in msg


def test_captions_file_format_errors_name_the_line(tmp_path):
    cases = {
        "captions.tsv": ("a.png\tok\nb.png no tab\n", ":2: expected 'filename<TAB>caption'"),
        "captions.json": ('{"a.png": "ok",\n "b.png": }', ":2: not valid JSON"),
        "captions.jsonl": ('{"file": "a.png", "caption": "x"}\n{"file": "b.png"}\n', ":2: expected an object"),
        "captions.csv": ("file,caption\na.png,ok\nb.png,\n", ":3: expected 'filename,caption'"),
    }
    for name, (text, want) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(MlxflowError, match=want):
            read_captions(tmp_path / name)
    (tmp_path / "x.json").write_text('["a list"]')
    with pytest.raises(MlxflowError, match="must map file names"):
        read_captions(tmp_path / "x.json")
    with pytest.raises(MlxflowError, match="cannot read captions file"):
        read_captions(tmp_path / "missing.tsv")


def test_csv_without_header_and_with_commas(tmp_path):
    (tmp_path / "c.csv").write_text('a.png,"a cat, sitting"\nb.png,a dog, running\n')
    assert read_captions(tmp_path / "c.csv") == {"a.png": "a cat, sitting", "b.png": "a dog, running"}
    (tmp_path / "h.csv").write_text("caption,image\nred,a.png\n")  # header in any column order
    assert read_captions(tmp_path / "h.csv") == {"a.png": "red"}


def _images(folder, names=CAPTIONS):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / n)
    return folder


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("encoding", ["utf-8 BOM", "utf-16 BOM"])
def test_the_issue_example_bom_captions_work_in_folder_import_and_latents(tmp_path, fmt, encoding):
    src = _images(tmp_path / "imgs")
    (src / f"captions.{fmt}").write_bytes(ENCODINGS[encoding](caption_file_text(fmt, newline="\r\n")))
    info = import_image_folder(src, tmp_path / "ds", size=8)
    assert info["count"] == 3 and info["skipped"] == 0
    assert ImageTextDataset.load(tmp_path / "ds").captions == list(CAPTIONS.values())
    r = ImageFolderReader(src, size=8)
    assert [(k, c) for k, _, c in r] == list(CAPTIONS.items())  # the first image is not dropped
    assert not r.skipped


def test_latin1_captions_file_stops_folder_import_and_latents_with_one_line(tmp_path):
    src = _images(tmp_path / "imgs")
    (src / "captions.tsv").write_bytes(caption_file_text("tsv").encode("latin-1", errors="replace"))
    for run in (lambda: import_image_folder(src, tmp_path / "ds", size=8), lambda: ImageFolderReader(src, size=8)):
        with pytest.raises(MlxflowError, match=r"captions.tsv:1: not UTF-8 text \(byte 0xE9 at column 10\)"):
            run()
    assert not (tmp_path / "ds").exists()


# --------------------------------------------------------------------------- sidecar .txt


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_sidecar_captions_in_every_accepted_encoding(tmp_path, encoding):
    src = _images(tmp_path / "imgs")
    for name, caption in CAPTIONS.items():
        (src / name).with_suffix(".txt").write_bytes(ENCODINGS[encoding](caption + "\r\n"))
    info = import_image_folder(src, tmp_path / "ds", size=8)
    assert info["count"] == 3 and ImageTextDataset.load(tmp_path / "ds").captions == list(CAPTIONS.values())
    assert [(k, c) for k, _, c in ImageFolderReader(src, size=8)] == list(CAPTIONS.items())


def test_undecodable_sidecar_skips_that_image_with_its_reason(tmp_path):
    src = _images(tmp_path / "imgs")
    for name, caption in CAPTIONS.items():
        (src / name).with_suffix(".txt").write_bytes(caption.encode("latin-1" if name == "a.png" else "utf-8",
                                                                    errors="replace"))
    info = import_image_folder(src, tmp_path / "ds", size=8)
    assert info["count"] == 2 and info["skipped"] == 1
    assert info["skipped_details"] == [{"name": "a.png", "reason": "caption not UTF-8"}]
    assert describe_skipped(info) == "skipped 1: a.png (caption not UTF-8)"
    assert "café" not in "".join(ImageTextDataset.load(tmp_path / "ds").captions)  # no mojibake stored
    r = ImageFolderReader(src, size=8)
    assert [k for k, _, _ in r] == ["b.png", "c.png"]
    assert dict(r.skipped) == {"bad_caption": 1} and r.skipped_details == info["skipped_details"]


def test_sidecar_missing_for_one_image_is_one_clear_error(tmp_path):
    src = _images(tmp_path / "imgs")
    (src / "a.txt").write_text("only a")
    with pytest.raises(MlxflowError, match=r"image b.png has no caption \(no b.txt beside it, or it is empty\) "
                                           r"\(and 1 more\)"):
        import_image_folder(src, tmp_path / "ds", size=8)
    r = ImageFolderReader(src, size=8)
    assert [k for k, _, _ in r] == ["a.png"] and dict(r.skipped) == {"missing_caption": 2}
    # a captions file wins over sidecars
    (src / "captions.tsv").write_text("".join(f"{k}\tfrom file\n" for k in CAPTIONS))
    import_image_folder(src, tmp_path / "ds", size=8)
    assert set(ImageTextDataset.load(tmp_path / "ds").captions) == {"from file"}


# --------------------------------------------------------------------------- tar members


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return path


def _png():
    b = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(b, "PNG")
    return b.getvalue()


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_tar_txt_and_json_captions_in_every_accepted_encoding(tmp_path, encoding):
    enc = ENCODINGS[encoding]
    members = []
    for i, caption in enumerate(CAPTIONS.values()):
        members += [(f"t{i}.png", _png()), (f"t{i}.txt", enc(caption + "\r\n"))]
        members += [(f"j{i}.png", _png()), (f"j{i}.json", enc(json.dumps({"prompt": caption}, ensure_ascii=False)))]
    r = TarShardReader(_tar(tmp_path / "s.tar", members), size=8)
    got = [c for _, _, c in r]
    assert got == [c for c in CAPTIONS.values() for _ in (0, 1)] and not r.skipped


def test_tar_non_utf8_captions_are_skipped_the_same_way_for_txt_and_json(tmp_path):
    latin = "café".encode("latin-1")
    members = [("a.png", _png()), ("a.txt", latin),
               ("b.png", _png()), ("b.json", b'{"prompt": "' + latin + b'"}'),
               ("c.png", _png()), ("c.txt", "fine".encode())]
    r = TarShardReader(_tar(tmp_path / "s.tar", members), size=8)
    assert [(k, c) for k, _, c in r] == [("c", "fine")]
    assert dict(r.skipped) == {"bad_caption": 2}
    assert r.skipped_details == [{"name": "a", "reason": "caption not UTF-8 (.txt)"},
                                 {"name": "b", "reason": "caption not UTF-8 (.json)"}]
    with pytest.raises(CaptionDecodeError):
        caption_from_json(b'{"prompt": "' + latin + b'"}')
    assert caption_from_json(b'\xef\xbb\xbf{"caption": " x "}') == "x"


def test_caption_errors_are_one_line_mlxflow_errors(tmp_path):
    src = _images(tmp_path / "imgs")
    for fmt in FORMATS:
        path = src / f"bad.{fmt}"
        path.write_bytes(b"\x00\x00" + "a.png\tx".encode("utf-16-le"))
        with pytest.raises(MlxflowError) as e:
            import_image_folder(src, tmp_path / "ds", size=8, captions=path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
