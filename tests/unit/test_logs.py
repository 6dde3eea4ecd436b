"""tunneld.logs: the line format in a terminal, a file and journald, and which loggers --verbose opens."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunneld import logs

STAMPED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    ours = logging.getLogger(logs.OUR_LOGGER)
    saved = (root.handlers[:], root.level, ours.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    ours.setLevel(saved[2])


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _emit_all() -> None:
    log = logging.getLogger("tunneld.test")
    log.debug("a debug line")
    log.info("an info line")
    log.warning("a warning line")
    log.error("an error line")


def test_terminal_lines_have_a_utc_millisecond_time_and_the_level() -> None:
    out = FakeTerminal()
    logs.setup(verbose=True, stream=out, env={})
    _emit_all()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    for line, level, text in zip(lines, ("DEBUG", "INFO", "WARNING", "ERROR"),
                                 ("a debug line", "an info line", "a warning line", "an error line"),
                                 strict=True):
        assert STAMPED.match(line), line
        assert line.endswith(f" {level} tunneld.test: {text}")


def test_a_file_gets_times_even_with_another_streams_journal_stream(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    with open(tmp_path / "log", "w") as f:
        logs.setup(stream=f, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})  # not our stderr
        logging.getLogger("tunneld.test").info("hello")
    [line] = (tmp_path / "log").read_text().splitlines()
    assert STAMPED.match(line) and line.endswith(" INFO tunneld.test: hello")


def test_under_journald_priority_prefixes_and_no_time(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.under_journald(f, env)
        logs.setup(verbose=True, stream=f, env=env)
        _emit_all()
        logging.getLogger("tunneld.test").critical("a critical line")
    assert (tmp_path / "journal").read_text().splitlines() == [
        "<7>tunneld.test: a debug line",
        "<6>tunneld.test: an info line",
        "<4>tunneld.test: a warning line",
        "<3>tunneld.test: an error line",
        "<2>tunneld.test: a critical line",
    ]


@pytest.mark.parametrize("value", ["", "12", "a:b", "1:2:3x", ":"])
def test_a_bad_journal_stream_is_not_journald(tmp_path: Path, value: str) -> None:
    with open(tmp_path / "log", "w") as f:
        assert not logs.under_journald(f, {"JOURNAL_STREAM": value})
    assert not logs.under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})  # no file descriptor


def test_one_event_is_one_line_newlines_and_tracebacks_escaped() -> None:
    out = FakeTerminal()
    logs.setup(stream=out, env={})
    log = logging.getLogger("tunneld.test")
    log.info("first\nsecond\rthird")
    try:
        raise ValueError("boom\nbang")
    except ValueError:
        log.exception("it failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("tunneld.test: first\\nsecond\\rthird")
    assert "it failed | Traceback" in lines[1] and "ValueError: boom\\nbang" in lines[1]


def test_without_verbose_our_debug_is_off_and_info_on() -> None:
    out = FakeTerminal()
    logs.setup(stream=out, env={})
    _emit_all()
    assert [line.split(" ", 2)[1] for line in out.getvalue().splitlines()] == ["INFO", "WARNING", "ERROR"]


def test_verbose_does_not_open_pyroute2s_debug_output() -> None:
    out = FakeTerminal()
    logs.setup(verbose=True, stream=out, env={})
    for name in ("pyroute2", "pyroute2.netlink.nlsocket", "trio", "dns", "asyncio", "prometheus_client"):
        logging.getLogger(name).debug("library chatter")
        logging.getLogger(name).info("library info")
    logging.getLogger("pyroute2").warning("library warning")
    logging.getLogger("tunneld.test").debug("ours")
    text = out.getvalue()
    assert "library chatter" not in text and "library info" not in text
    assert "pyroute2: library warning" in text and "tunneld.test: ours" in text


def test_debug_libs_opens_the_libraries_too() -> None:
    out = FakeTerminal()
    logs.setup(verbose=True, debug_libs=True, stream=out, env={})
    logging.getLogger("pyroute2.netlink").debug("library chatter")
    assert "DEBUG pyroute2.netlink: library chatter" in out.getvalue()


def test_setting_up_twice_does_not_double_lines() -> None:
    out = FakeTerminal()
    logs.setup(stream=out, env={})
    logs.setup(stream=out, env={})
    logging.getLogger("tunneld.test").info("once")
    assert out.getvalue().count("once") == 1
