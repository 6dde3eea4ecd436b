"""The optional native forms are built wherever they can be.

`setup.py` marks both extensions optional, so a build without a compiler or OpenSSL's headers goes on
without them and tunneld runs its slower reference paths. tools/install.sh installs both, so on a
machine it set up a missing extension is a build failure, shown here rather than as a slower tunnel.
(These checks live apart from the extensions' own tests, which are skipped where they are not built.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tunneld.crypto.esp import NATIVE_GCM
from tunneld.fastpath.segment import NATIVE_TCP6


def test_gcm_built_where_openssl_headers_are() -> None:
    if Path("/usr/include/openssl/evp.h").exists() and shutil.which("cc"):
        assert NATIVE_GCM or os.environ.get("TUNNELD_NATIVE_GCM") == "0"


def test_tcp6_built_where_a_compiler_is() -> None:
    if shutil.which("cc"):
        assert NATIVE_TCP6
