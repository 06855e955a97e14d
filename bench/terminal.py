"""The terminal page's flow control (issue 27): `cat` of a 64 MiB text file into the page (bash
on a pty behind gsrv's WebSocket, xterm.js in headless Chromium through selenium), with the
page's acknowledgements on and off (`?acks=0`), in interleaved rounds: MB/s from the command to
its marker on the screen, the page's JS heap at its highest (CDP Runtime.getHeapUsage, sampled),
the most output the page held unparsed (window.gsrvPendingMost), gsrv's RSS growth.

Usage: python bench/terminal.py [--rounds 3] [--mib 64] [--window 256KiB] [--out bench/results/terminal.md]
Everything stays on 127.0.0.1; the script ends only the gsrv and the browser it started.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

SCREEN_TAIL = """
const buffer = window.gsrvTerm.buffer.active, lines = [], cursor = buffer.baseY + buffer.cursorY;
for (let i = Math.max(0, cursor - 4); i <= cursor; i++) lines.push(buffer.getLine(i).translateToString(true));
return lines.join("\\n");
"""


def start_gsrv(tmp: str, window: str) -> tuple[subprocess.Popen[bytes], str]:
    config = os.path.join(tmp, "term.toml")
    with open(config, "w") as f:
        f.write('[services.shell]\nlisten = "127.0.0.1:0"\ncommand = ["bash", "--norc", "--noprofile", "-i"]\n'
                'pty = true\ntransport = "websocket"\nkill_scope = "group"\nenv = { PS1 = "gsrv$ " }\n'
                f'websocket = {{ console = true, reattach_buffer = "{window}" }}\n')  # fmt: skip
    log = open(os.path.join(tmp, "gsrv.log"), "w+")  # noqa: SIM115 (the process writes it)
    proc = subprocess.Popen([sys.executable, "-m", "gsrv", "serve", "-c", config], stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log.seek(0)
        found = re.search(r"event=listening service=shell address=(\S+)", log.read())
        if found:
            return proc, "http://" + found.group(1) + "/"
        time.sleep(0.05)
    raise SystemExit("gsrv did not start")


def browser(tmp: str):  # type: ignore[no-untyped-def]
    os.environ["SE_AVOID_STATS"] = "true"
    here = os.path.dirname(os.path.abspath(__file__))  # bench/websocket.py would shadow selenium's websocket
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp}/profile"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "chromedriver"))
    driver.set_script_timeout(60)
    return driver


def one(driver, address: str, path: str, acks: bool, gsrv_pid: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(address + ("" if acks else "?acks=0"))
    deadline = time.monotonic() + 30
    while "gsrv$ " not in driver.execute_script(SCREEN_TAIL):
        if time.monotonic() > deadline:
            raise RuntimeError("no prompt")
        time.sleep(0.05)
    gsrv = psutil.Process(gsrv_pid)
    rss0 = rss = gsrv.memory_info().rss
    heap = 0.0
    size = os.path.getsize(path)
    keys = driver.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea")
    started = time.monotonic()
    keys.send_keys(f"cat {path}; echo cat-done-$((6*7))\n")
    while not re.search(r"^cat-done-42$", driver.execute_script(SCREEN_TAIL), re.M):
        if time.monotonic() - started > 600:
            raise RuntimeError("the cat did not finish in 600 s")
        heap = max(heap, float(driver.execute_cdp_cmd("Runtime.getHeapUsage", {})["usedSize"]))
        rss = max(rss, gsrv.memory_info().rss)
        time.sleep(0.1)
    seconds = time.monotonic() - started
    pending = float(driver.execute_script("return window.gsrvPendingMost"))
    keys.send_keys("exit\n")
    return {"MB/s": size / seconds / 1e6, "heap_MiB": heap / 2**20, "pending_KiB": pending / 1024,
            "gsrv_rss_MiB": (rss - rss0) / 2**20}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--window", default="256KiB", help="the service's reattach_buffer (default: its default)")
    parser.add_argument("--out")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"acks on": [], "acks off": []}
    with tempfile.TemporaryDirectory(prefix="gsrv-term-bench-") as tmp:
        path = os.path.join(tmp, "text")
        line = (b"".join(bytes([33 + (n % 94)]) for n in range(79)) + b"\n") * 1024
        with open(path, "wb") as f:
            for _ in range(args.mib * 1024 * 1024 // len(line)):
                f.write(line)
        proc, address = start_gsrv(tmp, args.window)
        driver = None
        try:
            driver = browser(tmp)
            for _ in range(args.rounds):
                for name in results:
                    results[name].append(one(driver, address, path, name == "acks on", proc.pid))
                    print(name, results[name][-1], file=sys.stderr)
        finally:
            if driver is not None:
                driver.quit()
            proc.terminate()
            proc.wait(20)
    rows = ["| measure | acks on | acks off | on / off |", "|---|---:|---:|---:|"]
    for key in results["acks on"][0]:
        on = statistics.median(r[key] for r in results["acks on"])
        off = statistics.median(r[key] for r in results["acks off"])
        rows.append(
            f"| {key} | {on:.1f} | {off:.1f} | {on / off:.2f} |" if off else f"| {key} | {on:.1f} | {off:.1f} | |"
        )
    table = "\n".join(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            title = (f"# bench/terminal.py, {time.strftime('%Y-%m-%d')}: cat of {args.mib} MiB into the terminal page, "
                     f"reattach_buffer {args.window}, {args.rounds} interleaved rounds, medians")  # fmt: skip
            f.write(f"{title}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
