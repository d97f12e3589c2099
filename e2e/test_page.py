"""The search page in headless Chromium against a real ``gce serve`` process.

Upload through the page, compare the grid (count, order, scores, labels) with the API's answer for
the same query, toggle a learner, search from a result, drop a file, upload a non-image and read the
message, filter by label, and save screenshots to docs/img/serve_page.png and serve_page_rejected.png. Any failed step fails ``make e2e``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.serve_fixtures import make_serve_index

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "img" / "serve_page.png"
CHROMIUM = os.environ.get("GCE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("GCE_CHROMEDRIVER") or shutil.which("chromedriver")
WAIT_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    fixture = make_serve_index(root, num_classes=8, per_class=6, size=64)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}
    log = open(root / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gce", "serve", "--index", str(fixture.index_dir), "--checkpoint", str(fixture.checkpoint),
         "--port", str(port), "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"gce serve did not start: {(root / 'serve.log').read_text()}")
            time.sleep(0.2)
    try:
        yield url, fixture, root
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.fail("chromium and chromedriver are needed: apt-get install -y chromium chromium-driver (make e2e does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                "--force-device-scale-factor=1", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def api_search(url: str, fields: dict[str, str], image: Path | None = None) -> dict:
    """POST /search as multipart, like the page does."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + image.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/search", data=body,
                                     headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def wait_for_searches(driver, count: int) -> None:
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searches") == str(count))


def grid(driver) -> list[dict]:
    cards = driver.find_elements(By.CSS_SELECTOR, "#results li.hit")
    return [{"id": int(c.get_attribute("data-id")), "score": float(c.get_attribute("data-score")),
             "shown": c.find_element(By.CLASS_NAME, "score").text, "label": c.find_element(By.CLASS_NAME, "label").text}
            for c in cards]


def assert_grid_is(driver, answer: dict) -> None:
    shown = grid(driver)
    assert len(shown) == len(answer["results"]) > 0
    assert [card["id"] for card in shown] == [hit["id"] for hit in answer["results"]]
    assert [card["score"] for card in shown] == pytest.approx([hit["score"] for hit in answer["results"]], abs=1e-6)
    assert [card["shown"] for card in shown] == [f"{hit['score']:.3f}" for hit in answer["results"]]
    assert [card["label"] for card in shown] == [hit["label"] for hit in answer["results"]]


def thumbnails_loaded(driver) -> bool:
    return driver.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")


def test_the_page_end_to_end(server, browser):
    url, fixture, root = server
    driver = browser
    driver.get(url + "/")
    WebDriverWait(driver, WAIT_S).until(lambda d: "learners" in d.find_element(By.ID, "info").text)
    info = json.load(urllib.request.urlopen(f"{url}/info"))
    toggles = driver.find_elements(By.CSS_SELECTOR, "#learners input[type=checkbox]")
    assert len(toggles) == info["num_learners"] == 4 and all(t.is_selected() for t in toggles)
    k = info["limits"]["default_k"]
    assert driver.find_element(By.ID, "k").get_attribute("value") == str(k)

    # 1. Upload an image that is not in the index through the file chooser.
    query = root / "query.png"
    pixels = np.asarray(Image.open(fixture.paths[13]).convert("RGB")).astype(np.int16)
    noisy = np.clip(pixels + np.random.default_rng(1).normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(query)
    driver.find_element(By.ID, "file-input").send_keys(str(query))
    wait_for_searches(driver, 1)
    assert driver.find_element(By.ID, "message").is_displayed() is False
    answer = api_search(url, {"k": str(k)}, query)
    assert len(answer["results"]) == k
    assert_grid_is(driver, answer)
    assert "query-image" and driver.find_element(By.ID, "query-image").is_displayed()
    WebDriverWait(driver, WAIT_S).until(thumbnails_loaded)

    # 2. Switch learner 0 off: the query runs again with learners 1, 2, 3.
    driver.find_element(By.CSS_SELECTOR, "#learners label.chip:first-child span").click()
    wait_for_searches(driver, 2)
    subset = api_search(url, {"k": str(k), "learners": "1,2,3"}, query)
    assert [h["id"] for h in subset["results"]] != [h["id"] for h in answer["results"]] or \
        [h["score"] for h in subset["results"]] != [h["score"] for h in answer["results"]]
    assert_grid_is(driver, subset)
    assert "learners 1, 2, 3" in driver.find_element(By.ID, "status").text
    WebDriverWait(driver, WAIT_S).until(thumbnails_loaded)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOT))

    # 3. Click the third result: search from that item (itself left out), still with learners 1-3.
    third = grid(driver)[2]["id"]
    driver.find_elements(By.CSS_SELECTOR, "#results li.hit")[2].click()
    wait_for_searches(driver, 3)
    assert_grid_is(driver, api_search(url, {"id": str(third), "k": str(k), "learners": "1,2,3"}))
    assert third not in [card["id"] for card in grid(driver)]
    assert driver.find_element(By.ID, "query-caption").text.startswith(f"item {third}")

    # 4. Drop a file on the drop zone (a synthetic drop event carrying the query file's bytes).
    learner0 = driver.find_element(By.CSS_SELECTOR, "#learners label.chip:first-child span")
    learner0.click()  # all learners again
    wait_for_searches(driver, 4)
    driver.execute_script("""
        const [b64, name] = arguments;
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    """, __import__("base64").b64encode(query.read_bytes()).decode(), query.name)
    wait_for_searches(driver, 5)
    assert_grid_is(driver, answer)

    # 5. A non-image: the page says the upload was rejected and why; the grid is cleared.
    fake = root / "holiday.png"
    fake.write_text("this is a text file with an image's name\n")
    driver.find_element(By.ID, "file-input").send_keys(str(fake))
    wait_for_searches(driver, 6)
    message = driver.find_element(By.ID, "message")
    assert message.is_displayed()
    assert message.text.startswith("Upload rejected: not an image file"), message.text
    assert grid(driver) == []
    assert driver.save_screenshot(str(SCREENSHOT.with_name("serve_page_rejected.png")))
    text = root / "notes.txt"
    text.write_text("plain text\n")
    driver.find_element(By.ID, "file-input").send_keys(str(text))
    wait_for_searches(driver, 7)
    assert message.text.startswith("Upload rejected: unsupported content type 'text/plain'"), message.text

    # 6. A good upload afterwards clears the message; the service is still healthy.
    driver.find_element(By.ID, "file-input").send_keys(str(query))
    wait_for_searches(driver, 8)
    assert not message.is_displayed()
    assert_grid_is(driver, answer)
    assert json.load(urllib.request.urlopen(f"{url}/health")) == {"status": "ok"}

    # 7. A filter: typed into its field, Enter runs the query again with it; a bad one is said.
    wanted = fixture.labels[5]
    field = driver.find_element(By.ID, "filter")
    field.send_keys(f"label={wanted}\n")
    wait_for_searches(driver, 9)
    filtered = api_search(url, {"k": str(k), "filter": f"label={wanted}"}, query)
    assert {hit["label"] for hit in filtered["results"]} == {wanted}
    assert_grid_is(driver, filtered)
    assert f"label={wanted}" in driver.find_element(By.ID, "status").text
    field.send_keys(Keys.CONTROL, "a")  # select and type over: one change event (clear() fires its own)
    field.send_keys("colour=red\n")
    wait_for_searches(driver, 10)
    assert message.text.startswith("Filter rejected: cannot read filter 'colour=red'"), message.text
    assert grid(driver) == []
