/*
 * What the drills of domicilectl share (src/cli/drill.c: failover, gateway;
 * src/cli/drill_restore.c: restore): the deploy/local regions, the options every drill takes,
 * domicile-local and its state, clients of the gateways, and the calls of the load. Not
 * installed. Nothing here keeps state: each drill owns its dm_ctl_drill_env_t, and the calls
 * only read it, so its load threads share it once it is set up.
 */
#ifndef DOMICILE_CLI_DRILL_COMMON_H
#define DOMICILE_CLI_DRILL_COMMON_H

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "domicile/client.h"
#include "domicile/v1/records.pb-c.h"

#define DM_CTL_N_REGIONS   3
#define DM_CTL_N_CODES     17 /* gRPC status codes 0..16 */
#define DM_CTL_LOCAL_STATE "/var/lib/domicile-local"

/** The deploy/local regions, in domicile-local's order: "us", "eu", "in". */
extern const char *const dm_ctl_regions[DM_CTL_N_REGIONS];

/* What every drill takes from its command line and from the deploy/local state. */
typedef struct dm_ctl_drill_env {
    const char *state;     /* --state, else $DOMICILE_LOCAL_STATE, else DM_CTL_LOCAL_STATE */
    const char *json_path; /* --json FILE|-; NULL: none */
    int target;            /* the drilled region (index into dm_ctl_regions), from --region */
    double rate;           /* --rate: calls per second of each load worker */
    int call_ms;           /* deadline of each call */
    char *local;           /* domicile-local (--domicile-local, else found), owned */
    char *ca_pem, *cert_pem, *key_pem; /* owned; ca_pem NULL: plaintext */
    char *token_admin;                 /* the state's admin token, owned, cleansed when freed */
} dm_ctl_drill_env_t;

/** Sets the defaults: `call_ms`, `rate`, the state from the environment; the rest zero. */
void dm_ctl_drill_env_init(dm_ctl_drill_env_t *env, int call_ms, double rate);
/** Frees what `env` owns (the token cleansed first). */
void dm_ctl_drill_env_dispose(dm_ctl_drill_env_t *env);

/*
 * The long options every drill has (for its `struct option` table) and their values; a
 * drill's own options use other values. --gateway is left to each drill: one keeps a list
 * per region, the other the first given.
 */
#define DM_CTL_DRILL_OPT_REGION  'r'
#define DM_CTL_DRILL_OPT_STATE   's'
#define DM_CTL_DRILL_OPT_JSON    'j'
#define DM_CTL_DRILL_OPT_RATE    'R'
#define DM_CTL_DRILL_OPT_LOCAL   'L'
#define DM_CTL_DRILL_OPT_GATEWAY 'g'
#define DM_CTL_DRILL_OPT_HELP    'h'
/* clang-format off */
#define DM_CTL_DRILL_OPTIONS                                                \
    {"region", required_argument, NULL, DM_CTL_DRILL_OPT_REGION},           \
    {"state", required_argument, NULL, DM_CTL_DRILL_OPT_STATE},             \
    {"json", required_argument, NULL, DM_CTL_DRILL_OPT_JSON},               \
    {"rate", required_argument, NULL, DM_CTL_DRILL_OPT_RATE},               \
    {"domicile-local", required_argument, NULL, DM_CTL_DRILL_OPT_LOCAL},    \
    {"gateway", required_argument, NULL, DM_CTL_DRILL_OPT_GATEWAY},         \
    {"help", no_argument, NULL, DM_CTL_DRILL_OPT_HELP}
/* clang-format on */

/**
 * One option of a drill's getopt_long loop, if it is one every drill has, or an unknown one
 * (getopt's '?'). --region is kept in *region (checked by dm_ctl_drill_args_end); --rate must
 * be 1..rate_max. Returns 1 when `opt` is none of those (the drill's own), 0 when taken, -1
 * after --help (usage on stdout), DM_EXIT_USAGE after a message or usage on stderr.
 */
int dm_ctl_drill_option(dm_ctl_drill_env_t *env, int opt, const char *arg, const char **region,
                        int rate_max, void (*usage)(FILE *));

/**
 * After the getopt_long loop: no operand left, --region given (else usage on stderr) and one
 * of dm_ctl_regions (else a message); sets env->target. Returns 0 or DM_EXIT_USAGE.
 */
int dm_ctl_drill_args_end(dm_ctl_drill_env_t *env, int argc, const char *region,
                          void (*usage)(FILE *));

/**
 * --gateway REGION=HOST:PORT: the region's index, *addr pointing into `arg` after the '=';
 * -1 if `arg` is not that (no message: each drill words its own).
 */
int dm_ctl_drill_gateway_arg(const char *arg, const char **addr);

/**
 * env->local, else domicile-local found next to this build or on PATH; false, with a
 * message, if there is none that runs.
 */
bool dm_ctl_drill_find_local(dm_ctl_drill_env_t *env);
/**
 * The TLS files of --cacert/--cert/--key into env (none when `cacert` is NULL: plaintext).
 * False, after a message naming `what`, when one given cannot be read: a drill never falls
 * back to plaintext.
 */
bool dm_ctl_drill_read_tls(dm_ctl_drill_env_t *env, const char *what, const char *cacert,
                           const char *cert, const char *key);

/** Runs `domicile-local --state STATE args...`: dm_ctl_run_local with env's. */
int dm_ctl_drill_local(const dm_ctl_drill_env_t *env, char **out, const char *const *args);

/**
 * One query in `region` (domicile-local psql REGION -At -c SQL): its rows, '|' separated,
 * caller frees; NULL if it failed.
 */
char *dm_ctl_drill_sql(const dm_ctl_drill_env_t *env, int region, const char *sql);

/**
 * The state's token STATE/secrets/tokens/NAME.token, trailing white space removed; caller
 * frees (and cleanses). NULL, with a message, if it cannot be read.
 */
char *dm_ctl_drill_token(const dm_ctl_drill_env_t *env, const char *name);

/**
 * A client of `target` (TLS with env's PEMs when it has a CA), sending
 * "authorization: Bearer TOKEN" when `token` is not NULL. Caller destroys.
 */
dm_client_t *dm_ctl_drill_client(const dm_ctl_drill_env_t *env, const char *target,
                                 const char *token);

/** Index of `code` into per-code counts (0..DM_CTL_N_CODES-1); UNKNOWN if out of range. */
int dm_ctl_code_index(grpc_status_code code);

/**
 * A status after which a call is worth repeating as it was: the gateway or region did not
 * answer, or answered that it could not finish (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED,
 * CANCELLED, UNKNOWN). A drill may retry more than these.
 */
bool dm_ctl_transient(grpc_status_code code);

/**
 * A unary call (deadline env->call_ms) repeated while `retry` says its status is worth it,
 * `pause_ms` apart, until `ms` have passed. NULL with *resp (caller frees), or the last
 * status (caller frees).
 */
dm_status_t *dm_ctl_drill_call(const dm_ctl_drill_env_t *env, dm_client_t *c, const char *path,
                               const ProtobufCMessage *req, const ProtobufCMessageDescriptor *desc,
                               ProtobufCMessage **resp, int64_t ms, int64_t pause_ms,
                               bool (*retry)(grpc_status_code));

/* One write of a drill's load (PutRecord of kind "drill"); all borrowed. */
typedef struct dm_ctl_put {
    const char *customer, *record_id, *request_id;
    const char *subject;      /* NULL: none */
    const char *content_type; /* NULL: none */
    const void *payload;
    size_t len;
} dm_ctl_put_t;

/**
 * PutRecord of `w`, once. NULL when acknowledged (*replayed, if not NULL: the gateway
 * answered from an earlier write of this request_id), else the status (caller frees).
 */
dm_status_t *dm_ctl_drill_put(const dm_ctl_drill_env_t *env, dm_client_t *c, const dm_ctl_put_t *w,
                              bool *replayed);

/**
 * GetRecord of customer/record_id, once. NULL with *resp (caller frees with
 * protobuf_c_message_free_unpacked), else the status (caller frees).
 */
dm_status_t *dm_ctl_drill_get(const dm_ctl_drill_env_t *env, dm_client_t *c, const char *customer,
                              const char *record_id, Domicile__V1__GetRecordResponse **resp);

/** Microseconds on the monotonic clock. */
int64_t dm_ctl_mono_us(void);
/** Sleeps `us` (nothing if <= 0), through signals. */
void dm_ctl_sleep_us(int64_t us);
/** dm_ctl_sleep_us in milliseconds. */
void dm_ctl_sleep_ms(int64_t ms);

/**
 * Runs `LOCAL --state STATE args...` (deploy/local/domicile-local); its stderr goes to ours,
 * its stdout, trailing newlines removed, into *out (caller frees; out may be NULL to discard).
 * Returns the exit status (-1: could not run).
 */
int dm_ctl_run_local(const char *local, const char *state, char **out, const char *const *args);
/** domicile-local next to this build (build/ or build-x/ in the repository), else on PATH. */
char *dm_ctl_find_local(void);

#endif
