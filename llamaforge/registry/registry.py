"""Name -> factory tables, one per interface kind.

A spec names components by short strings; the registry turns those into factories and remembers who provided each
one (plugin, distribution, version), so that clashes and typos produce errors a user can act on.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from llamaforge.errors import DuplicateComponentError, UnknownComponentError


@dataclass(frozen=True)
class Source:
    """Where a registered component came from."""

    plugin: str
    distribution: str = "llamaforge"
    version: str = ""

    def __str__(self) -> str:
        where = f"{self.distribution} {self.version}".strip()
        return f"plugin {self.plugin!r} ({where})" if self.plugin != self.distribution else where


RUNTIME_SOURCE = Source(plugin="runtime", distribution="runtime")


@dataclass(frozen=True)
class Entry:
    """One registered component: its factory plus the metadata `llamaforge plugins` shows."""

    kind: str
    name: str
    factory: Any
    source: Source
    doc: str = ""
    params_model: type[BaseModel] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check user params against the component's declared pydantic model (if any)."""
        if self.params_model is not None:
            return self.params_model.model_validate(params).model_dump(exclude_unset=True)
        accepted = _keyword_params(self.factory, self.kind)
        if accepted is not None:
            unknown = sorted(set(params) - set(accepted))
            if unknown:
                from llamaforge.errors import SpecError

                listing = ", ".join(accepted) if accepted else "none"
                raise SpecError(f"unknown params {unknown} for {self.kind} {self.name!r}; accepted params: {listing}")
        return dict(params)


def _keyword_params(factory: Any, kind: str) -> list[str] | None:
    """Names a factory accepts from a spec's params, or None when it takes **kwargs (anything goes)."""
    from llamaforge.core.interfaces import STRUCTURAL_ARGS

    if inspect.isclass(factory):
        owner = next((c for c in factory.__mro__ if "__init__" in c.__dict__), object)
        if owner.__module__.startswith("torch.") or owner is object:
            return []  # no constructor of its own: takes no params
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    names = []
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(p.name)
    structural = set(STRUCTURAL_ARGS.get(kind, ()))
    return [n for n in names if n not in structural and n != "self"]


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry:
    """The components of one interface kind (e.g. all norms)."""

    def __init__(self, kind: str, description: str = "") -> None:
        self.kind = kind
        self.description = description
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        factory: Any,
        *,
        source: Source = RUNTIME_SOURCE,
        doc: str | None = None,
        params_model: type[BaseModel] | None = None,
        override: bool = False,
        **extra: Any,
    ) -> Entry:
        """Add `factory` under `name`; a second source for the same name is an error naming both."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"{self.kind} names must be non-empty strings without surrounding spaces, got {name!r}")
        old = self._entries.get(name)
        if old is not None and not override:
            raise DuplicateComponentError(
                f"{self.kind} {name!r} is registered twice: by {old.source} and by {source}. "
                f"Rename one of them, or restrict external plugins with LLAMAFORGE_PLUGINS."
            )
        entry = Entry(
            kind=self.kind,
            name=name,
            factory=factory,
            source=source,
            doc=doc if doc is not None else _first_doc_line(factory),
            params_model=params_model,
            extra=dict(extra),
        )
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(self._unknown_message(name)) from None

    def get(self, name: str) -> Any:
        """The factory registered under `name`."""
        return self.entry(name).factory

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard pattern, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def _unknown_message(self, name: str) -> str:
        available = self.names()
        close = difflib.get_close_matches(str(name), available, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = ", ".join(available) if available else "(none registered)"
        return f"unknown {self.kind} {name!r}.{hint} Available {self.kind} names: {listing}."


class Registries:
    """All interface kinds; `registries.norm.get('rmsnorm')`."""

    def __init__(self, kinds: dict[str, str]) -> None:
        self._by_kind = {k: Registry(k, d) for k, d in kinds.items()}

    def __getattr__(self, kind: str) -> Registry:
        try:
            return self.__dict__["_by_kind"][kind]
        except KeyError:
            raise AttributeError(kind) from None

    def kind(self, kind: str) -> Registry:
        try:
            return self._by_kind[kind]
        except KeyError:
            close = difflib.get_close_matches(kind, list(self._by_kind), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownComponentError(
                f"unknown interface kind {kind!r}.{hint} Kinds: {', '.join(sorted(self._by_kind))}."
            ) from None

    def kinds(self) -> list[str]:
        return list(self._by_kind)

    def entries(self) -> list[Entry]:
        return [e for r in self._by_kind.values() for e in r]

    def snapshot(self) -> dict[str, dict[str, Entry]]:
        return {k: dict(r._entries) for k, r in self._by_kind.items()}

    def restore(self, snap: dict[str, dict[str, Entry]]) -> None:
        for k, entries in snap.items():
            self._by_kind[k]._entries = dict(entries)


Factory = Callable[..., Any]
