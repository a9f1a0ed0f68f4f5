#!/usr/bin/env bash
# Build and install enroot + pyxis from the vendored source tarballs (Debian 12), for the sandbox's
# real pyxis path (scripts/setup runs it). A site's own enroot/pyxis (enroot's .deb packages, pyxis
# built the same way) is used as it is: nothing is built where both are installed already.
#
# Usage: install-enroot-pyxis.bash [VENDOR_DIR] [PREFIX]
#   VENDOR_DIR  dir holding enroot-4.1.2-with-submodules.tar.gz and pyxis-0.24.0.tar.gz
#               (default: <repo root>/rehearsal/vendor: NVIDIA/enroot v4.1.2 with its submodules and
#               NVIDIA/pyxis v0.24.0, both Apache-2.0)
#   PREFIX      install prefix (default: /usr/local, so `enroot` is on slurmd's default PATH)
# Env:
#   PYXIS_SO    where an existing spank_pyxis.so is looked for (default: PREFIX/lib/slurm/spank_pyxis.so)
#   JOBS        parallel make jobs for enroot (default: 2)
#
# Idempotent: when `enroot` is on PATH and spank_pyxis.so exists, it only reports what it found.
# It never edits a Slurm plugstack.conf; it prints the line to add.
set -euo pipefail

ENROOT_VER=4.1.2
PYXIS_VER=0.24.0
ENROOT_TGZ="enroot-${ENROOT_VER}-with-submodules.tar.gz"
PYXIS_TGZ="pyxis-${PYXIS_VER}.tar.gz"
DEB_PKGS=(libtool automake libmd-dev gawk squashfs-tools parallel pigz squashfuse libslurm-dev
          gcc make libcap2-bin curl jq fuse-overlayfs)

log() { printf '[install-enroot-pyxis] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(git -C "${script_dir}" rev-parse --show-toplevel 2>/dev/null || dirname "${script_dir}")"

VENDOR_DIR="${1:-${repo_root}/rehearsal/vendor}"
PREFIX="${2:-/usr/local}"
PYXIS_SO="${PYXIS_SO:-${PREFIX}/lib/slurm/spank_pyxis.so}"
JOBS="${JOBS:-2}"

# Config path baked into an installed enroot script (line: config::init "<sysconfdir>/enroot.conf").
enroot_conf_of() {
    local bin="$1"
    sed -n 's/^config::init "\(.*\)"$/\1/p' "${bin}" | head -n1
}

report() {
    local bin conf sysconf
    bin="$(command -v enroot)"
    conf="$(enroot_conf_of "${bin}")"
    sysconf="$(dirname "${conf:-${PREFIX}/etc/enroot/enroot.conf}")"
    log "enroot binary : ${bin} ($("${bin}" version 2>/dev/null || echo '?'))"
    log "enroot.conf   : ${conf:-unknown}"
    log "hooks dir     : ${sysconf}/hooks.d"
    log "spank_pyxis.so: ${PYXIS_SO}"
    log "plugstack line: required ${PYXIS_SO} runtime_path=<DIR>   (not written by this script)"
}

if command -v enroot >/dev/null 2>&1 && [[ -f "${PYXIS_SO}" ]]; then
    log "already installed, nothing to do"
    report
    exit 0
fi

[[ "$(id -u)" -eq 0 ]] || die "must run as root (apt-get, setcap, install into ${PREFIX})"
[[ -f "${VENDOR_DIR}/${ENROOT_TGZ}" ]] || die "missing ${VENDOR_DIR}/${ENROOT_TGZ}"
[[ -f "${VENDOR_DIR}/${PYXIS_TGZ}" ]] || die "missing ${VENDOR_DIR}/${PYXIS_TGZ}"
VENDOR_DIR="$(cd "${VENDOR_DIR}" && pwd)"

t_start=${SECONDS}

# --- Debian packages -------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
# One apt-cache call for all packages; prints the names with no install candidate.
unavailable() {
    apt-cache policy "${DEB_PKGS[@]}" 2>/dev/null | awk -v want="${DEB_PKGS[*]}" '
        /^[^ ]/ { p = $1; sub(/:$/, "", p) }
        /Candidate:/ && $2 != "(none)" { ok[p] = 1 }
        END { n = split(want, w, " "); for (i = 1; i <= n; i++) if (!(w[i] in ok)) print w[i] }'
}
mapfile -t missing < <(unavailable)
if ((${#missing[@]})); then
    log "apt lists stale or packages missing (${missing[*]}); running apt-get update"
    apt-get update -qq
    mapfile -t missing < <(unavailable)
    ((${#missing[@]} == 0)) || die "not available from apt: ${missing[*]}"
fi
to_install=()
for pkg in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q 'install ok installed' || to_install+=("${pkg}")
done
if ((${#to_install[@]})); then
    log "apt-get install ${to_install[*]}"
    apt-get install -y -qq --no-install-recommends "${to_install[@]}" >/dev/null
fi
t_apt=${SECONDS}

# --- build in a temp dir ----------------------------------------------------
work="$(mktemp -d /tmp/enroot-pyxis-build.XXXXXX)"
trap 'rm -rf "${work}"' EXIT

if ! command -v enroot >/dev/null 2>&1; then
    log "building enroot ${ENROOT_VER} in ${work} (prefix ${PREFIX})"
    tar -xzf "${VENDOR_DIR}/${ENROOT_TGZ}" -C "${work}"
    # `deps` tries `git submodule update` (ignored failure); the tarball already has the submodules.
    make -C "${work}/enroot-${ENROOT_VER}" -j"${JOBS}" prefix="${PREFIX}" install >"${work}/enroot-build.log" 2>&1 \
        || { tail -n 40 "${work}/enroot-build.log" >&2; die "enroot build failed"; }
    make -C "${work}/enroot-${ENROOT_VER}" prefix="${PREFIX}" setcap >>"${work}/enroot-build.log" 2>&1 \
        || { tail -n 20 "${work}/enroot-build.log" >&2; die "enroot setcap failed"; }
    hash -r
    command -v enroot >/dev/null 2>&1 \
        || die "enroot installed in ${PREFIX}/bin, which is not on PATH (${PATH})"
else
    log "enroot already on PATH: $(command -v enroot); not rebuilding it"
fi
t_enroot=${SECONDS}

if [[ ! -f "${PYXIS_SO}" ]]; then
    log "building pyxis ${PYXIS_VER} (prefix ${PREFIX})"
    tar -xzf "${VENDOR_DIR}/${PYXIS_TGZ}" -C "${work}"
    make -C "${work}/pyxis-${PYXIS_VER}" prefix="${PREFIX}" install >"${work}/pyxis-build.log" 2>&1 \
        || { tail -n 40 "${work}/pyxis-build.log" >&2; die "pyxis build failed"; }
    built="${PREFIX}/lib/slurm/spank_pyxis.so"
    if [[ "${built}" != "${PYXIS_SO}" ]]; then
        log "note: PYXIS_SO=${PYXIS_SO} but pyxis installed to ${built}"
        PYXIS_SO="${built}"
    fi
fi
t_pyxis=${SECONDS}

rm -rf "${work}"
trap - EXIT

log "timings: apt $((t_apt - t_start))s, enroot $((t_enroot - t_apt))s, pyxis $((t_pyxis - t_enroot))s, total $((SECONDS - t_start))s"
report
