"""Record access to SFT data files (JSONL and parquet) without loading them into memory.

A data file is read twice over a run's life: once, sequentially, when the ability is declared (every record is
parsed and checked, then dropped), and then one record at a time, in random order, as training samples it.
Only an int64 *key* per record is kept between the two: the byte offset of its line in a JSONL file, its row
index in a parquet file. A 1 GB JSONL file of 1M records costs 8 MB of keys, not the gigabytes its parsed
dicts would take.

Reading a parquet record decodes its whole row group (the format's unit of compression); the reader keeps the
last one, so a sequential pass decodes each group once, while random sampling decodes a group per example:
write training files with small row groups (``pyarrow.parquet.write_table(..., row_group_size=1000)``).
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hft_lightning.data.shapes import RecordError
from hft_lightning.errors import ConfigError

SUFFIXES = (".jsonl", ".parquet")
"""File types a data path may hold; a directory contributes its files of these types, in name order."""


class JsonlFile:
    """A JSONL file: one JSON object per line, blank lines ignored; records are addressed by byte offset.

    Args:
        path: The file.
    """

    def __init__(self, path: Path):
        self.path = path

    def scan(self) -> Iterator[tuple[int, str, Any]]:
        """Every record in file order, as ``(key, location, raw)``; :meth:`parse` turns ``raw`` into the record."""
        offset = 0
        with self.path.open("rb") as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    yield offset, f"{self.path}:{number}", line.rstrip(b"\r\n")
                offset += len(line)

    @staticmethod
    def parse(raw: Any) -> Any:
        """Decodes one line.

        Raises:
            RecordError: If the line is not UTF-8 JSON.
        """
        try:
            return json.loads(raw)
        except json.JSONDecodeError as error:
            raise RecordError("", f"malformed JSON: {error.msg} at column {error.colno}") from None
        except UnicodeDecodeError as error:
            raise RecordError("", f"not UTF-8 text: {error.reason} at byte {error.start}") from None

    def read(self, key: int) -> Any:
        """The record whose line starts at byte ``key``."""
        with self.path.open("rb") as file:
            file.seek(key)
            return json.loads(file.readline())


class ParquetFile:
    """A parquet file: one record per row (nested columns become lists and dicts); records are addressed by row.

    Args:
        path: The file.
    """

    def __init__(self, path: Path):
        import pyarrow.parquet as pq  # imported here: only parquet users pay for pyarrow

        self.path = path
        self._file = pq.ParquetFile(path)
        metadata = self._file.metadata
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        self._group_starts = [0, *itertools.accumulate(sizes)]
        self._cached: tuple[int, list[dict[str, Any]]] = (-1, [])

    def scan(self) -> Iterator[tuple[int, str, Any]]:
        """Every record in row order, as ``(key, location, raw)``; ``location`` names the 0-based row."""
        for group in range(len(self._group_starts) - 1):
            for row, record in enumerate(self._rows(group), start=self._group_starts[group]):
                yield row, f"{self.path}: row {row}", record

    @staticmethod
    def parse(raw: Any) -> Any:
        """Rows are already decoded."""
        return raw

    def read(self, key: int) -> Any:
        """The record in row ``key``."""
        group = bisect.bisect_right(self._group_starts, key) - 1
        return self._rows(group)[key - self._group_starts[group]]

    def _rows(self, group: int) -> list[dict[str, Any]]:
        if self._cached[0] != group:
            self._cached = (group, self._file.read_row_group(group).to_pylist())
        return self._cached[1]

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers receive a copy: reopen the file there rather than pickling pyarrow's handle.
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])


DataFile = JsonlFile | ParquetFile


def open_data_files(path: str, field: str) -> list[DataFile]:
    """The data files at ``path``: the file itself, or the JSONL and parquet files of a directory.

    Args:
        path: A ``.jsonl`` or ``.parquet`` file, or a directory holding such files (not its subdirectories).
        field: The configuration field that named ``path``, for error messages.

    Raises:
        ConfigError: If the path does not exist, is a file of another type, is a directory with no data file, or
            is a parquet file pyarrow cannot open.
    """
    location = Path(path)
    if location.is_dir():
        files = sorted(p for p in location.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"{field}: directory {path} holds no {' or '.join(SUFFIXES)} file")
    elif location.is_file():
        if location.suffix not in SUFFIXES:
            raise ConfigError(f"{field}: {path} is not a data file; expected a {' or '.join(SUFFIXES)} file")
        files = [location]
    else:
        raise ConfigError(f"{field}: {path} does not exist")
    return [_open(file, field) for file in files]


def _open(path: Path, field: str) -> DataFile:
    if path.suffix == ".jsonl":
        return JsonlFile(path)
    try:
        return ParquetFile(path)
    except (OSError, ValueError) as error:  # a missing footer is pyarrow.ArrowInvalid, a ValueError
        raise ConfigError(f"{field}: {path} is not a readable parquet file ({error})") from None
