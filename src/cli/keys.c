/*
 * domicilectl keys: a region's key-encryption key versions (KeysService).
 *
 *   keys status REGION              versions, data keys per version, the latest rotation
 *   keys rotate REGION [--wait]     a new version, current at once; the re-wrap of older data
 *                                   keys runs in the background. On a terminal (or --wait)
 *                                   the command follows it with a progress line until done.
 *   keys retire REGION VERSION      destroy a version no data key uses any more
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "domicile/client.h"
#include "domicile/output.h"
#include "domicile/v1/keys.pb-c.h"

#define KEYS    "/domicile.v1.KeysService/"
#define POLL_MS 500

#include "cli.h"

static int keys_fail(dm_status_t *st)
{
    fprintf(stderr, "domicilectl: %s: %s\n", dm_status_code_name(st->code), st->message);
    int code = (int)st->code;
    dm_status_free(st);
    return code == 0 ? 1 : 10 + code; /* as every other command: 10 + the status code */
}

static void keys_usage(FILE *f)
{
    fputs("usage: domicilectl keys status REGION\n"
          "       domicilectl keys rotate REGION [--wait|--no-wait]\n"
          "       domicilectl keys retire REGION VERSION\n",
          f);
}

static const char *iso(int64_t ms, char *buf, size_t len)
{
    if (ms <= 0)
        return "-";
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

static void print_status(const Domicile__V1__KeyStatus *s)
{
    char a[32], b[32];
    printf("region            %s\n", s->region);
    printf("kek_source        %s%s%s\n", s->kek_source, s->token[0] ? "  token " : "", s->token);
    printf("available         %s%s%s\n", s->available ? "yes" : "NO", s->available ? "" : ": ",
           s->available ? "" : s->unavailable_reason);
    printf("current_version   %d\n", s->current_version);
    printf("versions          version\tstate\tsource\tdata_keys\tcreated\tretired\tlabel\n");
    for (size_t i = 0; i < s->n_versions; i++) {
        const Domicile__V1__KeyVersion *v = s->versions[i];
        printf("                  %d%s\t%s\t%s\t%lld\t%s\t%s\t%s\n", v->version,
               v->current ? "*" : "", v->state, v->source, (long long)v->data_keys,
               iso(v->created_at_unix_ms, a, sizeof(a)), iso(v->retired_at_unix_ms, b, sizeof(b)),
               v->label[0] ? v->label : "-");
    }
    const Domicile__V1__KeyRotation *r = s->rotation;
    if (!r) {
        printf("rotation          none\n");
        return;
    }
    printf("rotation          %lld to version %d: %s, %lld of %lld re-wrapped, %lld left, "
           "started %s by %s%s%s\n",
           (long long)r->rotation_id, r->target_version, r->state, (long long)r->keys_rewrapped,
           (long long)r->keys_total, (long long)r->keys_remaining,
           iso(r->started_at_unix_ms, a, sizeof(a)), r->started_by[0] ? r->started_by : "-",
           r->finished_at_unix_ms ? ", finished " : "",
           r->finished_at_unix_ms ? iso(r->finished_at_unix_ms, b, sizeof(b)) : "");
    if (r->claimed_by[0])
        printf("rewrapping_on     %s (%.0f keys/s)\n", r->claimed_by, r->rewrap_per_second);
    if (r->last_error[0])
        printf("rotation_error    %s\n", r->last_error);
}

static int get_status(dm_client_t *c, int timeout_ms, const char *region,
                      Domicile__V1__GetKeyStatusResponse **out)
{
    Domicile__V1__GetKeyStatusRequest req = DOMICILE__V1__GET_KEY_STATUS_REQUEST__INIT;
    req.region = (char *)region;
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, KEYS "GetKeyStatus", &req.base,
                        &domicile__v1__get_key_status_response__descriptor, timeout_ms, &resp);
    if (st)
        return keys_fail(st);
    *out = (Domicile__V1__GetKeyStatusResponse *)resp;
    return 0;
}

static char *request_id(const char *what)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return dm_sprintf("ctl-keys-%s-%lld-%ld-%d", what, (long long)ts.tv_sec, ts.tv_nsec,
                      (int)getpid());
}

/* Follow the rotation until it is done: a progress line on a terminal, one line per change
 * otherwise. Returns 0 when done, else the failure's exit code. */
static int follow(dm_client_t *c, int timeout_ms, const char *region, int64_t rotation_id)
{
    bool tty = isatty(STDERR_FILENO);
    int64_t last_done = -1;
    for (;;) {
        Domicile__V1__GetKeyStatusResponse *resp = NULL;
        int rc = get_status(c, timeout_ms, region, &resp);
        if (rc)
            return rc;
        const Domicile__V1__KeyRotation *r = resp->status ? resp->status->rotation : NULL;
        if (!r || r->rotation_id != rotation_id) {
            fprintf(stderr, "%sdomicilectl: rotation %lld was superseded by another one\n",
                    tty ? "\n" : "", (long long)rotation_id);
            protobuf_c_message_free_unpacked(&resp->base, NULL);
            return 1;
        }
        int64_t total = r->keys_rewrapped + r->keys_remaining;
        double pct = total > 0 ? 100.0 * (double)r->keys_rewrapped / (double)total : 100.0;
        bool done = strcmp(r->state, "running") != 0;
        if (tty) {
            fprintf(stderr,
                    "\rrotation %lld to version %d: %lld/%lld data keys re-wrapped (%.1f%%)"
                    ", %.0f keys/s   ",
                    (long long)r->rotation_id, r->target_version, (long long)r->keys_rewrapped,
                    (long long)total, pct, r->rewrap_per_second);
        } else if (r->keys_rewrapped != last_done || done) {
            fprintf(stderr, "rotation %lld: %lld re-wrapped, %lld left\n",
                    (long long)r->rotation_id, (long long)r->keys_rewrapped,
                    (long long)r->keys_remaining);
        }
        last_done = r->keys_rewrapped;
        if (r->last_error[0])
            fprintf(stderr, "%sdomicilectl: rotation: %s\n", tty ? "\n" : "", r->last_error);
        if (done) {
            if (tty)
                fputc('\n', stderr);
            bool ok = strcmp(r->state, "done") == 0;
            protobuf_c_message_free_unpacked(&resp->base, NULL);
            return ok ? 0 : 1;
        }
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        struct timespec ts = {0, POLL_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
}

static int cmd_rotate(dm_client_t *c, int timeout_ms, int argc, char **argv)
{
    bool wait = isatty(STDERR_FILENO), region_seen = false;
    const char *region = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--wait") == 0) {
            wait = true;
        } else if (strcmp(argv[i], "--no-wait") == 0) {
            wait = false;
        } else if (!region_seen) {
            region = argv[i];
            region_seen = true;
        } else {
            keys_usage(stderr);
            return 2;
        }
    }
    if (!region) {
        keys_usage(stderr);
        return 2;
    }
    Domicile__V1__RotateKeyRequest req = DOMICILE__V1__ROTATE_KEY_REQUEST__INIT;
    char *rid = request_id("rotate");
    req.request_id = rid;
    req.region = (char *)region;
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, KEYS "RotateKey", &req.base,
                        &domicile__v1__rotate_key_response__descriptor, timeout_ms, &resp);
    free(rid);
    if (st)
        return keys_fail(st);
    const Domicile__V1__RotateKeyResponse *r = (const Domicile__V1__RotateKeyResponse *)resp;
    print_status(r->status);
    fflush(stdout);
    int64_t rotation = r->status && r->status->rotation ? r->status->rotation->rotation_id : 0;
    protobuf_c_message_free_unpacked(resp, NULL);
    return wait && rotation ? follow(c, timeout_ms, region, rotation) : 0;
}

static int cmd_retire(dm_client_t *c, int timeout_ms, int argc, char **argv)
{
    char *end = NULL;
    long v = argc == 3 ? strtol(argv[2], &end, 10) : 0;
    if (argc != 3 || !end || *end || v < 1 || v > 2147483647L) {
        keys_usage(stderr);
        return 2;
    }
    Domicile__V1__RetireKeyVersionRequest req = DOMICILE__V1__RETIRE_KEY_VERSION_REQUEST__INIT;
    char *rid = request_id("retire");
    req.request_id = rid;
    req.region = argv[1];
    req.version = (int32_t)v;
    ProtobufCMessage *resp = NULL;
    dm_status_t *st =
        dm_client_unary(c, KEYS "RetireKeyVersion", &req.base,
                        &domicile__v1__retire_key_version_response__descriptor, timeout_ms, &resp);
    free(rid);
    if (st)
        return keys_fail(st);
    print_status(((const Domicile__V1__RetireKeyVersionResponse *)resp)->status);
    protobuf_c_message_free_unpacked(resp, NULL);
    return 0;
}

int dm_ctl_keys(const dm_ctl_output_t *out, dm_client_t *c, int timeout_ms, int argc, char **argv)
{
    if (argc >= 1 && strcmp(argv[0], "rotate") == 0)
        return cmd_rotate(c, timeout_ms, argc, argv);
    if (argc >= 1 && strcmp(argv[0], "retire") == 0)
        return cmd_retire(c, timeout_ms, argc, argv);
    if (argc == 2 && strcmp(argv[0], "status") == 0) {
        Domicile__V1__GetKeyStatusResponse *resp = NULL;
        int rc = get_status(c, timeout_ms, argv[1], &resp);
        if (rc)
            return rc;
        rc = 0;
        if (out->fmt == DM_OUTPUT_JSON || out->fmt == DM_OUTPUT_JSONL) {
            /* One KeyStatus, as docs/cli.md's JSON contract says (the table stays the view
             * of one thing, a line per field, as dsr status). */
            dm_output_t *o = dm_output_create(stdout, out->fmt, DM_OUTPUT_ONE, 0, NULL, 0);
            dm_output_record(o, dm_output_message(&resp->status->base));
            rc = dm_output_end(o, true) ? 0 : 1;
        } else {
            print_status(resp->status);
        }
        protobuf_c_message_free_unpacked(&resp->base, NULL);
        return rc;
    }
    keys_usage(stderr);
    return 2;
}
