"""Downloading and unpacking data set archives: resumable HTTP with a progress bar, MD5 check, safe tar.

A download goes to ``<file>.part``; a broken connection is retried from where it stopped (HTTP ``Range``)
and the file gets its final name only once its MD5 matches, so an interrupted download never leaves a
truncated archive behind under the real name. Extraction refuses links, absolute paths and ``..``.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from nws.errors import NWSError

CHUNK = 1 << 20


class DownloadError(NWSError):
    """A download that could not be completed (offline, server error, wrong checksum)."""


class OfflineError(DownloadError):
    """The server could not be reached at all."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _unreachable(reason: object) -> bool:
    """Whether a connection error means there is no route to the host (offline), not a broken transfer."""
    return isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (asking for a byte range when ``part`` is not empty)."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if start and response.status != 206:  # the server ignored the range: start over
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, "ab" if start else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=Path(PurePosixPath(url).name).name, disable=not progress, leave=False) as bar:
            while block := response.read(CHUNK):
                f.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes")


def download(url: str, dest: Path, md5: str, retries: int = 5, timeout: float = 60.0, progress: bool = True,
             backoff: float = 2.0) -> Path:
    """Download ``url`` to ``dest`` and check its MD5; returns ``dest``.

    Broken transfers are resumed up to ``retries`` times (waiting ``backoff``, doubled each time). Raises
    :class:`OfflineError` when the host cannot be reached, :class:`DownloadError` otherwise.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    wait = backoff
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout, progress)
            break
        except urllib.error.HTTPError as err:
            if err.code == 416:  # range not satisfiable: the partial file is complete or bad; check it below
                break
            if 400 <= err.code < 500:
                raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
            problem: Exception = err
        except urllib.error.URLError as err:
            if isinstance(err.reason, (socket.gaierror, ConnectionRefusedError)) or _unreachable(err.reason):
                raise OfflineError(f"cannot reach {url} ({err.reason})") from None
            problem = err
        except (ConnectionError, TimeoutError, socket.timeout, OSError) as err:
            problem = err
        if attempt == retries:
            raise DownloadError(f"download of {url} failed after {retries + 1} attempts ({problem}); run the "
                                "command again to resume it") from None
        time.sleep(wait)
        wait *= 2
    got = md5sum(part)
    if got != md5:
        part.unlink()
        raise DownloadError(f"{url} downloaded with MD5 {got}, expected {md5}; the partial file was removed, "
                            "run the command again")
    part.replace(dest)
    return dest


def safe_extract(archive: Path, dest: Path, top: str) -> Path:
    """Extract the tar ``archive`` into ``dest``; every member must be a plain file or directory under
    ``top/`` (no links, devices, absolute paths or ``..``). Returns ``dest / top``.

    Members are extracted into a temporary directory next to the target, which is renamed into place only
    when extraction is complete."""
    dest = Path(dest)
    tmp = dest / f".{top}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                path = PurePosixPath(m.name)
                if (path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] != top
                        or not (m.isfile() or m.isdir())):
                    raise NWSError(f"{archive} holds an unexpected member {m.name!r}; not extracting it")
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / top).is_dir():
            raise NWSError(f"{archive} does not hold a {top}/ directory")
        (tmp / top).replace(dest / top)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise NWSError(f"{archive} is not a readable tar archive ({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / top
