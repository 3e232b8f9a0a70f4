"""Headless Chromium for the tests of self-contained pages (the interp dashboard, the graph page):
every host but localhost resolves to nothing, so a page that needs the network shows it."""
import shutil
import subprocess

import matplotlib.image as plt_image
import numpy as np
import pytest

OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def headless(page, *args: str) -> str:
    """Run headless Chromium, offline, on the page (skips when no Chromium is installed); its stdout."""
    browser = chromium()
    if browser is None:
        pytest.skip("chromium not installed (apt-get install -y chromium; setup_env.sh does as root)")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", OFFLINE, *args, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120, check=True).stdout


def dump_dom(page) -> str:
    """The page as headless Chromium renders it."""
    return headless(page, "--dump-dom")


def screenshot(page, png) -> np.ndarray:
    """[H, W, C] pixels of the page as headless Chromium draws it."""
    headless(page, f"--screenshot={png}", "--window-size=1200,900", "--hide-scrollbars")
    return plt_image.imread(png)

