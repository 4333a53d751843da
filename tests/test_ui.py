"""The web UI: input bounds, the generation function, and an end-to-end run in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from scfg import SCFGError
from scfg.ui import LIMITS, generate_pair, validate

gradio = pytest.importorskip("gradio")


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


def test_generate_pair_returns_both_images_and_regions(tiny_sd):
    cfg, scfg_image, overlay, heat, info = generate_pair(
        tiny_sd, "a red cat:1.5 on the sofa", steps=2, height=64, width=96
    )
    assert cfg.size == scfg_image.size == overlay.size == heat.size == (96, 64)
    assert "regions:" in info and "rate" in info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (CI installs it)")
def test_ui_end_to_end_in_headless_chromium(tiny_sd_path, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    from scfg.ui import build_app

    port = free_port()
    app = build_app(str(tiny_sd_path))
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle", timeout=60_000)
            page.locator("#prompt textarea").fill("a red cat:1.5 on the sofa")
            page.locator("#steps input[type=number]").fill("3")
            page.locator("#steps input[type=number]").press("Enter")
            page.locator("#width input").fill("96")
            page.locator("#generate").click()
            page.wait_for_selector("#cfg-image img", timeout=120_000)
            page.wait_for_selector("#scfg-image img", timeout=120_000)
            page.wait_for_selector("#regions img", timeout=120_000)
            page.wait_for_function(
                "document.querySelector('#info textarea').value.includes('regions:')", timeout=60_000
            )
            shot = os.environ.get("SCFG_UI_SCREENSHOT", str(tmp_path / "ui.png"))
            page.screenshot(path=shot, full_page=True)
            assert os.path.getsize(shot) > 10_000
            browser.close()
    finally:
        app.close()
