"""`mlxflow serve`, used as a person would: a real browser types a prompt and watches the image form.

The tests train a micro checkpoint on the synthetic shapes set with the fake "codes" text
encoder, serve it from a background thread of this process (where the fake encoder is
registered) on a free 127.0.0.1 port, and drive Debian's headless Chromium through
Selenium and /usr/bin/chromedriver (no browser download).

The README's docs/serve.png is this file's screenshot of a longer-trained checkpoint:
    MLXFLOW_SERVE_TRAIN_STEPS=400 MLXFLOW_SERVE_SCREENSHOT=docs/serve.png \
        .venv/bin/python -m mlxflow.blas pytest -q tests/test_serve.py -k streams
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import cli
from conftest import caption_code_encoder, make_shapes_dataset, micro_emoji_config
from mlxflow.families import load_checkpoint

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,860", "--force-device-scale-factor=1"]


def _missing_browser() -> str | None:
    for module, extra in (("gradio", "mlxflow[demo]"), ("selenium", "mlxflow[dev]")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install '{extra}'; bash .ci/setup.sh dev installs it)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver; bash .ci/setup.sh dev installs it)"
    return None


# Gradio's queue calls pandas APIs that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
needs_browser = pytest.mark.skipif(_missing_browser() is not None, reason=str(_missing_browser()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro emoji checkpoint trained for a few steps, and the fake encoder that embeds its captions."""
    from mlxflow import api
    from mlxflow.configs import emoji as config
    from mlxflow import encoders as text

    steps = int(os.environ.get("MLXFLOW_SERVE_TRAIN_STEPS", "4"))
    root = tmp_path_factory.mktemp("serve")
    ds, emb = make_shapes_dataset(root / "shapes", n=16)
    micro = {k: v for k, v in vars(micro_emoji_config()).items() if k not in ("text_dim", "text_tokens")}
    with pytest.MonkeyPatch.context() as mp:  # module scope: undone when the module's tests are done
        mp.setitem(text._CACHE, "codes", caption_code_encoder("codes", ds.captions, emb))
        mp.setitem(config.EMOJI_PRESETS, "micro", micro)
        mp.setitem(config.EMOJI_TRAIN_PRESETS, "micro", dict(batch_size=8, lr=2e-3, warmup_steps=2, ema_decay=0.9))
        result = api.train_model("emoji", root / "shapes", root / "run", preset="micro", steps=steps,
                                 text_encoder="codes", train_overrides={"ckpt_every": steps}, sample_prompts=0)
        yield Path(result.checkpoint)


def _serve(ckpt):
    from mlxflow.serve import build_app, launch

    app = build_app(ckpt)
    port = _free_port()
    launch(app, port=port, block=False, quiet=True)
    return app, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def server(checkpoint):
    if _missing_browser():
        pytest.skip(_missing_browser())
    app, url = _serve(checkpoint)
    yield url
    app.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        opts.add_argument(flag)
    # Not under the test run's LD_PRELOAD (OpenBLAS, see mlxflow.blas): Chromium's renderer dies with it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, env=env), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


# --- page helpers ---------------------------------------------------------------------------

def _wait(driver, condition, timeout=30.0, what="the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; page text:\n{_text(driver)[-1500:]}")


def _text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def _open(driver, url):
    driver.get(url)
    _wait(driver, lambda d: d.execute_script("return !!document.querySelector('#mlxflow-generate')"),
          what="the Generate button")


def _type_prompts(driver, text: str):
    box = driver.find_element("css selector", "#mlxflow-prompts textarea")
    box.clear()
    box.send_keys(text)


def _set_number(driver, elem_id: str, value):
    """Type into the number box of a slider (or a Number), as a person editing the field would."""
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element("css selector", f"#{elem_id} input[type=number]")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


# Records every image the output shows, in order: each streamed frame replaces the <img> src.
WATCH_FRAMES = """
window.__frames = [];
const root = document.querySelector('#mlxflow-image');
const note = () => root.querySelectorAll('img').forEach(img => {
  const f = window.__frames; if (img.src && f[f.length - 1] !== img.src) f.push(img.src);
});
new MutationObserver(note).observe(root, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
"""


def _status(driver) -> str:
    return driver.execute_script("const s = document.querySelector('#mlxflow-status'); return s ? s.innerText : ''")


def _fetch_png(url: str) -> np.ndarray:
    from PIL import Image

    with urllib.request.urlopen(url, timeout=10) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


# --- tests ----------------------------------------------------------------------------------

@needs_browser
def test_prompt_streams_frames_then_final_grid(server, browser, checkpoint, tmp_path):
    """Type two prompts, click Generate, watch the picture change step by step, then get the grid."""
    _open(browser, server)
    text = _text(browser)
    step = load_checkpoint(checkpoint).step
    assert f"emoji/micro · step {step}" in text and "text encoder: codes" in text  # the checkpoint's metadata
    assert "red square" in text  # example prompts from the training captions
    _type_prompts(browser, "red square\nblue disc")
    _set_number(browser, "mlxflow-steps", 12)
    browser.execute_script(WATCH_FRAMES)
    browser.find_element("css selector", "#mlxflow-generate").click()
    _wait(browser, lambda d: _status(d).startswith("done"), what="the final grid")
    assert "8 images, ab2 12 steps" in _status(browser)
    frames = browser.execute_script("return window.__frames")
    pixels = [_fetch_png(src) for src in frames]
    final = pixels[-1]
    intermediate = {p.tobytes() for p in pixels[:-1] if not np.array_equal(p, final)}
    assert len(intermediate) >= 2, f"saw {len(frames)} frames, {len(intermediate)} distinct before the final one"
    assert final.shape[0] < final.shape[1]  # two rows (prompts) of four
    link = _wait(browser, lambda d: d.execute_script(
        "const a = document.querySelector('#mlxflow-download a[href]'); return a && a.href"), what="the download link")
    download = _fetch_png(link)  # the grid at 2x, as `mlxflow sample` writes it; the page shows it larger
    k = final.shape[1] // (download.shape[1] // 2)
    assert k >= 2 and np.array_equal(final[::k, ::k], download[::2, ::2])
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MLXFLOW_SERVE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MLXFLOW_SERVE_SCREENSHOT"])


@needs_browser
def test_bad_input_shows_a_message_and_the_server_keeps_serving(server, browser):
    _open(browser, server)
    browser.find_element("css selector", "#mlxflow-generate").click()  # empty prompt box
    _wait(browser, lambda d: "Cannot generate: enter a prompt" in _status(d), what="the empty-prompt message")
    _wait(browser, lambda d: d.execute_script(  # and a toast
        "return [...document.querySelectorAll('.toast-body')].some(t => t.innerText.includes('enter a prompt'))"),
        what="the warning toast")
    _type_prompts(browser, "green disc")
    _set_number(browser, "mlxflow-seed", -5)
    browser.find_element("css selector", "#mlxflow-generate").click()
    _wait(browser, lambda d: "seed must be a whole number from 0" in _status(d), what="the bad-seed message")
    _set_number(browser, "mlxflow-seed", 5)
    _set_number(browser, "mlxflow-steps", 999)  # the slider's box keeps steps in range
    assert browser.find_element("css selector", "#mlxflow-steps input[type=number]").get_attribute("value") == "200"
    _set_number(browser, "mlxflow-steps", 3)
    browser.find_element("css selector", "#mlxflow-generate").click()
    _wait(browser, lambda d: _status(d).startswith("done"), what="a good request after the bad ones")
    assert "ab2 3 steps" in _status(browser)


@needs_browser
def test_two_tabs_generating_at_once_both_finish(server, browser):
    tabs = []
    for prompt in ("yellow square", "blue square"):
        if tabs:
            browser.switch_to.new_window("tab")
        _open(browser, server)
        _type_prompts(browser, prompt)
        _set_number(browser, "mlxflow-steps", 16)
        tabs.append(browser.current_window_handle)
    for handle in tabs:
        browser.switch_to.window(handle)
        browser.find_element("css selector", "#mlxflow-generate").click()
    for handle in tabs:
        browser.switch_to.window(handle)
        _wait(browser, lambda d: _status(d).startswith("done"), what=f"tab {tabs.index(handle) + 1} to finish")
        assert "4 images, ab2 16 steps" in _status(browser)


@needs_browser
def test_checkpoint_that_fails_to_load_gives_a_page_that_says_so(tmp_path, browser):
    bad = tmp_path / "run"
    (bad / "step-0000001").mkdir(parents=True)
    (bad / "step-0000001" / "config.json").write_text("{not json")
    app, url = _serve(bad)
    try:
        _open(browser, url)
        _wait(browser, lambda d: "Could not load the checkpoint" in _text(d), what="the load error")
        assert not browser.find_element("css selector", "#mlxflow-generate").is_enabled()
    finally:
        app.close()


def _jit_checkpoint(root: Path, kind: str) -> Path:
    """A micro JiT trained for 2 steps on a class-labelled (kind "class") or caption-less ("none") folder."""
    from PIL import Image

    from mlxflow import api

    for i in range(12):
        folder = root / "images" / (("red", "blue")[i % 2] if kind == "class" else "")
        folder.mkdir(parents=True, exist_ok=True)
        im = np.full((16, 16, 3), 255, np.uint8)
        im[3 + i % 4: 10 + i % 4, 4:11] = (220, 30, 30) if i % 2 == 0 else (30, 60, 220)
        Image.fromarray(im).save(folder / f"{i}.png")
    if kind == "class":
        api.import_class_data(root / "images", root / "ds", size=16)
    else:
        api.import_folder_data(root / "images", root / "ds", size=16, unconditional=True, text_encoder=None)
    micro = dict(image_size=16, patch_size=8, patch_stride=4, bottleneck=16, dim=32, depth=2, heads=2,
                 in_context_tokens=2, in_context_start=1)
    out = api.train_model("jit", root / "ds", root / "run", preset="tiny", steps=2, model_overrides=micro,
                          train_overrides=dict(batch_size=4, ckpt_every=0), sample_prompts=0)
    assert api.checkpoint_info(out["checkpoint"])["conditioning"] == kind
    return Path(out["checkpoint"])


@needs_browser
@pytest.mark.parametrize("kind", ["class", "none"])
def test_class_and_unconditional_checkpoints_get_their_own_controls(kind, tmp_path, browser):
    """Class-conditional: pick classes (none picked is a message); unconditional: no prompt at all."""
    from selenium.webdriver.common.keys import Keys

    app, url = _serve(_jit_checkpoint(tmp_path, kind))
    try:
        _open(browser, url)
        visible = browser.execute_script(
            "return ['#mlxflow-prompts', '#mlxflow-classes', '#mlxflow-cfg'].map(s => { const e ="
            " document.querySelector(s); return !!e && e.offsetParent !== null; })")
        assert visible == [False, kind == "class", kind == "class"]
        _set_number(browser, "mlxflow-steps", 4)
        _set_number(browser, "mlxflow-n", 3)
        if kind == "class":
            browser.find_element("css selector", "#mlxflow-generate").click()
            _wait(browser, lambda d: "pick at least one class" in _status(d), what="the no-class message")
            for name in ("red", "blue"):
                pick = browser.find_element("css selector", "#mlxflow-classes input")
                pick.click()
                pick.send_keys(name, Keys.ENTER)
            pick.send_keys(Keys.ESCAPE)  # close the option list, as a person clicking away would
            _wait(browser, lambda d: d.execute_script(
                "return document.querySelector('#mlxflow-classes').innerText.includes('blue')"), what="both classes")
        browser.find_element("css selector", "#mlxflow-generate").click()
        _wait(browser, lambda d: _status(d).startswith("done"), what="the final grid")
        assert f"{6 if kind == 'class' else 3} images" in _status(browser)
    finally:
        app.close()


def test_cli_serve_on_a_bad_path_is_one_error_line(tmp_path, capsys):
    code = cli.main(["serve", str(tmp_path / "nowhere"), "--port", str(_free_port())])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and "\n" not in err, err


def test_parse_request_explains_bad_input():
    from mlxflow.errors import MlxflowError
    from mlxflow.serve import parse_request

    ok = parse_request("text", " red heart \n\n pizza", None, 2, 20, "heun", 3, 7, 5)
    assert ok == dict(prompts=["red heart", "pizza"], n=2, steps=20, solver="heun", cfg_scale=3.0, seed=7, preview=5)
    assert parse_request("none", "ignored", None, 3, 8, "euler", 1, 0, 1)["prompts"] == []
    assert parse_request("class", None, ["cat", "dog"], 1, 8, "rk4", 2, 0, 1)["prompts"] == ["cat", "dog"]
    for args, message in [(("text", "  \n", None, 1, 8, "heun", 3, 0, 1), "enter a prompt"),
                          (("class", None, [], 1, 8, "heun", 3, 0, 1), "pick at least one class"),
                          (("text", "a", None, 1, 0, "heun", 3, 0, 1), "steps must be"),
                          (("text", "a", None, 1, 201, "heun", 3, 0, 1), "steps must be"),
                          (("text", "a", None, 1, 2.5, "heun", 3, 0, 1), "steps must be"),
                          (("text", "a", None, 1, 8, "dopri", 3, 0, 1), "unknown solver"),
                          (("text", "a", None, 0, 8, "heun", 3, 0, 1), "number of images"),
                          (("text", "a", None, 1, 8, "heun", 3, None, 1), "seed"),
                          (("text", "a\n" * 17, None, 1, 8, "heun", 3, 0, 1), "at most 16 prompts")]:
        with pytest.raises(MlxflowError, match=message):
            parse_request(*args)


def test_sample_frames_match_the_api_grid(checkpoint, tmp_path):
    """The streamed final frame is the same sample `mlxflow sample` writes; earlier frames differ from it."""
    from PIL import Image

    from mlxflow import api
    from mlxflow.api import sample_frames
    from mlxflow.serve import load

    loaded = load(checkpoint)
    frames = list(sample_frames(loaded.generator, ["red square"], n=2, steps=6, solver="euler",
                                cfg_scale=2.0, seed=3, preview=2))
    assert [s for s, _, _ in frames] == [2, 4, 6] and all(total == 6 for _, total, _ in frames)
    api.sample(checkpoint, ["red square"], tmp_path / "g.png", n=2, steps=6, solver="euler", cfg_scale=2.0, seed=3)
    reference = np.asarray(Image.open(tmp_path / "g.png"))
    final = np.asarray(frames[-1][2])
    assert np.array_equal(final, reference[::2, ::2])
    assert not np.array_equal(np.asarray(frames[0][2]), final)
