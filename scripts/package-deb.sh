#!/usr/bin/env bash
# Builds target/deb/postgresql-MAJOR-pg-emit_VERSION-REVISION_ARCH.deb from
# `cargo pgrx package` output: pg_emit for Debian's PostgreSQL MAJOR, as
# pg_graphql and the PostgreSQL apt repository's extensions ship, installable
# with `apt install ./….deb` on a server with no Rust. Whatever layout the
# PostgreSQL built against has (the pinned builds keep everything under
# /usr/lib/postgresql/MAJOR), the package has Debian's.
set -euo pipefail
cd "$(dirname "$0")/.."
major=$1
pg_config=/usr/lib/postgresql/$major/bin/pg_config
upstream=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# The Debian revision: the packaging of one upstream version, raised when
# only the packaging changes.
version=$upstream-1
arch=$(dpkg --print-architecture)
name=postgresql-$major-pg-emit

cargo pgrx package --pg-config "$pg_config" >/dev/null
rm -f target/deb/"$name"_*.deb
built=target/release/pg_emit-pg$major
staging=target/deb/$name
rm -rf "$staging"
mkdir -p "$staging/DEBIAN"
libdir=$("$pg_config" --pkglibdir)
sharedir=$("$pg_config" --sharedir)
install -D -m 0644 "$built$libdir/pg_emit.so" "$staging/usr/lib/postgresql/$major/lib/pg_emit.so"
mkdir -p "$staging/usr/share/postgresql/$major"
cp -a "$built$sharedir/extension" "$staging/usr/share/postgresql/$major/"
if [ "$(find "$built" -type f | wc -l)" -ne "$(find "$staging" -type f | wc -l)" ]; then
  echo "package-deb.sh: cargo pgrx package made files outside $libdir and $sharedir/extension:" >&2
  (cd "$built" && find . -type f) >&2
  exit 1
fi
# Debian's machine-readable copyright file, from LICENSE.
doc=$staging/usr/share/doc/$name
mkdir -p "$doc"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: pg_emit"
  echo
  echo "Files: *"
  echo "Copyright: $(sed -n 's/^Copyright (c) //p' LICENSE)"
  echo "License: PostgreSQL"
  sed -n '5,$p' LICENSE | sed -e 's/^$/./' -e 's/^/ /'
} > "$doc/copyright"
# A non-native version has a Debian changelog; this one says which
# upstream version the package carries, dated by the commit it was built from.
when=$(git log -1 --format=%aD 2>/dev/null || date -R)
printf '%s (%s) unstable; urgency=medium\n\n  * pg_emit %s for PostgreSQL %s.\n\n -- pg_emit developers <pg_emit@localhost>  %s\n' \
  "$name" "$version" "$upstream" "$major" "$when" | gzip -9n > "$doc/changelog.Debian.gz"
# Whatever the umask: directories 0755, files 0644.
chmod -R u+rwX,go+rX,go-w "$staging"
so=$staging/usr/lib/postgresql/$major/lib/pg_emit.so
strip --strip-unneeded "$so"

# The shared libraries pg_emit.so links against, as package dependencies
# (dpkg-shlibdeps wants a debian/control to read; it gets a minimal one).
shlib=$(mktemp -d)
mkdir "$shlib/debian"
printf 'Source: pg-emit\n\nPackage: %s\nArchitecture: any\n' "$name" > "$shlib/debian/control"
libs=$(cd "$shlib" && dpkg-shlibdeps -O "$OLDPWD/$so" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
rm -rf "$shlib"

size=$(du -sk --exclude=DEBIAN "$staging" | cut -f1)
cat > "$staging/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: pg_emit developers <pg_emit@localhost>
Installed-Size: $size
Depends: postgresql-$major, $libs
Section: database
Priority: optional
Description: send row changes and messages out of PostgreSQL $major
 pg_emit sends row changes and messages from triggers and SQL over TCP,
 HTTP (signed webhooks, CloudEvents), Redis Streams, NATS JetStream and
 Kafka, synchronously, after commit, or from a transactional outbox
 delivered by a background worker. Run CREATE EXTENSION pg_emit.
EOF
dpkg-deb --root-owner-group --build "$staging" "target/deb/${name}_${version}_${arch}.deb" >/dev/null
echo "target/deb/${name}_${version}_${arch}.deb"
