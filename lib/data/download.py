"""Fetch missing competition frames from their `coco_url` (stage 00 `--download`).

Each file lands in a temp file beside its destination, is fsynced and checked to decode, and is
only then renamed to its final name, so an interrupted or bad download never leaves a half frame
that a later stage would trust. Per-file failures (network, HTTP status, size cap, bad body) are
collected in the report and never raised: the stage decides what a missing frame means.
A host whose name does not resolve (offline) is given up on its first failure: its other frames
fail at once instead of being retried one by one.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import random
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

from PIL import Image
from tqdm import tqdm

from lib.core.faults import fault_point
from lib.data.frames import frame_size, pillow_bomb_limit_lifted, too_large

log = logging.getLogger("pipeline")

USER_AGENT = "fathomnet2025-pipeline/1.0 (python urllib; frame download)"
REFUSED = "refused: only http(s) URLs in images[].coco_url are fetched"
NOT_DECODABLE = "downloaded file does not decode"
CHUNK = 1 << 20
# A complete PNG ends with the IEND chunk: length 0, type, fixed CRC.
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_EOI = b"\xff\xd9"
BREAKER_MIN = 16  # files in a row that exhaust their retries before the rest are not tried
PART = ".part"  # suffix of a download's temp file
TAIL = 1024  # bytes at the end of a file searched for the end marker (tolerates a little trailing junk)


@dataclass
class DownloadJob:
    url: str
    dest: Path


@dataclass
class DownloadReport:
    downloaded: int
    skipped: int  # already complete and verified to decode
    failed: list[tuple[str, str]] = field(default_factory=list)  # (url, reason)
    seconds: float = 0.0


class _Retry(Exception):
    """A failure worth another attempt (network, timeout, 5xx/429, incomplete body)."""


class _Fail(Exception):
    """A failure another attempt will not fix (4xx, size cap, refused redirect, local write)."""

    def __init__(self, reason: str, exhausted: bool = False) -> None:
        super().__init__(reason)
        self.exhausted = exhausted  # every retry of a retryable failure was used up


class _Breaker:
    """Stops the batch after `limit` files in a row exhausted their retries.

    Offline, every file would otherwise wait out its full backoff (about 7 s with the defaults),
    hours for the ~9,000 train frames, only to fail the same way.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.run = 0
        self.last = ""
        self.lock = threading.Lock()

    def record(self, exhausted: bool, reason: str = "") -> None:
        with self.lock:
            self.run = self.run + 1 if exhausted else 0
            self.last = reason if exhausted else self.last

    def tripped(self) -> str | None:
        """The reason to fail remaining jobs without trying, or None."""
        with self.lock:
            if self.run < self.limit:
                return None
            return f"not tried: the last {self.run} downloads all failed ({self.last})"


class _Unresolved(_Fail):
    """The URL's host name did not resolve (offline, no DNS, a wrong host): no frame of that host is tried again."""


class _DeadHosts:
    """Hosts whose name did not resolve in this batch, with the reason.

    A frame whose URL cannot resolve fails at once and takes its host with it: the thousands of
    other frames of that host fail without a lookup or a retry, instead of 4 attempts each.
    """

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.lock = threading.Lock()

    def add(self, url: str, reason: str) -> None:
        with self.lock:
            self.reasons.setdefault(_host(url), reason)

    def reason(self, url: str) -> str | None:
        with self.lock:
            return self.reasons.get(_host(url))


class _Cancelled(Exception):
    """The caller was interrupted; stop reading and clean up."""


# ----------------------------------------------------------------------------- verification


def _tail(path: Path, n: int = TAIL) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read()


def verify_image(path: Path) -> bool:
    """True if `path` is a complete, decodable image.

    PIL's verify() checks PNG chunk CRCs but may accept a file cut right after the image data
    (and checks nothing for JPEG), so the end marker (PNG IEND, JPEG EOI) must also be present.
    """
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with pillow_bomb_limit_lifted(), Image.open(path) as im:  # verify() decodes no pixel; 00 checks the size
            fmt = im.format
            im.verify()
        if fmt == "PNG":
            return PNG_IEND in _tail(path)
        if fmt == "JPEG":
            return JPEG_EOI in _tail(path)
        return True
    except Exception:  # PIL raises SyntaxError, OSError, struct.error, ValueError... for bad files
        return False


def _too_large(path: Path, max_pixels: int | None) -> str | None:
    """'the frame is W x H pixels ...' when its header says it is above `max_pixels`; a file without one is verify's."""
    try:
        w, h = frame_size(path)
    except Exception:
        return None
    why = too_large(w, h, max_pixels)
    return None if why is None else f"the frame is {why}"


# ----------------------------------------------------------------------------- fetching


def _host(url: str) -> str:
    return (urllib.parse.urlsplit(url or "").hostname or "").lower()


def _is_http(url: str) -> bool:
    parts = urllib.parse.urlsplit(url or "")
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def _redirect_refused(newurl: str) -> str:
    return f"refused: redirected to {newurl!r}, a scheme that is not fetched (only http(s) URLs are)"


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too, and reports one to file: as 'HTTP 302'; a frame URL may only lead to http(s)."""

    def http_error_302(self, req, fp, code, msg, headers):
        newurl = headers.get("location") or headers.get("uri")
        if newurl is not None and not _is_http(urllib.parse.urljoin(req.full_url, newurl)):
            fp.close()
            raise _Fail(_redirect_refused(newurl))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not _is_http(urllib.parse.urljoin(req.full_url, newurl)):
            raise _Fail(_redirect_refused(newurl))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    """Built per call (not at import) so proxy settings are read from the current environment."""
    return urllib.request.build_opener(_HttpOnlyRedirects)


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _fetch_once(opener: urllib.request.OpenerDirector, url: str, out: BinaryIO, timeout: float,
                max_bytes: int, cancel: threading.Event) -> None:
    """One GET of `url` into `out` (truncated first); raises _Retry/_Fail/_Cancelled on failure.

    http.client returns b"" rather than raising when the peer closes before Content-Length
    bytes arrived, so the length is compared explicitly.
    """
    out.seek(0)
    out.truncate()
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})  # noqa: S310 (only http(s): download() refuses the rest first)
    try:
        with opener.open(req, timeout=timeout) as resp:
            expected = _content_length(resp)
            if expected is not None and expected > max_bytes:
                raise _Fail(f"larger than {max_bytes} bytes (Content-Length {expected})")
            got = 0
            while True:
                if cancel.is_set():
                    raise _Cancelled()
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                got += len(chunk)
                if got > max_bytes:
                    raise _Fail(f"larger than {max_bytes} bytes")
                try:
                    out.write(chunk)
                except OSError as e:
                    raise _Fail(f"could not write: {e}") from e
                fault_point("download_chunk")
            if expected is not None and got != expected:
                raise _Retry(f"incomplete body ({got} of {expected} bytes)")
    except urllib.error.HTTPError as e:
        e.close()
        reason = f"HTTP {e.code}"
        if e.code == 429 or e.code >= 500:
            raise _Retry(reason) from e
        raise _Fail(reason) from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, socket.gaierror):  # no retry: a name that does not resolve now will not in a second
            raise _Unresolved(f"host {_host(url)!r} does not resolve ({e.reason.strerror or e.reason})", exhausted=True) from e
        raise _Retry(f"network error: {e.reason}") from e
    except TimeoutError as e:
        raise _Retry("timed out") from e
    except (http.client.HTTPException, OSError) as e:
        raise _Retry(f"network error: {type(e).__name__}: {e}") from e


def _fetch_with_retries(opener: urllib.request.OpenerDirector, url: str, out: BinaryIO, timeout: float,
                        max_bytes: int, retries: int, backoff: float, cancel: threading.Event) -> None:
    """Up to 1 + retries attempts, waiting backoff * 2**attempt (+ jitter) between them."""
    for attempt in range(retries + 1):
        try:
            _fetch_once(opener, url, out, timeout, max_bytes, cancel)
            return
        except _Retry as e:
            if attempt == retries:
                raise _Fail(f"{e} (after {retries + 1} attempts)" if retries else str(e), exhausted=True) from e
            delay = backoff * 2**attempt + random.uniform(0.0, 0.25 * backoff)
            log.debug("retrying %s in %.2fs: %s", url, delay, e)
            if cancel.wait(delay):
                raise _Cancelled() from e


def _download_one(opener: urllib.request.OpenerDirector, job: DownloadJob, timeout: float, max_bytes: int,
                  retries: int, backoff: float, cancel: threading.Event, breaker: _Breaker, dead: _DeadHosts,
                  max_pixels: int | None = None) -> tuple[str, str]:
    """Returns ("skipped" | "downloaded" | "failed", reason). Never raises for per-file trouble."""
    dest = Path(job.dest)
    if dest.exists():
        if verify_image(dest):
            return "skipped", ""
        log.warning("'%s' exists but does not decode; downloading it again.", dest)
    if not _is_http(job.url):
        return "failed", REFUSED
    if cancel.is_set():
        return "failed", "cancelled"
    if (tripped := breaker.tripped()) is not None:
        return "failed", tripped
    if (unresolved := dead.reason(job.url)) is not None:
        return "failed", f"not tried: {unresolved}"
    tmp: str | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PART)
        with os.fdopen(fd, "w+b") as out:
            try:
                _fetch_with_retries(opener, job.url, out, timeout, max_bytes, retries, backoff, cancel)
            except _Fail as e:
                breaker.record(e.exhausted, str(e))
                if isinstance(e, _Unresolved):
                    dead.add(job.url, str(e))
                raise
            breaker.record(False)  # the server answered: the network is up
            out.flush()
            os.fsync(out.fileno())
        if (too_big := _too_large(Path(tmp), max_pixels)) is not None:
            return "failed", too_big
        if not verify_image(Path(tmp)):
            return "failed", NOT_DECODABLE
        os.replace(tmp, dest)
        tmp = None
        return "downloaded", ""
    except _Fail as e:
        return "failed", str(e)
    except _Cancelled:
        return "failed", "cancelled"
    except OSError as e:  # local: mkdir, temp file, fsync, rename
        return "failed", f"could not write '{dest}': {e}"
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def remove_partial(folder: Path) -> int:
    """Delete the temp files (`.<name>.*.part`) that a killed download left in `folder`; call it holding 00's lock."""
    n = 0
    if Path(folder).is_dir():
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and entry.name.endswith(PART) and entry.is_file():
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    n += 1
    if n:
        log.info("removed %d partial download(s) an interrupted run left in %s", n, folder)
    return n


def download(jobs: Sequence[DownloadJob], workers: int = 8, retries: int = 3, timeout: float = 30.0,
             max_bytes: int = 64 * 2**20, backoff: float = 1.0, progress: bool = True,
             max_pixels: int | None = None) -> DownloadReport:
    """Fetch every job whose dest is missing or does not decode, `workers` connections at a time.

    A fetched frame above `max_pixels` (width x height from its header; None: no limit) fails undecoded.

    `timeout` bounds each socket operation (connect, each read), not the whole file.
    """
    if workers < 1 or retries < 0 or max_bytes < 1 or timeout <= 0 or backoff < 0:
        raise ValueError(f"bad download settings: workers={workers} retries={retries} timeout={timeout} "
                         f"max_bytes={max_bytes} backoff={backoff}")
    t0 = time.monotonic()
    report = DownloadReport(downloaded=0, skipped=0, failed=[])
    if not jobs:
        return report
    opener = _opener()
    cancel = threading.Event()
    breaker, dead = _Breaker(max(BREAKER_MIN, 2 * workers)), _DeadHosts()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
    try:
        futures = {pool.submit(_download_one, opener, job, timeout, max_bytes, retries, backoff, cancel, breaker, dead,
                               max_pixels): job
                   for job in jobs}
        with tqdm(total=len(jobs), unit="img", desc="download", disable=not progress) as bar:
            for fut in as_completed(futures):
                outcome, reason = fut.result()
                if outcome == "skipped":
                    report.skipped += 1
                elif outcome == "downloaded":
                    report.downloaded += 1
                else:
                    report.failed.append((futures[fut].url, reason))
                    log.debug("download failed: %s: %s", futures[fut].url, reason)
                bar.update(1)
                if report.failed:
                    bar.set_postfix(failed=len(report.failed), refresh=False)
    except BaseException:
        cancel.set()  # workers stop at their next chunk and delete their temp files
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    report.seconds = time.monotonic() - t0
    log.info("download: %d fetched, %d already present, %d failed in %.1fs",
             report.downloaded, report.skipped, len(report.failed), report.seconds)
    if report.failed:
        url, reason = report.failed[0]
        log.warning("%d downloads failed; first: %s (%s)", len(report.failed), url, reason)
    return report


# ----------------------------------------------------------------------------- messages


def _frames(n: int) -> str:
    return f"{n} frame is" if n == 1 else f"{n} frames are"


def missing_message(n_missing: int, folder: Path, report: DownloadReport | None) -> str:
    """One sentence for a StageError: how many frames are missing, where, why, and the fix.

    URLs refused for their scheme (or redirected to one) need other URLs, not a network: the fix named differs.
    """
    head = f"{_frames(n_missing)} missing from {folder}"
    tail = "or fetch them with the competition's download.py into that folder."
    if report is None:
        return f"{head}; rerun 00_prepare_data.py with --download, {tail}"
    if not report.failed:
        return f"{head} (the download reported no failures); connect to the internet and rerun with --download, {tail}"
    reasons = [" ".join(r.split()).rstrip(".") for _, r in report.failed]
    other = [r for r in reasons if not r.startswith("refused")]
    if not other:
        return (f"{head} (could not download {len(reasons)}: {reasons[0]}); put http(s) URLs in the JSON's images[].coco_url, "
                f"{tail}")
    refused = len(reasons) - len(other)
    also = f", and {refused} refused: not http(s) URLs in images[].coco_url" if refused else ""
    return f"{head} (could not download {len(reasons)}: {other[0]}{also}); connect to the internet and rerun with --download, {tail}"
