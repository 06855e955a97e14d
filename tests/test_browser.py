"""A real browser (Debian's chromium, driven through chromedriver by selenium) on the console
page: it sends a line, reads it back upper-cased, and sees the close code the child's exit
gave. The browser is started so that it opens no connection off this machine."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import py_child, service_toml, wait_until

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    (CHROMIUM is None or DRIVER is None) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them; under CI=true this fails instead)",
)

UPPER_ONCE = "import sys; print(sys.stdin.readline().upper(), end='', flush=True); sys.exit(3)"


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """Headless chromium through chromedriver, opening no connection off this machine."""
    os.environ["SE_AVOID_STATS"] = "true"  # selenium: no usage statistics sent anywhere
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console: CSP reports
    driver = webdriver.Chrome(options=options, service=Service(DRIVER or "/usr/bin/chromedriver"))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(90)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.timeout(120)
def test_chromium_on_the_console_page_sends_a_line_and_sees_the_close_code(gsrv, chromium) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    service = service_toml("upper", py_child(UPPER_ONCE), transport="websocket")
    server = gsrv(service + "[services.upper.websocket]\nconsole = true\n")
    host, port = server.address("upper")
    driver = chromium
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
    page = server.wait_log(r"event=session_end service=upper .*reason=console")
    session = server.wait_log(r"event=session_end service=upper .*relay=websocket")
    assert "exit=3" in session and "reason=child_exit" in session, (page, session)


# One CGI script, three paths: GET / a page (a form, and a button that fetch()es a Blob);
# POST /sum the body's sha256; POST /form the form's fields back.
SITE = """
import hashlib, os, sys, urllib.parse
out, path = sys.stdout.buffer, os.environ["PATH_INFO"]
if path == "/sum":
    digest = hashlib.sha256()
    while chunk := sys.stdin.buffer.read(1 << 16):
        digest.update(chunk)
    out.write(b"Content-Type: text/plain\\n\\n" + digest.hexdigest().encode())
elif path == "/form":
    fields = urllib.parse.parse_qs(sys.stdin.buffer.read().decode())
    out.write(b"Content-Type: text/html\\n\\n<p id=got>" + fields["name"][0].upper().encode() + b"</p>")
else:
    out.write(b"Content-Type: text/html\\n\\n<form method=post action=/form><input id=name name=name>"
              b"<button id=send>send</button></form>")
"""
UPLOAD = """
const done = arguments[arguments.length - 1];
const bytes = new Uint8Array(64 * 1024 * 1024);
for (let i = 0; i < bytes.length; i += 4096) bytes[i] = (i / 4096) & 255;
fetch("/sum", {method: "POST", body: new Blob([bytes])})
  .then(r => r.text().then(t => done(r.status + " " + t)), e => done("error " + e));
"""


@pytest.mark.timeout(180)
def test_chromium_fetch_uploads_a_64_mib_blob_and_a_form_post_reaches_a_cgi_script(gsrv, chromium) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = gsrv(service_toml("site", py_child(SITE), transport="http"))
    host, port = server.address("site")
    chromium.get(f"http://{host}:{port}/")
    expected = bytearray(64 * 1024 * 1024)
    expected[::4096] = bytes(n & 255 for n in range(len(expected) // 4096))
    assert chromium.execute_async_script(UPLOAD) == "200 " + hashlib.sha256(expected).hexdigest()
    chromium.find_element(By.ID, "name").send_keys("from a form")
    chromium.find_element(By.ID, "send").click()
    WebDriverWait(chromium, 30).until(lambda d: d.find_elements(By.ID, "got"))
    assert chromium.find_element(By.ID, "got").text == "FROM A FORM"
    server.wait_log(r"method=POST path=/form status=200")  # the last request's line: the reader may lag the page
    sums = [line for line in server.lines if "path=/sum" in line]
    assert len(sums) == 1 and f"bytes_in={64 * 1024 * 1024} " in sums[0] and "status=200" in sums[0], sums
    assert server.count_log(r"method=POST path=/form status=200") == 1


BASH = ["bash", "--norc", "--noprofile", "-i"]


def shell_page(gsrv: Any, websocket: str = "") -> tuple[Any, str]:
    """gsrv serving bash on a pty behind the terminal page; the page's address."""
    bash = service_toml("shell", BASH, transport="websocket", pty=True, env={"PS1": "gsrv$ "})
    server = gsrv(bash + "[services.shell.websocket]\nconsole = true\n" + websocket)
    host, port = server.address("shell")
    return server, f"http://{host}:{port}/"


SCREEN = """
const buffer = window.gsrvTerm.buffer.active, lines = [];
for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
return lines.join("\\n");
"""


@pytest.mark.timeout(120)
def test_chromium_terminal_shows_bash_answers_tput_cols_after_a_resize_and_draws_top(gsrv, chromium) -> None:
    import re
    import subprocess

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, address = shell_page(gsrv)
    page = subprocess.run(["curl", "-sS", "-i", address], capture_output=True, timeout=20).stdout
    assert (
        b"\r\nContent-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'\r\n"
        in page
    )
    chromium.set_window_size(800, 600)
    chromium.get(address)
    wait = WebDriverWait(chromium, 30)
    wait.until(lambda d: "gsrv$ " in d.execute_script(SCREEN))
    keys = chromium.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
    before = chromium.execute_script("return window.gsrvTerm.cols")
    chromium.set_window_size(1100, 700)
    wait.until(lambda d: d.execute_script("return window.gsrvTerm.cols") != before)
    cols = chromium.execute_script("return window.gsrvTerm.cols")
    keys.send_keys("tput cols\n")
    wait.until(lambda d: re.search(rf"^{cols}$", d.execute_script(SCREEN), re.M))
    keys.send_keys("top -d 0.5\n")
    wait.until(lambda d: "load average" in d.execute_script(SCREEN) and "PID" in d.execute_script(SCREEN))
    keys.send_keys("q")
    keys.send_keys("exit\n")
    body = chromium.find_element(By.TAG_NAME, "body")
    wait.until(lambda d: body.get_attribute("data-close-code"))
    assert (body.get_attribute("data-close-code"), body.get_attribute("data-close-reason")) == ("1000", "exit=0")
    blocked = [e["message"] for e in chromium.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not blocked, "\n".join(blocked)
    assert "exit=0" in server.wait_log(r"event=session_end service=shell .*relay=websocket\+pty")


@pytest.mark.timeout(180)
def test_a_flood_into_a_throttled_terminal_page_stays_bounded_in_the_page_and_in_gsrv(gsrv, chromium) -> None:
    import re

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, address = shell_page(gsrv)
    chromium.get(address)
    wait = WebDriverWait(chromium, 120)
    wait.until(lambda d: "gsrv$ " in d.execute_script(SCREEN))
    chromium.execute_cdp_cmd("Emulation.setCPUThrottlingRate", {"rate": 6})
    before = server.rss()
    most = before
    chromium.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys("seq 1 400000; echo flood-done\n")

    def finished(d: object) -> bool:
        nonlocal most
        most = max(most, server.rss())
        return re.search(r"^flood-done$", chromium.execute_script(SCREEN), re.M) is not None

    wait.until(finished)
    pending = chromium.execute_script("return window.gsrvPendingMost")
    assert 0 < pending <= 256 * 1024 + 65536, pending  # the window (reattach_buffer) and one read
    assert most - before < 16 * 1024 * 1024
    assert re.search(r"^399999\n400000\nflood-done$", chromium.execute_script(SCREEN), re.M)


class Cutter:
    """A TCP proxy on 127.0.0.1 in front of `target` that can cut every connection through it
    at once, without a close frame (what a laptop's sleep or a Wi-Fi change does to a page;
    Chromium's offline emulation leaves open WebSockets up). New connections pass after a cut."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
            with self.lock:
                self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        with self.lock:
            cut, self.open = self.open, []
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.mark.timeout(150)
def test_a_cut_connection_reattaches_the_page_to_its_shell_with_no_byte_lost_or_doubled(gsrv, chromium) -> None:
    import re

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, _ = shell_page(gsrv, 'reattach = "5m"\n')
    cutter = Cutter(server.address("shell"))
    try:
        chromium.get(f"http://127.0.0.1:{cutter.address[1]}/")
        wait = WebDriverWait(chromium, 60)
        wait.until(lambda d: "gsrv$ " in d.execute_script(SCREEN))
        assert "#session=" in chromium.current_url  # the token: in the fragment, never sent to a server
        keys = chromium.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
        keys.send_keys("echo pid=$$\n")
        wait.until(lambda d: re.search(r"^pid=\d+$", d.execute_script(SCREEN), re.M))
        pid = re.findall(r"^pid=(\d+)$", chromium.execute_script(SCREEN), re.M)[0]
        keys.send_keys("for i in $(seq 1 3000); do echo n$i; sleep 0.001; done; sleep 3; echo back\n")
        wait.until(lambda d: re.search(r"^n500$", d.execute_script(SCREEN), re.M))
        cutter.cut()  # mid-stream: bytes in flight are lost to the page, not to gsrv
        server.wait_log(r"event=session_detached service=shell .*why=client_reset")
        wait.until(lambda d: d.execute_script("return window.gsrvConnects") == 2)
        wait.until(lambda d: re.search(r"^back$", d.execute_script(SCREEN), re.M))
        screen = chromium.execute_script(SCREEN)
        assert re.findall(r"^n(\d+)$", screen, re.M) == [str(i) for i in range(1, 3001)]
        keys.send_keys("echo pid=$$\n")
        wait.until(lambda d: len(re.findall(r"^pid=\d+$", d.execute_script(SCREEN), re.M)) == 2)
        assert re.findall(r"^pid=(\d+)$", chromium.execute_script(SCREEN), re.M) == [pid, pid]
        server.wait_log(r"event=session_reattached service=shell")
        assert server.count_log(r"event=session_reattached service=shell") == 1
        assert server.count_log(r"event=session_end .*relay=") == 0  # one session (and the page's files)
    finally:
        cutter.close()


@pytest.mark.timeout(120)
def test_the_status_page_shows_services_plots_a_new_session_and_ends_it_at_390_px(gsrv, chromium) -> None:
    import json
    import socket as stdsocket
    import urllib.request

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = gsrv('[admin]\nlisten = "127.0.0.1:0"\n' + service_toml("hold", ["sleep", "600"])
                  + service_toml("echo", ["cat"]))  # fmt: skip
    base = "http://" + server.wait_log(r"event=admin_listening address=\S+").split("address=")[1].split()[0]
    chromium.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                             {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})  # fmt: skip
    chromium.get(base + "/")
    wait = WebDriverWait(chromium, 30)
    wait.until(lambda d: d.execute_script("return window.gsrvDraws") >= 1)
    names = [
        row.find_elements(By.TAG_NAME, "td")[0].text
        for row in chromium.find_elements(By.CSS_SELECTOR, "#services tbody tr")
    ]
    assert names == ["hold", "echo"], names
    for _ in range(3):  # traffic for the plots
        with stdsocket.create_connection(server.address("echo"), timeout=10) as sock:
            sock.sendall(b"x" * 100000)
            sock.shutdown(stdsocket.SHUT_WR)
            while sock.recv(65536):
                pass
    points = "const p = document.querySelector('#plot-bytes polyline'); return p ? p.getAttribute('points') : ''"
    wait.until(lambda d: len(d.execute_script(points).split()) >= 2)  # the plot draws (points of rates)
    held = stdsocket.create_connection(server.address("hold"), timeout=10)

    def listed() -> bool:
        with urllib.request.urlopen(base + "/sessions", timeout=10) as reply:
            return bool(json.loads(reply.read())["count"] == 1)

    wait_until(listed, 30, "the hold session listed by the admin listener")
    drawn = chromium.execute_script("return window.gsrvDraws")
    wait.until(lambda d: d.execute_script("return window.gsrvDraws") >= drawn + 2)  # the page's next polls
    assert chromium.find_elements(By.CSS_SELECTOR, "#sessions tbody tr")  # show it, with no reload
    width = chromium.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert width[0] <= width[1], width  # nothing scrolls sideways at 390 px
    chromium.find_element(By.CSS_SELECTOR, "#sessions button.end").click()
    line = server.wait_log(r"event=session_end service=hold")
    assert "reason=ended_by_admin" in line, line
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#sessions tbody tr"))
    blocked = [e["message"] for e in chromium.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not blocked, "\n".join(blocked)
    held.close()


@pytest.mark.timeout(180)
def test_an_upgrade_keeps_the_terminal_pages_shell_and_its_watcher_and_the_page_does_not_reload(gsrv, chromium) -> None:  # type: ignore[no-untyped-def]
    """`gsrv upgrade` with a bash in the terminal page and a watcher's page open: both pages
    reconnect on their own (the exec closed their connections without a close frame), the shell
    is the same process (`echo $$`), the watcher streams on, and neither page reloaded."""
    import re

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_gsrv_upgrade import upgrade

    bash = service_toml("shell", BASH, transport="websocket", pty=True, env={"PS1": "gsrv$ "})
    server = gsrv('[admin]\nlisten = "127.0.0.1:0"\n' + bash
                  + '[services.shell.websocket]\nconsole = true\nreattach = "5m"\nshare = "read-only"\n')  # fmt: skip
    host, port = server.address("shell")
    chromium.get(f"http://{host}:{port}/")
    wait = WebDriverWait(chromium, 60)
    wait.until(lambda d: "gsrv$ " in d.execute_script(SCREEN))
    keys = chromium.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
    keys.send_keys("echo pid=$$\n")
    wait.until(lambda d: re.search(r"^pid=\d+$", d.execute_script(SCREEN), re.M))
    pid = re.findall(r"^pid=(\d+)$", chromium.execute_script(SCREEN), re.M)[0]
    link = wait.until(lambda d: d.execute_script("const a = document.querySelector('#status a'); return a && a.href"))
    page = chromium.current_window_handle
    chromium.execute_script("window.gsrvMark = 'not reloaded'")
    chromium.switch_to.new_window("window")
    chromium.get(link)
    watcher = chromium.current_window_handle
    wait.until(lambda d: "watching" in d.find_element(By.ID, "status").text)
    chromium.execute_script("window.gsrvMark = 'not reloaded'")
    done = upgrade(server)
    assert done.returncode == 0 and "1 session(s) moved" in done.stdout, (done.stdout, done.stderr)
    chromium.switch_to.window(page)
    wait.until(lambda d: d.execute_script("return window.gsrvConnects") == 2)  # it reconnected by itself
    keys.send_keys("echo pid=$$ after\n")
    wait.until(lambda d: re.search(r"^pid=\d+ after$", d.execute_script(SCREEN), re.M))
    assert re.findall(r"^pid=(\d+) after$", chromium.execute_script(SCREEN), re.M) == [pid]
    assert chromium.execute_script("return window.gsrvMark") == "not reloaded"
    chromium.switch_to.window(watcher)
    wait.until(lambda d: d.execute_script("return window.gsrvConnects") == 2)  # it reconnected by itself too
    wait.until(lambda d: re.search(rf"^pid={pid} after$", d.execute_script(SCREEN), re.M))  # it streams on
    assert chromium.execute_script("return window.gsrvMark") == "not reloaded"
    server.wait_log(r"event=session_reattached service=shell")
    assert server.count_log(r"event=session_end .*relay=websocket") == 0  # one session, never ended
