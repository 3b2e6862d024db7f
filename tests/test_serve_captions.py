"""The search page's captions show the whole label, and a code point's character, in a real browser."""

from browser import chromium, screenshot
from test_serve import index_file, server  # noqa: F401 - fixtures: one served index for the module

LONG_LABEL = "a class name far longer than one line of a result's caption"
LABELS = ["U+0041", "U+0391", "U+0410", LONG_LABEL]


def test_captions_show_whole_labels_and_code_point_characters(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path / "profile")
    try:
        driver.get(server + "/")
        WebDriverWait(driver, 30).until(lambda d: "database images" in d.find_element(By.ID, "about").text)
        # the page's own rendering, fed an answer whose labels are look-alike code points and a long name
        driver.execute_script("""
            const labels = arguments[0];
            window.fetch = async () => new Response(JSON.stringify({milliseconds: 1, results: labels.map(
                (label, n) => ({id: n, score: 1 - n / 100, label: label, path: `p${n}.png`, correct: n % 2 === 0}))}),
                {status: 200, headers: {"Content-Type": "application/json"}});
            search(new FormData());""", LABELS)
        WebDriverWait(driver, 30).until(lambda d: "results in" in d.find_element(By.ID, "status").text)
        captions = driver.find_elements(By.CSS_SELECTOR, "#results .cell figcaption")
        texts = [" ".join(caption.text.split()) for caption in captions]
        assert texts == ["1. 1.0000 U+0041 A", "2. 0.9900 U+0391 \u0391", "3. 0.9800 U+0410 \u0410",
                         f"4. 0.9700 {LONG_LABEL}"]
        for caption in captions:  # nothing cut: the whole text fits the caption's box
            assert driver.execute_script("const e = arguments[0]; "
                                         "return e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight",
                                         caption), caption.text
        screenshot(driver, "serve_captions")
    finally:
        driver.quit()
