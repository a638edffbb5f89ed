#!/usr/bin/env bash
# Xvfb + Mesa + the X/EGL libraries Qt and napari's OpenGL canvas need on a headless Linux box.
# Installed with apt when we are root; otherwise we say what to install and stop.
set -euo pipefail
PKGS="xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0
libxcb-cursor0 libdbus-1-3 libfontconfig1"
if [ "$(uname -s)" != "Linux" ] || [ -n "${DISPLAY:-}" ]; then
  exit 0  # a desktop with a display needs none of this
fi
if ! command -v dpkg >/dev/null 2>&1; then
  command -v xvfb-run >/dev/null 2>&1 && exit 0
  echo "system-deps: no dpkg here; install Xvfb and Mesa (OpenGL) with your package manager" >&2
  exit 1
fi
missing=""
for p in $PKGS; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = "0" ]; then
  echo "system-deps: installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
  echo "system-deps: missing Debian packages:$missing" >&2
  echo "  run: sudo apt-get install -y$missing" >&2
  exit 1
fi
