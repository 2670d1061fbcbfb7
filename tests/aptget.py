"""Debian packages a test needs (chromium, exiftool): found where installed, else installed with apt-get."""

import os
import shutil
import subprocess
from collections.abc import Callable

import pytest


def apt_install(package: str, find: Callable[[], str | None]) -> str:
    """`find()`'s answer, after installing `package` with apt-get (as root, or through sudo without a password)
    when it finds nothing; the test fails with apt-get's own words when that does not help."""
    found = find()
    if found:
        return found
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        pytest.fail(f"{package} is missing and cannot be installed (not root, no sudo): apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        r = subprocess.run(prefix + cmd, capture_output=True, text=True, env=env, timeout=900)
        log.append(f"$ {' '.join(cmd)} -> {r.returncode}\n{r.stderr[-2000:]}")
    found = find()
    if not found:
        pytest.fail(f"{package} is missing and apt-get could not install it:\n" + "\n".join(log))
    return found
