"""The archive's search page (medmoe_archive/app.py) and the Gradio demo (model_card/app.py) in a real browser:
headless Chromium driven by selenium types queries, applies filters, pages, uploads a DICOM file and an image, and
checks what the grid and the demo show; a screenshot of each page goes to test-artifacts/. Without Chromium these
tests skip, except in CI (CI=true), where .ci/run installs it. The page's HTTP contract (login, limits, logs) is
checked without a browser."""

import base64
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("faiss")
pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from medmoe_archive import index as index_script  # noqa: E402
from medmoe_archive.app import SearchPage, serve  # noqa: E402
from medmoe_archive.search import ArchiveSearch  # noqa: E402

from .helpers import ROOT  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts"
VIEWER = "https://pacs.example/viewer?study={study}&series={series}&instance={instance}"
STUDIES = {  # study -> (date, modality tag)
    "1.2.826.0.1.3680043.10.7.1": ("20240105", "CT"),
    "1.2.826.0.1.3680043.10.7.2": ("20250611", "CT"),
    "1.2.826.0.1.3680043.10.7.3": ("20250612", "MR"),
}


def browser():
    """Headless Chromium; skipped with the reason where it is not installed, a failure in CI."""
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver):
        reason = "headless Chromium, chromedriver and selenium are needed (apt install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: .ci/run installs them")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def chrome():
    driver = browser()
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait_for(driver, condition, seconds: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds).until(lambda _: condition())


@pytest.fixture(scope="module")
def dicom_archive(tmp_path_factory, phantoms):
    """12 phantom PNGs and 9 CT/MR DICOM files in 3 studies of one series each, with study dates."""
    root = tmp_path_factory.mktemp("dicom_archive")
    for number, row in enumerate(phantoms[:12]):
        row["image"].save(root / f"phantom_{number:02d}.png")
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    generator = np.random.default_rng(0)
    for study, (date, modality) in STUDIES.items():
        for instance in range(3):
            source.StudyInstanceUID, source.SeriesInstanceUID = study, f"{study}.1"
            source.SOPInstanceUID = f"{study}.1.{instance}"
            source.StudyDate, source.Modality, source.PatientID = date, modality, f"PATIENT-{study[-1]}"
            pixels = source.pixel_array + generator.integers(0, 200, source.pixel_array.shape).astype(np.int16)
            source.PixelData = pixels.astype(np.int16).tobytes()
            source.save_as(root / f"study{study[-1]}_{instance}.dcm")
    return root


def build_index(model: Path, archive: Path, out: Path, *extra: str) -> Path:
    index_script.index_archive(index_script.parse_args(
        ["--model", str(model), "--images", str(archive), "--output_dir", str(out), "--num_workers", "0", *extra]
    ))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def archive_index(nano_folder, dicom_archive, tmp_path_factory):
    return build_index(nano_folder, dicom_archive, tmp_path_factory.mktemp("page") / "index")


def start_page(index: Path, model: Path, page_size: int = 24, login=None):
    page = SearchPage(ArchiveSearch(index, str(model)), VIEWER, page_size)
    server = serve(page, "127.0.0.1", 0, login)
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.fixture(scope="module")
def page_url(archive_index, nano_folder):
    server, url = start_page(archive_index, nano_folder, page_size=8)
    yield url
    server.shutdown()


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, lambda: "images" in driver.find_element("id", "archive").text)


def hits(driver) -> list:
    return driver.find_elements("css selector", "#results .hit")


def search_and_wait(driver) -> list:
    driver.find_element("id", "status").get_attribute("textContent")
    driver.execute_script("document.getElementById('results').replaceChildren()")
    driver.find_element("id", "search").click()
    wait_for(driver, lambda: hits(driver) or driver.find_element("id", "error").is_displayed())
    assert not driver.find_element("id", "error").is_displayed(), driver.find_element("id", "error").text
    return hits(driver)


def test_a_text_query_fills_the_grid_and_a_filter_narrows_it_with_viewer_links(chrome, page_url):
    from selenium.webdriver.support.ui import Select

    open_page(chrome, page_url)
    chrome.find_element("id", "text").send_keys("axial CT of the chest")
    found = search_and_wait(chrome)
    assert len(found) == 8 and chrome.find_element("id", "next").is_enabled()  # 21 images, pages of 8
    assert all(chrome.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                     card.find_element("tag name", "img")) for card in found)  # fmt: skip
    ranks = [card.find_element("class name", "score").text.split()[0] for card in found]
    assert ranks == [f"#{rank}" for rank in range(1, 9)]
    Select(chrome.find_element("id", "modality")).select_by_visible_text("CT")
    found = search_and_wait(chrome)
    assert len(found) == 6 and {card.find_element("class name", "modality").text for card in found} == {
        "modality tag: CT"
    }
    for card in found:
        study = card.find_element("class name", "study").text.removeprefix("study: ")
        instance = card.find_element("class name", "instance").text.removeprefix("instance: ")
        link = card.find_element("class name", "viewer").get_attribute("href")
        assert link == VIEWER.format(study=study, series=f"{study}.1", instance=instance)
    screenshot(chrome, "search_page_filtered")


def test_dates_groups_and_pages(chrome, page_url):
    from selenium.webdriver.support.ui import Select

    open_page(chrome, page_url)
    chrome.find_element("id", "text").send_keys("brain MRI")
    chrome.find_element("id", "date_from").send_keys("20250101")
    found = search_and_wait(chrome)
    assert {card.find_element("class name", "date").text for card in found} == {
        "study date: 20250611",
        "study date: 20250612",
    }
    chrome.find_element("id", "date_from").clear()
    Select(chrome.find_element("id", "group")).select_by_visible_text("series")
    found = search_and_wait(chrome)
    assert len(found) == 3 and all(card.find_element("class name", "matches").text.endswith("matching images")
                                   for card in found)  # fmt: skip
    Select(chrome.find_element("id", "group")).select_by_visible_text("image")
    search_and_wait(chrome)
    chrome.find_element("id", "next").click()
    wait_for(chrome, lambda: chrome.find_element("id", "page").text == "page 2")
    ranks = [card.find_element("class name", "score").text.split()[0] for card in hits(chrome)]
    assert ranks == [f"#{rank}" for rank in range(9, 17)]


def test_an_uploaded_dicom_file_finds_its_own_image_first(chrome, page_url, dicom_archive):
    open_page(chrome, page_url)
    chrome.find_element("id", "image").send_keys(str(dicom_archive / "study2_1.dcm"))  # read as the index read it
    found = search_and_wait(chrome)
    top = found[0]
    assert top.find_element("class name", "score").text == "#1 1.000"
    assert top.find_element("class name", "instance").text == "instance: 1.2.826.0.1.3680043.10.7.2.1.1"
    screenshot(chrome, "search_page_dicom_query")


def test_a_de_identified_index_shows_pseudonyms_grey_tiles_and_no_viewer_links(chrome, nano_folder, dicom_archive,
                                                                               tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv("MEDMOE_DEIDENTIFY_KEY", "the page test's de-identification key")
    index = build_index(nano_folder, dicom_archive, tmp_path / "index", "--deidentify")
    server, url = start_page(index, nano_folder)
    try:
        open_page(chrome, url)
        assert chrome.find_element("id", "deidentified").is_displayed()
        assert not chrome.find_element("id", "date_from").is_displayed()  # pseudonymised dates do not order
        chrome.find_element("id", "text").send_keys("CT")
        found = search_and_wait(chrome)
        shown = chrome.page_source
        for identifier in (*STUDIES, "PATIENT-1", "20240105", str(dicom_archive), "phantom_00", "study2_1"):
            assert identifier not in shown, identifier
        assert not chrome.find_elements("css selector", "#results .viewer")
        widths = {chrome.execute_script("return arguments[0].naturalWidth", card.find_element("tag name", "img"))
                  for card in found}  # fmt: skip
        assert widths == {1}  # the grey tile: no thumbnail is stored
        screenshot(chrome, "search_page_deidentified")
    finally:
        server.shutdown()


def post(url: str, body: dict, authorization: str | None = None):
    request = urllib.request.Request(url + "api/search", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_login_limits_and_a_log_without_queries(archive_index, nano_folder, caplog):
    server, url = start_page(archive_index, nano_folder, login=("radiology", "s3cret-pass"))
    good = "Basic " + base64.b64encode(b"radiology:s3cret-pass").decode()
    try:
        with caplog.at_level(logging.INFO, logger="medmoe_archive.app"):
            assert post(url, {"text": "CT"})[0] == 401
            assert post(url, {"text": "CT"}, "Basic " + base64.b64encode(b"radiology:wrong").decode())[0] == 401
            status, answer = post(url, {"text": "hypodense lesion PATIENT-SECRET"}, good)
            assert status == 200 and len(answer["hits"]) == 21
            assert post(url, {"text": "x" * 20_001}, good) == (400, {"error": answer_error(20_000)})
            assert post(url, {"image_base64": "not base64!"}, good) == (
                400,
                {"error": "The image is not valid base64."},
            )
            status, answer = post(url, {"image_base64": base64.b64encode(b"not an image").decode()}, good)
            assert status == 400 and answer["error"]
            assert post(url, {"text": "CT", "image_base64": "AA=="}, good)[0] == 400
        logged = caplog.text
        assert "POST /api/search" in logged and "PATIENT-SECRET" not in logged and "hypodense" not in logged
    finally:
        server.shutdown()
    assert server.server_address[0] == "127.0.0.1"


def answer_error(characters: int) -> str:
    return f"The text query is longer than {characters:,} characters."


@pytest.fixture(scope="module")
def demo_url(nano_folder):
    pytest.importorskip("gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from medmoe.model_card.app import Demo, build_interface

    interface = build_interface(Demo(str(nano_folder)))
    interface.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    yield interface.local_url
    interface.close()


def test_the_demo_scores_an_uploaded_image(chrome, demo_url, tmp_path, nano_folder):
    picture = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96), dtype=np.uint8)).save(picture)
    chrome.get(demo_url)
    upload = wait_for(chrome, lambda: chrome.find_elements("css selector", "input[type=file]"), 60)
    upload[0].send_keys(str(picture))
    wait_for(chrome, lambda: "upload.png" in chrome.page_source)
    next(button for button in chrome.find_elements("tag name", "button") if button.text == "Submit").click()
    scores = lambda: [found.text for found in chrome.find_elements("css selector", ".label") if "%" in found.text]  # noqa: E731
    shown = wait_for(chrome, scores, 120)
    experts = json.loads((nano_folder / "config.json").read_text())["expert_names"]
    assert sorted(text.split("\n")[0] for text in shown) == sorted(experts)  # default labels: the expert names
    screenshot(chrome, "demo_page_scores")
