"""The web UI: input bounds, the generation function, and an end-to-end run in headless Chromium.

`python tests/test_ui.py --screenshot docs/ui.png` drives the same page on the shipped demo model and saves the
README's screenshot.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
from urllib.parse import urljoin

import pytest
from PIL import Image

from scfg import SCFGError
from scfg.ui import DISPLAY_PX, LIMITS, generate_pair, upscale, validate, write_downloads

PROMPT = "a large yellow triangle above a small purple circle"  # the tiny and demo tokenizers split some words
PANELS = ("#cfg-image", "#scfg-image", "#regions", "#rate")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 64, 64, 10, 5.0), "empty"),
        (("x" * (LIMITS.max_prompt_chars + 1), 64, 64, 10, 5.0), "characters"),
        (("a cat", 60, 64, 10, 5.0), "`height`"),
        (("a cat", 64, 4096, 10, 5.0), "`width`"),
        (("a cat", 64, 64, 0, 5.0), "steps"),
        (("a cat", 64, 64, 10, 1.0), "guidance scale"),
    ],
)
def test_inputs_are_bounded_with_clear_messages(args, message):
    with pytest.raises(SCFGError, match=message):
        validate(*args)


@pytest.fixture(scope="module")
def pair_and_progress(tiny_sd_path):
    """One generation on the tiny model (3 steps, 96x64), with every progress call recorded."""
    from conftest import load_pipe

    calls = []

    def progress(fraction, desc):
        calls.append((fraction, desc))

    pipe = load_pipe(tiny_sd_path)
    return pipe, generate_pair(pipe, PROMPT, steps=3, height=64, width=96, progress=progress), calls


def test_generate_pair_returns_both_images_and_word_regions(pair_and_progress):
    _, pair, _ = pair_and_progress
    assert pair.cfg.size == pair.scfg.size == pair.regions.size == pair.rate.size == (96, 64)
    assert len(pair.steps) == 3 and pair.config.preset_name == "official"
    # the tiny tokenizer spells "triangle" letter by letter: the legend and the text still name whole words
    words = {re.sub(r" #\d+$", "", label) for label, _, _ in pair.legend}
    assert words <= {*PROMPT.split(), "other"} and "triangle" in words
    assert "regions: " in pair.info and "triangle " in pair.info and "rate min" in pair.info


def test_generate_pair_reports_progress_per_denoising_step(pair_and_progress):
    _, _, calls = pair_and_progress
    assert [desc for _, desc in calls] == [f"{run}: step {i}/3" for run in ("CFG", "S-CFG") for i in (1, 2, 3)]
    fractions = [fraction for fraction, _ in calls]
    assert fractions == sorted(fractions) and fractions[0] > 0 and fractions[-1] == 1.0


def test_downloads_keep_the_generated_size_and_record_the_settings(pair_and_progress, tmp_path):
    pipe, pair, _ = pair_and_progress
    paths = write_downloads(pair, str(tmp_path), "my-model", pipe)
    assert [os.path.basename(p) for p in paths] == [
        "cfg-seed0.png",
        "scfg-seed0.png",
        "regions-seed0.png",
        "rate-seed0.png",
        "steps-seed0.gif",
    ]
    cfg, scfg = Image.open(paths[0]), Image.open(paths[1])
    assert cfg.size == scfg.size == Image.open(paths[2]).size == Image.open(paths[3]).size == (96, 64)
    assert Image.open(paths[4]).n_frames == 3
    assert cfg.text["parameters"].splitlines()[0] == PROMPT
    assert ", S-CFG: off, " in cfg.text["parameters"] and ", S-CFG: official, " in scfg.text["parameters"]
    assert "Size: 96x64, Model: my-model, " in scfg.text["parameters"]
    assert json.loads(scfg.text["scfg"])["scfg_config"] == pair.config.to_dict()


def test_upscale_repeats_pixels_by_a_whole_factor():
    image = Image.new("RGB", (3, 2))
    image.putdata([(i * 40, 0, 0) for i in range(6)])
    big = upscale(image, target=10)
    assert big.size == (15, 10)  # factor 5: the shorter side reaches the target
    assert all(big.getpixel((x, y)) == image.getpixel((x // 5, y // 5)) for x in range(15) for y in range(10))
    assert upscale(Image.new("RGB", (1024, 64))).size == (2048, 128)  # the longer side is capped
    assert upscale(Image.new("RGB", (512, 512))).size == (512, 512)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def ui_page(model: str | None):
    """The app launched on a free port, and a headless Chromium page (1400x1000) on it."""
    from playwright.sync_api import sync_playwright

    from scfg.ui import build_app

    port = free_port()
    app = build_app(model)
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle", timeout=60_000)
                yield page
            finally:
                browser.close()
    finally:
        app.close()


def generate(page, prompt: str, steps: int, width: int, timeout_ms: int = 300_000) -> None:
    """Fill the form, click Generate and wait until every output, the GIF and the downloads are shown."""
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#steps input[type=number]").fill(str(steps))
    page.locator("#steps input[type=number]").press("Enter")
    page.locator("#width input").fill(str(width))
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#info textarea').value.includes('regions:')", timeout=timeout_ms)
    for selector in [*(f"{panel} img" for panel in PANELS), "#steps-gif img", "#regions-legend span", "#downloads a"]:
        page.wait_for_selector(selector, timeout=60_000)
    page.wait_for_function(  # every image decoded, so that the boxes below are final
        "[...document.querySelectorAll('#cfg-image img, #scfg-image img, #regions img, #rate img, #steps-gif img')]"
        ".every(img => img.complete && img.naturalWidth > 0)",
        timeout=60_000,
    )


# The size an <img> is drawn at: its box, less what `object-fit` (Gradio: scale-down) leaves empty.
DRAWN_SIZE = """img => {
    const box = img.getBoundingClientRect(), fit = getComputedStyle(img).objectFit;
    let s = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
    if (fit === "scale-down") s = Math.min(s, 1);
    if (fit === "fill") return [box.width, box.height, img.naturalWidth, img.naturalHeight];
    return [img.naturalWidth * s, img.naturalHeight * s, img.naturalWidth, img.naturalHeight];
}"""


def fetch_image(page, url: str) -> Image.Image:
    """The image at `url` (relative to the page), as the browser's session downloads it."""
    return Image.open(io.BytesIO(page.request.get(urljoin(page.url, url)).body()))


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (CI installs it)")
def test_ui_end_to_end_in_headless_chromium(tiny_sd_path, tmp_path):
    pytest.importorskip("gradio")
    pytest.importorskip("playwright.sync_api")
    with ui_page(str(tiny_sd_path)) as page:
        generate(page, PROMPT, steps=3, width=80)
        # the 80x64 images are shown upscaled by a whole factor, at least a panel's height, in their aspect ratio
        for panel in PANELS:
            img = page.locator(f"{panel} img")
            width, height, natural_width, natural_height = img.evaluate(DRAWN_SIZE)
            assert width >= 256 and height >= 256, (panel, width, height)
            assert abs(width / height - 80 / 64) < 0.02, (panel, width, height)
            assert natural_height >= DISPLAY_PX and natural_width * 64 == natural_height * 80, panel
            assert img.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
        # the legend names whole words of the prompt (the tiny tokenizer spells most of them letter by letter)
        texts = page.locator("#regions-legend .scfg-legend > span").all_inner_texts()
        entries = [re.fullmatch(r"(.+) (\d+)%", text.strip()) for text in texts]
        assert len(texts) == page.locator("#regions-legend .scfg-legend > span > span").count() > 0  # one swatch each
        assert all(entries), texts
        words = {re.sub(r" #\d+$", "", entry.group(1)) for entry in entries}
        assert words <= {*PROMPT.split(), "other"} and {"triangle", "yellow"} <= words, words
        assert "triangle" in page.locator("#info textarea").input_value()
        bar = page.locator("#rate-colorbar").inner_text()
        assert re.search(r"\d\.\d\d.*rate.*\d\.\d\d", bar, re.S), bar
        # downloads: the generated size, with the settings in the PNG; the GIF has one frame per step
        links = {
            link.get_attribute("href").rsplit("/", 1)[-1]: link.get_attribute("href")
            for link in page.locator("#downloads a").all()
        }
        assert {"cfg-seed0.png", "scfg-seed0.png", "steps-seed0.gif"} <= links.keys(), links
        scfg_png = fetch_image(page, links["scfg-seed0.png"])
        assert scfg_png.size == (80, 64) and scfg_png.text["parameters"].splitlines()[0] == PROMPT
        assert fetch_image(page, page.locator("#steps-gif img").get_attribute("src")).n_frames == 3
        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        assert Image.open(shot).width >= 1400


def save_screenshot(path: str, steps: int) -> None:
    """Generate `PROMPT` on the shipped demo model in the page and save a screenshot of it to `path`."""
    with ui_page(None) as page:
        generate(page, PROMPT, steps=steps, width=64, timeout_ms=900_000)
        page.screenshot(path=path, full_page=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Screenshot of the web UI with a generated pair (demo model).")
    parser.add_argument("--screenshot", required=True, help="PNG to write, e.g. docs/ui.png")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    save_screenshot(args.screenshot, args.steps)
