"""reir report: one self-contained HTML file, checked in headless Chromium."""

import re

import pytest

from browser import chromium, screenshot
from conftest import run_reir
from reir.retrieval.database import load_database


@pytest.fixture(scope="module")
def report(served_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("report") / "report.html"
    result = run_reir("report", "--data_base", str(served_model.database), "--output", str(output),
                        "--k", "5", "--queries", "3")
    assert result.returncode == 0, result.stderr
    return output


def test_report_needs_nothing_outside_the_file(report):
    text = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:|/)""", text)
    assert "<script" not in text and "@import" not in text and "url(" not in text
    assert text.count("data:image/jpeg;base64,") > 0 and text.count("data:image/png;base64,") == 1


def test_report_opens_in_a_browser_with_metrics_curves_and_queries(report, served_model, tmp_path):
    from selenium.webdriver.common.by import By

    db = load_database(served_model.database)
    driver = chromium(tmp_path / "profile")
    try:
        driver.get(report.as_uri())
        metrics = {row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
                   for row in driver.find_elements(By.CSS_SELECTOR, "table tr")}
        assert metrics["recall@1"] == f"{100 * db.info['metrics']['recall@1']:.2f}%"
        images = driver.find_elements(By.TAG_NAME, "img")
        assert images and all(driver.execute_script("return arguments[0].naturalWidth > 0", i) for i in images)
        curves = driver.find_element(By.CSS_SELECTOR, "img.curves")
        assert driver.execute_script("return arguments[0].naturalWidth", curves) > 300
        for section in ("best", "worst"):
            rows = driver.find_elements(By.CSS_SELECTOR, f"#{section} .row")
            assert len(rows) == 3 and all(len(r.find_elements(By.TAG_NAME, "figure")) == 1 + 5 for r in rows)
        best = driver.find_elements(By.CSS_SELECTOR, "#best .row")[0].find_elements(By.TAG_NAME, "figure")[1:]
        worst = driver.find_elements(By.CSS_SELECTOR, "#worst .row")[0].find_elements(By.TAG_NAME, "figure")[1:]
        green, red = "rgb(0, 170, 0)", "rgb(220, 0, 0)"
        def colours(cells):
            return [c.value_of_css_property("border-top-color").replace("rgba", "rgb").replace(", 1)", ")")
                    for c in cells]
        assert colours(best).count(green) >= colours(worst).count(green)
        assert set(colours(best) + colours(worst)) <= {green, red}
        screenshot(driver, "report")
    finally:
        driver.quit()


def test_report_of_an_unlabelled_collection_shows_queries_without_metrics(served_model, tmp_path):
    database = tmp_path / "plain_data_base.safetensors"
    assert run_reir("embed", "--model", str(served_model.model), "--images", str(served_model.images),
                      "--output", str(database), "--num_workers", "0").returncode == 0
    result = run_reir("report", "--data_base", str(database), "--queries", "2")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "plain_data_base.html").read_text()
    assert "not computed" in text and text.count('class="row"') == 2 and "Worst queries" not in text


LONG_LABEL = "a class name far longer than one line of a caption"


def test_every_caption_shows_its_whole_label_and_a_code_points_character(tmp_path):
    """Latin A, Greek Alpha and Cyrillic A score alike: a caption cut to "U+0…" did not tell them apart."""
    from selenium.webdriver.common.by import By

    from handmade import make_database

    labels = ["U+0041", "U+0391", "U+0410", LONG_LABEL, "U+0041", "U+0391", "U+0410", LONG_LABEL]
    database = make_database(tmp_path, "look_alikes", {"test": ([0, 2, 4, 6, 90, 92, 94, 96], labels)})
    output = tmp_path / "report.html"
    result = run_reir("report", "--data_base", str(database), "--k", "6", "--queries", "2", "--output", str(output))
    assert result.returncode == 0, result.stderr
    driver = chromium(tmp_path / "profile")
    try:
        driver.get(output.as_uri())
        captions = driver.find_elements(By.TAG_NAME, "figcaption")
        texts = [" ".join(caption.text.split()) for caption in captions]
        assert any("U+0391 \u0391" in text for text in texts) and any("U+0410 \u0410" in text for text in texts)
        assert any(LONG_LABEL in text for text in texts)
        for caption in captions:  # nothing cut: the whole text fits the caption's box
            assert driver.execute_script("const e = arguments[0]; "
                                         "return e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight",
                                         caption), caption.text
        screenshot(driver, "report_captions")
    finally:
        driver.quit()
