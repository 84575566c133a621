"""The inputs of a curation: every file under folders, every member of tar files, every row of a list.

Curation judges a file by its content, not its name, so every file gets a row: a text file named
.jpg is dropped as not an image, a PNG named .dat is read. Entries that cannot even be listed (a
symbolic-link loop, a broken link, an unreadable folder or tar) get a row of their own with the reason.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from genfoundry.errors import GenfoundryError
from genfoundry.sources import SourceError, TAR_MEMBER, read_table, split_member, tar_members, walk


class CurateError(GenfoundryError):
    """A curation that cannot start or finish; the message says why and what to change."""


@dataclass(frozen=True)
class Item:
    """One input: `source` opens it (a path, or 'x.tar::member'), `at` is a tar member's (offset, size)."""

    source: str
    at: tuple[int, int] | None = None
    label: str | None = None   # the first folder level under a folder source, or a list's 'label'
    caption: str | None = None


@dataclass
class Listing:
    items: list[Item]
    unlisted: list[tuple[str, str, str]]  # (source, reason, message): entries that could not be listed


def display(source: str) -> str:
    """A source as valid UTF-8 (a name that is not is shown with \\x escapes), for the manifest."""
    return os.fsencode(source).decode("utf-8", "backslashreplace")


def raw(source: str) -> bytes | None:
    """The source's bytes where `display` cannot give them back exactly, else None."""
    encoded = os.fsencode(source)
    try:
        encoded.decode("utf-8")
        return None
    except UnicodeDecodeError:
        return encoded


def _is_tar(path: str) -> bool:
    return path.lower().endswith(".tar")


def _tar(path: str, label: str | None, listing: Listing) -> None:
    try:
        members = tar_members(path)
    except (OSError, tarfile.TarError) as e:
        listing.unlisted.append((path, "unreadable-archive", f"cannot list the tar: {e}"))
        return
    for name, at in sorted(members.items()):
        listing.items.append(Item(f"{path}{TAR_MEMBER}{name}", at, label))


def _folder(root: Path, listing: Listing) -> None:
    try:
        rels, left_out, _ = walk(root, every_file=True)
    except SourceError as e:
        listing.unlisted.append((str(root), "unreadable-folder", str(e)))
        return
    nested = any("/" in rel for rel in rels)
    for rel in rels:
        label = rel.split("/")[0] if nested and "/" in rel else None
        path = str(root / rel)
        if _is_tar(path):
            _tar(path, label, listing)
        else:
            listing.items.append(Item(path, None, label))
    for path, why in left_out.items():
        reason = ("symlink-loop" if "loop" in why else "broken-link" if "broken" in why else "unreadable-folder")
        listing.unlisted.append((path, reason, why))


def _table(path: Path, listing: Listing) -> None:
    try:
        rows, _ = read_table(path)
    except SourceError as e:
        raise CurateError(str(e)) from None
    base = Path(os.path.abspath(path.parent))
    for row in rows:
        value = row.get("path")
        if not value:
            listing.unlisted.append((f"{path}:row", "empty-path", "a row of the list has no path"))
            continue
        archive, member = split_member(str(value))
        file = Path(archive)
        file = str(file if file.is_absolute() else base / file)
        label = row.get("label")
        caption = row.get("caption")
        text = lambda v: None if v is None or v == "" or v != v else str(v)  # noqa: E731 (NaN from pandas)
        source = file if member is None else f"{file}{TAR_MEMBER}{member}"
        listing.items.append(Item(source, None, text(label), text(caption)))


def list_sources(sources: list[str]) -> Listing:
    """Every input of `sources` (folders, .tar files, .csv/.parquet lists), sorted and without repeats."""
    if not sources:
        raise CurateError("give at least one source: an image folder, a .tar file or a .csv/.parquet list")
    listing = Listing([], [])
    for src in sources:
        path = Path(os.path.abspath(os.path.expanduser(src)))
        if path.is_dir():
            _folder(path, listing)
        elif path.is_file() and _is_tar(str(path)):
            _tar(str(path), None, listing)
        elif path.is_file() and path.suffix.lower() in (".csv", ".parquet"):
            _table(path, listing)
        elif path.exists():
            raise CurateError(f"'{src}' is neither a folder, a .tar file nor a .csv/.parquet list of images")
        else:
            raise CurateError(f"source '{src}' does not exist")
    seen, items = set(), []
    for item in sorted(listing.items, key=lambda i: i.source):
        if item.source not in seen:
            seen.add(item.source)
            items.append(item)
    listing.items = items
    return listing
