"""The optional native part: tunneld.crypto._gcm, batch AES-GCM over OpenSSL's libcrypto (docs/fastpath.md).

Everything else is in pyproject.toml. `optional=True`: where there is no compiler or no OpenSSL headers
the build goes on without it, and tunneld seals and opens with the `cryptography` package instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tunneld.crypto._gcm", ["tunneld/crypto/_gcm.c"], libraries=["crypto"],
                             extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
                             optional=True)])
