"""The dashboard in a real browser: Debian's headless Chromium driven through its
chromedriver by Selenium, against a real server and two real agents.

The page signs in with the operator's token, shows tasks created through the API with
their outputs, pauses one after its confirmation dialog, shows a command printing
``<script>`` as text (no alert, no element injected), and breaks none of its own
Content-Security-Policy. Screenshots go to the test's folder (under pytest's basetemp);
docs/dashboard.png in the README is one of them.

Chromium and chromedriver must be installed (``scripts/test`` installs them as root with
``apt-get install chromium chromium-driver``): without them these tests fail, saying so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.daemons import Fleet, http, running_fleet

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("TASKSCHEDULER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TASKSCHEDULER_CHROMEDRIVER", "/usr/bin/chromedriver")
#: What Chromium needs on these machines: no sandbox (root, containers), no GPU, and no
#: network of its own (the machine's network is closed).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1100",
)
#: The page polls every 5 s: a change shows within two polls.
SHOWS_WITHIN = 40.0

HOSTILE = "<script>alert(1)</script>"
HOSTILE_IMG = "<img src=x onerror=alert(2)>"
HOSTILE_COMMAND = f"printf '%s\\n' '{HOSTILE}' '{HOSTILE_IMG}'"
FLAKY = (
    'if [ $(( $(date +%s) / 2 % 4 )) -eq 0 ]; then echo "disk 91% full" >&2; exit 1; fi; '
    "echo disk ok"
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(
            f"the dashboard's browser tests need Debian's chromium and chromium-driver "
            f"({', '.join(missing)} not found): run scripts/test as root, which installs "
            "them, or: apt-get install -y chromium chromium-driver",
            pytrace=False,
        )
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: webdriver.Chrome, what: str, check: Callable[[Any], Any]) -> Any:
    """Wait for ``check(driver)`` to be truthy (the page re-renders as it polls)."""
    wait = WebDriverWait(
        driver,
        SHOWS_WITHIN,
        poll_frequency=0.2,
        ignored_exceptions=(StaleElementReferenceException,),
    )
    return wait.until(check, f"the page to show {what}")


def click(driver: webdriver.Chrome, selector: str) -> None:
    """Click what ``selector`` finds, again if the page re-rendered it meanwhile."""
    until(driver, selector, lambda d: d.find_element(By.CSS_SELECTOR, selector).click() or True)


def css(driver: webdriver.Chrome, selector: str) -> list[Any]:
    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def create(fleet: Fleet, body: dict[str, Any]) -> str:
    code, answer = fleet.api("POST", "/api/v1/tasks/create", body)
    assert code == 201, answer
    return str(answer["command_id"])


def no_alert(driver: webdriver.Chrome) -> None:
    try:
        text = driver.switch_to.alert.text
    except NoAlertPresentException:
        return
    raise AssertionError(f"an alert opened: {text!r}")


def policy_violations(driver: webdriver.Chrome) -> list[str]:
    """What the console says of a CSP violation (our own inline style or script would be
    one) or an uncaught error in the page's code. (A 401 before signing in is logged
    too, as a failed load: that one is expected.)"""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"] or "Uncaught" in entry["message"]
    ]


def test_the_dashboard_shows_tasks_and_outputs_pauses_and_escapes(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with running_fleet(tmp_path / "fleet") as fleet:
        browser.get(fleet.server_url + "/")
        # The server holds operator tokens: the page asks for one, and keeps it for the tab.
        until(browser, "the sign-in form", lambda d: d.find_element(By.ID, "token").is_displayed())
        browser.find_element(By.ID, "token").send_keys(fleet.operator_token)
        browser.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
        until(browser, "the tasks page", lambda d: css(d, "#tasks-page table"))
        assert (
            browser.execute_script("return sessionStorage.getItem('taskscheduler.operator-token')")
            == fleet.operator_token
        )
        assert browser.get_cookies() == []

        hello = create(fleet, {"command": "echo hello world", "frequency": "every 2 seconds"})
        hostile = create(fleet, {"command": HOSTILE_COMMAND, "frequency": "every 2 seconds"})
        flaky = create(fleet, {"command": FLAKY, "frequency": "every 2 seconds"})
        create(
            fleet,
            {
                "command": "/usr/local/bin/backup --all",
                "cron": "30 2 * * *",
                "timezone": "Europe/Paris",
            },
        )

        # The list shows them (no reload), each agent's last status as a coloured cell.
        row = f'tr[data-task="{hello}"]'
        until(
            browser, "both agents' results", lambda d: len(css(d, f"{row} .cell.s-succeeded")) == 2
        )
        assert css(browser, f"{row} td.command")[0].text == "echo hello world"
        assert "every 2 seconds" in css(browser, row)[0].text
        assert any(
            "every day at 02:30 (Europe/Paris" in r.text
            for r in css(browser, "#tasks-page tbody tr")
        )
        # The command with markup is shown as its text.
        hostile_row = css(browser, f'tr[data-task="{hostile}"] td.command')[0]
        assert hostile_row.text == HOSTILE_COMMAND
        browser.save_screenshot(str(shots / "tasks.png"))

        # Search by command.
        browser.find_element(By.ID, "command-search").send_keys("hello")
        until(browser, "only the matching task", lambda d: len(css(d, "#tasks-page tbody tr")) == 1)
        assert css(browser, row)

        # The task's page: both agents' identical outputs grouped in one box.
        click(browser, f"{row} td.command a")
        until(browser, "the grouped outputs", lambda d: "2 agents:" in _groups_text(d))
        assert "hello world" in css(browser, ".output-group pre")[0].text
        until(browser, "the charts", lambda d: len(css(d, "svg.plot polyline")) >= 2)
        assert css(browser, "svg.cells rect.cell.s-succeeded")
        browser.save_screenshot(str(shots / "task.png"))

        # Pause from the page: a confirmation first; cancelling changes nothing.
        click(browser, 'button[data-action="pause"]')
        until(browser, "the dialog", lambda d: d.find_element(By.ID, "confirm").is_displayed())
        assert "Pause" in browser.find_element(By.ID, "confirm-text").text
        browser.find_element(By.CSS_SELECTOR, '#confirm button[value="cancel"]').click()
        assert fleet.api("GET", f"/api/v1/tasks/{hello}")[1]["state"] == "active"
        click(browser, 'button[data-action="pause"]')
        until(browser, "the dialog", lambda d: d.find_element(By.ID, "confirm").is_displayed())
        browser.find_element(By.ID, "confirm-ok").click()
        until(
            browser,
            "the paused state",
            lambda d: d.find_element(By.ID, "task-state").text == "paused",
        )
        assert fleet.api("GET", f"/api/v1/tasks/{hello}")[1]["state"] == "paused"
        assert css(browser, 'button[data-action="resume"]')

        # Output with markup is text: no alert, no element made from it.
        browser.get(f"{fleet.server_url}/#/tasks/{hostile}")
        until(browser, "the hostile output", lambda d: HOSTILE in _outputs_text(d))
        assert HOSTILE_IMG in _outputs_text(browser)
        assert browser.find_element(By.ID, "task-command").text == HOSTILE_COMMAND
        no_alert(browser)
        assert css(browser, "main script, main img, main iframe") == []
        assert browser.execute_script("return document.scripts.length") == 1

        # The agents: online, with their counts and start lateness once runs came in.
        browser.get(f"{fleet.server_url}/#/agents")
        until(browser, "two online agents", lambda d: len(css(d, "#agents-page .s-online")) == 2)
        until(
            browser, "start lateness", lambda d: "p99" in d.find_element(By.ID, "agents-page").text
        )
        browser.save_screenshot(str(shots / "agents.png"))

        # The audit log has the pause, by the operator's token's name.
        browser.get(f"{fleet.server_url}/#/audit")
        until(
            browser,
            "the pause in the audit log",
            lambda d: "task.paused" in d.find_element(By.ID, "audit-page").text,
        )
        assert "operator:tests" in browser.find_element(By.ID, "audit-page").text

        # The picture for the README: a task that fails now and then.
        browser.get(f"{fleet.server_url}/#/tasks/{flaky}")
        until(browser, "eight executions per agent", lambda d: len(css(d, "svg.cells rect")) >= 16)
        browser.save_screenshot(str(shots / "dashboard.png"))
        no_alert(browser)
        assert policy_violations(browser) == []


def _groups_text(driver: webdriver.Chrome) -> str:
    return "\n".join(str(group.text) for group in css(driver, ".output-group"))


def _outputs_text(driver: webdriver.Chrome) -> str:
    try:
        return "\n".join(str(p.text) for p in css(driver, ".output-group pre"))
    except WebDriverException:
        return ""


def test_a_wrong_token_is_refused_and_the_page_asks_again(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    with running_fleet(tmp_path / "fleet", agents=1) as fleet:
        browser.get(fleet.server_url + "/#/agents")
        until(browser, "the sign-in form", lambda d: d.find_element(By.ID, "token").is_displayed())
        browser.find_element(By.ID, "token").send_keys("tso_not-a-token")
        browser.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
        until(
            browser,
            "the refusal",
            lambda d: d.find_element(By.ID, "sign-in-error").text == "That token was refused.",
        )
        assert css(browser, "#agents-page") == []
        browser.find_element(By.ID, "token").send_keys(fleet.operator_token)
        browser.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
        until(
            browser, "the agents", lambda d: len(css(d, "#agents-page tbody tr[data-agent]")) == 1
        )
        assert policy_violations(browser) == []


def test_on_a_loopback_server_without_tokens_the_page_needs_none(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    prepared = Fleet(tmp_path / "fleet", agents=1)
    del prepared.server.env["TASKSCHEDULER_TOKENS"]  # the playground's way
    with running_fleet(tmp_path / "fleet", prepared=prepared) as fleet:
        code, answer = http(
            "POST",
            fleet.server_url + "/api/v1/tasks/create",
            {"command": "echo from the playground", "frequency": "every 1 hours"},
        )
        assert code == 201, answer
        task_id = answer["command_id"]
        browser.get(fleet.server_url + "/")
        row = f'tr[data-task="{task_id}"]'
        until(browser, "the task, without signing in", lambda d: css(d, row))
        assert not browser.find_element(By.ID, "sign-in").is_displayed()
        assert not browser.find_element(By.ID, "sign-out").is_displayed()
        assert "never ran" in css(browser, row)[0].text
        # Run now, from the task's page, after its confirmation.
        click(browser, f"{row} td.command a")
        click(browser, 'button[data-action="run-now"]')
        until(browser, "the dialog", lambda d: d.find_element(By.ID, "confirm").is_displayed())
        browser.find_element(By.ID, "confirm-ok").click()
        until(
            browser,
            "the run's output",
            lambda d: "from the playground" in _outputs_text(d) and "run now" in _groups_page(d),
        )
        assert policy_violations(browser) == []


def _groups_page(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.ID, "task-page").text)
