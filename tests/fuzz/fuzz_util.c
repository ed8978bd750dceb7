#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "domicile/validate.h"
#include "fuzz_util.h"

static char dir[256];

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void rm_dir(void)
{
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

const char *fz_path(const char *name)
{
    static char paths[4][512]; /* a few at a time: f(fz_path("a"), fz_path("b")) */
    static unsigned next;
    char *path = paths[next++ % 4];
    if (!dir[0]) {
        const char *t = getenv("TMPDIR");
        snprintf(dir, sizeof(dir), "%s/dm-fuzz-XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(dir))
            abort();
        atexit(rm_dir);
    }
    snprintf(path, sizeof(paths[0]), "%s/%s", dir, name);
    return path;
}

void fz_write(const char *name, const void *data, size_t len, mode_t mode)
{
    const char *path = fz_path(name);
    /* A new file, not O_TRUNC: ext4 flushes a truncated-and-rewritten file on close
     * (auto_da_alloc), which cost ~1 ms per input. */
    unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0 || fchmod(fd, mode) != 0 || (len && write(fd, data, len) != (ssize_t)len))
        abort(); /* a broken fixture must not pass for an uninteresting input */
    close(fd);
}

void fz_write_text(const char *name, const char *text, mode_t mode)
{
    fz_write(name, text, strlen(text), mode);
}

/* Token of principal "svc" is "svc-token", of "ro" "ro-token" (hashes below). */
static const char principals[] =
    "principals = (\n"
    "  { name = \"svc\"; roles = [ \"service\" ]; tenants = [ \"acme\", \"globex.eu\" ];\n"
    "    region = \"us\"; default_purpose = \"service-delivery\";\n"
    "    token_sha256 = \"840f135a0cd6a2ca7c9865624d5434f90a072d562d58ec4503fc480d1b65a25d\"; },\n"
    "  { name = \"ro\"; roles = [ \"reader\", \"auditor\" ]; tenants = [ \"*\" ];\n"
    "    region = \"eu\"; default_purpose = \"analytics\";\n"
    "    token_sha256 = \"ca06d421c0e43efc914b85af48162c8d6dffb4abbddb16c16bae3532a49673a5\"; "
    "cert_subject = \"CN=reader,O=Example\"; }\n"
    ");\n";

static const char bases[] =
    "bases = (\n"
    "  { id = \"scc-m2\"; instrument = \"SCC module 2\"; citation = \"OJ L 199\";\n"
    "    kind = \"scc\"; effective = \"2021-06-27\"; revoked = \"\"; notes = \"\"; },\n"
    "  { id = \"dpf\"; instrument = \"DPF\"; citation = \"OJ L 231\"; kind = \"adequacy\";\n"
    "    effective = \"2023-07-10\"; revoked = \"2031-01-01\"; }\n"
    ");\n";
static const char routes[] =
    "forbidden_purposes = [ \"sale\" ];\n"
    "routes = (\n"
    "  { from = \"eu\"; to = \"us\"; purpose = \"*\"; bases = [ \"dpf\", \"scc-m2\" ]; },\n"
    "  { from = \"us\"; to = \"*\"; purpose = \"analytics\"; bases = [ \"scc-m2\" ]; }\n"
    ");\n";

void fz_fixture(void)
{
    static bool done;
    static const char *const codes[] = {"us", "eu", "in"};
    char name[64], text[1024];
    if (done)
        return;
    done = true;
    if (mkdir(fz_path("regions"), 0700) != 0)
        abort();
    fz_write_text("pepper", "0123456789abcdef0123456789abcdef", 0600);
    fz_write_text("pw", "s3cret\n", 0600);
    fz_write_text("kek", "0123456789abcdef0123456789abcdef", 0600);
    fz_write_text("ledger.key", "fedcba9876543210fedcba9876543210", 0600);
    fz_write_text("ca.crt", "not parsed by the loader\n", 0644);
    fz_write_text("server.crt", "not parsed by the loader\n", 0644);
    fz_write_text("server.key", "not parsed by the loader\n", 0600);
    fz_write_text("principals.conf", principals, 0644);
    fz_write_text("bases.conf", bases, 0644);
    fz_write_text("routes.conf", routes, 0644);
    fz_write_text("hook.secret", "webhook-secret", 0600);
    for (size_t i = 0; i < DM_ARRAY_LEN(codes); i++) {
        snprintf(text, sizeof(text),
                 "code = \"%s\";\nname = \"Region %s\";\njurisdiction = \"J\";\n"
                 "hosts = [ \"127.0.0.1:5432\", \"db.example:5433\" ];\n"
                 "password_file = \"../pw\";\nssl_root_cert = \"../ca.crt\";\n"
                 "kek_file = \"../kek\";\nledger_key_file = \"../ledger.key\";\n",
                 codes[i], codes[i]);
        snprintf(name, sizeof(name), "regions/%s.conf", codes[i]);
        fz_write_text(name, text, 0644);
    }
    fz_write_text("gateway.conf",
                  "listen = \"127.0.0.1:0\";\ntransport = \"plaintext\";\n"
                  "principals_file = \"principals.conf\";\ngateway_region = \"us\";\n"
                  "regions_dir = \"regions\";\nregions = [ \"us\", \"eu\", \"in\" ];\n"
                  "subject_pepper_file = \"pepper\";\nbases_file = \"bases.conf\";\n"
                  "routes_file = \"routes.conf\";\n",
                  0644);
}

const dm_config_t *fz_config(void)
{
    static dm_config_t *cfg;
    if (!cfg) {
        fz_fixture();
        dm_status_t *st = dm_config_load(fz_path("gateway.conf"), &cfg);
        if (st) {
            fprintf(stderr, "fuzz fixture: %s\n", st->message);
            abort();
        }
    }
    return cfg;
}

void fz_status(dm_status_t *st, bool client_safe)
{
    if (!st)
        return;
    if (!st->message || !st->message[0])
        abort();
    if (client_safe) {
        size_t n = strlen(st->message);
        if (st->code != GRPC_STATUS_INVALID_ARGUMENT || !dm_utf8_valid(st->message, n))
            abort();
        for (size_t i = 0; i < n; i++)
            if ((unsigned char)st->message[i] < 0x20 || st->message[i] == 0x7f)
                abort();
    } else if ((st->code != GRPC_STATUS_INVALID_ARGUMENT &&
                st->code != GRPC_STATUS_FAILED_PRECONDITION) ||
               st->message[0] != '/') {
        /* A config error names the file first ("file:line: key ..."); every fixture path is
         * absolute, and so is an @include'd file's once resolved. */
        abort();
    }
    dm_status_free(st);
}
