/*
 * domiciled: the Domicile gateway daemon.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <openssl/crypto.h>

#include "domicile/api.h"
#include "domicile/log.h"
#include "domicile/peer.h"
#include "domicile/metrics.h"
#include "domicile/sdnotify.h"

static void usage(FILE *f)
{
    fputs("usage: domiciled --config FILE [options]\n"
          "  -c, --config FILE     gateway configuration (libconfig syntax)\n"
          "      --check-config    check every file the gateway loads (config, regions, secrets'\n"
          "                        presence and modes, principals, bases, routes, customer\n"
          "                        webhooks), print the configuration (no secrets), exit\n"
          "      --listen ADDR     override `listen` (host:port, port 0 = any free port)\n"
          "      --ready-fd N      write \"READY <port>\\n\" to fd N once serving, then close it\n"
          "      --list-methods    print every rpc with its kind and exit\n"
          "  -V, --version         print the version and exit\n",
          f);
}

static const char *kind_name(dm_rpc_kind_t k)
{
    switch (k) {
    case DM_RPC_UNARY:
        return "unary";
    case DM_RPC_SERVER_STREAM:
        return "server-stream";
    case DM_RPC_CLIENT_STREAM:
        return "client-stream";
    case DM_RPC_BIDI_STREAM:
        return "bidi-stream";
    }
    return "?";
}

static void signal_ready(int fd, int port)
{
    char line[32];
    int n = snprintf(line, sizeof(line), "READY %d\n", port);
    if (write(fd, line, (size_t)n) != n)
        dm_warn("main", "cannot write the readiness line to fd %d: %s", fd, strerror(errno));
    close(fd);
}

/* Tells systemd (Type=notify) that we serve; a no-op without $NOTIFY_SOCKET. */
static void notify_ready(const char *addr, int port)
{
    char msg[512];
    const char *colon = strrchr(addr, ':');
    int host_len = colon ? (int)(colon - addr) : (int)strlen(addr);
    snprintf(msg, sizeof(msg), "READY=1\nSTATUS=serving on %.*s:%d", host_len, addr, port);
    int r = dm_sd_notify(msg);
    if (r < 0)
        dm_warn("main", "cannot notify the service manager ($NOTIFY_SOCKET): %s", strerror(-r));
}

/* systemd: a reload starts (READY=1 again when it is over); the timestamp is what
 * Type=notify-reload expects. */
static void notify_reloading(void)
{
    char msg[64];
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    snprintf(msg, sizeof(msg), "RELOADING=1\nMONOTONIC_USEC=%lld",
             (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000);
    dm_sd_notify(msg);
}

/* Every client connection and every region connection is a descriptor, and gRPC 1.51 stops
 * accepting for good once accept4 fails with EMFILE (grpc/grpc#16058): seen at about 1,000
 * connections under a shell's default soft limit of 1024. Take the hard limit. */
#define NOFILE_FLOOR 4096
#define NOFILE_CAP   1048576 /* the kernel's default nr_open, for an unlimited hard limit */

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) {
        dm_warn("main", "getrlimit(RLIMIT_NOFILE): %s", strerror(errno));
        return;
    }
    rlim_t before = rl.rlim_cur;
    rlim_t want =
        rl.rlim_max == RLIM_INFINITY || rl.rlim_max > NOFILE_CAP ? NOFILE_CAP : rl.rlim_max;
    if (rl.rlim_cur < want) {
        rl.rlim_cur = want;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
            dm_warn("main", "cannot raise the open-files limit from %llu to %llu: %s",
                    (unsigned long long)before, (unsigned long long)want, strerror(errno));
            rl.rlim_cur = before;
        } else {
            dm_info("main", "open-files limit raised from %llu to %llu (the hard limit)",
                    (unsigned long long)before, (unsigned long long)want);
        }
    }
    if (rl.rlim_cur < NOFILE_FLOOR)
        dm_warn("main",
                "open-files limit is %llu: fewer than that many client connections can be "
                "served; raise the hard limit (LimitNOFILE=, ulimit -Hn) to %d or more",
                (unsigned long long)rl.rlim_cur, NOFILE_FLOOR);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'}, {"check-config", no_argument, NULL, 'k'},
        {"listen", required_argument, NULL, 'l'}, {"ready-fd", required_argument, NULL, 'r'},
        {"list-methods", no_argument, NULL, 'm'}, {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    const char *config_path = NULL, *listen = NULL;
    bool check_only = false;
    int ready_fd = -1, opt, port = 0, rc = 1;
    dm_app_t app = {0};
    dm_status_t *st = NULL;
    sigset_t sigs;

    /* No OpenSSL tear-down at exit: gRPC 1.51 may still be finishing a peer channel's TLS
     * set-up on a thread of its own after grpc_shutdown_blocking() (a gateway that exits
     * while a peer is connecting), and OPENSSL_cleanup() would free what that thread reads.
     * The process is ending: the kernel takes the memory back. First OpenSSL call. */
    OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, NULL);

    while ((opt = getopt_long(argc, argv, "c:Vh", opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 'k':
            check_only = true;
            break;
        case 'l':
            listen = optarg;
            break;
        case 'r':
            ready_fd = atoi(optarg);
            break;
        case 'm': {
            size_t n;
            const dm_method_t *m = dm_api_methods(&n);
            for (size_t i = 0; i < n; i++) {
                char roles[128];
                dm_roles_format(m[i].roles, roles, sizeof(roles));
                for (char *r = roles; *r; r++)
                    if (*r == ' ')
                        memmove(r, r + 1, strlen(r));
                printf("%s %s %s roles=%s\n", m[i].path, kind_name(m[i].kind),
                       m[i].handler ? "implemented" : "unimplemented",
                       m[i].roles == DM_ROLES_GATEWAY ? "gateway"
                       : m[i].roles                   ? roles
                                                      : "public");
            }
            return 0;
        }
        case 'V':
            printf("domiciled %s (grpc core %s)\n", DM_VERSION, grpc_version_string());
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (!config_path || optind != argc) {
        usage(stderr);
        return 2;
    }

    /* Block the signals before any thread exists (gRPC's included): only sigwait sees them. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    if ((st = dm_config_load(config_path, &app.cfg))) {
        fprintf(stderr, "domiciled: invalid configuration: %s\n", st->message);
        dm_status_free(st);
        return 2;
    }
    if (listen) {
        free(app.cfg->listen);
        app.cfg->listen = dm_strdup(listen);
    }
    /* Everything else the gateway will load (principals, bases and routes, customer
     * webhooks), before anything starts: a file it cannot load is refused here, with its
     * file:line, for --check-config and for a start alike. */
    if ((st = dm_app_check(app.cfg, check_only ? stdout : NULL))) {
        fprintf(stderr, "domiciled: invalid configuration: %s\n", st->message);
        dm_status_free(st);
        dm_config_free(app.cfg);
        return 2;
    }
    if (check_only) {
        dm_config_print(app.cfg, stdout);
        dm_config_free(app.cfg);
        return 0;
    }
    dm_log_level_t level = DM_LOG_INFO;
    dm_log_level_parse(app.cfg->log_level, &level);
    dm_log_set_level(level);
    raise_nofile();

    grpc_init();
    size_t n_methods;
    const dm_method_t *methods = dm_api_methods(&n_methods);
    if ((st = dm_regions_create(app.cfg, &app.regions)))
        goto out;
    if ((st = dm_app_init(&app)))
        goto out;
    if ((st = dm_peers_create(app.cfg, app.regions, &app.peers)))
        goto out;
    dm_regions_set_remote(app.regions, dm_peers_submit, app.peers);
    app.health = dm_health_create(&app);
    dm_regions_on_change(app.regions, dm_health_region_changed, app.health);
    if ((st = dm_server_create(app.cfg, methods, n_methods, &app, &app.server)))
        goto out;
    if (app.cfg->probe_listen[0] &&
        (st = dm_server_add_probe(app.server, app.cfg->probe_listen, dm_api_probe_method())))
        goto out;
    dm_metrics_init(n_methods);
    if ((st = dm_metrics_start(&app, app.cfg->metrics_listen)))
        goto out;
    dm_server_on_shutdown(app.server, dm_health_shutdown, app.health);
    dm_server_set_authorizer(app.server, dm_authorize, &app);
    dm_regions_start(app.regions);
    dm_app_start(&app);
    dm_peers_start(app.peers);
    if ((st = dm_server_start(app.server, &port)))
        goto out;
    dm_info("main", "domiciled %s serving on %s (port %d), gateway region \"%s\", %zu regions",
            DM_VERSION, app.cfg->listen, port, app.cfg->gateway_region, app.cfg->n_regions);
    if (ready_fd >= 0)
        signal_ready(ready_fd, port);
    notify_ready(app.cfg->listen, port);

    int sig = 0;
    for (;;) {
        sigwait(&sigs, &sig);
        if (sig != SIGHUP)
            break;
        dm_info("main", "received SIGHUP: reloading %s", config_path);
        notify_reloading();
        if ((st = dm_app_reload(&app, config_path))) {
            dm_error("config",
                     "reload failed, keeping the running configuration (principals, transfer "
                     "policy and settings as before): %s",
                     st->message);
            dm_status_free(st);
            st = NULL;
        }
        notify_ready(app.cfg->listen, port); /* reload done (or refused): serving again */
    }
    dm_info("main", "received %s", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    dm_sd_notify("STOPPING=1");
    dm_server_shutdown(app.server, app.cfg->shutdown_grace_ms);
    rc = 0;
out:
    if (st) {
        dm_error("main", "cannot start: %s%s%s", st->message, st->detail ? ": " : "",
                 st->detail ? st->detail : "");
        dm_status_free(st);
    }
    /* Order matters: nothing that can start a batch may outlive the completion queues. */
    dm_metrics_stop();
    dm_webhooks_stop(app.webhooks); /* it runs statements: before the regions stop */
    dm_peers_stop(app.peers);       /* cancels what is in flight; callbacks run now */
    dm_app_stop(&app);              /* key custody runs statements too */
    if (app.regions)
        dm_regions_stop(app.regions);
    dm_server_destroy(app.server);
    dm_health_destroy(app.health);
    dm_peers_destroy(app.peers);
    dm_regions_destroy(app.regions);
    dm_app_dispose(&app);
    /* Blocking: gRPC may otherwise finish its clean-up on a thread of its own (a peer
     * channel's subchannel still connecting) while exit() tears OpenSSL down under it. */
    grpc_shutdown_blocking();
    dm_config_free(app.cfg);
    if (rc == 0)
        dm_info("main", "exiting cleanly");
    return rc;
}
