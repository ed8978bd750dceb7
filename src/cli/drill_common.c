/*
 * The drills' shared layer (drill_common.h): options, domicile-local, clients and the calls of
 * the load, the same for `drill failover|gateway` and `drill restore`.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "domicile/clock.h"

#include "cli.h"
#include "drill_common.h"

extern char **environ;

#define PATH_PUT "/domicile.v1.RecordsService/PutRecord"
#define PATH_GET "/domicile.v1.RecordsService/GetRecord"

/* The deploy/local regions and their order (domicile-local's REGIONS). */
const char *const dm_ctl_regions[DM_CTL_N_REGIONS] = {"us", "eu", "in"};

void dm_ctl_drill_env_init(dm_ctl_drill_env_t *env, int call_ms, double rate)
{
    memset(env, 0, sizeof(*env));
    env->call_ms = call_ms;
    env->rate = rate;
    env->target = -1;
    env->state =
        getenv("DOMICILE_LOCAL_STATE") ? getenv("DOMICILE_LOCAL_STATE") : DM_CTL_LOCAL_STATE;
}

void dm_ctl_drill_env_dispose(dm_ctl_drill_env_t *env)
{
    free(env->local);
    free(env->ca_pem);
    free(env->cert_pem);
    free(env->key_pem);
    if (env->token_admin)
        OPENSSL_cleanse(env->token_admin, strlen(env->token_admin));
    free(env->token_admin);
    env->local = env->ca_pem = env->cert_pem = env->key_pem = env->token_admin = NULL;
}

/* ------------------------------------------------------------------------------------------
 * the command line */

int dm_ctl_drill_option(dm_ctl_drill_env_t *env, int opt, const char *arg, const char **region,
                        int rate_max, void (*usage)(FILE *))
{
    switch (opt) {
    case DM_CTL_DRILL_OPT_REGION:
        *region = arg;
        return 0;
    case DM_CTL_DRILL_OPT_STATE:
        env->state = arg;
        return 0;
    case DM_CTL_DRILL_OPT_JSON:
        env->json_path = arg;
        return 0;
    case DM_CTL_DRILL_OPT_RATE:
        env->rate = atof(arg);
        if (!(env->rate >= 1 && env->rate <= rate_max)) {
            fprintf(stderr, "domicilectl: --rate must be 1..%d calls per second\n", rate_max);
            return DM_EXIT_USAGE;
        }
        return 0;
    case DM_CTL_DRILL_OPT_LOCAL:
        free(env->local);
        env->local = dm_strdup(arg);
        return 0;
    case DM_CTL_DRILL_OPT_HELP:
        usage(stdout);
        return -1;
    case '?':
        usage(stderr);
        return DM_EXIT_USAGE;
    default:
        return 1;
    }
}

int dm_ctl_drill_args_end(dm_ctl_drill_env_t *env, int argc, const char *region,
                          void (*usage)(FILE *))
{
    if (optind != argc || !region) {
        usage(stderr);
        return DM_EXIT_USAGE;
    }
    env->target = -1;
    for (int i = 0; i < DM_CTL_N_REGIONS; i++)
        if (strcmp(region, dm_ctl_regions[i]) == 0)
            env->target = i;
    if (env->target < 0) {
        fprintf(stderr, "domicilectl: unknown region \"%s\" (us, eu, in)\n", region);
        return DM_EXIT_USAGE;
    }
    return 0;
}

int dm_ctl_drill_gateway_arg(const char *arg, const char **addr)
{
    const char *eq = strchr(arg, '=');
    int r = -1;
    for (int i = 0; eq && i < DM_CTL_N_REGIONS; i++)
        if ((size_t)(eq - arg) == strlen(dm_ctl_regions[i]) &&
            strncmp(arg, dm_ctl_regions[i], (size_t)(eq - arg)) == 0)
            r = i;
    if (r < 0 || !eq[1])
        return -1;
    *addr = eq + 1;
    return r;
}

/* ------------------------------------------------------------------------------------------
 * domicile-local and its state */

bool dm_ctl_drill_read_tls(dm_ctl_drill_env_t *env, const char *what, const char *cacert,
                           const char *cert, const char *key)
{
    if (!cacert)
        return true;
    env->ca_pem = dm_ctl_read_file(cacert, false);
    env->cert_pem = cert ? dm_ctl_read_file(cert, false) : NULL;
    env->key_pem = key ? dm_ctl_read_file(key, false) : NULL;
    if (!env->ca_pem || (cert && !env->cert_pem) || (key && !env->key_pem)) {
        fprintf(stderr, "domicilectl: %s: cannot read the TLS files\n", what);
        return false;
    }
    return true;
}

bool dm_ctl_drill_find_local(dm_ctl_drill_env_t *env)
{
    if (!env->local)
        env->local = dm_ctl_find_local();
    if (!env->local || access(env->local, X_OK) != 0) {
        fprintf(stderr, "domicilectl: drill: domicile-local not found (give --domicile-local)\n");
        return false;
    }
    return true;
}

int dm_ctl_drill_local(const dm_ctl_drill_env_t *env, char **out, const char *const *args)
{
    return dm_ctl_run_local(env->local, env->state, out, args);
}

char *dm_ctl_drill_sql(const dm_ctl_drill_env_t *env, int region, const char *sql)
{
    char *out = NULL;
    const char *args[] = {"psql", dm_ctl_regions[region], "-At", "-c", sql, NULL};
    if (dm_ctl_drill_local(env, &out, args) != 0) {
        free(out);
        return NULL;
    }
    return out;
}

char *dm_ctl_drill_token(const dm_ctl_drill_env_t *env, const char *name)
{
    char *path = dm_sprintf("%s/secrets/tokens/%s.token", env->state, name);
    char *token = dm_ctl_read_file(path, true);
    if (!token)
        fprintf(stderr, "domicilectl: drill: cannot read %s: %s\n", path, strerror(errno));
    free(path);
    return token;
}

int dm_ctl_run_local(const char *local, const char *state, char **out, const char *const *args)
{
    const char *argv[24];
    int n = 0;
    argv[n++] = local;
    argv[n++] = "--state";
    argv[n++] = state;
    for (int i = 0; args[i] && n < 23; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    if (out)
        *out = NULL;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return -1;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
    pid_t pid;
    int rc = posix_spawn(&pid, local, &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    if (rc != 0) {
        close(fds[0]);
        fprintf(stderr, "domicilectl: cannot run %s: %s\n", local, strerror(rc));
        return -1;
    }
    size_t cap = 4096, len = 0;
    char *buf = dm_malloc(cap);
    for (;;) {
        if (len + 1 >= cap)
            buf = dm_realloc(buf, cap *= 2);
        ssize_t r = read(fds[0], buf + len, cap - len - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
    }
    buf[len] = '\0';
    close(fds[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    while (len && buf[len - 1] == '\n')
        buf[--len] = '\0';
    if (out)
        *out = buf;
    else
        free(buf);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

char *dm_ctl_find_local(void)
{
    char exe[PATH_MAX], buf[PATH_MAX + 64], real[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash)
            *slash = '\0';
        static const char *const rel[] = {"../deploy/local/domicile-local",
                                          "../../deploy/local/domicile-local", "domicile-local"};
        for (size_t i = 0; i < DM_ARRAY_LEN(rel); i++) {
            snprintf(buf, sizeof(buf), "%s/%s", exe, rel[i]);
            if (realpath(buf, real) && access(real, X_OK) == 0)
                return dm_strdup(real);
        }
    }
    const char *path = getenv("PATH");
    while (path && *path) {
        size_t len = strcspn(path, ":");
        snprintf(buf, sizeof(buf), "%.*s/domicile-local", (int)len, path);
        if (len && access(buf, X_OK) == 0)
            return dm_strdup(buf);
        path += len + (path[len] == ':');
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------
 * clients and calls */

dm_client_t *dm_ctl_drill_client(const dm_ctl_drill_env_t *env, const char *target,
                                 const char *token)
{
    dm_client_t *c = env->ca_pem
                         ? dm_client_create_tls(target, env->ca_pem, env->cert_pem, env->key_pem)
                         : dm_client_create(target);
    if (token) {
        char *h = dm_sprintf("Bearer %s", token);
        dm_client_add_metadata(c, "authorization", h);
        free(h);
    }
    return c;
}

int dm_ctl_code_index(grpc_status_code code)
{
    return (int)code >= 0 && (int)code < DM_CTL_N_CODES ? (int)code : GRPC_STATUS_UNKNOWN;
}

bool dm_ctl_transient(grpc_status_code code)
{
    switch (code) {
    case GRPC_STATUS_UNAVAILABLE:
    case GRPC_STATUS_DEADLINE_EXCEEDED:
    case GRPC_STATUS_ABORTED:
    case GRPC_STATUS_CANCELLED:
    case GRPC_STATUS_UNKNOWN:
        return true;
    default:
        return false;
    }
}

dm_status_t *dm_ctl_drill_call(const dm_ctl_drill_env_t *env, dm_client_t *c, const char *path,
                               const ProtobufCMessage *req, const ProtobufCMessageDescriptor *desc,
                               ProtobufCMessage **resp, int64_t ms, int64_t pause_ms,
                               bool (*retry)(grpc_status_code))
{
    int64_t until = dm_mono_ms() + ms;
    for (;;) {
        dm_status_t *st = dm_client_unary(c, path, req, desc, env->call_ms, resp);
        if (!st || !retry(st->code) || dm_mono_ms() > until)
            return st;
        dm_status_free(st);
        dm_ctl_sleep_ms(pause_ms);
    }
}

dm_status_t *dm_ctl_drill_put(const dm_ctl_drill_env_t *env, dm_client_t *c, const dm_ctl_put_t *w,
                              bool *replayed)
{
    Domicile__V1__PutRecordRequest r = DOMICILE__V1__PUT_RECORD_REQUEST__INIT;
    r.request_id = (char *)w->request_id;
    r.customer_id = (char *)w->customer;
    r.record_id = (char *)w->record_id;
    r.kind = "drill";
    if (w->subject)
        r.subject = (char *)w->subject;
    if (w->content_type)
        r.content_type = (char *)w->content_type;
    r.payload.data = (uint8_t *)w->payload;
    r.payload.len = w->len;
    ProtobufCMessage *resp = NULL;
    dm_status_t *st = dm_client_unary(
        c, PATH_PUT, &r.base, &domicile__v1__put_record_response__descriptor, env->call_ms, &resp);
    if (st)
        return st;
    if (replayed)
        *replayed = ((Domicile__V1__PutRecordResponse *)resp)->replayed;
    protobuf_c_message_free_unpacked(resp, NULL);
    return NULL;
}

dm_status_t *dm_ctl_drill_get(const dm_ctl_drill_env_t *env, dm_client_t *c, const char *customer,
                              const char *record_id, Domicile__V1__GetRecordResponse **resp)
{
    Domicile__V1__GetRecordRequest r = DOMICILE__V1__GET_RECORD_REQUEST__INIT;
    r.customer_id = (char *)customer;
    r.record_id = (char *)record_id;
    *resp = NULL;
    return dm_client_unary(c, PATH_GET, &r.base, &domicile__v1__get_record_response__descriptor,
                           env->call_ms, (ProtobufCMessage **)resp);
}

/* ------------------------------------------------------------------------------------------
 * time */

int64_t dm_ctl_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void dm_ctl_sleep_us(int64_t us)
{
    if (us <= 0)
        return;
    struct timespec ts = {(time_t)(us / 1000000), (long)(us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

void dm_ctl_sleep_ms(int64_t ms)
{
    dm_ctl_sleep_us(ms * 1000);
}
