"""One table drives configuration: frozen dataclasses whose fields carry their own help.

A configuration section is a frozen dataclass; each field's ``metadata`` holds its help text
(and optionally a ``check`` callable and a ``flag`` name).  From that one definition come:
parsing of a TOML table with errors that name the file, the key and the value; command-line
flags with help; and a JSON dump.  Profiles and agent.toml both use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import ConfigError

__all__ = ["add_flags", "apply_flags", "from_table", "path_problem", "read_toml", "setting", "to_json"]

T = TypeVar("T")


def setting(default: Any, help: str, *, check: Callable[[Any], str | None] | None = None,
            flag: bool = True) -> Any:
    """A dataclass field with help text; ``check(value)`` returns a problem or None."""
    meta = {"help": help, "check": check, "flag": flag}
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple or a frozen mapping for mutable defaults")
    return dataclasses.field(default=default, metadata=meta)


MAX_PATH_CHARS = 1024  # far beyond any real path, well inside the kernel's PATH_MAX of 4096
_NAME_MAX = 255


def path_problem(value: str) -> str | None:
    """Why ``value`` cannot name a file (a NUL, or longer than the kernel looks up), or None.

    A ``setting`` check for path-valued strings: the file system would otherwise answer
    such a value with ValueError or ENAMETOOLONG at the first lookup, far from the key.
    """
    if "\0" in value:
        return "a path cannot hold a NUL character"
    if len(value) > MAX_PATH_CHARS or any(len(part.encode()) > _NAME_MAX for part in value.split("/")):
        return (f"not a usable path (at most {MAX_PATH_CHARS} characters, "
                f"{_NAME_MAX} bytes per component)")
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "nothing"
    return getattr(tp, "__name__", str(tp))


_SCALARS: dict[Any, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    Path: lambda v: isinstance(v, str | Path),
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (lists -> tuples, str -> Path)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    accept = _SCALARS.get(tp)
    if accept is None:
        raise TypeError(f"unsupported setting type {tp!r}")
    if not accept(value):
        raise bad
    if tp is Path and (problem := path_problem(str(value))):
        raise ConfigError(f"{where} = {value!r}: {problem}")
    return Path(value) if tp is Path else float(value) if tp is float else value


def read_toml(path: Path, *, what: str = "configuration file",
              error: type[ConfigError] = ConfigError,
              missing: type[Exception] | None = None) -> dict[str, Any]:
    """Parse a TOML file (agent.toml, an image profile, a manifest) into plain data.

    Raises:
        ``missing`` (default: ``error``): the file does not exist.
        ``error``: the file is not UTF-8 or not valid TOML; the message names the file.
    """
    import tomllib

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise (missing or error)(f"{path}: no such {what}") from None
    try:
        return tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise error(f"{path}: not valid TOML: arrays or tables nested too deeply") from None


def from_table(cls: type[T], table: Mapping[str, Any], origin: str) -> T:
    """Build section ``cls`` from a TOML table; ``origin`` is like ``agent.toml: [server]``.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value its check refuses.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{origin}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{origin}: unknown key {unknown[0]!r} (known keys: {known})")
    values = {}
    for name, value in table.items():
        where = f"{origin} {name}"
        coerced = _coerce(value, hints[name], where)
        check = fields[name].metadata.get("check")
        if check is not None and (problem := check(coerced)):
            raise ConfigError(f"{where} = {value!r}: {problem}")
        values[name] = coerced
    return cls(**values)


def to_json(section: Any) -> dict[str, Any]:
    """A section as JSON-ready data (Paths as strings, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            value = to_json(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[f.name] = value
    return out


def _shown(value: object) -> str:
    """A default as a person writes it: ``/var/lib/appliance``, not ``PosixPath(...)``."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) or "none"
    if value == "":
        return "empty"
    return str(value)


def add_flags(parser: argparse.ArgumentParser, cls: type[Any], prefix: str = "") -> None:
    """Add ``--prefix-name`` flags for every flaggable field of section ``cls`` (default: unset)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True):
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        tp = hints[f.name]
        dest = (prefix + f.name).replace("-", "_")
        help_text = f.metadata.get("help", "")
        if "default" not in help_text:  # some say what the default means in their own words
            help_text += f" (default: {_shown(f.default)})"
        if tp is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif typing.get_origin(tp) is tuple:
            parser.add_argument(flag, dest=dest, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=dest, default=None, help=help_text)


def apply_flags(section: T, args: argparse.Namespace, prefix: str = "", origin: str = "flags") -> T:
    """A copy of ``section`` with the fields given on the command line replaced (type-checked)."""
    hints = typing.get_type_hints(type(section))
    changes = {}
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        raw = getattr(args, (prefix + f.name).replace("-", "_"), None)
        if raw is None:
            continue
        tp = hints[f.name]
        value: Any = raw
        if tp is int or tp is float:
            try:
                value = int(raw, 0) if tp is int and raw.lower().startswith("0x") else tp(raw)
            except ValueError:
                raise ConfigError(f"--{(prefix + f.name).replace('_', '-')} = {raw!r}: "
                                  f"expected {tp.__name__}") from None
        coerced = _coerce(value, tp, f"{origin} --{(prefix + f.name).replace('_', '-')}")
        check = f.metadata.get("check")
        if check is not None and (problem := check(coerced)):
            raise ConfigError(f"--{(prefix + f.name).replace('_', '-')} = {raw!r}: {problem}")
        changes[f.name] = coerced
    return dataclasses.replace(section, **changes)  # type: ignore[type-var]
