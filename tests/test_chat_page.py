"""The chat page, served by a live server, driven in headless Chromium (Debian's `chromium` and
`chromedriver`, through Selenium): the API key is asked for, a message is typed, a streamed answer
appears, the stop button ends a generation; a screenshot is saved as an artifact. Skips where no
browser is installed (CI installs one)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from test_server import MODEL, never_ending, serving

from hetero_moe.llm import LLM

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="no chromium and chromedriver (apt-get install chromium chromium-driver)"
)
KEY = "page-k3y"


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_page_in_headless_chromium(tiny, browser, capsys, monkeypatch) -> None:
    # short answers, never ending at EOS: each streams deltas to the context's end (a random model may stop at once)
    llm = never_ending(LLM(tiny("DeepseekV3ForCausalLM").path, dtype="float32", max_context=96), monkeypatch)
    with serving(llm, api_key=KEY) as url:
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, 60)
        key = wait.until(
            lambda d: d.find_element(By.ID, "api-key") if d.find_element(By.ID, "api-key").is_displayed() else None
        )
        key.send_keys(KEY, Keys.ENTER)
        wait.until(lambda d: MODEL in d.find_element(By.ID, "model").text)
        assert "context 96 tokens" in browser.find_element(By.ID, "model").text
        box = browser.find_element(By.ID, "input")
        box.send_keys("Hello there", Keys.ENTER)
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant[data-done='1']"))
        assert browser.find_element(By.CSS_SELECTOR, ".message.user").text.endswith("Hello there")
        assert answer.find_element(By.CLASS_NAME, "content").text.strip()
        assert int(answer.get_attribute("data-chunks")) > 1  # streamed, delta by delta
        assert not browser.find_element(By.ID, "error").is_displayed()
        # stop: a second message, stopped at once; the page is ready again
        box.send_keys("Tell me more", Keys.ENTER)
        wait.until(
            lambda d: (
                not d.find_element(By.ID, "stop").get_attribute("disabled")
                or len(d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='1']")) == 2
            )
        )
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='1']")) == 2)
        assert browser.find_element(By.ID, "send").is_enabled()
        # Markdown: code blocks and inline code, and model text never becomes markup
        html = browser.execute_script("return markdown('**bold** `x<y>`\\n\\n```py\\n<script>alert(1)</script>\\n```')")
        assert "<strong>bold</strong>" in html and "<code>x&lt;y&gt;</code>" in html
        assert "<pre><code>&lt;script&gt;" in html and "<script>" not in html
        folder = Path(os.environ.get("HETERO_MOE_ARTIFACTS") or tempfile.gettempdir()) / "hetero-moe-artifacts"
        folder.mkdir(parents=True, exist_ok=True)
        shot = folder / "chat-page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        with capsys.disabled():
            sys.stdout.write(f"\nchat page screenshot: {shot}\n")
    llm.close()
