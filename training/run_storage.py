"""A training run's folder ``storage_path/run_name`` on a pyarrow filesystem, and its checkpoint layout.

A run folder holds ``checkpoint_NNNNNNNNN/checkpoint.pt`` (one per saved step, written by Ray Train),
``final/checkpoint.pt`` once the run finished, and the notes of ``training.progress``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs as pafs

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_DIR_PREFIX = "checkpoint_"


class RunStorage:
    """A run folder ``storage_path/run_name`` on a pyarrow filesystem (local folder, s3://, gs://, file://).

    Raises:
        ValueError: (at construction) a URI pyarrow cannot open.
    """

    def __init__(self, storage_path: str, run_name: str) -> None:
        if "://" in str(storage_path):
            try:
                self.fs, base = pafs.FileSystem.from_uri(str(storage_path))
            except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
                raise ValueError(f"storage_path {storage_path!r} cannot be opened by pyarrow.fs: {err}") from err
            self.uri_prefix = str(storage_path).split("://", 1)[0] + "://"
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(storage_path).expanduser().resolve())
            self.uri_prefix = ""
        self.storage_path, self.base, self.run_name = str(storage_path), base.rstrip("/"), run_name
        self.run_dir = f"{self.base}/{run_name}"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.run_dir, *parts])

    def uri(self, *parts: str) -> str:
        path = self.path(*parts)
        return f"{self.uri_prefix}{path}" if self.uri_prefix else path

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write via a temporary name and a move (atomic on a local disk)."""
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.tmp"
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(data)
        self.fs.move(tmp, path)

    def fetch(self, path: str) -> Path:
        """A local path of the file at ``path``: itself on a local disk, else a downloaded copy."""
        if self.is_local:
            return Path(path)
        local = Path(tempfile.mkdtemp(prefix="linernotes-ckpt-")) / Path(path).name
        local.write_bytes(self.read_bytes(path))
        return local

    def checkpoints(self) -> list[str]:
        """Paths of this run's ``checkpoint_*/checkpoint.pt`` files, oldest step first."""
        if not self.exists(self.run_dir):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.run_dir, allow_not_found=True))
        names = sorted(info.base_name for info in infos
                       if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_DIR_PREFIX))
        return [self.path(name, CHECKPOINT_FILE) for name in names if self.exists(self.path(name, CHECKPOINT_FILE))]
