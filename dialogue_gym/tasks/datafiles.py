"""Loading dataset rows for the dataset-backed tasks (UltraInteract, Anthropic HH) from local copies or the hub.

Local copies may be a single file (``.parquet``, ``.jsonl`` / ``.json``, ``.arrow``, optionally ``.gz``-compressed
JSON lines) or a directory: a ``save_to_disk`` folder, or a hub snapshot (``hf download ID --repo-type dataset
--local-dir DIR``) that the ``datasets`` library reads as a data folder. The hub is used only when a hub id is set
explicitly (the Hydra env configs name theirs); nothing here touches the network otherwise.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dialogue_gym.conversation import DialogueError

_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".gz": "json", ".csv": "csv"}


def hub_offline() -> bool:
    """Whether the environment asks for offline mode (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set truthy)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def missing_data_error(dataset: str, env_name: str, example_path: str, reason: str,
                       hub_hint: bool = True) -> DialogueError:
    """The error raised when a dataset-backed task has no data: what is missing and exactly how to provide it."""
    hub = (f" To load from the hub instead (needs network or a copy in the datasets cache), set "
           f"env.task_kwargs.hub_id={dataset}.") if hub_hint else ""
    return DialogueError(
        f"task {env_name!r} needs the dataset {dataset}, but {reason}. Point it at a local copy, e.g. "
        f"`+env={env_name} env.task_kwargs.path={example_path}` (or task_kwargs={{'path': ...}} in Python); "
        f"get one where there is network with `hf download {dataset} --repo-type dataset --local-dir DIR` and "
        f"pass DIR (or one of its data files).{hub}"
    )


def load_records(path: str | os.PathLike | None, hub_id: str | None, *, dataset: str, env_name: str,
                 example_path: str, source_split: str = "train",
                 columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a dataset as plain dicts, from a local copy (``path``) or, when set explicitly, the hub.

    Args:
        path: a local file or directory, or None.
        hub_id: a hub dataset id, used only when ``path`` is None.
        dataset: the dataset's usual hub id (for error messages).
        env_name: the task's config name (for error messages).
        example_path: an example local path shown in error messages.
        source_split: which split of the source to read when it has several.
        columns: read only these columns (those present; fewer columns load much faster); None reads all.

    Raises:
        DialogueError: no path and no hub id, a path that does not exist or cannot be read, a missing split,
            or a hub load that failed (offline, unknown id); the message says how to provide the data.
    """
    if path is not None:
        ds = _load_local(Path(os.fspath(path)).expanduser(), dataset, env_name, example_path, source_split)
        return _as_records(ds, columns)
    if not hub_id:
        raise missing_data_error(dataset, env_name, example_path, "no local copy was given (path is None)")
    if not isinstance(hub_id, str):
        raise DialogueError(f"task_kwargs.hub_id must be a string (a hub dataset id), got {type(hub_id).__name__}")
    from datasets import load_dataset

    try:
        ds = load_dataset(hub_id, split=source_split)
    except Exception as e:  # offline, unknown id, missing split: all reported the same way
        where = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if hub_offline() else "loading failed"
        first = str(e).splitlines()[0] if str(e) else ""
        raise missing_data_error(
            dataset, env_name, example_path,
            f"hub_id={hub_id!r} could not be loaded ({where}: {type(e).__name__}: {first[:300]})", hub_hint=False,
        ) from None
    return _as_records(ds, columns)


def _as_records(ds: Any, columns: Sequence[str] | None) -> list[dict[str, Any]]:
    """Plain-dict rows of a ``datasets.Dataset``, read column-wise in batches (much faster than row by row)."""
    if columns is not None:
        keep = [c for c in columns if c in ds.column_names]
        if keep:
            ds = ds.select_columns(keep)
    records: list[dict[str, Any]] = []
    for batch in ds.iter(batch_size=4096):
        keys = list(batch)
        if keys:
            records.extend({k: batch[k][i] for k in keys} for i in range(len(batch[keys[0]])))
    return records


def _load_local(path: Path, dataset: str, env_name: str, example_path: str,
                source_split: str) -> Any:
    import datasets

    if not path.exists():
        raise missing_data_error(dataset, env_name, example_path, f"task_kwargs.path {str(path)!r} does not exist",
                                 hub_hint=False)
    try:
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset(str(path))
        elif path.suffix == ".arrow":
            loaded = datasets.Dataset.from_file(str(path))
        else:
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DialogueError(
                    f"task_kwargs.path {str(path)!r} has an unknown file type {path.suffix!r}; allowed: "
                    f"{', '.join(sorted(_FILE_BUILDERS))}, .arrow, or a directory"
                )
            loaded = datasets.load_dataset(builder, data_files={source_split: str(path)})
    except DialogueError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DialogueError(f"could not read {dataset} from task_kwargs.path {str(path)!r}: "
                            f"{type(e).__name__}: {first[:300]}") from None
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if source_split not in loaded:
            raise DialogueError(f"{str(path)!r} has splits {sorted(loaded)}; task_kwargs.source_split is "
                                f"{source_split!r}; choose one of those")
        loaded = loaded[source_split]
    return loaded


def stable_hash(text: str) -> int:
    """A 64-bit hash of a string that is the same on every machine and run (unlike Python's ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def in_test_split(key: str, test_fraction: float) -> bool:
    """Whether the item with this key belongs to the test split (deterministic, by hash)."""
    return stable_hash(key) % 1_000_000 < round(test_fraction * 1_000_000)


def check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DialogueError(f"task_kwargs.{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def check_optional_positive(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DialogueError(f"task_kwargs.{name} must be a positive integer or null, got {value!r}")
    return value


def check_strict(value: Any) -> bool:
    if not isinstance(value, bool):
        raise DialogueError(f"task_kwargs.strict must be true or false, got {value!r}")
    return value


class InvalidRows:
    """Collects dataset rows that do not follow the schema, so one bad row of 219k does not block the task.

    ``add`` re-raises at once when ``strict``; ``finish`` warns once (the count and the first error) when some
    rows were skipped, and raises when no row at all was valid.
    """

    def __init__(self, env_name: str, strict: bool):
        self.env_name, self.strict = env_name, strict
        self.count = 0
        self.first = ""

    def add(self, error: DialogueError) -> None:
        if self.strict:
            raise error
        self.count += 1
        self.first = self.first or str(error)

    def finish(self, total: int) -> None:
        if not self.count:
            return
        if self.count == total:
            raise DialogueError(f"task {self.env_name!r}: none of the {total} row(s) of the dataset is valid; the "
                                f"first error: {self.first}")
        warnings.warn(f"task {self.env_name!r}: skipped {self.count} malformed row(s) of {total}; the first: "
                      f"{self.first} (set task_kwargs.strict=true to stop at the first malformed row)",
                      UserWarning, stacklevel=3)
