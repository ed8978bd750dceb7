/*
 * Shared by the libFuzzer drivers of tests/fuzz: a private temporary directory (made on first
 * use, removed at exit), whole-file writes, and the oracle every returned status must pass.
 */
#ifndef DOMICILE_FUZZ_UTIL_H
#define DOMICILE_FUZZ_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/types.h>

#include "domicile/config.h"
#include "domicile/status.h"

/** The libFuzzer entry point (declared for -Wmissing-prototypes). */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/** "<tmpdir>/<name>" in a static buffer (one of 4 used in turn: valid for 3 more calls). */
const char *fz_path(const char *name);
/** Write `len` bytes to fz_path(name) (replacing it) with `mode`; aborts on I/O errors. */
void fz_write(const char *name, const void *data, size_t len, mode_t mode);
/** The same for a NUL-terminated text. */
void fz_write_text(const char *name, const char *text, mode_t mode);
/**
 * A valid gateway configuration written once into the temp dir: regions "us", "eu", "in"
 * (regions/<code>.conf), their 0600 secrets, pepper, CA, TLS cert and key, principals.conf,
 * bases.conf and routes.conf (a small transfer policy), hook.secret (a webhook's secret).
 */
void fz_fixture(void);
/** dm_config_load() of the fixture's gateway.conf (once; kept for the process). */
const dm_config_t *fz_config(void);
/**
 * Oracle for a returned status; frees it. NULL is fine; else the code must be INVALID_ARGUMENT
 * (or FAILED_PRECONDITION when `client_safe` is false: secret files), the message non-empty
 * and, when `client_safe` (it goes to a client as grpc-message), valid UTF-8 without control
 * characters. Config errors go to the operator's log and may quote the file's bytes, but must
 * name the file first (an absolute path in the fixture).
 */
void fz_status(dm_status_t *st, bool client_safe);

#endif
