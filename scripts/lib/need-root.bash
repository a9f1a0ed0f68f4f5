# shellcheck shell=bash
# Sourced by scripts/setup, scripts/test and scripts/rehearse, which need root (Debian packages, network
# namespaces, mounts). As root: return. As a user: run the same script again with sudo, keeping the
# NEMOTRON_* variables sudo would drop; without sudo (a container's root shell has none, so a user
# there can't become root): say so and exit 1.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/need-root.bash"
#   need_root "$@"
need_root() {
    if [[ $(id -u) == 0 ]]; then
        return 0
    fi
    local script name var
    script=$(realpath "${BASH_SOURCE[1]}")
    name=$(basename "$script")
    if ! command -v sudo >/dev/null 2>&1; then
        echo "$name: needs root, and there is no sudo here: run it as root" >&2
        exit 1
    fi
    local -a keep=()
    while IFS= read -r var; do
        keep+=("$var=${!var}")
    done < <(compgen -e | grep -E '^NEMOTRON_' || true)
    echo "$name: needs root: running it with sudo" >&2
    exec sudo -- env "${keep[@]}" bash "$script" "$@"
}
