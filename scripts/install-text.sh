#!/usr/bin/env bash
# Installs the Debian packages whose real English text llmpress uses for calibration and
# evaluation (see README, "Text"). Idempotent: does nothing when every corpus is found.
# Each line: a folder pattern (as llmpress.text.ROOTS looks for it) and the package that ships it;
# linux-doc and python3-doc are Debian's packages of the release's current version.
set -eu
corpora=(
  "/usr/share/doc/debian-handbook/html/en-US debian-handbook"
  "/usr/share/doc/python3.*/html/_sources python3-doc"
  "/usr/share/doc/linux-doc-*/Documentation linux-doc"
  "/usr/share/games/fortunes fortunes"
  "/usr/share/wordnet wordnet"
)
missing=()
for c in "${corpora[@]}"; do
  pattern=${c% *}
  pkg=${c##* }
  # shellcheck disable=SC2086 # the pattern is meant to glob
  found=$(compgen -G "$pattern" || true)
  [ -n "$found" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install-text: missing Debian packages ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
