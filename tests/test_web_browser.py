"""The web page in a real browser: Debian's chromium, headless, driven by selenium (nothing
downloaded at run time; tools/install-browser installs it). One node, one `exposure web`
(with a users file) and one browser for the module; the tests run in order: the risk
user's page, an event, a breach, sorting and the drill-down, a PM's session, then the node
stopped. ``EXPOSURE_WEB_SCREENSHOT=FILE`` saves the risk user's page (docs/web.png)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from websupport import PASSWORDS, PM1, fed_node, flow, send, users_file

from exposure.harness.localnode import free_port, listening, terminate
from exposure.harness.wait import wait_for

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium: pip install -e "
                                "'.[test]'")
pytest.importorskip("uvicorn", reason="the web extra: pip install -e '.[web]'")
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.process, pytest.mark.timeout(120),
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver "
                       "(tools/install-browser installs Debian's chromium and chromium-driver)"),
]
NEW_ACCOUNT = 4001  # an account the generated flows never touch (they stay below 4001)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    with fed_node(tmp_path_factory.mktemp("webbrowser")) as n:
        yield n


@pytest.fixture(scope="module")
def web(node, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("weblog") / "web.log"
    users = users_file(log.parent)
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "exposure", "web", "--config",
                              str(node.config), "--port", str(port), "--users", str(users)],
                             stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: listening("127.0.0.1", port) or p.poll() is not None, 60,
                 "exposure web to listen")
        assert p.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}/"
    finally:
        terminate(p)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    # chromium leaves its singleton socket's directory (org.chromium.Chromium.*) in its
    # temporary directory after quit(): that is the module's own, removed with the rest.
    tmp = tmp_path_factory.mktemp("browser-tmp")
    o = Options()
    o.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1900,1300"):
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"performance": "ALL",  # the WebSocket frames
                                            "browser": "ALL"})     # the console (CSP)
    d = webdriver.Chrome(service=Service(DRIVER, env={**os.environ, "TMPDIR": str(tmp)}),
                         options=o)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(tmp, ignore_errors=True)


def login(d, url: str, user: str) -> None:
    d.delete_all_cookies()
    d.get(url)
    wait_for(lambda: d.find_element("id", "login").is_displayed(), 10, "the login form")
    d.find_element("id", "login-name").send_keys(user)
    d.find_element("id", "login-password").send_keys(PASSWORDS[user])
    d.find_element("css selector", "#login button").click()
    wait_for(lambda: d.execute_script("return document.querySelector('#user').textContent")
             == f"user {user}", 10, f"{user}'s page")


def page(d) -> dict:
    """Every value the page shows, read in one script: the fund's data-field/data-value,
    each account row's and instrument row's, the node line."""
    return d.execute_script("""
      const vals = (el) => Object.fromEntries([...el.querySelectorAll('[data-field]')]
          .filter((c) => c.dataset.value !== undefined)
          .map((c) => [c.dataset.field, c.dataset.value]));
      const rows = (sel, id) => Object.fromEntries([...document.querySelectorAll(sel)]
          .map((r) => [r.dataset[id], vals(r)]));
      return {
        fund: vals(document.querySelector('[data-table="fund"]')),
        accounts: rows('[data-table="accounts"] tr[data-account]', 'account'),
        order: [...document.querySelectorAll('[data-table="accounts"] tr[data-account]')]
               .map((r) => Number(r.dataset.account)),
        instruments: rows('[data-table="instruments"] tr[data-instrument]', 'instrument'),
        positions: rows('[data-table="positions"] tr[data-instrument]', 'instrument'),
        drill: document.querySelector('[data-table="positions"]').dataset.account || null,
        total: Number(document.querySelector('#page-info').dataset.total),
        stale: document.querySelector('#status').dataset.stale,
        role: document.querySelector('#role').textContent,
      };""")


def show_all(d) -> None:
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("id", "page-size")).select_by_value("0")


def test_the_page_shows_what_dump_prints(node, web, browser):
    login(browser, web, "risk")
    show_all(browser)
    want = node.dump()
    fund = {k: v for k, v in want["fund"].items()}

    def agrees() -> bool:
        p = page(browser)
        return (p["total"] == len(want["accounts"])
                and float(p["fund"].get("gross", "nan")) == fund["gross"])

    wait_for(agrees, 10, "the page to show dump's book")
    p = page(browser)
    for k, v in p["fund"].items():
        assert float(v) == fund[k], k
    assert len(p["fund"]) == 10
    for a in want["accounts"]:
        got = p["accounts"][str(a["account"])]
        for k in ("gross", "net", "long_mv", "short_mv", "worst_gross", "margin", "beta_net",
                  "pnl", "live_orders", "breach", "open_buy_mv", "open_sell_mv"):
            assert float(got[k]) == a[k], (a["account"], k)
    ins = {i["instrument"]: i for i in want["instruments"]}
    assert p["instruments"]  # the first page, by crossing
    for i, got in p["instruments"].items():
        for k in ("ref_price", "fund_pos", "open_buy", "open_sell"):
            assert float(got[k]) == ins[int(i)][k], (i, k)
        assert (got["currency"], float(got["rate"])) == ("USD", 1.0)  # SPEC 7: its own
    assert browser.find_element("id", "base").text == "USD"  # the figures' currency
    assert p["stale"] == "false" and p["role"] == "primary"
    # The page runs under its strict Content-Security-Policy without a violation.
    console = [e["message"] for e in browser.get_log("browser")]
    assert not [m for m in console if "Content Security Policy" in m], console
    shot = os.environ.get("EXPOSURE_WEB_SCREENSHOT")
    if shot:
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element("id", "page-size")).select_by_value("50")
        browser.find_element("css selector", "tr[data-account]").click()
        wait_for(lambda: page(browser)["positions"], 5, "the drill-down")
        size = browser.get_window_size()
        browser.set_window_size(size["width"], 2300)  # (down to the drill-down)
        browser.save_screenshot(shot)
        browser.set_window_size(size["width"], size["height"])
        browser.find_element("id", "drill-close").click()
        show_all(browser)


def test_an_event_shows_within_a_second_and_a_breach_turns_its_flag_on(node, web, browser):
    sel = f'tr[data-account="{NEW_ACCOUNT}"]'
    assert str(NEW_ACCOUNT) not in page(browser)["accounts"]  # (new to the page)
    send(node, [{"type": "mark", "instrument": 5000, "price": 10.0},
                {"type": "position", "account": NEW_ACCOUNT, "instrument": 5000, "qty": 100,
                 "price": 10.0}])
    t0 = time.monotonic()
    wait_for(lambda: browser.find_elements("css selector", sel), 1.0,
             "the new account's row (within 1 s of the node's acknowledgement)")
    print(f"the event showed after {time.monotonic() - t0:.3f} s")
    row = page(browser)["accounts"][str(NEW_ACCOUNT)]
    assert float(row["gross"]) == 1000.0 and row["breach"] == "0"
    assert not browser.find_elements("css selector", f'{sel} .flag.on')
    # A gross limit of 500 on a gross of 1,000: the gross breach's flag, 200% of its limit.
    send(node, [{"type": "limit", "account": NEW_ACCOUNT, "gross": 500.0}])
    flag = f'{sel} [data-flag="gross"][data-on="1"]'
    wait_for(lambda: browser.find_elements("css selector", flag), 1.0, "the breach flag")
    f = browser.find_element("css selector", flag)
    assert f.get_attribute("data-limit") == "500" and float(f.get_attribute("data-use")) == 200
    assert "on" in f.get_attribute("class") and "200%" in f.text
    assert "breach" in browser.find_element("css selector", sel).get_attribute("class")


def test_sorting_and_the_drill_down(node, web, browser):
    def order_by(field: str) -> list[float]:
        p = page(browser)
        return [float(p["accounts"][str(a)][field]) for a in p["order"]]

    g = order_by("gross")
    assert g == sorted(g, reverse=True)  # the default: gross, largest first
    browser.find_element("css selector", '[data-table="accounts"] th[data-sort="gross"]').click()
    g = order_by("gross")
    assert g == sorted(g) and len(g) > 10
    browser.find_element("css selector", '[data-table="accounts"] th[data-sort="pnl"]').click()
    p = order_by("pnl")
    assert p == sorted(p, reverse=True)
    # The filter: by name (accounts.csv) or id.
    browser.find_element("id", "filter").send_keys(f"ACC-{PM1[2]:04d}")
    wait_for(lambda: page(browser)["order"] == [PM1[2]], 5, "the filter by name")
    browser.find_element("id", "filter").clear()
    browser.find_element("id", "filter").send_keys(" ")  # (clear() fires no input event)
    # The drill-down: the positions of PM1[2], as dump prints them.
    wait_for(lambda: browser.find_elements("css selector", f'tr[data-account="{PM1[2]}"]'), 5,
             "the row")
    browser.find_element("css selector", f'tr[data-account="{PM1[2]}"]').click()
    want = {str(r["instrument"]): r for r in node.dump()["positions"]
            if r["account"] == PM1[2]}
    assert want
    wait_for(lambda: set(page(browser)["positions"]) == set(want), 5, "the positions")
    p = page(browser)
    assert p["drill"] == str(PM1[2])
    for i, r in p["positions"].items():
        for k in ("pos", "open_buy", "open_sell", "pnl"):
            assert float(r[k]) == want[i][k], (i, k)


def test_a_pm_never_receives_another_pm_s_rows(node, web, browser):
    """pm1 logs in; every WebSocket frame the browser receives (chromium's own network
    log) carries only pm1's accounts, while a flow moves every account."""
    browser.get_log("performance")  # (drop what came before)
    login(browser, web, "pm1")
    send(node, flow(1500, seed=31))
    wait_for(lambda: set(map(int, page(browser)["accounts"])) == set(PM1), 5,
             "pm1's accounts")
    frames = []
    opened: set[str] = set()  # the WebSockets the pm1 page opened (not the risk page's,
    for e in browser.get_log("performance"):  # whose last frames may still be logged)
        m = json.loads(e["message"])["message"]
        if m["method"] == "Network.webSocketCreated":
            opened.add(m["params"]["requestId"])
        elif m["method"] == "Network.webSocketFrameReceived" \
                and m["params"]["requestId"] in opened:
            r = m["params"]["response"]  # (a binary frame's payload comes base64-encoded)
            data = r["payloadData"]
            frames.append(json.loads(base64.b64decode(data) if r["opcode"] == 2 else data))
    books = [f for f in frames if f["type"] in ("snapshot", "update")]
    assert books and books[0]["type"] == "snapshot" and books[0]["user"] == "pm1"
    seen = {r[0] for f in books for r in f["accounts"]}
    assert seen <= set(PM1) and seen, seen - set(PM1)
    assert any(f.get("fund") for f in books) and any(f.get("instruments") for f in books)
    p = page(browser)
    assert set(map(int, p["accounts"])) == set(PM1) and p["fund"] and p["instruments"]


def test_stopping_the_node_makes_the_page_say_stale_within_3_s(node, web, browser):
    assert page(browser)["stale"] == "false"
    node.stop()
    t0 = time.monotonic()
    wait_for(lambda: page(browser)["stale"] == "true", 3.0, "the page to say stale")
    print(f"stale after {time.monotonic() - t0:.2f} s")
    assert browser.find_element("id", "stale").is_displayed()
