"""Without Chromium the page tests are skipped with what to install, except in CI, where they fail."""

import shutil

import pytest

import browser


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_browser_is_a_skip_with_instructions_or_a_failure_in_ci(monkeypatch, tmp_path, ci):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match=r"chromium and chromedriver not found.*"
                                       r"apt-get install chromium chromium-driver"):
        browser.chromium(tmp_path / "profile")


@pytest.mark.parametrize("ci", ["", "true"])
def test_browser_0_skips_the_page_tests_outside_ci_only(monkeypatch, tmp_path, ci):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("REIR_BROWSER", "0")
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="BROWSER=0" if not ci else "not found"):
        browser.chromium(tmp_path / "profile")
