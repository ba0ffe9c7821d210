#!/usr/bin/env bash
# The dashboard test's browser: Debian's headless-capable chromium.
# Installed with apt when missing and we are root; otherwise the test skips with the reason.
set -u
for name in chromium chromium-browser google-chrome; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium with apt-get"
  (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium; the dashboard browser test will be skipped" >&2
else
  echo "not installing chromium (needs root and apt-get); the dashboard browser test will be skipped" >&2
fi
exit 0
