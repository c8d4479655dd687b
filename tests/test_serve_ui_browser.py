"""The chat page at /ui, driven by a real headless Chromium (Debian's chromium + chromium-driver, via selenium):
type a prompt, press Enter, see the model's reply. Skipped when the browser is not installed."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and chromedriver (apt-get install -y chromium chromium-driver)",
)

PROMPT = "Once upon a time"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_chat_page_answers_a_typed_prompt(tmp_path):
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from llamaforge.core.loading import load_model_and_tokenizer
    from llamaforge.serve.app import create_app
    from llamaforge.serve.testing import ServerThread, tiny_model_dir

    model, tok = load_model_and_tokenizer(tiny_model_dir(tmp_path / "model"), require_tokenizer=True)
    app = create_app(model, tok, model_name="tiny-ui", max_batch=2, ui=True)
    engine, service = app.state.engine, app.state.service
    expected_prompt = len(service.chat_ids([{"role": "user", "content": PROMPT}]))

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chrome'}"]:
        options.add_argument(flag)
    with ServerThread(app) as server:
        assert server.host == "127.0.0.1"
        driver = webdriver.Chrome(service=ChromeService(CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(60)
            driver.get(f"{server.url}/ui/")
            wait = WebDriverWait(driver, 60, poll_frequency=0.2)
            box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "textarea[data-testid='textbox']"))
            before = engine.stats()
            box.send_keys(PROMPT)
            box.send_keys(Keys.ENTER)

            def reply(d):
                bots = d.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")
                done = engine.stats()["finished"] > before["finished"]
                return bots[-1].text.strip() if bots and done and bots[-1].text.strip() else None

            text = wait.until(reply)
            users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "[data-testid='user']")]
        finally:
            driver.quit()
    assert users == [PROMPT]
    assert text and not text.startswith("[error")
    after = engine.stats()
    # the page sent exactly this conversation, through the chat template, to the batching engine
    assert after["prefill_tokens"] - before["prefill_tokens"] == expected_prompt
    assert after["decoded_tokens"] > before["decoded_tokens"] or after["finished"] > before["finished"]
