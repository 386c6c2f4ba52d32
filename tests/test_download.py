"""The download path, served from a local HTTP server (no internet here)."""

import functools
import http.server
import threading

import pytest

from vitcore.data.download import fetch, is_url


@pytest.fixture
def server(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "archive.tgz").write_bytes(b"x" * 3_000_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "files"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_downloads_once_and_reuses(server, tmp_path):
    dest = tmp_path / "cache"
    path = fetch(f"{server}/archive.tgz", dest, progress=False)
    assert path == dest / "archive.tgz" and path.read_bytes() == b"x" * 3_000_000
    path.write_bytes(b"cached")
    assert fetch(f"{server}/archive.tgz", dest, progress=False).read_bytes() == b"cached"
    assert not list(dest.glob("*.part-*"))


def test_a_missing_file_is_one_clear_error_and_leaves_nothing(server, tmp_path):
    with pytest.raises(OSError, match="could not download .*/nope.tgz"):
        fetch(f"{server}/nope.tgz", tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    assert is_url("https://x/y.tgz") and not is_url("/data/y.tgz") and not is_url("pipe:cat x")


def test_an_archive_url_is_a_shard_source(tmp_path):
    """The demo's fallback path: the official archive by URL, downloaded once, read as a tar."""
    import tarfile

    from PIL import Image

    from vitcore.data.shards import write_shards

    files = tmp_path / "files"
    files.mkdir()
    for cls in ("a", "b"):
        (tmp_path / "src" / "nette" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 16), (40 * i, 0, 0)).save(tmp_path / "src" / "nette" / "train" / cls / f"{i}.JPEG")
    with tarfile.open(files / "nette.tgz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "nette", arcname="nette")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/nette.tgz"
        index = write_shards(url, tmp_path / "shards", split="train", download_dir=tmp_path / "dl", progress=False)
    finally:
        httpd.shutdown()
    assert index["total"] == 6 and index["classes"] == ["a", "b"]
    assert (tmp_path / "dl" / "nette.tgz").is_file()


def test_a_connection_closed_early_is_an_error_not_a_cached_file(tmp_path):
    class ShortBody(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 500)  # then the handler returns and the server closes

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), ShortBody)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(OSError, match="500 of 100000 bytes"):
            fetch(f"http://127.0.0.1:{httpd.server_address[1]}/a.tgz", tmp_path / "cache", progress=False)
    finally:
        httpd.shutdown()
    assert list((tmp_path / "cache").iterdir()) == []
