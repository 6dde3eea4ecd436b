# The system-wide layout shared by `tools/install.sh --system` and tools/build-deb.sh (sourced, not run).
#
# stage_system DEST LIB BIN UNITS MAN8 BASHCOMP ZSHCOMP PY
#   Builds, under the staging root DEST ("" for the real root), a virtual environment at LIB made with the
#   interpreter PY, holding tunneld and its Python dependencies (its own, not the distribution's: see
#   docs/packaging.md), and the command BIN/tunneld, the units (ExecStart pointing at BIN/tunneld), the
#   man page and the bash and zsh completions. The environment is made to live at LIB, not DEST/LIB: its
#   scripts' #! lines and its byte code name the final paths.
# ROOT must name the repository.

stage_system() {
  local dest=$1 lib=$2 bin=$3 units=$4 man8=$5 bashcomp=$6 zshcomp=$7 py=$8
  local work venv=$dest$lib
  work=$(mktemp -d)
  # The source as a clean clone would have it: no .venv, no stale build/ that setuptools would pick up.
  mkdir "$work/src"
  tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./dist \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache --exclude=.pytest_cache \
      --exclude=.ruff_cache --exclude=.hypothesis -cf - . | tar -C "$work/src" -xf -

  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  # pip from the development environment when there is one (pip --python drives another interpreter's
  # environment), else the new environment's own, removed afterwards: the service needs no installer.
  local pip
  if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -m pip --python "$py" --version >/dev/null 2>&1
  then
    "$py" -m venv --without-pip "$venv"
    pip=("$ROOT/.venv/bin/python" -m pip --python "$venv/bin/python")
  else
    "$py" -m venv "$venv"
    pip=("$venv/bin/python" -m pip)
  fi
  "${pip[@]}" install -q --disable-pip-version-check --no-compile "$work/src"
  # The man page and completions come from the argument parser, with the generators kept out of the
  # environment (they are build tools).
  "${pip[@]}" install -q --disable-pip-version-check --no-compile --target "$work/distlib" \
      "argparse-manpage>=4.5" "shtab>=1.7"
  PYTHONPATH="$work/distlib" "$venv/bin/python" "$ROOT/tools/dist_files.py" "$work/gen"
  if [ -x "$venv/bin/pip" ]; then
    "$venv/bin/python" -m pip uninstall -q -y --disable-pip-version-check pip setuptools
  fi
  # The dependencies' own commands (f2py, pyroute2's tools...) are not tunneld's: only tunneld and python stay.
  find "$venv/bin" -mindepth 1 ! -name tunneld ! -name 'python*' -exec rm -f {} +

  if [ -n "$dest" ]; then
    local f
    for f in "$venv"/bin/*; do
      if [ -f "$f" ] && [ ! -L "$f" ] && [ "$(head -c 2 "$f")" = "#!" ]; then
        sed -i "1s|^#!$venv/bin/|#!$lib/bin/|" "$f"
      fi
    done
    sed -i "s|$venv|$lib|g" "$venv/pyvenv.cfg"
  fi
  # Byte code compiled now, naming the final paths: the service user cannot write it at run time.
  find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
  if [ -n "$dest" ]; then
    "$venv/bin/python" -m compileall -q -j0 -s "$dest" -p / "$venv/lib" >/dev/null
  else
    "$venv/bin/python" -m compileall -q -j0 "$venv/lib" >/dev/null
  fi

  install -d "$dest$bin" "$dest$units" "$dest$man8" "$dest$bashcomp" "$dest$zshcomp"
  ln -sfn "$lib/bin/tunneld" "$dest$bin/tunneld"
  local unit
  for unit in tunneld.service tunneld-dns.service; do
    sed "s|/usr/bin/tunneld|$bin/tunneld|g" "$ROOT/dist/systemd/$unit" > "$dest$units/$unit"
    chmod 0644 "$dest$units/$unit"
  done
  gzip -9n < "$work/gen/tunneld.8" > "$dest$man8/tunneld.8.gz"
  install -m 0644 "$work/gen/tunneld.bash" "$dest$bashcomp/tunneld"
  install -m 0644 "$work/gen/_tunneld" "$dest$zshcomp/_tunneld"
  chmod 0644 "$dest$man8/tunneld.8.gz"
  rm -rf "$work"
}
