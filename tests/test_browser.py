"""The browser helper can fail: a page that throws, logs an error or fails to load a resource is caught;
a clean page is clean; the screenshot is a PNG."""

from browser import open_page


def test_a_throwing_page_is_caught_and_a_clean_one_is_clean(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><p>x</p><img src="missing.png"><script>console.error("boom"); '
                   'throw new Error("thrown here")</script>')
    page = open_page(bad, tmp_path / "bad.png")
    messages = " ".join(page["console_errors"])
    assert "boom" in messages and "Uncaught Error: thrown here" in messages, page["console_errors"]

    clean = tmp_path / "clean.html"
    clean.write_text('<!doctype html><title>t</title><svg width="10" height="10"><rect width="5" height="5"/></svg>')
    page = open_page(clean, tmp_path / "clean.png")
    assert page["console_errors"] == []
    assert "<svg" in page["dom"] and "<rect" in page["dom"]
    assert (tmp_path / "clean.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
