"""The web UI driven in a real headless browser (Debian chromium + chromedriver, through selenium).

Open the page, pick a model, send a message, watch the answer stream in; open the Runs tab and find a run.
Skipped where chromium, chromedriver, selenium or gradio is missing (CI installs them: see .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import running_webui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = Path(os.environ.get("LMWRIGHT_WEBUI_SHOTS", tempfile.gettempdir())) / "lmwright-webui-browser"

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian chromium + chromium-driver (apt-get install chromium chromium-driver)")

# Records, in the page, the length of the last assistant message of chat A at every DOM change.
OBSERVE = """
window.__lens = [];
const root = document.getElementById('chat_a');
const last = () => { const m = root.querySelectorAll('[data-testid="bot"]'); return m.length ? m[m.length - 1] : null; };
new MutationObserver(() => {
  const m = last(); const n = m ? m.innerText.trim().length : 0;
  if (window.__lens[window.__lens.length - 1] !== n) window.__lens.push(n);
}).observe(root, {childList: true, subtree: true, characterData: true});
"""


@pytest.fixture(scope="module")
def browser_runs(tmp_path_factory, lm_dir):
    root = tmp_path_factory.mktemp("browser-runs")
    for name in ("alpha-run", "beta-run"):
        shutil.copytree(lm_dir, root / name)
    (root / "beta-run" / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 3.0 - 0.25 * s}) for s in range(1, 5)), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def app_url(browser_runs):
    with running_webui(browser_runs) as url:
        yield url


@pytest.fixture
def driver(tmp_path, request):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    failed_before = request.session.testsfailed
    yield drv
    SHOTS.mkdir(parents=True, exist_ok=True)  # a screenshot of how the page ended, for debugging
    tag = "failed" if request.session.testsfailed > failed_before else "passed"
    drv.save_screenshot(str(SHOTS / f"{request.node.name}-{tag}.png"))
    drv.quit()


def _wait(what, predicate, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _pick(drv, elem_id: str, option: str) -> None:
    """Choose ``option`` in the Gradio dropdown ``elem_id`` the way a user does: open it, click the option."""
    from selenium.webdriver.common.by import By

    drv.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    opt = _wait(f"option {option!r} in #{elem_id}", lambda: [
        o for o in drv.find_elements(By.CSS_SELECTOR, f'#{elem_id} li[role=option][aria-label="{option}"]')
        if o.is_displayed()], 10)[0]
    opt.click()
    _wait(f"#{elem_id} showing {option!r}",
          lambda: drv.find_element(By.CSS_SELECTOR, f"#{elem_id} input").get_attribute("value") == option, 10)


def test_browser_chat_streams_an_answer(app_url, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(app_url)
    _wait("the chat box", lambda: driver.find_elements(By.CSS_SELECTOR, "#msg textarea"), 30)
    _pick(driver, "run_a", "beta-run")
    _pick(driver, "run_b", "alpha-run")  # side by side: the same message to a second model
    # a fixed seed: with the default random one the tiny model sometimes samples its end of text after 2-3 tokens,
    # an answer too short to show streaming (seed 0: ~90 pieces)
    seed = driver.find_element(By.CSS_SELECTOR, "#seed input")
    seed.send_keys(Keys.CONTROL, "a")
    seed.send_keys("0", Keys.TAB)
    _wait("the seed set to 0", lambda: driver.find_element(By.CSS_SELECTOR, "#seed input").get_attribute("value")
          == "0", 10)
    driver.execute_script(OBSERVE)
    box = driver.find_element(By.CSS_SELECTOR, "#msg textarea")
    box.send_keys("hello there")
    box.send_keys(Keys.ENTER)

    def answer():
        bots = driver.find_elements(By.CSS_SELECTOR, '#chat_a [data-testid="bot"]')
        users = driver.find_elements(By.CSS_SELECTOR, '#chat_a [data-testid="user"]')
        return bots and users and bots[-1].text.strip()

    _wait("an assistant message", answer, 60)
    # wait until the answer stops changing (the stream ended), then look at how it got there
    prev = None
    deadline = time.time() + 60
    while time.time() < deadline:
        lens = driver.execute_script("return window.__lens")
        if lens == prev:
            break
        prev = lens
        time.sleep(1.0)
    _wait("model B's answer (it streams after A's)", lambda: [b for b in driver.find_elements(
        By.CSS_SELECTOR, '#chat_b [data-testid="bot"]') if b.text.strip()], 60)
    for chat in ("chat_a", "chat_b"):
        users = [u.text for u in driver.find_elements(By.CSS_SELECTOR, f'#{chat} [data-testid="user"]')]
        assert users == ["hello there"], chat
    # streamed: the page showed the answer at several lengths (markdown rendering may shrink it at times, so
    # count distinct lengths rather than demand growth); a reply sent in one piece shows one length
    assert len({n for n in prev if n > 0}) >= 3, f"the answer did not stream in: lengths seen {prev}"
    assert max(prev) >= 50, f"seed 0's long answer did not arrive: lengths seen {prev}"
    assert driver.find_element(By.CSS_SELECTOR, "#msg textarea").get_attribute("value") == ""


def test_browser_runs_tab_lists_runs(app_url, driver):
    from selenium.webdriver.common.by import By

    driver.get(app_url)
    _wait("the tabs", lambda: driver.find_elements(By.CSS_SELECTOR, "button[role=tab]"), 30)
    tab = [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == "Runs"][0]
    tab.click()
    _wait("the run selector", lambda: driver.find_element(By.CSS_SELECTOR, "#run_sel input").is_displayed(), 10)
    driver.find_element(By.CSS_SELECTOR, "#run_sel input").click()
    listed = _wait("the runs listed", lambda: [o.get_attribute("aria-label") for o in driver.find_elements(
        By.CSS_SELECTOR, "#run_sel li[role=option]")], 10)
    assert listed == ["alpha-run", "beta-run"]
    driver.find_element(By.CSS_SELECTOR, "#run_sel input").click()  # close it again
    _pick(driver, "run_sel", "beta-run")
    table = _wait("the metrics table", lambda: [t for t in driver.find_elements(By.CSS_SELECTOR, "#metrics_table")
                                                  if "2.25" in t.text], 20)[0]
    cells = table.text.split()
    assert {"step", "loss", "2.75", "2.5", "2.25"} <= set(cells), cells
