"""Fetching a weights file from a URL into the cache, and the hash check of files named like torchvision's.

A download goes to a temporary file beside its destination and is renamed only once complete (the length
the server announced) and verified: a partial download never looks complete, and a second use finds the
file and needs no network. A file named ``name-<8 or more hex digits>.pth`` (torchvision's, torch.hub's
convention) must have a SHA-256 that starts with those digits, whether it comes from a URL or a local path.
Under ``torch.distributed`` the first process of each machine downloads while the others wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from ssd.data.filecache import cache_dir

log = logging.getLogger("ssd.weights")

URL_SCHEMES = ("http://", "https://", "file://")
HASH_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")  # torchvision's vgg16-397923af.pth
CHUNK = 1 << 20


class DownloadError(ValueError):
    """A weights file that could not be fetched or failed its hash check; the message is one line."""


def is_url(spec: str | os.PathLike) -> bool:
    return str(spec).startswith(URL_SCHEMES)


def weights_cache() -> Path:
    """Where downloaded and converted weights live: ``$SSD_CACHE_DIR/weights`` (``~/.cache/ssd/weights``)."""
    return cache_dir() / "weights"


def expected_hash(name: str) -> str | None:
    """The SHA-256 prefix a file name promises (``vgg16-397923af.pth`` -> ``397923af``), or None."""
    match = HASH_NAME.search(name)
    return match.group(1) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hash(path: Path, name: str | None = None, source: str | None = None) -> None:
    """Raise :class:`DownloadError` when ``path`` (named ``name``) is not what its name's hash prefix says."""
    want = expected_hash(name or path.name)
    if want is None:
        return
    got = sha256_of(path)
    if not got.startswith(want):
        raise DownloadError(
            f"{source or path}: SHA-256 starts with {got[: len(want)]}, but the file name promises {want} "
            "(a corrupt or different file); nothing was cached"
        )


def url_file_name(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not name:
        raise DownloadError(f"{url}: the URL names no file")
    return name


def fetch_url(url: str, manual: str = "") -> Path:
    """The cached copy of ``url`` (``weights_cache()/downloads/<file name>``), downloaded and verified once.
    ``manual`` ends the unreachable-URL message with what to do instead."""
    dest = weights_cache() / "downloads" / url_file_name(url)
    with first_process_per_machine():
        if not dest.is_file():
            download(url, dest, manual)
    return dest


def download(url: str, dest: Path, manual: str = "") -> None:
    """``url`` -> ``dest`` through ``dest.<pid>.part``: renamed only when complete and verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            log.info("downloading %s to %s%s", url, dest, f" ({total / 2**20:.1f} MiB)" if total else "")
            received = copy_with_progress(response.read, part, total, dest.name)
        if total is not None and received != total:
            raise DownloadError(f"{url}: the download ended after {received} of {total} bytes; nothing was cached")
        check_hash(part, dest.name, url)
        os.replace(part, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        hint = f"; {manual}" if manual else f"; download it elsewhere and pass the local file ({dest} is the cache)"
        raise DownloadError(f"cannot download {url} ({reason}){hint}") from None
    finally:
        part.unlink(missing_ok=True)


def copy_with_progress(read: Callable[[int], bytes], path: Path, total: int | None, label: str) -> int:
    """Write the chunks of ``read`` to ``path`` with a progress bar (on a terminal); the bytes written."""
    from tqdm import tqdm

    received = 0
    with open(path, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=label,
                                     disable=not sys.stderr.isatty()) as bar:  # fmt: skip
        for block in iter(lambda: read(CHUNK), b""):
            f.write(block)
            received += len(block)
            bar.update(len(block))
    return received


@contextlib.contextmanager
def first_process_per_machine() -> Iterator[None]:
    """The body runs on each machine's first process (``LOCAL_RANK`` 0) first, then on the others, which
    then find its files; without a process group, every process runs it (a temporary file each)."""
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if group and not first:
        dist.barrier()
    try:
        yield
    finally:
        if group and first:
            dist.barrier()
