"""The browser helper can fail: a page that throws (at once or just after its load), logs an error, or fails
to load a resource, local or from the network (which it cannot reach), is caught; a clean page is clean,
and its screenshot is a PNG of the whole page; a missing page and a browser out of time are errors."""

import struct

import pytest

from browser import open_page

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def test_errors_exceptions_and_failed_loads_are_caught(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><p>x</p><img src="missing.png"><img src="https://example.com/x.png">'
                   '<script>console.log("fine"); console.error("boom"); throw new Error("thrown here")</script>'
                   '<script>setTimeout(() => { throw new TypeError("later") }, 20)</script>')
    page = open_page(bad, tmp_path / "bad.png")
    errors = page["console_errors"]
    assert "boom" in errors and "Uncaught Error: thrown here" in errors, errors
    assert "Uncaught TypeError: later" in errors, errors
    assert "Failed to load resource: net::ERR_FILE_NOT_FOUND" f" ({(tmp_path / 'missing.png').as_uri()})" in errors
    assert "Failed to load resource: net::ERR_NAME_NOT_RESOLVED (https://example.com/x.png)" in errors
    assert "fine" not in errors and {"level": "log", "source": "console", "text": "fine",
                                     "url": bad.as_uri()} in page["console"]
    assert page["requests"][0] == bad.as_uri() and "https://example.com/x.png" in page["requests"]
    assert {"url": "https://example.com/x.png", "error": "net::ERR_NAME_NOT_RESOLVED"} in page["failed_requests"]
    assert png_size(tmp_path / "bad.png")[0] == 1280


def test_a_clean_page_is_clean_and_shot_whole(tmp_path):
    clean = tmp_path / "clean.html"
    clean.write_text('<!doctype html><title>t</title><svg width="10" height="10"><rect width="5" height="5"/></svg>'
                     '<div style="height:3000px;background:linear-gradient(#fff,#333)"></div>')
    page = open_page(clean, tmp_path / "clean.png")
    assert page["console_errors"] == [] and page["console"] == [] and page["failed_requests"] == []
    assert page["requests"] == [clean.as_uri()]
    assert page["dom"].startswith("<!DOCTYPE html><html>") and "<svg" in page["dom"] and "<rect" in page["dom"]
    assert page["screenshot"] == tmp_path / "clean.png"
    width, height = png_size(page["screenshot"])
    assert width == page["page_size"][0] == 1280 and height == page["page_size"][1] > 3000, (width, height)


def test_a_missing_page_and_a_timeout_raise(tmp_path):
    with pytest.raises(RuntimeError, match="ERR_FILE_NOT_FOUND"):
        open_page(tmp_path / "absent.html", tmp_path / "absent.png")
    page = tmp_path / "page.html"
    page.write_text("<!doctype html><p>x</p>")
    with pytest.raises(TimeoutError):
        open_page(page, tmp_path / "page.png", timeout=0.05)
    assert not (tmp_path / "page.png").exists()
