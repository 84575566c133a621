"""The report's chart library: uPlot from the npm registry, fetched once at set-up and embedded in
every page, so a report opens offline and genfoundry never vendors it.

`python -m genfoundry.report.assets` installs it (setup.sh does); `--from FILE.tgz` installs a tarball
fetched elsewhere, for machines without a registry. The tarball is checked against the registry's
published SHA-512 before anything is unpacked.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

from genfoundry.errors import GenfoundryError

UPLOT_VERSION = "1.6.32"
UPLOT_INTEGRITY = "sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="
FILES = {"package/dist/uPlot.iife.min.js": "uPlot.iife.min.js", "package/dist/uPlot.min.css": "uPlot.min.css",
         "package/LICENSE": "LICENSE"}


class AssetError(GenfoundryError):
    """The chart library is missing, or a tarball offered for it is not the one published."""


def asset_dir() -> Path:
    """Where the library lives: $GENFOUNDRY_ASSETS, else the environment's share/genfoundry."""
    root = os.environ.get("GENFOUNDRY_ASSETS") or Path(sys.prefix) / "share" / "genfoundry"
    return Path(root) / f"uplot-{UPLOT_VERSION}"


def uplot() -> tuple[str, str]:
    """(JavaScript, CSS) of uPlot, as the page embeds them."""
    folder = asset_dir()
    try:
        return (folder / "uPlot.iife.min.js").read_text(), (folder / "uPlot.min.css").read_text()
    except OSError:
        raise AssetError(f"the report's chart library (uPlot {UPLOT_VERSION}) is not installed in {folder}: run "
                         f"`python -m genfoundry.report.assets` once (it downloads 160 KB from the npm "
                         f"registry; --from FILE.tgz installs a copy fetched elsewhere)") from None


def install(tarball: str | Path | None = None, registry: str = "https://registry.npmjs.org") -> Path:
    """Fetches (or reads) uPlot's npm tarball, checks its SHA-512, unpacks the three files it needs."""
    if tarball is None:
        url = f"{registry.rstrip('/')}/uplot/-/uplot-{UPLOT_VERSION}.tgz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as e:
            raise AssetError(f"cannot download {url}: {getattr(e, 'reason', None) or e}; on a machine without "
                             f"the registry, fetch that file elsewhere and pass --from FILE.tgz") from None
    else:
        try:
            data = Path(tarball).read_bytes()
        except OSError as e:
            raise AssetError(f"cannot read {tarball}: {e.strerror or e}") from None
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != UPLOT_INTEGRITY:
        raise AssetError(f"the tarball is not uplot {UPLOT_VERSION} as the npm registry published it "
                         f"(SHA-512 {digest[:30]}..., expected {UPLOT_INTEGRITY[:30]}...)")
    from genfoundry.checkpoint.storage import write_atomic

    folder = asset_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member, name in FILES.items():
                write_atomic(folder / name, tar.extractfile(member).read())
    except OSError as e:
        raise AssetError(f"cannot write {folder}: {e.strerror or e} (GENFOUNDRY_ASSETS=DIR puts it elsewhere)") from None
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m genfoundry.report.assets", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="tarball", metavar="FILE.tgz", help="install this tarball of uplot "
                   f"{UPLOT_VERSION} instead of downloading it")
    p.add_argument("--registry", default=os.environ.get("GENFOUNDRY_NPM_REGISTRY", "https://registry.npmjs.org"),
                   help="npm registry (or mirror) to download from (default %(default)s)")
    args = p.parse_args(argv)
    if args.tarball is None and (asset_dir() / "uPlot.iife.min.js").is_file():
        print(f"uplot {UPLOT_VERSION} is installed in {asset_dir()}")
        return
    try:
        folder = install(args.tarball, args.registry)
    except AssetError as e:
        sys.exit(f"error: {e}")
    print(f"uplot {UPLOT_VERSION} installed in {folder}")


if __name__ == "__main__":
    main()
