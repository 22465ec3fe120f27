#!/usr/bin/env bash
# Builds PostgreSQL MAJOR (17 or 18) from Debian's source package, for a
# bookworm machine whose apt has only PostgreSQL 15: the upstream tarball
# that Debian ships in trixie (17) or sid (18), fetched and checked by apt
# through a list of our own (the system's apt sources are not touched).
#
# It installs with Debian's layout (binaries and libraries under
# /usr/lib/postgresql/MAJOR, extension files under
# /usr/share/postgresql/MAJOR), so that pg_emit's .deb for MAJOR installs
# into it as into Debian's own server. Idempotent: nothing happens when
# that pg_config is already there. About 2½ minutes on 2 cores.
set -euo pipefail
major=$1
case "$major" in
  17) suite=trixie ;;
  18) suite=sid ;;
  *) echo "build-postgres.sh: PostgreSQL $major is not obtainable here (17 and 18 are)" >&2; exit 2 ;;
esac
prefix=/usr/lib/postgresql/$major
if [ -x "$prefix/bin/pg_config" ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

work=$(mktemp -d /tmp/pg_emit-postgres-$major.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
  > "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o APT::Sandbox::User=root)
apt-get "${apt_opts[@]}" -qq update
(cd "$work" && apt-get "${apt_opts[@]}" -qq source --download-only "postgresql-$major" >/dev/null)

tar -xjf "$work"/postgresql-"$major"_*.orig.tar.bz2 -C "$work"
cd "$work"/postgresql-"$major".*/
# PL/Python as in Debian's packages (the tests compare pg_emit with the
# plpython recipe it replaces), against Debian's Python.
PYTHON=/usr/bin/python3 ./configure -q --prefix="$prefix" --datadir="/usr/share/postgresql/$major" \
  --with-lz4 --with-python --without-icu >/dev/null
make -s -j"$(nproc)" >/dev/null
$SUDO make -s install >/dev/null
