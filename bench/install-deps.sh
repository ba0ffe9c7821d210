#!/usr/bin/env bash
# The benchmark's peers and load generator: Debian's redis-server and wrk.
# Installs them with apt when they are missing and we are root; otherwise
# says what to install and carries on (the benchmark reports them as skipped).
set -u
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || echo "could not install ${missing[*]}; those peers will be skipped" >&2
else
  echo "not installing ${missing[*]} (needs root and apt-get); those peers will be skipped" >&2
fi
exit 0
