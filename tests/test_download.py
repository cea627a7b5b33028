"""lib.data.download against a local HTTP server on 127.0.0.1 (the test machine has no internet)."""
from __future__ import annotations

import functools
import io
import logging
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from lib.data.download import (
    NOT_DECODABLE,
    REFUSED,
    USER_AGENT,
    DownloadJob,
    DownloadReport,
    download,
    missing_message,
    verify_image,
)

MAX_REQUESTS = 200  # a runaway retry loop fails the test instead of hammering the server


def png_bytes(size: tuple[int, int] = (24, 16), color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def bomb_png(w: int, h: int) -> bytes:
    """A valid w x h 1-bit grey PNG of zeros, built row by row: ~100 KB, w * h * 3 bytes once decoded to BGR."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + (w + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


class Server:
    """Handle on the running test server: its base URL and a per-path request counter."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.agents: list[str] = []
        self.lock = threading.Lock()
        self.png = png_bytes()
        self.big = png_bytes((256, 256), (1, 2, 3)) + b"\0" * 8192
        self.url = ""
        self.bomb = bomb_png(30000, 30000)

    def url_for(self, path: str) -> str:
        return self.url + path

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


def make_handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def send_body(self, body: bytes, length: int | None = None, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "image/png")
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with state.lock:
                state.counts[self.path] += 1
                n = state.counts[self.path]
                total = sum(state.counts.values())
                state.agents.append(self.headers.get("User-Agent", ""))
            if total > MAX_REQUESTS:
                self.send_error(418, "too many requests in one test")
            elif self.path.startswith("/ok/"):
                self.send_body(state.png, len(state.png))
            elif self.path.startswith("/flaky/"):
                if n == 1:
                    self.send_error(503)
                else:
                    self.send_body(state.png, len(state.png))
            elif self.path.startswith("/truncated/"):
                self.send_body(state.png[: len(state.png) // 2], len(state.png) + 100)
                self.close_connection = True
            elif self.path.startswith("/broken/"):
                body = b"this is not an image " * 20
                self.send_body(body, len(body))
            elif self.path == "/big.png":
                self.send_body(state.big, len(state.big))
            elif self.path == "/big-stream.png":  # no Content-Length: the cap must hit while reading
                self.send_body(state.big, None)
                self.close_connection = True
            elif self.path == "/bomb.png":
                self.send_body(state.bomb, len(state.bomb))
            elif self.path == "/slow.png":
                time.sleep(0.6)
                self.send_body(state.png, len(state.png))
            elif self.path.startswith("/redirect/"):
                self.send_response(302)
                self.send_header("Location", "/ok/" + self.path.rsplit("/", 1)[1])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path in ("/redirect-ftp.png", "/redirect-file.png", "/redirect-file-301.png"):
                self.send_response(301 if "301" in self.path else 302)
                self.send_header("Location", "ftp://127.0.0.1/x.png" if "ftp" in self.path else "file:///etc/passwd")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(404)

    return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client hanging up early is expected here
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    state = Server()
    httpd = QuietServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def fetch(jobs: list[DownloadJob], **kw) -> DownloadReport:
    kw = {"workers": 4, "retries": 3, "timeout": 5.0, "backoff": 0.01, "progress": False, **kw}
    return download(jobs, **kw)


def leftovers(folder: Path) -> list[str]:
    """Temp files (dot-prefixed) left in a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- verify_image


def test_verify_image_good_and_truncated(tmp_path: Path) -> None:
    data = png_bytes((64, 48))
    good = tmp_path / "good.png"
    good.write_bytes(data)
    assert verify_image(good)
    half = tmp_path / "half.png"
    half.write_bytes(data[: len(data) // 2])
    assert not verify_image(half)
    no_iend = tmp_path / "no_iend.png"
    no_iend.write_bytes(data[:-12])
    assert not verify_image(no_iend)
    no_crc = tmp_path / "no_crc.png"  # PIL's verify() alone accepts this one
    no_crc.write_bytes(data[:-4])
    assert not verify_image(no_crc)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all" * 10)
    assert not verify_image(junk)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert not verify_image(empty)
    assert not verify_image(tmp_path / "absent.png")
    assert not verify_image(tmp_path)  # a folder


def test_verify_image_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="JPEG")
    good = tmp_path / "good.jpg"
    good.write_bytes(buf.getvalue())
    assert verify_image(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[:-2])
    assert not verify_image(cut)


# ----------------------------------------------------------------------------- download


def test_ok_downloads_then_skips(server: Server, tmp_path: Path) -> None:
    jobs = [DownloadJob(server.url_for(f"/ok/{i}.png"), tmp_path / "a" / "b" / f"{i}.png") for i in range(6)]
    rep = fetch(jobs)
    assert (rep.downloaded, rep.skipped, rep.failed) == (6, 0, [])
    assert rep.seconds >= 0
    for job in jobs:
        assert verify_image(job.dest)
        with Image.open(job.dest) as im:
            assert im.size == (24, 16)
    assert leftovers(tmp_path / "a" / "b") == []
    assert server.total == 6 and set(server.agents) == {USER_AGENT}

    rep = fetch(jobs)
    assert (rep.downloaded, rep.skipped, rep.failed) == (0, 6, [])
    assert server.total == 6  # no new request


def test_corrupt_existing_dest_is_redownloaded(server: Server, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    dest = tmp_path / "x.png"
    dest.write_bytes(png_bytes()[:-12])
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        rep = fetch([DownloadJob(server.url_for("/ok/x.png"), dest)])
    assert (rep.downloaded, rep.skipped, rep.failed) == (1, 0, [])
    assert verify_image(dest)
    assert any(str(dest) in r.getMessage() for r in caplog.records)


def test_flaky_succeeds_after_retry(server: Server, tmp_path: Path) -> None:
    rep = fetch([DownloadJob(server.url_for("/flaky/f.png"), tmp_path / "f.png")])
    assert (rep.downloaded, rep.failed) == (1, [])
    assert server.counts["/flaky/f.png"] == 2
    assert verify_image(tmp_path / "f.png")


def test_truncated_fails_cleanly(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "t.png"
    rep = fetch([DownloadJob(server.url_for("/truncated/t.png"), dest)], retries=2)
    assert rep.downloaded == 0 and len(rep.failed) == 1
    assert "incomplete body" in rep.failed[0][1]
    assert server.counts["/truncated/t.png"] == 3  # 1 + retries
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_404_fails_without_retry(server: Server, tmp_path: Path) -> None:
    rep = fetch([DownloadJob(server.url_for("/missing.png"), tmp_path / "m.png")])
    assert rep.failed == [(server.url_for("/missing.png"), "HTTP 404")]
    assert server.counts["/missing.png"] == 1
    assert list(tmp_path.iterdir()) == []


def test_broken_body_does_not_decode(server: Server, tmp_path: Path) -> None:
    rep = fetch([DownloadJob(server.url_for("/broken/b.png"), tmp_path / "b.png")])
    assert [r for _, r in rep.failed] == [NOT_DECODABLE]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "", "x.png", "http://"])
def test_non_http_refused_without_request(server: Server, tmp_path: Path, url: str) -> None:
    rep = fetch([DownloadJob(url, tmp_path / "r.png")])
    assert rep.failed == [(url, REFUSED)]
    assert server.total == 0
    assert list(tmp_path.iterdir()) == []


def test_timeout_and_refused_connection_are_retried(server: Server, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/x.png"
    rep = fetch([DownloadJob(dead, tmp_path / "d.png"), DownloadJob(server.url_for("/slow.png"), tmp_path / "s.png")],
                retries=1, timeout=0.2)
    reasons = dict(rep.failed)
    assert reasons[dead].startswith("network error") and "after 2 attempts" in reasons[dead]
    assert "timed out" in reasons[server.url_for("/slow.png")]
    assert server.counts["/slow.png"] == 2
    assert list(tmp_path.iterdir()) == []


def test_offline_batch_stops_trying(server: Server, tmp_path: Path) -> None:
    """Offline, files after a run of exhausted retries fail at once instead of each backing off."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    jobs = [DownloadJob(f"{dead}/{i}.png", tmp_path / f"{i}.png") for i in range(60)]
    rep = fetch(jobs, workers=2, retries=1)
    assert len(rep.failed) == 60
    tried = [r for _, r in rep.failed if r.startswith("network error")]
    skipped = [r for _, r in rep.failed if r.startswith("not tried: the last")]
    assert 16 <= len(tried) < 20 and len(tried) + len(skipped) == 60
    assert list(tmp_path.iterdir()) == []
    # A success resets the count: the breaker does not trip on scattered failures.
    mixed = []
    for i in range(40):
        mixed.append(DownloadJob(f"{dead}/m{i}.png", tmp_path / f"m{i}.png"))
        mixed.append(DownloadJob(server.url_for(f"/ok/m{i}.png"), tmp_path / f"ok{i}.png"))
    rep = fetch(mixed, workers=1, retries=0)
    assert rep.downloaded == 40 and all(r.startswith("network error") for _, r in rep.failed)


def test_unresolvable_host_is_given_up_at_its_first_failure(server: Server, tmp_path: Path, monkeypatch) -> None:
    """A host whose name does not resolve: one lookup per worker at most, no retries, its other frames fail at once;
    frames of other hosts still download."""
    lookups: list[str] = []
    real = socket.getaddrinfo

    def counting(host, *a, **kw):
        lookups.append(str(host))
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    jobs = [DownloadJob(f"http://nonexistent.invalid/{i}.png", tmp_path / f"{i}.png") for i in range(40)]
    jobs.append(DownloadJob(server.url_for("/ok/fine.png"), tmp_path / "fine.png"))
    t0 = time.monotonic()
    rep = fetch(jobs, workers=2, retries=3, backoff=1.0)  # with retries, 40 frames would back off for minutes
    assert time.monotonic() - t0 < 5
    assert rep.downloaded == 1 and len(rep.failed) == 40
    assert lookups.count("nonexistent.invalid") <= 2  # one per worker in flight, never a retry
    first = [r for _, r in rep.failed if not r.startswith("not tried")]
    assert 1 <= len(first) <= 2 and all(r.startswith("host 'nonexistent.invalid' does not resolve") for r in first)
    assert all(r == f"not tried: {first[0]}" or r in first or r.startswith("not tried: host 'nonexistent.invalid'")
               for _, r in rep.failed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fine.png"]
    message = missing_message(40, tmp_path, rep)
    assert "nonexistent.invalid" in message and message.count(";") == 1


def test_redirects_only_to_http(server: Server, tmp_path: Path) -> None:
    bad = ["/redirect-ftp.png", "/redirect-file.png", "/redirect-file-301.png"]
    rep = fetch([DownloadJob(server.url_for("/redirect/r.png"), tmp_path / "r.png")]
                + [DownloadJob(server.url_for(p), tmp_path / f"f{i}.png") for i, p in enumerate(bad)])
    assert rep.downloaded == 1 and verify_image(tmp_path / "r.png")
    reasons = dict(rep.failed)
    assert len(reasons) == 3
    for p in bad:  # never 'HTTP 302': the reason says it redirected to a refused scheme
        r = reasons[server.url_for(p)]
        assert r.startswith("refused: redirected to '") and "scheme that is not fetched" in r and "HTTP" not in r
        assert ("ftp://" if "ftp" in p else "file:///etc/passwd") in r
        assert server.counts[p] == 1  # no retry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]
    msg = missing_message(3, tmp_path, DownloadReport(1, 0, rep.failed))
    assert _one_sentence(msg) and "connect to the internet" not in msg and "images[].coco_url" in msg


@pytest.mark.parametrize("path", ["/big.png", "/big-stream.png"])
def test_size_cap(server: Server, tmp_path: Path, path: str) -> None:
    cap = 4096
    assert len(server.big) > cap
    rep = fetch([DownloadJob(server.url_for(path), tmp_path / "big.png")], max_bytes=cap)
    assert len(rep.failed) == 1 and f"larger than {cap} bytes" in rep.failed[0][1]
    assert server.counts[path] == 1
    assert list(tmp_path.iterdir()) == []


def test_mixed_batch(server: Server, tmp_path: Path) -> None:
    names = ["/ok/1.png", "/ok/2.png", "/flaky/3.png", "/missing.png", "/broken/5.png"]
    jobs = [DownloadJob(server.url_for(p), tmp_path / f"{i}.png") for i, p in enumerate(names)]
    jobs.append(DownloadJob("file:///nope.png", tmp_path / "9.png"))
    rep = fetch(jobs, workers=3)
    assert rep.downloaded == 3 and rep.skipped == 0
    assert sorted(r for _, r in rep.failed) == sorted(["HTTP 404", NOT_DECODABLE, REFUSED])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.png", "2.png"]


def test_oversize_frame_fails_undecoded(server: Server, tmp_path: Path) -> None:
    """A fetched frame passes 00's size check: above max_pixels it is refused (and not kept); within it, kept."""
    rep = fetch([DownloadJob(server.url_for("/bomb.png"), tmp_path / "b.png")], max_pixels=100_000_000)
    assert rep.downloaded == 0 and len(rep.failed) == 1
    assert rep.failed[0][1].startswith("the frame is 30000 x 30000 pixels") and "max_frame_pixels=100000000" in rep.failed[0][1]
    assert server.counts["/bomb.png"] == 1 and list(tmp_path.iterdir()) == []
    rep = fetch([DownloadJob(server.url_for("/bomb.png"), tmp_path / "b.png")], max_pixels=None)
    assert rep.downloaded == 1 and verify_image(tmp_path / "b.png")  # Pillow's own bomb limit does not refuse it


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError):
        download([], workers=0)


def test_empty_jobs() -> None:
    rep = download([], progress=False)
    assert (rep.downloaded, rep.skipped, rep.failed) == (0, 0, [])


# ----------------------------------------------------------------------------- missing_message


def _one_sentence(msg: str) -> bool:
    return msg.endswith(".") and "\n" not in msg and ". " not in msg and msg.count(";") == 1


def test_missing_message(tmp_path: Path) -> None:
    folder = Path("input/x/train/images")
    msg = missing_message(412, folder, None)
    assert _one_sentence(msg) and "412 frames are missing" in msg and str(folder) in msg
    assert "--download" in msg and "download.py" in msg

    rep = DownloadReport(downloaded=0, skipped=3, failed=[("http://a/1.png", "network error: [Errno -3] no name.\n"),
                                                          ("http://a/2.png", "HTTP 404")], seconds=0.1)
    msg = missing_message(2, folder, rep)
    assert _one_sentence(msg) and "2 frames are missing" in msg and str(folder) in msg
    assert "network error" in msg and "connect to the internet" in msg

    refused = DownloadReport(0, 0, [("ftp://a/1.png", REFUSED), ("file:///x.png", REFUSED)], 0.1)
    msg = missing_message(2, folder, refused)
    assert _one_sentence(msg) and "connect to the internet" not in msg
    assert "only http(s) URLs" in msg and "images[].coco_url" in msg and "download.py" in msg

    mixed = DownloadReport(0, 0, [("ftp://a/1.png", REFUSED), ("http://a/2.png", "network error: down")], 0.1)
    msg = missing_message(2, folder, mixed)
    assert _one_sentence(msg) and "network error: down" in msg and "connect to the internet" in msg
    assert "1 refused: not http(s) URLs in images[].coco_url" in msg

    msg = missing_message(1, folder, DownloadReport(0, 0, [], 0.0))
    assert _one_sentence(msg) and msg.startswith("1 frame is missing")
