#!/usr/bin/env bash
# The container's start command for the hctl worker image (images/Dockerfile).
#
# It does what RunPod's own /start.sh does for SSH, so pods are reachable even if the base image's
# script changes: the key(s) in PUBLIC_KEY (RunPod injects the account's keys there when a pod is
# created with SSH on) go into root's authorized_keys, missing host keys are generated (the base
# image deletes them at build time), and sshd is started. The container's environment is written
# to /etc/rp_environment and sourced from ~/.bashrc, because an SSH session does not inherit the
# container's environment and the worker needs HF_HOME on the volume. Then the base image's
# /start.sh runs as usual (nginx, JupyterLab when JUPYTER_PASSWORD is set, /pre_start.sh,
# /post_start.sh) without PUBLIC_KEY, so it does not add the same keys twice. Without a base
# script it runs the hooks itself and keeps the container alive.
#
# A pod created by hctl on RunPod's REST API (which keeps no deadline) carries its lease in
# HCTL_LEASE_UNTIL / HCTL_LEASE_COMMAND: the lease watchdog (hctl.watchdog) starts here, from the
# pod's first second, and stops the pod at its deadline with the pod's own key.
#
# Sourcing this file (as tests/test_dockerfile.py does) only defines the functions.
set -euo pipefail

RP_ENVIRONMENT_FILE="${RP_ENVIRONMENT_FILE:-/etc/rp_environment}"
SSHD_PRIVILEGE_DIR="${SSHD_PRIVILEGE_DIR:-/run/sshd}"
BASE_START_SCRIPT="${BASE_START_SCRIPT:-/start.sh}"
HCTL_PYTHON="${HCTL_PYTHON:-python3}"

log() {
    echo "[hctl-start] $*"
}

# Append each key of PUBLIC_KEY (and SSH_PUBLIC_KEY) once; RunPod may send several keys separated
# by newlines, and a pod created without SSH gets the literal string "null".
install_public_keys() {
    local keys="${PUBLIC_KEY:-}"$'\n'"${SSH_PUBLIC_KEY:-}"
    local ssh_dir="${HOME}/.ssh"
    local authorized="${ssh_dir}/authorized_keys"
    local installed=0
    local key
    mkdir -p "${ssh_dir}"
    chmod 700 "${ssh_dir}"
    touch "${authorized}"
    chmod 600 "${authorized}"
    while IFS= read -r key; do
        key="${key%$'\r'}"
        if [[ -z "${key// /}" || "${key}" == "null" ]]; then
            continue
        fi
        if ! grep -qxF -- "${key}" "${authorized}"; then
            printf '%s\n' "${key}" >>"${authorized}"
        fi
        installed=$((installed + 1))
    done <<<"${keys}"
    echo "${installed}"
}

start_sshd() {
    # Host keys are deleted when the base image is built, so every container makes its own.
    ssh-keygen -A
    mkdir -p "${SSHD_PRIVILEGE_DIR}"
    if command -v service >/dev/null 2>&1 && service ssh start; then
        return 0
    fi
    "$(command -v sshd || echo /usr/sbin/sshd)"
}

setup_ssh() {
    local installed
    installed="$(install_public_keys)"
    if [[ "${installed}" -eq 0 ]]; then
        log "no PUBLIC_KEY given: SSH is not started (create the pod with SSH on, e.g. by hctl)"
        return 0
    fi
    log "installed ${installed} public key(s); starting sshd"
    start_sshd
}

# SSH sessions start with a clean environment; they read this file from ~/.bashrc instead.
export_environment() {
    local entry name
    : >"${RP_ENVIRONMENT_FILE}"
    while IFS= read -r -d '' entry; do
        name="${entry%%=*}"
        case "${name}" in
        PUBLIC_KEY | SSH_PUBLIC_KEY | JUPYTER_PASSWORD) continue ;;
        esac
        [[ "${name}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        printf 'export %s=%q\n' "${name}" "${entry#*=}" >>"${RP_ENVIRONMENT_FILE}"
    done < <(env -0)
    chmod 600 "${RP_ENVIRONMENT_FILE}"
    local bashrc="${HOME}/.bashrc"
    local line="[ -f ${RP_ENVIRONMENT_FILE} ] && . ${RP_ENVIRONMENT_FILE}"
    touch "${bashrc}"
    # First line, because Ubuntu's ~/.bashrc returns early for non-interactive shells.
    if ! grep -qxF -- "${line}" "${bashrc}"; then
        printf '%s\n%s\n' "${line}" "$(cat "${bashrc}")" >"${bashrc}"
    fi
}

# The pod's own deadline, when it was created with one (see hctl.services.lease).
start_lease_watchdog() {
    if [[ -z "${HCTL_LEASE_UNTIL:-}" || -z "${HCTL_LEASE_COMMAND:-}" ]]; then
        return 0
    fi
    log "starting the lease watchdog"
    setsid "${HCTL_PYTHON}" -m hctl.watchdog --from-env >/dev/null 2>&1 </dev/null &
}

# The caches live on the volume: the container disk is small and wiped on every stop.
prepare_caches() {
    local folder
    for folder in "${HF_HOME:-}" "${PIP_CACHE_DIR:-}" "${UV_CACHE_DIR:-}"; do
        [[ -n "${folder}" ]] && mkdir -p "${folder}" 2>/dev/null || true
    done
}

main() {
    setup_ssh
    start_lease_watchdog
    prepare_caches
    export_environment
    if [[ -x "${BASE_START_SCRIPT}" ]]; then
        exec env -u PUBLIC_KEY -u SSH_PUBLIC_KEY "${BASE_START_SCRIPT}"
    fi
    [[ -f /pre_start.sh ]] && bash /pre_start.sh
    [[ -f /post_start.sh ]] && bash /post_start.sh
    log "ready"
    exec sleep infinity
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
