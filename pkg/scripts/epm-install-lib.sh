#!/bin/bash
# Shared by preinstall, postinstall and uninstall.sh. Sourced, not run.
# Functions only: nothing here acts when sourced. The paths are used by the
# scripts that source this file.
# shellcheck disable=SC2034

EPM_DAEMON_LABEL="com.epm.epmd"
EPM_HELPER_LABEL="com.epm.helper"
EPM_DAEMON_PLIST="/Library/LaunchDaemons/${EPM_DAEMON_LABEL}.plist"
EPM_HELPER_PLIST="/Library/LaunchAgents/${EPM_HELPER_LABEL}.plist"
EPM_SUPPORT_DIR="/Library/Application Support/EPM"
EPM_LOG_DIR="/Library/Logs/EPM"
EPM_HELPER_APP="${EPM_SUPPORT_DIR}/EPM Helper.app"
LSREGISTER="/System/Library/Frameworks/CoreServices.framework/Frameworks/LaunchServices.framework/Support/lsregister"

# The user logged in at the console, read from `scutil` output on stdin
# (`show State:/Users/ConsoleUser`). Prints nothing when nobody is: the login
# window (loginwindow), Setup Assistant (_mbsetupuser) and root do not count,
# because a per-user helper must not run in their sessions.
console_user_from_scutil() {
    local name
    name="$(awk '/^[[:space:]]*Name[[:space:]]*:/ && !/kCGSSessionUserNameKey/ { sub(/^[[:space:]]*Name[[:space:]]*:[[:space:]]*/, ""); print; exit }')"
    case "$name" in
        "" | loginwindow | _mbsetupuser | root) return 0 ;;
        *) printf '%s\n' "$name" ;;
    esac
}

# The console user on this Mac, or nothing.
console_user() {
    printf 'show State:/Users/ConsoleUser\n' | scutil | console_user_from_scutil
}

# Stops a launchd job if it is loaded; quiet and successful when it is not.
bootout_if_loaded() {
    local domain="$1" label="$2"
    if launchctl print "${domain}/${label}" >/dev/null 2>&1; then
        launchctl bootout "${domain}/${label}" || true
    fi
}

# Loads the helper into the console user's GUI session, if someone is
# logged in; otherwise launchd starts it at their next login.
bootstrap_helper_for_console_user() {
    local user uid
    user="$(console_user)"
    if [[ -z "$user" ]]; then
        echo "epm: nobody is logged in; the helper starts at the next login"
        return 0
    fi
    uid="$(id -u "$user")"
    bootout_if_loaded "gui/${uid}" "$EPM_HELPER_LABEL"
    launchctl bootstrap "gui/${uid}" "$EPM_HELPER_PLIST"
    echo "epm: helper started for ${user}"
}
