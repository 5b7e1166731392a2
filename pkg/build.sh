#!/bin/bash
# Builds the signed, notarized EPM installer package from release binaries.
# Runs on a Mac with Xcode's command line tools; see docs/deploy-macos.md.
#
#   pkg/build.sh --version 1.2.0 --bin-dir target/universal/release \
#       --app-identity "Developer ID Application: Example Corp (ABCDE12345)" \
#       --installer-identity "Developer ID Installer: Example Corp (ABCDE12345)" \
#       --provisioning-profile epmd.provisionprofile --notary-profile epm-notary
#
# --dry-run stages the package tree and prints the signing, packaging and
# notarization commands instead of running them (works on any OS; CI uses it).
set -euo pipefail

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'USAGE'
Options:
  --version V                 package version (required)
  --bin-dir DIR               holds epmd, epm-helper, epmctl and libepm_sudo.dylib (required)
  --app-identity NAME         codesign identity for the binaries (required unless --dry-run)
  --installer-identity NAME   productbuild identity for the package (required unless --dry-run)
  --provisioning-profile FILE embedded in epmd.app; authorizes the ES entitlement (required unless --dry-run)
  --notary-profile NAME       notarytool keychain profile; without it the package is not notarized
  --out DIR                   where EPM-<version>.pkg goes (default: dist)
  --dry-run                   print the Apple tool commands instead of running them
USAGE
}

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
version="" bin_dir="" app_identity="" installer_identity="" profile="" notary_profile=""
out="dist" dry_run=false
while (($#)); do
    case "$1" in
        --version) version="${2:?--version needs a value}"; shift 2 ;;
        --bin-dir) bin_dir="${2:?--bin-dir needs a value}"; shift 2 ;;
        --app-identity) app_identity="${2:?--app-identity needs a value}"; shift 2 ;;
        --installer-identity) installer_identity="${2:?--installer-identity needs a value}"; shift 2 ;;
        --provisioning-profile) profile="${2:?--provisioning-profile needs a value}"; shift 2 ;;
        --notary-profile) notary_profile="${2:?--notary-profile needs a value}"; shift 2 ;;
        --out) out="${2:?--out needs a value}"; shift 2 ;;
        --dry-run) dry_run=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

fail() { echo "build.sh: $*" >&2; exit 2; }
[[ -n "$version" ]] || fail "--version is required"
[[ "$version" =~ ^[0-9]+(\.[0-9]+){0,2}$ ]] || fail "--version must look like 1.2.3, not $version"
[[ -n "$bin_dir" ]] || fail "--bin-dir is required"
for binary in epmd epm-helper epmctl libepm_sudo.dylib; do
    [[ -f "$bin_dir/$binary" ]] || fail "$bin_dir/$binary is missing: build the release binaries first"
done
if ! $dry_run; then
    [[ -n "$app_identity" ]] || fail "--app-identity is required"
    [[ -n "$installer_identity" ]] || fail "--installer-identity is required"
    [[ -f "$profile" ]] || fail "--provisioning-profile must name the epmd provisioning profile file"
fi
app_identity="${app_identity:-DRY-RUN application identity}"
installer_identity="${installer_identity:-DRY-RUN installer identity}"

# Apple tools run through here, so --dry-run shows exactly what would run.
run() {
    if $dry_run; then
        printf 'would run:'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

step() { printf '==> %s\n' "$*"; }

work="$(mktemp -d "${TMPDIR:-/tmp}/epm-pkg.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
support="$root/Library/Application Support/EPM"

step "staging the package tree"
install -d "$support/epmd.app/Contents/MacOS" "$support/EPM Helper.app/Contents/MacOS" "$support/bin" \
    "$root/Library/LaunchDaemons" "$root/Library/LaunchAgents" "$root/usr/local/bin" \
    "$root/usr/local/lib/epm"
install -m 0755 "$bin_dir/epmd" "$support/epmd.app/Contents/MacOS/epmd"
install -m 0755 "$bin_dir/epm-helper" "$support/EPM Helper.app/Contents/MacOS/epm-helper"
install -m 0755 "$bin_dir/epmctl" "$support/bin/epmctl"
ln -s "../../../Library/Application Support/EPM/bin/epmctl" "$root/usr/local/bin/epmctl"
# The sudo approval plugin; /etc/sudo.conf is the administrator's to change.
install -m 0644 "$bin_dir/libepm_sudo.dylib" "$root/usr/local/lib/epm/libepm_sudo.dylib"
sed "s/@VERSION@/$version/g" "$here/bundles/epmd-Info.plist" >"$support/epmd.app/Contents/Info.plist"
sed "s/@VERSION@/$version/g" "$here/bundles/helper-Info.plist" >"$support/EPM Helper.app/Contents/Info.plist"
if [[ -n "$profile" ]]; then
    install -m 0644 "$profile" "$support/epmd.app/Contents/embedded.provisionprofile"
fi
install -m 0644 "$here/epmd.toml.default" "$support/epmd.toml.default"
# The uninstaller ships with its library, laid out as in this directory.
install -d "$support/scripts"
install -m 0755 "$here/uninstall.sh" "$support/uninstall.sh"
install -m 0644 "$here/scripts/epm-install-lib.sh" "$support/scripts/epm-install-lib.sh"
install -m 0644 "$repo/launchd/com.epm.epmd.plist" "$root/Library/LaunchDaemons/"
install -m 0644 "$repo/launchd/com.epm.helper.plist" "$root/Library/LaunchAgents/"
sed "s/@VERSION@/$version/g" "$here/Distribution.xml" >"$work/Distribution.xml"

step "signing (hardened runtime, secure timestamp)"
sign=(codesign --force --options runtime --timestamp --sign "$app_identity")
run "${sign[@]}" "$support/bin/epmctl"
# sudo loads plugins with library validation: the plugin must be signed.
run "${sign[@]}" "$root/usr/local/lib/epm/libepm_sudo.dylib"
run "${sign[@]}" "$support/EPM Helper.app"
run "${sign[@]}" --entitlements "$here/entitlements/epmd.entitlements" "$support/epmd.app"
run codesign --verify --strict --verbose=2 "$support/epmd.app"

step "packaging"
run pkgbuild --root "$root" --scripts "$here/scripts" --identifier com.epm.pkg \
    --version "$version" --install-location / "$work/epm-component.pkg"
mkdir -p "$out"
product="$out/EPM-$version.pkg"
run productbuild --distribution "$work/Distribution.xml" --package-path "$work" \
    --sign "$installer_identity" --timestamp "$product"

if [[ -n "$notary_profile" ]]; then
    step "notarizing"
    run xcrun notarytool submit "$product" --keychain-profile "$notary_profile" --wait
    run xcrun stapler staple "$product"
    run xcrun stapler validate "$product"
else
    echo "build.sh: no --notary-profile: $product is signed but not notarized; MDM installs it, Gatekeeper on a double-click will not" >&2
fi
run pkgutil --check-signature "$product"
if $dry_run; then
    (cd "$root" && find . -print | LC_ALL=C sort)
fi
step "done: $product"
