"""The page of `gptcli serve` in a headless Chromium, driven by Selenium: it streams a reply
token by token, and that reply is the one the API gives the same request unstreamed.

Chromium comes from Debian (`chromium`, `chromium-driver`). If it is missing, the set-up
installs it once with apt-get when it runs as root; where it cannot (not root, no apt-get,
no network, a failed install) the tests skip and say why. Selenium is given the Debian
chromedriver, so Selenium Manager never downloads a browser or a driver.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from serving import request

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the dev extra is not installed
    webdriver = None

CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_TIMEOUT_S = 240  # per apt-get command: a mirror that does not answer must not eat CI's time
WAIT_S = 30  # for the page to load its model, and for one reply to stream


def _chromium() -> str | None:
    return shutil.which("chromium") if os.path.exists(CHROMEDRIVER) else None


def _install_chromium() -> str | None:
    """Install chromium and its driver with apt-get; None on success, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "chromium is not installed, and installing it needs root (apt-get install chromium chromium-driver)"
    if shutil.which("apt-get") is None:
        return "chromium is not installed, and there is no apt-get to install it with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"installing chromium: '{' '.join(command)}' took over {INSTALL_TIMEOUT_S} s (no network?)"
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
            return f"installing chromium: '{' '.join(command)}' failed (no network?): {last[0]}"
    return None if _chromium() else "apt-get ran, but chromium or /usr/bin/chromedriver is still missing"


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for this file's tests."""
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install selenium, or the dev extra)")
    if _chromium() is None:
        why = _install_chromium()
        if why:
            pytest.skip(why)
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1000,700"):
        options.add_argument(argument)
    options.binary_location = _chromium()
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _open(driver, server, task: str, max_tokens: int) -> None:
    """Load the page, wait until it has read the model card, make sampling greedy and set
    the reply's length (two chat turns must fit the test model's 64-token context)."""
    driver.get(server.url + "/")
    WebDriverWait(driver, WAIT_S).until(lambda d: f"· {task} ·" in d.find_element(By.ID, "model").text)
    for field, value in (("temperature", 0), ("max_tokens", max_tokens)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))


def _reply(driver) -> tuple[str, int]:
    """The latest reply's text and chunk count, once its stream has ended without an error."""
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "reply").get_attribute("data-done") == "1")
    assert driver.find_element(By.ID, "error").text == ""
    reply = driver.find_element(By.ID, "reply")
    return reply.get_property("textContent"), int(reply.get_attribute("data-chunks"))


def test_chat_page_streams_the_greedy_reply(browser, serve_process, chat_checkpoint):
    server = serve_process(chat_checkpoint)
    _open(browser, server, "chat", max_tokens=12)
    turns = []
    for i, text in enumerate(["Hello there", "And then?"]):
        box = browser.find_element(By.ID, "input")
        box.send_keys(text)
        if i == 0:
            browser.find_element(By.ID, "send").click()
        else:
            box.send_keys(Keys.ENTER)  # Enter sends too
        reply, chunks = _reply(browser)
        assert reply and chunks > 1  # it streamed, piece by piece
        sent = browser.execute_script("return window.lastRequest")
        turns.append({"role": "user", "content": text})
        assert sent == {"messages": turns, "temperature": 0, "top_p": 1, "max_tokens": 12}  # the history too
        status, whole = request(f"{server.api}/chat/completions", {**sent, "stream": False})
        assert status == 200, whole
        assert whole["choices"][0]["message"]["content"] == reply
        turns.append({"role": "assistant", "content": reply})
    assert len(browser.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 4


def test_lm_page_streams_a_completion_after_the_prompt(browser, serve_process, lm_checkpoint):
    server = serve_process(lm_checkpoint)
    _open(browser, server, "lm", max_tokens=30)
    browser.find_element(By.ID, "input").send_keys("To be, or")
    browser.find_element(By.ID, "send").click()
    reply, chunks = _reply(browser)
    assert reply and chunks > 1
    assert browser.find_element(By.ID, "output").get_property("textContent") == "To be, or" + reply
    sent = browser.execute_script("return window.lastRequest")
    assert sent == {"prompt": "To be, or", "temperature": 0, "top_p": 1, "max_tokens": 30}
    status, whole = request(f"{server.api}/completions", {**sent, "stream": False})
    assert status == 200, whole
    assert whole["choices"][0]["text"] == reply
