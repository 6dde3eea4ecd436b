"""`tunneld up --secret-file PATH`: the account secret from another file than [account] secret_file (the
systemd unit passes its credential, %d/account-secret). Same checks as the config's file; failures are one
line, exit 2. The daemon is replaced by a recorder: nothing here opens a device or a socket."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tunneld import daemon
from tunneld.cli import main
from tunneld.config import ConfigError, load_config
from tunneld.crypto.kdf import derive_psk

DOMAIN = "home.example.net"


def _secret(path: Path, fill: int, mode: int = 0o600) -> Path:
    path.write_text(base64.b64encode(bytes([fill]) * 32).decode() + "\n")
    path.chmod(mode)
    return path


def _config(tmp_path: Path, secret_line: str) -> Path:
    cfg = tmp_path / "tunneld.toml"
    cfg.write_text(f'[interface]\nstate_dir = "{tmp_path / "state"}"\n'
                   f'control_socket = "{tmp_path / "c.sock"}"\n'
                   f'[account]\ndomain = "{DOMAIN}"\n{secret_line}')
    return cfg


def test_the_option_replaces_the_configs_secret(tmp_path: Path) -> None:
    own = _secret(tmp_path / "own", 1)
    credential = _secret(tmp_path / "credential", 2)
    cfg = _config(tmp_path, f'secret_file = "{own}"\n')
    assert load_config(cfg).psk == derive_psk(bytes([1]) * 32, DOMAIN)
    config = load_config(cfg, secret_file=credential)
    assert config.psk == derive_psk(bytes([2]) * 32, DOMAIN)
    assert config.account.secret_file == credential


def test_with_the_option_the_configs_secret_is_neither_required_nor_read(tmp_path: Path) -> None:
    credential = _secret(tmp_path / "credential", 3)
    psk = derive_psk(bytes([3]) * 32, DOMAIN)
    assert load_config(_config(tmp_path, ""), secret_file=credential).psk == psk
    missing = _config(tmp_path, f'secret_file = "{tmp_path / "missing"}"\n')
    assert load_config(missing, secret_file=credential).psk == derive_psk(bytes([3]) * 32, DOMAIN)
    with pytest.raises(ConfigError, match="secret_file"):
        load_config(_config(tmp_path, ""))  # without the option the key is still required


class _Recorder:
    configs: ClassVar[list[Any]] = []

    def __init__(self, config: Any, ident: Any, keylog: Any, **privileges: Any) -> None:
        self.configs.append(config)


async def _no_run(d: Any) -> None:
    return None


def test_up_passes_the_secret_to_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "Daemon", _Recorder)
    monkeypatch.setattr(daemon, "run_until_signalled", _no_run)
    monkeypatch.delenv("TUNNELD_KEYLOG", raising=False)
    _Recorder.configs = []
    credential = _secret(tmp_path / "credential", 4)
    cfg = _config(tmp_path, f'secret_file = "{tmp_path / "missing"}"\n')
    assert main(["up", "--config", str(cfg), "--secret-file", str(credential)]) == 0
    [config] = _Recorder.configs
    assert config.psk == derive_psk(bytes([4]) * 32, DOMAIN)


def _unsafe(tmp_path: Path, case: str) -> str:
    if case == "missing":
        return str(tmp_path / "nothing")
    if case == "mode-0640":
        return str(_secret(tmp_path / "s", 5, 0o640))
    if case == "directory":
        return str(tmp_path)
    if case == "not-base64":
        p = tmp_path / "s"
        p.write_text("not a secret\n")
        p.chmod(0o600)
        return str(p)
    if case == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file away")
        path = _secret(tmp_path / "s", 5)
        os.chown(path, 65534, 65534)
        return str(path)
    if case == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads a mode-0000 file")
        return str(_secret(tmp_path / "s", 5, 0o000))
    return {"empty": "", "nul": "a\0b"}[case]


@pytest.mark.parametrize("case", ["missing", "mode-0640", "directory", "not-base64", "other-owner",
                                  "unreadable", "empty", "nul"])
def test_a_bad_secret_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setattr(daemon, "Daemon", _Recorder)  # reached only if the check let the file through
    monkeypatch.setattr(daemon, "run_until_signalled", _no_run)
    cfg = _config(tmp_path, f'secret_file = "{_secret(tmp_path / "own", 1)}"\n')
    rc = main(["up", "--config", str(cfg), "--secret-file", _unsafe(tmp_path, case)])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == "" and err.count("\n") == 1 and err.startswith("tunneld: ") and "--secret-file" in err, err
    assert "Traceback" not in err
