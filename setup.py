"""The optional native parts (docs/fastpath.md): tunneld.crypto._gcm, batch AES-GCM over OpenSSL's
libcrypto, and tunneld.fastpath._tcp6, IPv6 TCP segmentation and coalescing.

Everything else is in pyproject.toml. `optional=True`: where there is no compiler or no OpenSSL headers
the build goes on without them, and tunneld seals and opens with the `cryptography` package and segments
and coalesces with NumPy instead.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Werror=implicit-function-declaration"]

setup(ext_modules=[
    Extension("tunneld.crypto._gcm", ["tunneld/crypto/_gcm.c"], libraries=["crypto"],
              extra_compile_args=_FLAGS, optional=True),
    Extension("tunneld.fastpath._tcp6", ["tunneld/fastpath/_tcp6.c"], extra_compile_args=_FLAGS,
              optional=True),
])
