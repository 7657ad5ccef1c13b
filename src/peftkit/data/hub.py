"""Examples from a data set on the Hugging Face Hub, by name (``data.hub``).

``data.hub`` names the data set the way the Hub does, plus an optional config:

- ``name`` or ``owner/name``: the data set (its only config, or the one it marks as default);
- ``name:config`` or ``owner/name:config``: with a config, always unambiguous;
- ``owner/name/config``: the same, since a Hub repository id has at most one slash;
- ``a/b``: two readings, tried in this order: the data set ``a/b``, then the data set ``a`` with the
  config ``b`` (so both ``stanfordnlp/sst2`` and ``glue/sst2`` work). The first that exists, in the
  local cache or on the Hub, is used and recorded; ``a:b`` forces the second reading.

A copy in the local ``datasets`` cache (``HF_DATASETS_CACHE``, by default
``~/.cache/huggingface/datasets``) is read from there without any network call, so a run reads the
same revision every time on one machine. Otherwise the Hub is probed once with a short timeout before
``datasets`` is asked to download: without a network ``datasets`` retries name lookups for about 20
seconds before giving up, and a firewall that drops packets makes it wait far longer.

:func:`read_hub` returns raw rows (each a dict of the Hub's columns); mapping columns to a task's
roles is the caller's job, done the same way as for local files.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import files as _files  # the module, not its names: files.py may import this module in turn
from .config import SPLITS, DataConfig

# Long enough for a TLS handshake on a slow link, short enough that a machine without a network
# learns it in seconds (a missing DNS answer fails at once; only dropped packets wait this long).
PROBE_TIMEOUT_S = 5.0
# The Hub's repository-name rule: letters, digits, ".", "_", "-"; no "--" or ".."; at most 96 characters.
_SEGMENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?")
_CONFIG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_SPLIT = re.compile(r"\w+(\.\w+)*")  # the split names ``datasets`` accepts
_SYNTAX = "'name', 'owner/name', 'name:config', 'owner/name:config' or 'owner/name/config'"
_FIXES = (
    "connect to the network once (offline mode off) so datasets can download it, set HF_DATASETS_CACHE "
    "to a folder that holds it, or export it to a CSV / JSONL / Parquet file and use data.files"
)


def readings(hub: str) -> list[tuple[str, str | None]]:
    """The (repository, config) pairs ``hub`` can mean, in the order they are tried.

    ``hub`` must be well formed (:func:`config_problems` finds none); config None means the data
    set's only or default config.
    """
    if ":" in hub:
        repo, config = hub.split(":")
        return [(repo, config)]
    parts = hub.split("/")
    if len(parts) == 3:
        return [("/".join(parts[:2]), parts[2])]
    if len(parts) == 2:
        return [(hub, None), (parts[0], parts[1])]
    return [(hub, None)]


def config_problems(data: DataConfig) -> list[str]:
    """What is wrong with ``data.hub`` and ``data.hub_splits``, found without any network."""
    if data.hub is None:
        return []
    problems = _name_problems(data.hub)
    hub_splits = data.hub_splits if isinstance(data.hub_splits, dict) else {}
    if not isinstance(data.hub_splits, dict):
        problems.append(
            f"data.hub_splits: expected a mapping such as {{validation: dev}}, got {data.hub_splits!r}"
        )
    for key, value in hub_splits.items():
        if key not in SPLITS:
            problems.append(
                f"data.hub_splits.{key}: expected one of {', '.join(SPLITS)} as the key "
                "(the peftkit split the Hub split feeds)"
            )
        elif not isinstance(value, str) or not _SPLIT.fullmatch(value):
            hint = (
                "; split slices are not read here, use data.max_train_examples / data.max_eval_examples"
                if isinstance(value, str) and "[" in value
                else ""
            )
            problems.append(
                f"data.hub_splits.{key}: expected the name of a split of the Hub data set, such as "
                f"'train', 'dev' or 'validation_matched', got {value!r}{hint}"
            )
    shared: dict[str, list[str]] = {}
    for key, value in hub_splits.items():
        if key in SPLITS and isinstance(value, str):
            shared.setdefault(value, []).append(key)
    for value, keys in shared.items():
        if len(keys) > 1:
            # choosing on validation and reporting on the same rows as test overstates the result
            problems.append(
                f"data.hub_splits: {' and '.join(keys)} both read the Hub split {value!r}; keep one "
                "(a peftkit split with no Hub split is cut from the train split with data.split)"
            )
    return problems


def _name_problems(hub: Any) -> list[str]:
    if not isinstance(hub, str):
        return [f"data.hub: expected a Hub data set name ({_SYNTAX}), got {hub!r}"]
    if hub != hub.strip() or any(c.isspace() for c in hub) or not hub:
        return [f"data.hub: expected {_SYNTAX} without spaces, got {hub!r}"]
    url = re.match(r"(?:https?://[^/]+/datasets/|hf://datasets/)(.+)", hub)
    if url:
        return [
            f"data.hub: give the data set's name, not a URL: {url.group(1).split('@')[0].rstrip('/')!r} "
            f"instead of {hub!r}"
        ]
    if "://" in hub:
        return [f"data.hub: expected a Hub data set name ({_SYNTAX}), got the URL {hub!r}"]
    if hub.startswith(("/", ".", "~")) or "\\" in hub:
        return [
            f"data.hub: {hub!r} looks like a local path; local files go in data.files (CSV / JSONL / Parquet)"
        ]
    repo, _, config = hub.partition(":")
    if ":" in config or (":" in hub and not config):
        return [f"data.hub: expected {_SYNTAX}, got {hub!r} (one ':' before the config name)"]
    parts = repo.split("/")
    if len(parts) > (2 if ":" in hub else 3):
        return [f"data.hub: expected {_SYNTAX}, got {hub!r} (a Hub data set is 'name' or 'owner/name')"]
    if ":" not in hub and len(parts) == 3:
        repo, config = "/".join(parts[:2]), parts[2]
        parts = parts[:2]
    bad = [p for p in parts if not _SEGMENT.fullmatch(p) or "--" in p or ".." in p]
    if bad:
        return [
            f"data.hub: {bad[0]!r} in {hub!r} is not a Hub name (letters, digits, '.', '_' and '-', "
            "not starting or ending with '.' or '-', no '--' or '..', at most 96 characters)"
        ]
    if config and not _CONFIG.fullmatch(config):
        return [f"data.hub: {config!r} in {hub!r} is not a config name (letters, digits, '.', '_', '+', '-')"]
    return []


def read_hub(data: DataConfig) -> tuple[list[str], dict[str, list[dict]], dict[str, Any]]:
    """Column names, raw rows per split and provenance of the Hub data set ``data.hub``.

    Hub splits feed peftkit's splits through ``data.hub_splits`` (default: the split of the same
    name, unless another key already reads it). A validation or test split the data set lacks is
    cut from its train split with the seeded ``data.split`` fractions, as for one local file. Every
    split is shuffled with ``data.split.seed`` (Hub splits are often sorted, e.g. by label), and
    ``data.max_train_examples`` / ``data.max_eval_examples`` keep the first rows after that shuffle
    before they are turned into Python dicts, so taking the first N again changes nothing.

    Args:
        data: The run's ``data`` section; reads ``hub``, ``hub_splits``, ``split`` and the limits.

    Returns:
        The columns every used split has; ``{"train": [...], "validation": [...], "test": [...]}`` of
        rows keyed by column (a split may be empty); and an info dict: source, name, config, revision
        (the Hub commit), where it was read from, the Hub splits used and their sizes and
        fingerprints, ``class_names`` of label columns, the seed, and the fractions of any cut split.

    Raises:
        ConfigError: ``data.hub`` is malformed; the data set is neither in the local cache nor
            reachable (no network, or the Hub did not answer); the Hub has no such data set, config or
            split (the message lists the available ones when ``datasets`` tells them).
    """
    problems = config_problems(data)
    if problems:
        raise ConfigError(problems, what="data config")
    assert data.hub is not None  # config_problems returns nothing only for a set name
    cache = cache_dir()
    with _files._quiet_datasets():
        found = _from_cache(data.hub, cache)
        if found is None:
            found = _from_hub(data.hub, cache)
    dataset, repo, config, revision, origin = found
    return _take_splits(
        data,
        dataset,
        repo,
        {
            "source": "hub",
            "hub": data.hub,
            "name": repo,
            "config": config,
            "revision": revision,
            "loaded_from": origin,
            "cache_dir": str(cache),
        },
    )


def cache_dir() -> Path:
    """The ``datasets`` cache: ``HF_DATASETS_CACHE`` as set now, else the one ``datasets`` started with."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE).expanduser()


def cached_configs(cache: Path, repo: str) -> list[str]:
    """The configs of ``repo`` held in ``cache`` (its folders ``<owner>___<name>/<config>/<version>/<revision>``)."""
    from datasets.naming import camelcase_to_snakecase

    *owner, name = repo.split("/")
    root = cache / "___".join([*owner, camelcase_to_snakecase(name)])
    configs = set()
    for info_file in root.glob("*/*/*/dataset_info.json"):
        folder = info_file.parent
        if folder.name.endswith(".incomplete"):  # an interrupted download
            continue
        try:
            config_name = json.loads(info_file.read_text(encoding="utf-8")).get("config_name")
        except (OSError, ValueError):
            continue
        # datasets reloads a folder only when it is named after the config (no extra build options)
        if config_name == folder.parts[-3]:
            configs.add(config_name)
    return sorted(configs)


def _from_cache(hub: str, cache: Path) -> tuple[Any, str, str, str, str] | None:
    """The data set from the local cache without any network call, or None when it is not there."""
    for repo, config in readings(hub):
        configs = cached_configs(cache, repo)
        if config is None and len(configs) > 1:
            raise ConfigError(
                [
                    f"data.hub: {repo!r} has several configs in the cache at {cache} "
                    f"({', '.join(configs)}); name one, e.g. '{repo}:{configs[0]}'"
                ],
                what="data config",
            )
        if configs and (config is None or config in configs):
            from datasets.packaged_modules.cache.cache import Cache

            # the builder load_dataset itself uses offline: it reads the newest cached revision
            builder = Cache(
                cache_dir=str(cache),
                repo_id=repo,
                dataset_name=repo.split("/")[-1],
                config_name=config,
                version="auto",
                hash="auto",
            )
            builder.download_and_prepare()
            return builder.as_dataset(), repo, builder.config.name, str(builder.hash), "cache"
    return None


def _from_hub(hub: str, cache: Path) -> tuple[Any, str, str, str, str]:
    """The data set downloaded from the Hub into ``cache``, after one quick check that the Hub answers."""
    from datasets import load_dataset_builder
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.utils import httpx

    options = readings(hub)
    offline = offline_reason()
    if offline is not None:
        raise ConfigError([_not_cached(hub, options, cache, offline)], what="data config")
    not_found = []
    for repo, config in options:
        try:
            builder = load_dataset_builder(repo, config, cache_dir=str(cache))
            builder.download_and_prepare()
            return builder.as_dataset(), repo, builder.config.name, str(builder.hash), "hub"
        except DatasetNotFoundError as exc:
            not_found.append(f"{_reading(repo, config)}: {exc}")
        except ValueError as exc:  # an unknown or missing config: datasets lists the available ones
            if "config" not in str(exc).lower():
                raise
            message = " ".join(str(exc).split()).replace("Example of usage: ", "e.g. ")
            raise ConfigError(
                [
                    f"data.hub: {_reading(repo, config)}: {message}; a config goes after a colon, "
                    f"e.g. '{repo}:<config>'"
                ],
                what="data config",
            ) from None
        except (ConnectionError, httpx.TransportError) as exc:
            reason = f"the Hub did not answer ({type(exc).__name__}: {exc})"
            raise ConfigError([_not_cached(hub, options, cache, reason)], what="data config") from None
    raise ConfigError(
        [
            f"data.hub: no Hub data set matches {hub!r} ({'; '.join(not_found)}); check the name on "
            "https://huggingface.co/datasets, and for a gated or private data set log in (hf auth login or HF_TOKEN)"
        ],
        what="data config",
    )


def offline_reason() -> str | None:
    """Why the Hub cannot be used now (offline mode, or no answer to one quick request), or None."""
    import datasets.config

    flags = [
        v
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
    ]
    if flags or datasets.config.HF_HUB_OFFLINE:
        return f"offline mode is on ({' / '.join(flags) or 'HF_HUB_OFFLINE'})"
    from huggingface_hub.utils import get_session

    endpoint = datasets.config.HF_ENDPOINT
    try:
        # the Hub's own HTTP session, so its proxy and certificate settings apply
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to get an answer means the same: no usable Hub
        return (
            f"there is no network: {endpoint} gave no answer within {PROBE_TIMEOUT_S:g} s "
            f"({type(exc).__name__}: {exc})"
        )
    return None


def _not_cached(hub: str, options: list[tuple[str, str | None]], cache: Path, reason: str) -> str:
    held = [
        f"{repo} has {', '.join(configs)}" for repo, _ in options if (configs := cached_configs(cache, repo))
    ]
    also = f" (the cache holds other configs: {'; '.join(held)})" if held else ""
    sets = " or ".join(_reading(repo, config) for repo, config in options)
    return (
        f"data.hub: {sets} is not in the local datasets cache at {cache}{also}, and {reason}; fix: {_FIXES}"
    )


def _reading(repo: str, config: str | None) -> str:
    return f"data set {repo!r}" + (f" with config {config!r}" if config else "")


def _take_splits(
    data: DataConfig, dataset: Any, repo: str, info: dict[str, Any]
) -> tuple[list[str], dict[str, list[dict]], dict[str, Any]]:
    """Map Hub splits to peftkit's, cut the missing ones from train, shuffle, limit, and turn into rows."""
    available = list(dataset)
    explicit = dict(data.hub_splits)
    unknown = [
        f"data.hub_splits.{key}: {repo!r} ({info['config']}) has no split {name!r}; its splits: "
        f"{', '.join(available)}"
        for key, name in explicit.items()
        if name not in available
    ]
    if unknown:
        raise ConfigError(unknown, what="data config")
    used = set(explicit.values())
    source = {s: explicit.get(s, s if s in available and s not in used else None) for s in SPLITS}
    if source["train"] is None:
        why = (
            "its split 'train' already feeds another split"
            if "train" in available
            else "it has no split 'train'"
        )
        raise ConfigError(
            [
                f"data.hub_splits.train: nothing to train on: {repo!r} ({info['config']}) has the splits "
                f"{', '.join(available)}, and {why}; set data.hub_splits.train to the one to train on"
            ],
            what="data config",
        )
    seed = data.split.seed
    missing = [s for s in ("validation", "test") if source[s] is None]
    fractions = {s: getattr(data.split, s) if s in missing else 0.0 for s in ("validation", "test")}
    # split_rows on row numbers makes the same cut split_rows on the rows would, without copying them
    cut = _files.split_rows(
        list(range(dataset[source["train"]].num_rows)), fractions["validation"], fractions["test"], seed
    )
    order: dict[str, tuple[str, list[int]]] = {"train": (source["train"], cut["train"])}
    for split in ("validation", "test"):
        if split in missing:
            order[split] = (source["train"], cut[split])
        else:
            numbers = list(range(dataset[source[split]].num_rows))
            random.Random(seed).shuffle(numbers)
            order[split] = (source[split], numbers)
    limits = {
        "train": data.max_train_examples,
        "validation": data.max_eval_examples,
        "test": data.max_eval_examples,
    }
    rows = {
        split: dataset[name].select(numbers[: limits[split]]).to_list()
        for split, (name, numbers) in order.items()
    }
    used_splits = [dataset[name] for name in dict.fromkeys(name for name, _ in order.values())]
    columns = [c for c in used_splits[0].column_names if all(c in d.column_names for d in used_splits)]
    info.update(
        {
            "hub_splits": {s: source[s] for s in SPLITS if source[s] is not None},
            "hub_split_rows": {name: dataset[name].num_rows for name in available},
            "fingerprints": {name: getattr(dataset[name], "_fingerprint", None) for name in available},
            "class_names": {c: f.names for c, f in used_splits[0].features.items() if hasattr(f, "names")},
            "seed": seed,
        }
    )
    if missing:
        info["cut_from_train"] = missing
        info["fractions"] = {s: fractions[s] for s in missing}
    return columns, rows, info
