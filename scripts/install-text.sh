#!/usr/bin/env bash
# Installs the Debian packages whose real English text llmpress uses for calibration and
# evaluation (see README, "Text"). Idempotent: does nothing when they are present.
set -eu
pkgs=(debian-handbook python3.11-doc linux-doc-6.1 fortunes wordnet)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install-text: missing Debian packages ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
