"""`cnntrain data`: list, download and verify datasets.

Exit codes: 0 done, 1 runtime error (a download failed, a file is bad or not the published
one, nothing found), 2 bad usage. NumPy and the data modules are imported inside the
commands so that `cnntrain --help` stays fast.
"""

import json
from pathlib import Path
from typing import List, Optional

import typer

data_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                       help="List, download and verify the datasets.")


def _fail(message, code):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _known(name, downloadable=False):
    from .data.datasets import REGISTRY

    names = [n for n, r in REGISTRY.items() if r.gz_md5 or not downloadable]
    if name not in names:
        what = "downloadable dataset" if downloadable else "dataset"
        _fail(f"unknown {what} {name!r}: expected one of {', '.join(names)}", 2)


def _how(check, name=None):
    """What is known of one checked file, in words."""
    if check.published_as and (name is None or check.published_as == name):
        return f"verified: sha256 of the data matches the published {check.published_as}"
    return "IDX checks passed; matches no published checksum"


@data_app.command("list")
def list_cmd(json_mode: bool = typer.Option(False, "--json", help="Print one JSON object per dataset on stdout.")):
    """Each dataset: where it was found (lookup order as for training, no download) and whether it verified."""
    from .data.datasets import REGISTRY, DataNotFound, check_folder, find_dataset_dir, offline
    from .data.idx import IDXError

    rows = []
    for name, release in REGISTRY.items():
        row = {"dataset": name, "folder": None, "status": "not found", "verified": False, "problem": None}
        try:
            folder, _ = find_dataset_dir(name)
        except DataNotFound as e:  # not raised without data.dir, but a folder can vanish
            folder, row["problem"] = None, str(e)
        if folder is not None:
            row["folder"] = str(folder)
            try:
                check_folder(folder, name)
                row["status"] = "bundled" if name == "mnist-sample" else "found"
                row["verified"] = bool(release.sha256)
            except IDXError as e:
                row["status"], row["problem"] = "bad", str(e)
        elif release.gz_md5:
            row["problem"] = ("offline: CNNTRAIN_OFFLINE is set" if offline()
                              else "downloaded on first use, or with `cnntrain data download`")
        rows.append(row)
    for row in rows:
        if json_mode:
            typer.echo(json.dumps(row))
            continue
        verified = "verified" if row["verified"] else "-"
        note = row["folder"] if row["status"] in ("found", "bundled") else row["problem"] or ""
        if row["status"] == "bad":
            note = f"{row['folder']}: {note}"
        typer.echo(f"{row['dataset']:<14} {row['status']:<9} {verified:<8} {note}")


@data_app.command("download")
def download_cmd(
    name: str = typer.Argument(..., help="mnist or fashion-mnist."),
    mirror: Optional[List[str]] = typer.Option(None, "--mirror", metavar="URL",
                                               help="A base URL to try first (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """Download NAME into the cache (only files not already there), verified by the published md5."""
    _known(name, downloadable=True)
    from .data.datasets import check_folder, download_dataset
    from .data.download import DownloadError
    from .data.idx import IDXError

    for url in mirror or []:
        if not url.startswith(("http://", "https://")):
            _fail(f"--mirror {url}: expected an http:// or https:// URL", 2)
    try:
        folder = download_dataset(name, mirrors=mirror or [], quiet=quiet)
        check_folder(folder, name)
    except DownloadError as e:
        _fail(f"{name}: {e}", 1)
    except IDXError as e:
        _fail(str(e), 1)
    typer.echo(f"{name}: verified in {folder}")


@data_app.command("verify")
def verify_cmd(target: str = typer.Argument(..., metavar="NAME|DIR",
                                            help="A dataset name (found as for training) or a folder.")):
    """Check a dataset's four IDX files: strict format checks, counts, and published checksums."""
    from .data.datasets import REGISTRY, check_folder, find_dataset_dir
    from .data.idx import IDXError

    name = target if target in REGISTRY else None
    if name is not None:
        folder, tried = find_dataset_dir(name)
        if folder is None:
            hint = f"; run `cnntrain data download {name}`" if REGISTRY[name].gz_md5 else ""
            _fail(f"{name} not found: looked in {'; '.join(tried)}{hint}", 1)
    else:
        folder = Path(target)
        if not folder.is_dir():
            _fail(f"{target}: neither a dataset ({', '.join(REGISTRY)}) nor a folder", 2)
    try:
        checks = check_folder(folder, name)
    except IDXError as e:
        _fail(str(e), 1)
    for check in checks:
        shape = "x".join(map(str, check.shape))
        typer.echo(f"{check.path}  {shape}  {_how(check, name)}")
    if name is not None:
        verified = all(c.published_as == name for c in checks)
        typer.echo(f"{name}: {'verified' if verified else 'IDX checks passed (no published checksum)'} "
                   f"in {folder}")
