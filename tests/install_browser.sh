#!/usr/bin/env bash
# The browser that tests/test_search.py drives through the search page: Debian's chromium and
# chromedriver (Selenium cannot download a browser here). Installed when missing, if this is a
# root shell with apt-get; otherwise nothing is installed and that test is skipped, saying why.
set -u
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: chromium is not installed and this is not a root shell with apt-get; the browser test will be skipped"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing chromium and chromedriver for the browser test (apt-get)"
apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || echo "note: apt-get could not install chromium; the browser test will be skipped"
exit 0
