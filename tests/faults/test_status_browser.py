"""The status page in a real headless browser: Debian's chromium, driven by selenium through
Debian's chromedriver (.ci/run installs both; nothing is downloaded). A real ``fedpipe server``
with real client processes: the page loads, names the connected clients, its curves grow, and
it says so when the server goes away. Without the token, 401.

A developer's run skips when chromium, chromedriver or selenium is missing; CI fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.monitored_federation import (
    CLIENTS,
    STATUS_TOKEN,
    assert_stopped,
    start_monitored_federation,
)

#: Seconds the page has to show what the server knows (it polls every second).
PAGE_WAIT = 30


def required(what: str, found: Any) -> Any:
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing: CI must run the browser test (see .ci/run)")
        pytest.skip(f"{what} is missing (apt-get install chromium chromium-driver; pip selenium)")
    return found


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = required("chromium", shutil.which("chromium") or shutil.which("chromium-browser"))
    driver_path = required("chromedriver", shutil.which("chromedriver"))
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        required("selenium (the dev extra)", None)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1700")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(PAGE_WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, PAGE_WAIT, poll_frequency=0.2).until(condition, what)


def points(driver: Any, metric: str) -> int:
    """Points of the metric's curve: the commands of its SVG path."""
    from selenium.common.exceptions import NoSuchElementException
    from selenium.webdriver.common.by import By

    try:
        path = driver.find_element(By.ID, f"curve-{metric}").get_attribute("d") or ""
    except NoSuchElementException:
        return 0
    return len(re.findall(r"[ML]", path))


def client_names(driver: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#clients tbody td.name")]


def text_of(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def test_the_page_shows_the_clients_and_curves_that_grow_in_a_real_browser(
    tmp_path: Path,
    client_data: list[Path],
    procs: list[subprocess.Popen[str]],
    browser: Any,
) -> None:
    fed = start_monitored_federation(tmp_path, client_data, procs)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(fed.url, timeout=10)
    assert refused.value.code == 401

    browser.get(fed.url)  # no token, no cookie: the browser is refused too
    assert "401 Unauthorized" in browser.find_element("tag name", "body").text
    browser.get_log("browser")  # read, so that the log below holds what the page did

    browser.get(f"{fed.url}?token={STATUS_TOKEN}")
    assert browser.current_url == fed.url  # the token traded for a cookie, gone from the address
    wait_until(browser, lambda d: client_names(d) == sorted(CLIENTS), "the three clients listed")
    wait_until(browser, lambda d: points(d, "accuracy") >= 2, "an accuracy curve")
    first = {m: points(browser, m) for m in ("accuracy", "loss", "train_loss")}
    wait_until(browser, lambda d: points(d, "accuracy") > first["accuracy"] + 2, "a longer curve")
    second = {m: points(browser, m) for m in ("accuracy", "loss", "train_loss")}
    assert all(second[m] > first[m] >= 2 for m in first), (first, second)

    recorded = fed.records()[-1]["round"]
    shown_round = int(text_of(browser, "round").split(" / ")[0])
    assert shown_round >= second["accuracy"] and text_of(browser, "round").endswith("/ 100000")
    assert recorded >= second["accuracy"]
    phases = ("training", "evaluating", "round done", "setting up clients")
    assert text_of(browser, "phase") in phases
    assert text_of(browser, "clients-count") == str(len(CLIENTS))
    assert browser.title.startswith("fedpipe · fedpipe-run · round ")
    # Nothing was blocked (the page loads nothing from elsewhere) and no script failed.
    problems = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems

    screenshot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(screenshot))
    print(f"status page screenshot: {screenshot}")

    assert_stopped(fed, fed.stop())
    wait_until(browser, lambda d: text_of(d, "phase") == "server unreachable", "the loss shown")
    assert "the run may have ended" in text_of(browser, "footer")
    browser.delete_all_cookies()
