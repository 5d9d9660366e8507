#!/usr/bin/env bash
# Debian packages the test suite uses, installed only when missing (called by `make test`):
#   chromium + chromium-driver  the web page test drives headless Chromium
#   libgl1 + libglib2.0-0       opencv, pulled in by the rapidocr OCR engine
#   tesseract-ocr(-eng)         the alternative OCR engine, compared in tests
#   iproute2                    Ray tests run their cluster in a loopback-only namespace
# Without root or apt-get it only lists what is missing; the tests that need it then skip.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
ldconfig -p 2>/dev/null | grep -q 'libGL.so.1' || missing+=(libgl1)
ldconfig -p 2>/dev/null | grep -q 'libgthread-2.0.so.0' || missing+=(libglib2.0-0)
command -v tesseract >/dev/null || missing+=(tesseract-ocr tesseract-ocr-eng)
command -v ip >/dev/null || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "warning: missing Debian packages (${missing[*]}); run as root:" >&2
    echo "  apt-get install --no-install-recommends ${missing[*]}" >&2
    echo "the tests that need them will be skipped" >&2
fi
