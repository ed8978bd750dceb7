/*
 * What the files of domicilectl share (src/cli/): exit statuses, the output options, and the
 * entry points of the commands that live in files of their own. Not installed.
 */
#ifndef DOMICILE_CLI_H
#define DOMICILE_CLI_H

#include <stdbool.h>

#include "domicile/client.h"
#include "domicile/output.h"

/*
 * Exit statuses, for scripts; `domicilectl --help` and docs/cli.md list them. A gRPC status
 * is DM_EXIT_STATUS + its code, so a script tells NOT_FOUND (15) from UNAVAILABLE (24).
 */
enum dm_ctl_exit {
    DM_EXIT_OK = 0,
    DM_EXIT_FAILURE = 1,    /* failed here: output not written, a malformed answer, a drill goal */
    DM_EXIT_USAGE = 2,      /* bad command line; drill: the regions are not healthy before it */
    DM_EXIT_PARTIAL = 3,    /* locate without some region; health not SERVING; a drill step */
    DM_EXIT_LEDGER = 4,     /* transfers verify: the ledger does not verify */
    DM_EXIT_MISMATCH = 5,   /* dsr export: the lines do not match the manifest, or no manifest */
    DM_EXIT_INCOMPLETE = 6, /* dsr export: the manifest says regions are missing */
    DM_EXIT_STATUS = 10,    /* + the gRPC status code: 11 CANCELLED ... 26 UNAUTHENTICATED */
};

/* --output and --no-headers, wherever they were given on the command line. */
typedef struct dm_ctl_output {
    const char *name;       /* as given; NULL: the command's default */
    dm_output_format_t fmt; /* parsed `name`; DM_OUTPUT_TABLE when it is a report-only format */
    bool no_headers;
} dm_ctl_output_t;

/**
 * `domicilectl drill failover|gateway ...` (src/cli/drill.c). timeout_ms <= 0: the drill's own
 * call deadline. Returns the exit status.
 */
int dm_ctl_drill(const dm_ctl_output_t *out, const char *addr, const char *cacert, const char *cert,
                 const char *key, int timeout_ms, int argc, char **argv);

/**
 * Reads the whole file at `path`; `strip`: trailing newlines, carriage returns and spaces
 * removed. Caller frees. NULL, errno set, if it cannot be opened (src/cli/domicilectl.c).
 */
char *dm_ctl_read_file(const char *path, bool strip);

/** `domicilectl drill restore ...` (src/cli/drill_restore.c), called by dm_ctl_drill. */
int dm_ctl_drill_restore(const char *addr, const char *cacert, const char *cert, const char *key,
                         int timeout_ms, int argc, char **argv);

/** `domicilectl keys status|rotate|retire ...` (src/cli/keys.c); `out`: status as JSON. */
int dm_ctl_keys(const dm_ctl_output_t *out, dm_client_t *c, int timeout_ms, int argc, char **argv);

/** `domicilectl completion bash` (src/cli/completion.c): argv[0] is "completion". */
int dm_ctl_completion(int argc, char **argv);

#endif
