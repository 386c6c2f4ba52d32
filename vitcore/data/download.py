"""Fetching a dataset archive over HTTP(S) once, for users with internet access."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from tqdm.auto import tqdm

from vitcore.atomic import commit


def is_url(spec: str) -> bool:
    return urlparse(spec).scheme in ("http", "https")


def fetch(url: str, dest_dir: str | Path, progress: bool = True) -> Path:
    """Download `url` into `dest_dir` (kept: a second call reuses it) and return the file's path.

    Written under a temporary name and renamed when complete, so an interrupted download is
    never mistaken for a finished one.
    """
    name = Path(urlparse(url).path).name or "download"
    dest = Path(dest_dir) / name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{name}.part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            # A server that closes early looks like the end of the file to urllib: check the length.
            if total is not None and out.tell() != total:
                raise OSError(f"connection closed after {out.tell()} of {total} bytes")
        commit(partial, dest)
    except OSError as e:
        raise OSError(f"could not download {url}: {e}") from None
    finally:
        partial.unlink(missing_ok=True)  # left only when the download did not complete
    return dest

