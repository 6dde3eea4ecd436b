"""Reading a TOML configuration file strictly: the file itself, and typed values reported as one-line errors.

`TableReader` is what `tunneld.config` builds its loader on: it reads the file (bounded in size, UTF-8,
TOML) and turns each key into a typed value or a `ConfigError` that names the file, the key and the fix.
The tables themselves (what keys mean) are tunneld.config's.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, NoReturn, TypeVar

from tunneld import config_values as values
from tunneld.config_model import ConfigError, Endpoint
from tunneld.config_values import Problem, show, type_name

__all__ = ["MAX_FILE", "TableReader", "unknown_key"]

MAX_FILE: Final = 1 << 20  # a config or secret file is tiny; do not read /dev/zero until memory runs out

_In = TypeVar("_In")
_Out = TypeVar("_Out")


def unknown_key(key: str, known: tuple[str, ...]) -> str:
    """The problem text for an unknown key, with the closest known one as a hint."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f"unknown key {show(key)}{hint}"


class TableReader:
    """The file at `path` and typed values from its tables; subclasses say what the tables hold."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.absolute().parent  # relative paths stay valid if the daemon changes directory

    def fail(self, key: str | None, problem: str, fix: str) -> NoReturn:
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        raise ConfigError(f"{where}{problem}; {fix}", key=key)

    # -- the file ------------------------------------------------------------------------------------------

    def read(self) -> dict[str, object]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except ValueError:  # a NUL byte: no file can have that name
            self.fail(None, "not a path (it holds a NUL byte)", "pass --config PATH")
        except FileNotFoundError:
            self.fail(
                None,
                "no such file",
                "create it with `tunneld join DOMAIN --server HOST --secret-file F`, or pass --config PATH",
            )
        except OSError as e:
            self.fail(
                None,
                f"cannot read: {e.strerror}",
                "check the path and its permissions, or pass --config PATH",
            )
        if len(data) > MAX_FILE:
            self.fail(None, f"larger than {MAX_FILE} bytes", "is this the right file? pass --config PATH")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(None, f"not UTF-8 text (byte {e.start})", "save the file as UTF-8, as TOML requires")
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            # tomllib's messages end in "(at line L, column C)", which is the part the user needs.
            self.fail(None, f"TOML syntax error: {e}", "fix the syntax at that line (see https://toml.io)")

    def table(self, doc: Mapping[str, object], name: str, *, required: bool) -> dict[str, object]:
        value = doc.get(name)
        if value is None:
            if required:
                self.fail(
                    f"[{name}]",
                    "missing",
                    'add an [account] table with domain = "home.example.net" and secret_file = "/path"',
                )
            return {}
        if not isinstance(value, dict):
            self.fail(name, f"expected a table, got {type_name(value)}", f"write it as a [{name}] table")
        return value

    def check_keys(self, table: Mapping[str, object], where: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.fail(where, unknown_key(key, known), "known keys: " + ", ".join(known))

    # -- typed values ----------------------------------------------------------------------------------------

    def string(self, table: Mapping[str, object], where: str, key: str, example: str) -> str | None:
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(f"{where}.{key}", f"expected a string, got {show(value)}", f"write {key} = {example}")
        return value

    def required_string(self, table: Mapping[str, object], where: str, key: str, example: str) -> str:
        value = self.string(table, where, key, example)
        if value is None:
            self.fail(f"{where}.{key}", "missing", f"add {key} = {example}")
        return value

    def integer(self, table: Mapping[str, object], where: str, key: str, default: int) -> int:
        value = table.get(key, default)
        # TOML booleans are Python bools, which are ints: refuse them explicitly.
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(
                f"{where}.{key}", f"expected an integer, got {show(value)}", f"write {key} = {default}"
            )
        return value

    def bounded(
        self, table: Mapping[str, object], where: str, key: str, default: int, low: int, high: int, fix: str
    ) -> int:
        """An integer from ``low`` to ``high``; ``fix`` tells the range to a user who went outside it."""
        value = self.integer(table, where, key, default)
        if not low <= value <= high:
            self.fail(f"{where}.{key}", f"{value} is out of range", fix)
        return value

    def boolean(self, table: Mapping[str, object], where: str, key: str, fix: str,
                default: bool = True) -> bool:
        """A boolean (true when not given, unless ``default`` says otherwise)."""
        value = table.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"{where}.{key}", f"expected true or false, got {show(value)}", fix)
        return value

    def path_value(
        self, table: Mapping[str, object], where: str, key: str, default: Path | None
    ) -> Path | None:
        text = self.string(table, where, key, '"/absolute/path"')
        if text is None:
            return default
        if not text or "\0" in text:
            self.fail(
                f"{where}.{key}", f"{show(text)} is not a path", 'write a path, e.g. "/var/lib/tunneld"'
            )
        return self.base / text  # an absolute `text` replaces the base

    def seconds(self, table: Mapping[str, object], where: str, key: str, default: float) -> float:
        value = table.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1e9:
            self.fail(f"{where}.{key}", f"expected a positive number of seconds, got {show(value)}",
                      f"write {key} = {default:g}")
        return float(value)

    def endpoint(
        self, table: Mapping[str, object], where: str, key: str, example: str, fix: str | None = None
    ) -> Endpoint | None:
        """An optional "address:port"; ``fix``, if given, replaces the parser's own advice."""
        text = self.string(table, where, key, example)
        return None if text is None else self.parsed(f"{where}.{key}", values.endpoint, text, fix)

    def parsed(self, key: str, parse: Callable[[_In], _Out], value: _In, fix: str | None = None) -> _Out:
        """``parse(value)``, its Problem reported at ``key`` (with ``fix``, if given, as the fix)."""
        try:
            return parse(value)
        except Problem as p:
            self.fail(key, p.problem, fix or p.fix)
