/*
 * domicilectl: command-line client of the Domicile gateway.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/grpc.h>

#include "grpc/health/v1/health.pb-c.h"

#include "domicile/client.h"

#define HEALTH_CHECK "/grpc.health.v1.Health/Check"
#define HEALTH_WATCH "/grpc.health.v1.Health/Watch"

static void usage(FILE *f)
{
    fputs("usage: domicilectl [--addr HOST:PORT] [--timeout MS] COMMAND [ARGS]\n"
          "  --addr HOST:PORT   gateway address (default $DOMICILE_ADDR or 127.0.0.1:50051)\n"
          "  --timeout MS       deadline of each call (default 5000)\n"
          "commands:\n"
          "  health [SERVICE]   grpc.health.v1 Check: \"\" = gateway, domicile.region.<code>\n"
          "  watch [SERVICE]    grpc.health.v1 Watch: print every status change\n",
          f);
}

static const char *serving_name(int s)
{
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
        &grpc__health__v1__health_check_response__serving_status__descriptor, s);
    return v ? v->name : "?";
}

static bool print_watch(const ProtobufCMessage *m, void *arg)
{
    const Grpc__Health__V1__HealthCheckResponse *r =
        (const Grpc__Health__V1__HealthCheckResponse *)m;
    printf("%s\n", serving_name(r->status));
    fflush(stdout);
    return true;
}

static int fail(dm_status_t *st)
{
    fprintf(stderr, "domicilectl: %s: %s\n", dm_status_code_name(st->code), st->message);
    int code = (int)st->code;
    dm_status_free(st);
    return code == 0 ? 1 : 10 + code; /* distinct exit codes per status, for scripts */
}

static int cmd_health(dm_client_t *c, int argc, char **argv, int timeout_ms, bool watch)
{
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    req.service = argc > 0 ? argv[0] : "";
    if (watch) {
        dm_status_t *st = dm_client_server_stream(
            c, HEALTH_WATCH, &req.base, &grpc__health__v1__health_check_response__descriptor,
            timeout_ms, print_watch, NULL);
        return st ? fail(st) : 0;
    }
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, HEALTH_CHECK, &req.base,
                        &grpc__health__v1__health_check_response__descriptor, timeout_ms, &resp);
    if (st)
        return fail(st);
    int s = ((Grpc__Health__V1__HealthCheckResponse *)resp)->status;
    printf("%s\n", serving_name(s));
    protobuf_c_message_free_unpacked(resp, NULL);
    return s == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? 0 : 3;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"addr", required_argument, NULL, 'a'},
        {"timeout", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *addr = getenv("DOMICILE_ADDR") ? getenv("DOMICILE_ADDR") : "127.0.0.1:50051";
    int timeout_ms = 5000, opt, rc;

    while ((opt = getopt_long(argc, argv, "+a:t:h", opts, NULL)) != -1) {
        switch (opt) {
        case 'a':
            addr = optarg;
            break;
        case 't':
            timeout_ms = atoi(optarg);
            if (timeout_ms < 0 || timeout_ms > 3600000) {
                fprintf(stderr, "domicilectl: --timeout must be 0..3600000 ms\n");
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[optind++];
    grpc_init();
    dm_client_t *c = dm_client_create(addr);
    if (strcmp(cmd, "health") == 0) {
        rc = cmd_health(c, argc - optind, argv + optind, timeout_ms, false);
    } else if (strcmp(cmd, "watch") == 0) {
        rc = cmd_health(c, argc - optind, argv + optind, 0, true);
    } else {
        fprintf(stderr, "domicilectl: unknown command \"%s\"\n", cmd);
        usage(stderr);
        rc = 2;
    }
    dm_client_destroy(c);
    grpc_shutdown();
    return rc;
}
