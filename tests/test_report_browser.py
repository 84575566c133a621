"""The headless-Chromium harness on small self-contained pages: readiness, console errors, screenshots."""

import struct

import pytest

from genfoundry.errors import GenfoundryError
from genfoundry.report.browser import BrowserError, find_browser, open_page


def _need_browser():
    try:
        find_browser()
    except BrowserError as e:
        pytest.skip(f"headless Chromium unavailable: {e}")


READY = """<script>
requestAnimationFrame(() => {
  performance.mark("genfoundry-charts-drawn");
  window.genfoundryReport = {ready: true, charts: [{id: "loss", title: "Loss", series: 2, points: 7, drawn: true}],
                             errors: []};
});
</script>"""


def _page(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{body}</body></html>")
    return path


def test_ready_page_status_timings_and_full_height_screenshot(tmp_path):
    _need_browser()
    page = _page(tmp_path, "ok.html", f"<h1>report</h1><div style='height:2500px;background:#369'></div>{READY}")
    shot = tmp_path / "shots" / "ok.png"
    result = open_page(page, screenshot=shot, width=800, timeout_s=30)
    assert result["status"]["ready"] is True
    assert result["status"]["charts"] == [{"id": "loss", "title": "Loss", "series": 2, "points": 7, "drawn": True}]
    assert result["console_errors"] == []
    assert result["charts_drawn_ms"] > 0 and result["first_contentful_paint_ms"] > 0
    assert 0 < result["load_s"] < 30
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    png_width, png_height = struct.unpack(">II", header[16:24])
    assert png_width == 800 and png_height >= 2500  # the whole page, not the 1000-px window


def test_script_error_is_reported_among_console_errors(tmp_path):
    _need_browser()
    page = _page(tmp_path, "err.html", "<p>one chart</p><script>throw new Error('chart-boom-17')</script>" + READY)
    result = open_page(page, timeout_s=30)
    assert result["status"]["ready"] is True
    assert any("chart-boom-17" in message for message in result["console_errors"]), result["console_errors"]


def test_page_that_never_becomes_ready_names_what_it_saw(tmp_path):
    _need_browser()
    page = _page(tmp_path, "stuck.html", "<script>window.genfoundryReport = {ready: false, charts: [], errors: []};"
                                         "throw new Error('never-drawn-5')</script>")
    with pytest.raises(BrowserError, match=r"did not become ready within 2 s.*ready.*false.*never-drawn-5"):
        open_page(page, timeout_s=2)


def test_missing_browser_and_missing_page_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(BrowserError, match="no-such-page.html"):
        open_page(tmp_path / "no-such-page.html")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrowserError, match="apt-get install chromium chromium-driver") as e:
        find_browser()
    assert isinstance(e.value, GenfoundryError) and "\n" not in str(e.value)
