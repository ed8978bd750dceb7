#!/usr/bin/env bash
# deploy/deps.sh — install the Debian 12 packages Domicile needs, only the missing ones.
#
#   deploy/deps.sh [build] [run] [test]      (no argument = all three)
#   deploy/deps.sh patroni                   (optional, never part of the default: Patroni
#                                             and etcd for domicile-local up --patroni)
#   . deploy/deps.sh build                   (sourced: same, returns instead of exiting;
#                                             sourced without arguments it only defines
#                                             the function domicile_deps)
#
# build: compiler, CMake, gRPC core, protobuf-c, libpq, OpenSSL, libcurl, libconfig, jansson
# run:   PostgreSQL 15 server and client, the openssl CLI, CA certificates
# test:  build + run + Python gRPC client, pytest, PyYAML (deployment manifests), cmocka,
#        valgrind, clang and its sanitizer runtime (libFuzzer, LeakSanitizer) for tests/fuzz
#
# Each package is checked with dpkg-query; apt-get update + apt-get install run only when
# something is missing, so a machine that has everything pays one dpkg-query call and
# prints nothing. Works as root on a fresh Debian 12 image (no sudo needed); as another
# user it uses sudo when sudo exists.

DOMICILE_DEPS_BUILD="build-essential cmake pkg-config libgrpc-dev protobuf-c-compiler
libprotobuf-c-dev protobuf-compiler libpq-dev libssl-dev libcurl4-openssl-dev libconfig-dev
libjansson-dev libmicrohttpd-dev"
DOMICILE_DEPS_RUN="postgresql-15 postgresql-client-15 openssl ca-certificates"
DOMICILE_DEPS_TEST="python3-grpcio python3-protobuf python3-pytest python3-yaml libcmocka-dev valgrind
clang libclang-rt-14-dev"
# Optional (deploy/local Patroni mode, tests/integration/test_patroni.py): Patroni 3.0 with
# its etcd client library, and etcd 3.4 (server and etcdctl).
DOMICILE_DEPS_PATRONI="patroni python3-etcd etcd-server etcd-client"

domicile_deps() {
    local want="" set
    [ "$#" -eq 0 ] && set -- build run test
    for set in "$@"; do
        case "$set" in
            build) want="$want $DOMICILE_DEPS_BUILD" ;;
            run) want="$want $DOMICILE_DEPS_RUN" ;;
            test) want="$want $DOMICILE_DEPS_BUILD $DOMICILE_DEPS_RUN $DOMICILE_DEPS_TEST" ;;
            patroni) want="$want $DOMICILE_DEPS_PATRONI" ;;
            *)
                echo "deps.sh: unknown package set '$set' (expected build, run, test or patroni)" >&2
                return 2
                ;;
        esac
    done

    # One dpkg-query for all packages; names it does not know are simply absent from
    # its output (its complaints about them go to /dev/null).
    local installed missing="" pkg
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    installed=$(dpkg-query -W -f='${Package} ${Status}\n' $want 2>/dev/null || true)
    for pkg in $want; do
        case " $missing " in *" $pkg "*) continue ;; esac
        if ! printf '%s\n' "$installed" | grep -qx "$pkg install ok installed"; then
            missing="$missing $pkg"
        fi
    done
    [ -z "$missing" ] && return 0

    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "deps.sh: missing packages:$missing — run as root to install them" >&2
            return 1
        fi
    fi
    echo "deps.sh: installing:$missing" >&2
    # shellcheck disable=SC2086
    $sudo apt-get update -qq || return 1
    # shellcheck disable=SC2086
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends $missing || return 1
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Executed.
    set -euo pipefail
    domicile_deps "$@"
elif [ "$#" -gt 0 ]; then
    # Sourced with arguments.
    domicile_deps "$@"
fi

# domicile_deps_patroni — the optional Patroni + etcd packages (same checks as above).
domicile_deps_patroni() { domicile_deps patroni; }
