"""The fetch step against a real HTTP server on 127.0.0.1: success, checksum mismatch, interruption."""

from __future__ import annotations

import hashlib
import http.server
import tarfile
import threading

import pytest

from rcekd.fetch import Remote, fetch

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; `/cut` sends only half the body, then drops the connection."""

    cut_once = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/cut" and Handler.cut_once:
            Handler.cut_once = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.cut_once = True
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_success_and_ledger(server, tmp_path):
    [path] = fetch("toy", tmp_path, remotes=[Remote("data.bin", f"{server}/data.bin", MD5)])
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "data.bin.part").exists()
    # no published checksum: the first download's md5 is recorded, later runs verify against it
    [other] = fetch("toy", tmp_path, remotes=[Remote("other.bin", f"{server}/other.bin")])
    assert '"other.bin": "%s"' % MD5 in (tmp_path / "checksums.json").read_text()
    other.write_bytes(b"corrupted")
    fetch("toy", tmp_path, remotes=[Remote("other.bin", f"{server}/other.bin")])
    assert other.read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(ValueError, match=r"data\.bin: md5 .* does not match the expected 0{32}"):
        fetch("toy", tmp_path, remotes=[Remote("data.bin", f"{server}/data.bin", "0" * 32)])
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()


def test_interrupted_transfer_resumes(server, tmp_path):
    remote = Remote("data.bin", f"{server}/cut", MD5)
    with pytest.raises(OSError):
        fetch("toy", tmp_path, remotes=[remote])
    assert not (tmp_path / "data.bin").exists()
    part = tmp_path / "data.bin.part"
    assert 0 < part.stat().st_size < len(PAYLOAD)  # the partial file never has the final name
    [path] = fetch("toy", tmp_path, remotes=[remote])  # resumes with a Range request
    assert path.read_bytes() == PAYLOAD and not part.exists()


def test_local_directory_and_archive(tmp_path):
    source = tmp_path / "mine"
    source.mkdir()
    (source / "data.bin").write_bytes(PAYLOAD)
    [path] = fetch("toy", tmp_path / "a", local=source, remotes=[Remote("data.bin", "http://unused", MD5)])
    assert path.read_bytes() == PAYLOAD
    archive = tmp_path / "mine.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "data.bin", arcname="nested/data.bin")
    [path] = fetch("toy", tmp_path / "b", local=archive, remotes=[Remote("data.bin", "http://unused", MD5)])
    assert path.read_bytes() == PAYLOAD
    with pytest.raises(FileNotFoundError, match="no member named missing.bin"):
        fetch("toy", tmp_path / "c", local=archive, remotes=[Remote("missing.bin", "http://unused")])
