#!/bin/bash
# Removes EPM from this Mac: run as root (`sudo bash uninstall.sh`), or push
# it as an MDM script. Keeps the audit log unless --purge is given, because
# an uninstall must not erase the record of what happened.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=scripts/epm-install-lib.sh
. "$here/scripts/epm-install-lib.sh"

purge=false
case "${1:-}" in
    "") ;;
    --purge) purge=true ;;
    -h | --help)
        echo "usage: sudo $0 [--purge]    (--purge also deletes the audit log and the state)"
        exit 0
        ;;
    *)
        echo "unknown argument: $1 (see --help)" >&2
        exit 2
        ;;
esac
if [[ $(id -u) -ne 0 ]]; then
    echo "run as root: sudo $0" >&2
    exit 1
fi

user="$(console_user)"
if [[ -n "$user" ]]; then
    bootout_if_loaded "gui/$(id -u "$user")" "$EPM_HELPER_LABEL"
fi
bootout_if_loaded system "$EPM_DAEMON_LABEL"
# sudo refuses to run when sudo.conf names a plugin that is gone: take the
# line out first (a copy of the old file stays beside it).
if [[ -f /etc/sudo.conf ]] && grep -q '^Plugin epm_approval ' /etc/sudo.conf; then
    cp -p /etc/sudo.conf /etc/sudo.conf.epm-uninstall
    grep -v '^Plugin epm_approval ' /etc/sudo.conf.epm-uninstall >/etc/sudo.conf || true
fi
rm -f "$EPM_DAEMON_PLIST" "$EPM_HELPER_PLIST" /usr/local/bin/epmctl /usr/local/lib/epm/libepm_sudo.dylib
"$LSREGISTER" -u "$EPM_HELPER_APP" 2>/dev/null || true
rm -rf "${EPM_SUPPORT_DIR:?}/epmd.app" "${EPM_SUPPORT_DIR:?}/EPM Helper.app" "${EPM_SUPPORT_DIR:?}/bin"
if $purge; then
    rm -rf "$EPM_SUPPORT_DIR" "$EPM_LOG_DIR"
fi
pkgutil --forget com.epm.pkg >/dev/null 2>&1 || true
echo "epm: removed$($purge && echo ', with its state and audit log' || echo '; the audit log stays in '"$EPM_LOG_DIR")"
