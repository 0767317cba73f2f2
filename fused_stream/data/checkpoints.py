"""Where a model comes from: a preset, a local checkpoint, or a checkpoint resolved exactly as moshi resolves it.

A model spec (the CLI's `--model [LABEL=]SPEC`, `load_model(spec)`) is one of:

    tiny | small | moshi-7b                     a preset with seeded random weights (`data.models`)
    PATH                                        a local .safetensors file, or a folder with config.json
    hf:ORG/NAME[@REVISION][,KEY=VALUE ...]      `moshi.models.loaders.CheckpointInfo.from_hf_repo(ORG/NAME, ...)`

The keys of the `hf:` form are moshi's own flags (`python -m moshi.server`), with the same meaning: `moshi=`
(--moshi-weight), `mimi=` (--mimi-weight), `tokenizer=` (--tokenizer), `config=` (--config-path), `lora=`
(--lora-weight), each a local path or `hf://ORG/NAME/FILE`, and `fuse_lora=false` (--no-fuse-lora; LoRA is fused by
default). A moshi-finetune LoRA run is `hf:kyutai/moshiko-pytorch-bf16,lora=RUN/consolidated/lora.safetensors,
config=RUN/consolidated/config.json`; a full fine-tune is `moshi=RUN/consolidated/consolidated.safetensors,config=...`.

Resolution is moshi's (`hf://` references, legacy repositories without config.json, LoRA, full fine-tunes); this
module adds what an evaluator needs around it, each failure one line (`CheckpointError`, a ValueError):
- a file the Hugging Face hub or its cache cannot give (offline, `HF_HUB_OFFLINE=1`, gated, misspelt) names the
  repository, the file and the command that fetches it;
- moshi reads a repository whose config.json it cannot get as a legacy Moshi 7B. Offline that is only true when
  the cache recorded that the hub has no config.json; otherwise the config is merely not cached, and the model
  would be built with the wrong architecture: refused;
- without `HF_HUB_OFFLINE=1` and without network, the hub library retries every file for about a minute: the hub
  is probed first (a connection within `HUB_PROBE_SECONDS`), and an unreachable hub stops at once, saying to set
  `HF_HUB_OFFLINE=1` when the cache holds the repository, or how to fetch it when it does not;
- a config with `lora: true` and no LoRA weights (moshi would run the base model with zero adapters), LoRA weights
  for a config without `lora: true` (moshi's bare assertion), and local files that do not exist are refused
  before any weight is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import huggingface_hub
from huggingface_hub import errors as hub_errors
from moshi.models import loaders

from ..errors import FusedStreamError, one_line

__all__ = ["HUB_PREFIX", "CheckpointError", "HubCheckpoint", "ResolvedHub", "is_hub_spec"]

HUB_PREFIX = "hf:"
# The keys of the hf: form -> HubCheckpoint's fields (moshi's flag names without the dashes).
HUB_KEYS = {"moshi": "moshi_weight", "mimi": "mimi_weight", "tokenizer": "tokenizer", "config": "config_path",
            "lora": "lora_weight", "fuse_lora": "fuse_lora"}


HUB_PROBE_SECONDS = 3.0  # a hub that does not accept a connection this fast is taken as unreachable
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")  # the hub may be reachable only through one


class CheckpointError(FusedStreamError, ValueError):
    """A model checkpoint that cannot be resolved or does not go together; one line naming what and where."""


def is_hub_spec(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX)


@dataclass(frozen=True)
class HubCheckpoint:
    """A model as `python -m moshi.server` takes it: a Hugging Face repository and moshi's per-file overrides."""

    repo: str = loaders.DEFAULT_REPO
    revision: str | None = None
    moshi_weight: str | None = None
    mimi_weight: str | None = None
    tokenizer: str | None = None
    config_path: str | None = None
    lora_weight: str | None = None
    fuse_lora: bool = True

    def __post_init__(self) -> None:
        parts = self.repo.split("/")
        if len(parts) != 2 or not all(parts) or any(c in self.repo for c in ",=@ "):
            raise CheckpointError(f"{self.repo!r} is not a Hugging Face repository name (ORG/NAME)")

    @classmethod
    def parse(cls, spec: str) -> HubCheckpoint:
        """`hf:ORG/NAME[@REV][,key=value...]` (see the module docstring)."""
        if not is_hub_spec(spec):
            raise CheckpointError(f"{spec!r} does not start with {HUB_PREFIX}")
        head, *options = spec.removeprefix(HUB_PREFIX).split(",")
        repo, _, revision = head.partition("@")
        values: dict[str, Any] = {"repo": repo, "revision": revision or None}
        for option in options:
            key, eq, value = option.partition("=")
            key = key.strip()
            if not eq or key not in HUB_KEYS or not value:
                raise CheckpointError(f"model spec {spec!r}: {option!r} is not KEY=VALUE with KEY one of "
                                      f"{', '.join(HUB_KEYS)}")
            field = HUB_KEYS[key]
            if field in values:
                raise CheckpointError(f"model spec {spec!r}: {key}= is given twice")
            if field == "fuse_lora":
                if value.lower() not in ("true", "false"):
                    raise CheckpointError(f"model spec {spec!r}: fuse_lora must be true or false, got {value!r}")
                values[field] = value.lower() == "true"
            else:
                values[field] = value
        return cls(**values)

    def spec(self) -> str:
        """The canonical `hf:` spelling: `HubCheckpoint.parse(c.spec()) == c`."""
        head = HUB_PREFIX + self.repo + (f"@{self.revision}" if self.revision else "")
        options = [f"{key}={getattr(self, name)}" for key, name in HUB_KEYS.items()
                   if name != "fuse_lora" and getattr(self, name) is not None]
        if not self.fuse_lora:
            options.append("fuse_lora=false")
        return ",".join([head, *options])

    def label(self) -> str:
        """The default label of this model in reports: the repository's name (+ "-lora" with adapters)."""
        return self.repo.split("/")[1] + ("-lora" if self.lora_weight else "")

    def with_overrides(self, **overrides: Any) -> HubCheckpoint:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def resolve(self) -> ResolvedHub:
        """moshi's resolution of this checkpoint (downloads what the cache lacks, unless offline); CheckpointError
        naming the repository and file when the hub or its cache cannot give it."""
        for name in ("moshi_weight", "mimi_weight", "tokenizer", "config_path", "lora_weight"):
            value = getattr(self, name)
            if value is not None and not value.startswith("hf://") and not Path(value.removeprefix("file://")).is_file():
                raise CheckpointError(f"{self._what(name)} {value} is not a file")
        self._check_reachable()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                info = loaders.CheckpointInfo.from_hf_repo(
                    self.repo, self.moshi_weight, self.mimi_weight, self.tokenizer, config_path=self.config_path,
                    lora_weights=self.lora_weight, revision=self.revision)
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{self.spec()}: its config.json is not JSON ({exc})") from None
            except Exception as exc:  # noqa: BLE001 - the hub's many errors, each made one line below
                if any(_assumed_legacy(w) for w in caught):  # the legacy file names failed: config.json is the news
                    self._check_legacy()
                raise CheckpointError(hub_failure(exc, self.repo)) from exc
        for warning in caught:  # anything else moshi warns about is passed on as it is
            if _assumed_legacy(warning):
                self._check_legacy()
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        resolved = ResolvedHub(self, info)
        resolved.check_lora()
        return resolved

    def _check_reachable(self) -> None:
        """Online (no HF_HUB_OFFLINE), a hub that cannot be reached stops here in seconds, rather than after the hub
        library's retries of every file (48 s and 48 warnings measured): with the repository in the cache, say to
        set HF_HUB_OFFLINE=1; without, how to fetch it."""
        if huggingface_hub.constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
            return  # offline: the cache alone answers; behind a proxy a direct probe proves nothing
        reason = hub_unreachable()
        if reason is None:
            return
        endpoint = huggingface_hub.constants.ENDPOINT
        cached = huggingface_hub.try_to_load_from_cache(self.repo, "config.json", revision=self.revision)
        if cached is not None:  # a path, or the record that the hub has none: the repository was fetched before
            raise CheckpointError(f"{self.repo}: the Hugging Face hub ({endpoint}) cannot be reached ({reason}); the "
                                  "cache holds this repository: set HF_HUB_OFFLINE=1 to use it without network")
        at = f" --revision {self.revision}" if self.revision else ""
        raise CheckpointError(f"{self.repo}: the Hugging Face hub ({endpoint}) cannot be reached ({reason}) and the "
                              f"cache does not hold this repository: fetch it with `huggingface-cli download "
                              f"{self.repo}{at}` on a machine with network access, or give local paths")

    def _check_legacy(self) -> None:
        """moshi read the repository as a legacy Moshi 7B because config.json could not be fetched: accept that only
        when the hub answered that there is none (the cache's `.no_exist` record), not when it was unreachable."""
        cached = huggingface_hub.try_to_load_from_cache(self.repo, "config.json", revision=self.revision)
        if cached is not huggingface_hub._CACHED_NO_EXIST:
            at = f" --revision {self.revision}" if self.revision else ""
            raise CheckpointError(
                f"{self.repo}: config.json is not in the Hugging Face cache and the hub cannot be reached"
                f"{_offline_note()}, so it is unknown whether this is a legacy Moshi 7B repository (which has none): "
                f"fetch it with `huggingface-cli download {self.repo} config.json{at}`, or give the config "
                "(config=PATH / --config-path)")

    @staticmethod
    def _what(name: str) -> str:
        """How the user named option `name`: `lora= (--lora-weight)`."""
        key = next(k for k, v in HUB_KEYS.items() if v == name)
        return f"{key}= (--{name.replace('_', '-')})"


@dataclass(frozen=True)
class ResolvedHub:
    """A resolved hub checkpoint: moshi's `CheckpointInfo` and whether to fuse LoRA."""

    source: HubCheckpoint
    info: loaders.CheckpointInfo

    @property
    def lm_config(self) -> dict[str, Any]:
        """The LMModel keyword arguments the model is built with (moshi's 7B defaults for a legacy repository)."""
        return dict(loaders._lm_kwargs if self.info.lm_config is None else self.info.lm_config)

    def check_lora(self) -> None:
        config, lora = self.info.lm_config or {}, self.info.lora_weights
        if config.get("lora") and lora is None:
            raise CheckpointError(
                f"{self.source.spec()}: its config says lora: true but no LoRA weights are given, so the base model "
                "would be evaluated with empty adapters: give them (lora=PATH / --lora-weight)")
        if lora is not None and not config.get("lora"):
            raise CheckpointError(
                f"{self.source.spec()}: LoRA weights {lora} are given but the config has no lora: true (moshi-finetune "
                "writes it in consolidated/config.json): give that config (config=PATH / --config-path)")

    def config_digest(self) -> str | None:
        """sha256 of the config the model is built from (None: moshi's 7B defaults): its exact content, wherever
        it was read from."""
        raw = self.info.raw_config
        return None if raw is None else hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What was resolved, for the report: which files the numbers come from."""
        info = self.info
        legacy = "moshi's Moshi 7B defaults (legacy repository)"
        config = self.source.config_path or (legacy if info.raw_config is None else f"{self.source.repo} config.json")
        return {"spec": self.source.spec(), "model_weights": str(info.moshi_weights),
                "lora_weights": None if info.lora_weights is None else str(info.lora_weights),
                "fuse_lora": self.source.fuse_lora, "mimi_weights": str(info.mimi_weights),
                "config": config, "config_sha256": self.config_digest()}

    def weight_files(self) -> dict[str, Path | None]:
        """The files whose weights end up in the model."""
        return {"model_weights": Path(self.info.moshi_weights),
                "lora_weights": None if self.info.lora_weights is None else Path(self.info.lora_weights)}


def _assumed_legacy(warning: warnings.WarningMessage) -> bool:
    """moshi's warning that it reads a repository without a (reachable) config.json as a legacy Moshi 7B."""
    return "contains no config.json" in str(warning.message)


def hub_failure(exc: BaseException, repo: str) -> str:
    """One line for an error of the Hugging Face hub: which repository and file, and how to get it."""
    request = _hub_request(exc)
    repo = request.get("repo_id") or repo
    file = request.get("filename")
    revision = request.get("revision")
    revision = None if revision in (None, "main") else revision
    at = f" (revision {revision})" if revision else ""
    fetch = f"`huggingface-cli download {repo} {file}{f' --revision {revision}' if revision else ''}`"
    if isinstance(exc, hub_errors.LocalEntryNotFoundError):
        return (f"{repo}: {file or 'a file'}{at} is not in the Hugging Face cache and the hub cannot be "
                f"reached{_offline_note()}: fetch it with {fetch} on a machine with network access, or give a local "
                "path")
    if isinstance(exc, hub_errors.GatedRepoError):
        return f"{repo} is gated: accept its terms on huggingface.co and log in (`huggingface-cli login`)"
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return f"{repo}: no such repository on the Hugging Face hub (or it is private: `huggingface-cli login`)"
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return f"{repo}: no revision {revision!r} on the Hugging Face hub"
    if isinstance(exc, hub_errors.EntryNotFoundError):
        return f"{repo}{at} has no file {file!r}"
    return f"{repo}: {one_line(exc)}" + (f" (while fetching {file})" if file else "")


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the hub's endpoint does not accept a TCP connection within `timeout` seconds (no route, no name
    resolution, a timeout), or None when it does."""
    url = urlsplit(huggingface_hub.constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:  # socket.gaierror (no DNS), TimeoutError, ConnectionRefusedError, no route to host
        return f"{type(exc).__name__}: {one_line(exc)}" if str(exc) else type(exc).__name__


def _offline_note() -> str:
    return " (HF_HUB_OFFLINE is set)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""


def _hub_request(exc: BaseException) -> dict[str, Any]:
    """repo_id, filename, revision of the `hf_hub_download` call that raised `exc`, read from its traceback (the
    hub's messages do not always name the file); empty when it did not come from there."""
    found: dict[str, Any] = {}
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "hf_hub_download" and "filename" in frame.f_locals:
            found = {k: frame.f_locals.get(k) for k in ("repo_id", "filename", "revision")}
        tb = tb.tb_next
    return found

