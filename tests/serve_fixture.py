"""A live ``cliplens serve`` for browser tests: started on a free loopback port, ready when /healthz answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(index_dirs, env, log_path: Path):
    """Yield the URL of a ``cliplens serve`` of ``index_dirs`` (its output in ``log_path``); stop it after."""
    port = free_port()
    cmd = [sys.executable, "-m", "cliplens", "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    for d in index_dirs:
        cmd += ["--index-dir", str(d)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + float(os.environ.get("CLIPLENS_TEST_SERVER_WAIT", "90"))
            while True:
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"cliplens serve did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def guard_page(page, server: str, foreign: list, errors: list) -> None:
    """Loopback only: a request to any other host is blocked and recorded in ``foreign``; console errors and page
    errors are recorded in ``errors`` (the tests assert both stay empty)."""
    page.set_default_timeout(20_000)

    def only_loopback(route):
        if route.request.url.startswith(server) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    page.route("**/*", only_loopback)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
