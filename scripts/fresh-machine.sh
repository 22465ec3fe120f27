#!/usr/bin/env bash
# Runs make targets in a fresh clone as on a machine that has never built
# pg_emit, and says how long each took. For proving "works from a fresh
# clone" on a machine where earlier work left things installed.
#
#   scripts/fresh-machine.sh                 make demo, PG=16 make setup, PG=17 make setup
#   scripts/fresh-machine.sh 'make test'     any commands, each one timed
#
# Each line of a command's log starts with the seconds since it began.
#
# Root only: it runs in a private mount namespace (unshare -m), where what
# earlier sessions built is hidden behind empty, writable directories (tmpfs):
# PostgreSQL 14, 16, 17 and 18 under /usr/lib/postgresql and
# /usr/share/postgresql (15, Debian's package, stays visible, as do the apt
# packages: dpkg's records cannot be hidden), ~/.pgrx, ~/.cargo/bin's
# cargo-pgrx and tansu, cargo's registry and git caches and pip's cache.
# Nothing outside the namespace changes, but what the commands install with
# apt stays installed. The clone is of this repository's HEAD, in
# /tmp/pg_emit-fresh.*, kept with a log per command.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "fresh-machine.sh: run as root (it needs a mount namespace)" >&2; exit 2; }

if [ "${PG_EMIT_FRESH_INSIDE:-}" != 1 ]; then
  exec env PG_EMIT_FRESH_INSIDE=1 unshare -m --propagation private -- bash "$0" "$@"
fi

if [ $# -eq 0 ]; then
  set -- "make demo" "PG=16 make setup" "PG=17 make setup"
fi

# The originals stay reachable under $keep so that what is kept visible
# (15, the rustup proxies) can be put back into the emptied directories.
keep=$(mktemp -d /tmp/pg_emit-fresh-keep.XXXXXX)
hide() { # DIR [NAME...]: DIR emptied, except for NAMEs bound back in
  local dir=$1; shift
  mkdir -p "$dir" "$keep$dir"
  mount --bind "$dir" "$keep$dir"
  mount -t tmpfs -o mode=0755 tmpfs "$dir"
  local name
  for name in "$@"; do
    if [ -d "$keep$dir/$name" ]; then
      mkdir "$dir/$name"
      mount --bind "$keep$dir/$name" "$dir/$name"
    fi
  done
}
# 15 is bound back from the real disk even when it is not installed yet, so
# that what apt installs there outlives the namespace, as dpkg records it.
mkdir -p /usr/lib/postgresql/15 /usr/share/postgresql/15
hide /usr/lib/postgresql 15
hide /usr/share/postgresql 15
hide "$HOME/.pgrx"
hide "$HOME/.cargo/registry"
hide "$HOME/.cargo/git"
hide "$HOME/.cache/pip"
# ~/.cargo/bin: the rustup proxies (cargo, rustc, ...) only.
mkdir -p "$keep/cargo-bin"
mount --bind "$HOME/.cargo/bin" "$keep/cargo-bin"
mount -t tmpfs -o mode=0755 tmpfs "$HOME/.cargo/bin"
for tool in "$keep"/cargo-bin/*; do
  case "$(basename "$tool")" in
    cargo-pgrx|tansu) ;;
    *) ln -s "$tool" "$HOME/.cargo/bin/$(basename "$tool")" ;;
  esac
done

clone=$(mktemp -d /tmp/pg_emit-fresh.XXXXXX)
git clone -q "$repo" "$clone/pg_emit"
cd "$clone/pg_emit"
echo "fresh clone of $(git rev-parse --short HEAD) in $PWD; hidden: PostgreSQL 14/16/17/18, ~/.pgrx, cargo-pgrx, tansu, cargo and pip caches"

summary=()
status=0
i=0
for cmd in "$@"; do
  i=$((i + 1))
  log=$clone/$i.log
  echo "==> $cmd (log: $log)"
  start=$(date +%s)
  if env -u MAKEFLAGS -u MAKELEVEL PATH="$HOME/.cargo/bin:$PATH" bash -o pipefail -c "($cmd) 2>&1 < /dev/null |
       while IFS= read -r line; do printf '%5d %s\n' \$((EPOCHSECONDS - $start)) \"\$line\"; done" > "$log"; then
    result=ok
  else
    result="FAILED (exit $?)"
    status=1
  fi
  took=$(( $(date +%s) - start ))
  summary+=("$(printf '%-40s %-16s %dm%02ds' "$cmd" "$result" $((took / 60)) $((took % 60)))")
  echo "    $result after $((took / 60))m$((took % 60))s"
  [ "$result" = ok ] || { tail -30 "$log"; break; }
done
echo
echo "fresh machine, $(nproc) cores:"
printf '  %s\n' "${summary[@]}"
exit $status
