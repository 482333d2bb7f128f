"""The checks every checkpoint of stoker gets on load: its keys, its version, and the configuration it was made
under (a StateError names every key that differs, with both values, and what to resume with)."""

from __future__ import annotations

from typing import Any

from stoker.errors import StateError


def check_checkpoint(state: Any, *, what: str, keys: set[str], version: int | None = None,
                     config: dict[str, Any] | None = None, settings: str = "the settings") -> None:
    """Raise a StateError unless `state` is a dict holding `keys`, `version` (under "version") and a "config" equal
    to `config`; `what` names the object ("stream", "sampler"...), `settings` what the user must resume with."""
    if not isinstance(state, dict):
        raise StateError(f"not a {what} checkpoint (expected a dict with keys {sorted(keys)}): {state!r:.200}")
    missing = keys - set(state)
    if missing:
        raise StateError(f"{what} checkpoint lacks keys {sorted(missing)} (expected {sorted(keys)}): {state!r:.200}")
    if version is not None and state.get("version") != version:
        raise StateError(f"{what} checkpoint version {state.get('version')!r} is not supported "
                         f"(this stoker writes {version})")
    if config is not None:
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise StateError(f"{what} checkpoint config must be a dict, got {saved!r:.200}")
        differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if differ:
            details = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {config.get(k)!r})" for k in differ)
            raise StateError(f"{what} checkpoint does not match: differing keys {details}; resume with {settings} "
                             "the checkpoint was made with")
