"""A real browser (Debian's chromium, driven through chromedriver by selenium) on the console
page: it sends a line, reads it back upper-cased, and sees the close code the child's exit
gave. The browser is started so that it opens no connection off this machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import py_child, service_toml

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    (CHROMIUM is None or DRIVER is None) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them; under CI=true this fails instead)",
)

UPPER_ONCE = "import sys; print(sys.stdin.readline().upper(), end='', flush=True); sys.exit(3)"


@pytest.mark.timeout(120)
def test_chromium_on_the_console_page_sends_a_line_and_sees_the_close_code(gsrv, tmp_path: Path) -> None:
    os.environ["SE_AVOID_STATS"] = "true"  # selenium: no usage statistics sent anywhere
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    service = service_toml("upper", py_child(UPPER_ONCE), transport="websocket")
    server = gsrv(service + "[services.upper.websocket]\nconsole = true\n")
    host, port = server.address("upper")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER or "/usr/bin/chromedriver"))
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"http://{host}:{port}/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("open: "))
        box = driver.find_element(By.ID, "line")
        box.send_keys("hello from a browser")
        driver.find_element(By.CSS_SELECTOR, "form button").click()
        wait.until(lambda d: "HELLO FROM A BROWSER" in [e.text for e in d.find_elements(By.CSS_SELECTOR, "#log .out")])
        body = driver.find_element(By.TAG_NAME, "body")
        wait.until(lambda d: body.get_attribute("data-close-code"))
        assert (body.get_attribute("data-close-code"), body.get_attribute("data-close-reason")) == ("1011", "exit=3")
    finally:
        driver.quit()
    page = server.wait_log(r"event=session_end service=upper .*reason=console")
    session = server.wait_log(r"event=session_end service=upper .*relay=websocket")
    assert "exit=3" in session and "reason=child_exit" in session, (page, session)
