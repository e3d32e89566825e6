#!/bin/sh
# The browser tests/test_app_browser.py drives (Playwright through `executable_path`: Playwright's own browser
# download is never used). Installs Debian's chromium with apt when no Chromium is found and apt runs as root;
# otherwise it only says so, and that test skips with the reason. Never fails `make test`.
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then
        exit 0
    fi
done
if [ -n "$VIR_CHROMIUM" ] && [ -x "$VIR_CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure_browser: installing chromium with apt-get (for tests/test_app_browser.py)" >&2
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || {
        apt-get update -q >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; then
        exit 0
    fi
    echo "ensure_browser: apt-get could not install chromium; the browser test will skip" >&2
    exit 0
fi
echo "ensure_browser: no Chromium and no root apt-get here; the browser test will skip" \
     "(install chromium, or set VIR_CHROMIUM)" >&2
exit 0
