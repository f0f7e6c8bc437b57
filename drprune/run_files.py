"""Where a training run's own files go: beside Composer's checkpoints, the way Composer puts them there.

The masks (`zs_s<step>.safetensors`), the mixture summary and plots and the mask report describe the
checkpoints they sit next to. Composer formats `save_folder` with the run name and rank
(`runs/{run_name}` becomes `runs/tiny-prune`), and for an object-store URI (`s3://bucket/prefix`)
keeps its checkpoints in a local temp folder and uploads them under `prefix/`. These files go the
same way: into the formatted local folder; or, for a URI, written to a local staging folder and
handed to `logger.upload_file` as `prefix/<name>`, which reaches the RemoteUploaderDownloader that
`uploader_for` adds to the run's loggers (Composer 0.32 uploads checkpoints through an uploader of
its own that the logger cannot reach). Never a local folder named `{run_name}` or `s3:`. Every file
is still written atomically (drprune.atomic), staged or not.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from composer.core import State
from composer.loggers import Logger
from composer.utils import format_name_with_dist, maybe_create_remote_uploader_downloader_from_uri, parse_uri

from drprune.errors import ConfigError

log = logging.getLogger(__name__)


class RunFiles:
    """Writes named files into a run's save_folder (local, `{run_name}`-templated, or an object store)."""

    def __init__(self, save_folder: str | None) -> None:
        self.save_folder = save_folder
        self.backend, self.bucket, self.prefix = parse_uri(save_folder) if save_folder else ("", "", "")

    @property
    def enabled(self) -> bool:
        """Whether the run has a save_folder (no files are written without one)."""
        return self.save_folder is not None

    def write(self, name: str, writer: Callable[[Path], Any], state: State, logger: Logger) -> str:
        """Write the file `name` with `writer(path)`; return where it went (a local path or a URI)."""
        assert self.save_folder is not None, "no save_folder: check `enabled` first"
        if not self.backend:
            path = Path(format_name_with_dist(self.save_folder, state.run_name)) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            writer(path)
            return str(path)
        remote = format_name_with_dist(str(PurePosixPath(self.prefix) / name) if self.prefix else name,
                                       state.run_name)
        with tempfile.TemporaryDirectory(prefix="drprune-upload-") as staging:
            path = Path(staging) / name
            writer(path)
            logger.upload_file(remote_file_name=remote, file_path=path, overwrite=True)  # copied before it returns
        return f"{self.backend}://{self.bucket}/{remote}"


def local_save_folder(save_folder: str | None, run_name: str | None) -> Path | None:
    """The local folder Composer writes checkpoints to, `{run_name}` (and rank) formatted as Composer formats
    them; None without a save_folder, for an object store, or for a template whose run name Composer picks."""
    if save_folder is None or parse_uri(save_folder)[0] or ("{" in save_folder and run_name is None):
        return None
    return Path(format_name_with_dist(save_folder, run_name or ""))


def uploader_for(save_folder: str | None, loggers: list[Any]) -> list[Any]:
    """[Composer's RemoteUploaderDownloader for the object store of a URI save_folder], unless `loggers`
    has one for that bucket already; [] for a local save_folder."""
    backend = parse_uri(save_folder)[0] if save_folder else ""
    if not backend:
        return []
    try:
        uploader = maybe_create_remote_uploader_downloader_from_uri(save_folder, loggers)
    except NotImplementedError as err:
        raise ConfigError(f"save_folder={save_folder}: Composer cannot upload to {backend}:// object stores; use "
                          "s3://, gs://, oci://, azure:// or dbfs:/, or a local folder") from err
    return [] if uploader is None else [uploader]
