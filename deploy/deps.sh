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
# build: compiler, CMake, gRPC core, protobuf-c, libpq, OpenSSL, libcurl, libconfig, jansson,
#        the PKCS#11 header (libp11-kit-dev)
# run:   PostgreSQL 15 server and client, the openssl CLI, CA certificates, pgBackRest
#        (deploy/local backups: domicile-local backup/restore), SoftHSM2 (the regions'
#        PKCS#11 tokens of deploy/local)
# test:  build + run + Python gRPC client, pytest, PyYAML (deployment manifests), cmocka,
#        valgrind, clang and its sanitizer runtime (libFuzzer, LeakSanitizer) for tests/fuzz,
#        PyKCS11 (a second PKCS#11 client, to look into the tokens) and gdb (gcore) for
#        tests/integration/test_keys.py,
#        Node.js and npm from Debian when no npm is on PATH (for buf, and for the second gRPC
#        client stack of the integration tests, tests/integration/node, which installs its
#        own pinned packages), and buf (tests api.lint, api.breaking) from npm:
#        @bufbuild/buf, pinned, into $DOMICILE_BUF_DIR (default /var/cache/domicile/buf as
#        root, ~/.cache/domicile/buf otherwise); python3-jsonschema (the Grafana dashboard's
#        check) and promtool (tests monitoring.*: the alerting rules), taken out of Debian's
#        prometheus package into $DOMICILE_PROMTOOL_DIR (default /var/cache/domicile/promtool
#        as root, ~/.cache/domicile/promtool otherwise) unless promtool is on PATH: the
#        package itself would also install and start a Prometheus server
#
# Each package is checked with dpkg-query; apt-get update + apt-get install run only when
# something is missing, so a machine that has everything pays one dpkg-query call and
# prints nothing. Works as root on a fresh Debian 12 image (no sudo needed); as another
# user it uses sudo when sudo exists.

DOMICILE_DEPS_BUILD="build-essential cmake pkg-config libgrpc-dev protobuf-c-compiler
libprotobuf-c-dev protobuf-compiler libpq-dev libssl-dev libcurl4-openssl-dev libconfig-dev
libjansson-dev libmicrohttpd-dev libp11-kit-dev"
DOMICILE_DEPS_RUN="postgresql-15 postgresql-client-15 openssl ca-certificates pgbackrest softhsm2"
DOMICILE_DEPS_TEST="python3-grpcio python3-protobuf python3-pytest python3-yaml python3-jsonschema
libcmocka-dev valgrind clang libclang-rt-14-dev python3-pykcs11 gdb"
# buf is not packaged by Debian; the npm package ships the release binary.
DOMICILE_BUF_VERSION=1.75.0
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
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        domicile_apt_install $missing || return 1
    fi
    case " $* " in *" test "*) domicile_deps_node && domicile_deps_buf && domicile_deps_promtool || return 1 ;; esac
    return 0
}

# domicile_apt_install PKG... — apt-get install, as root or through sudo.
domicile_apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "deps.sh: missing packages: $* — run as root to install them" >&2
            return 1
        fi
    fi
    echo "deps.sh: installing: $*" >&2
    $sudo apt-get update -qq || return 1
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" || return 1
}

# domicile_buf_dir — where deps.sh installs buf (tests/api/buf-check looks there too).
domicile_buf_dir() {
    if [ -n "${DOMICILE_BUF_DIR:-}" ]; then
        echo "$DOMICILE_BUF_DIR"
    elif [ "$(id -u)" -eq 0 ]; then
        echo /var/cache/domicile/buf
    else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/domicile/buf"
    fi
}

# domicile_deps_node — Node.js and npm. They may come from elsewhere (NodeSource ships npm
# inside its nodejs package, which conflicts with Debian's npm): only a machine without npm
# gets Debian's.
domicile_deps_node() {
    command -v npm >/dev/null 2>&1 || domicile_apt_install nodejs npm
}

# domicile_deps_buf — buf $DOMICILE_BUF_VERSION in $(domicile_buf_dir), unless it is there.
domicile_deps_buf() {
    local dir buf
    dir=$(domicile_buf_dir)
    buf="$dir/node_modules/.bin/buf"
    if [ -x "$buf" ] && [ "$("$buf" --version 2>/dev/null)" = "$DOMICILE_BUF_VERSION" ]; then
        return 0
    fi
    domicile_deps_node || return 1
    echo "deps.sh: installing buf $DOMICILE_BUF_VERSION from npm into $dir" >&2
    mkdir -p "$dir" || return 1
    npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
        "@bufbuild/buf@$DOMICILE_BUF_VERSION" >&2 || return 1
    [ "$("$buf" --version 2>/dev/null)" = "$DOMICILE_BUF_VERSION" ] || {
        echo "deps.sh: $buf is not buf $DOMICILE_BUF_VERSION after npm install" >&2
        return 1
    }
}

# domicile_promtool_dir — where deps.sh puts promtool (tests/monitoring/promtool-check looks
# there too).
domicile_promtool_dir() {
    if [ -n "${DOMICILE_PROMTOOL_DIR:-}" ]; then
        echo "$DOMICILE_PROMTOOL_DIR"
    elif [ "$(id -u)" -eq 0 ]; then
        echo /var/cache/domicile/promtool
    else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/domicile/promtool"
    fi
}

# domicile_deps_promtool — promtool from Debian's prometheus package (apt-get download, then
# only usr/bin/promtool out of the .deb), unless one is on PATH or already there.
domicile_deps_promtool() {
    local dir tmp deb
    command -v promtool >/dev/null 2>&1 && return 0
    dir=$(domicile_promtool_dir)
    [ -x "$dir/promtool" ] && return 0
    if ! apt-cache show prometheus >/dev/null 2>&1; then
        local sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo apt-get update -qq || return 1
    fi
    echo "deps.sh: installing promtool from Debian's prometheus package into $dir" >&2
    tmp=$(mktemp -d) || return 1
    chmod 0777 "$tmp" # apt's sandbox user (_apt) writes the download there
    (cd "$tmp" && apt-get download -qq prometheus) || {
        rm -rf "$tmp"
        return 1
    }
    deb=$(find "$tmp" -maxdepth 1 -name 'prometheus_*.deb' | head -n 1)
    mkdir -p "$dir" && dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" ./usr/bin/promtool &&
        install -m 0755 "$tmp/usr/bin/promtool" "$dir/promtool"
    local rc=$?
    rm -rf "$tmp"
    [ "$rc" -eq 0 ] && "$dir/promtool" --version >/dev/null 2>&1
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
