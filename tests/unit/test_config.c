/*
 * The config loader on good and broken files. Files are written at run time into a temp dir
 * (git does not keep the 0600 modes secrets need).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "domicile/auth.h"
#include "domicile/config.h"
#include "domicile/dsr.h"
#include "domicile/ledger.h"

static char dir[64];

static void write_file(const char *name, const char *text, mode_t mode)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    chmod(path, mode);
}

static const char *gw_good = "listen = \"127.0.0.1:0\";\n"
                             "transport = \"plaintext\";\n"
                             "gateway_region = \"in\";\n"
                             "regions_dir = \"regions\";\n"
                             "regions = [ \"eu\", \"in\" ];\n"
                             "subject_pepper_file = \"pepper\";\n"
                             "principals_file = \"pepper\";\n"
                             "bases_file = \"pepper\";\n"
                             "routes_file = \"pepper\";\n"
                             "peer_listen = \"127.0.0.1:0\";\n"
                             "peer_cert_file = \"ca.crt\";\n"
                             "peer_key_file = \"kek\";\n"
                             "peer_ca_file = \"ca.crt\";\n";
static const char *threads3 = "threads = 3;\n";

static void write_region(const char *code, const char *extra)
{
    char text[1024], name[64];
    snprintf(text, sizeof(text),
             "code = \"%s\";\nname = \"Region %s\";\njurisdiction = \"J\";\n"
             "hosts = [ \"localhost:5432\", \"127.0.0.1:5433\" ];\n"
             "password_file = \"../pw\";\nssl_root_cert = \"../ca.crt\";\n"
             "kek_source = \"file\"; kek_file = \"../kek\";\nledger_key_file = \"../kek\";\n%s",
             code, code, extra);
    snprintf(name, sizeof(name), "regions/%s.conf", code);
    write_file(name, text, 0644);
}

/* Another region's file, as a gateway of "in" sees it: where its gateways are, nothing else. */
static void write_foreign(const char *code, const char *extra)
{
    char text[1024], name[64];
    snprintf(text, sizeof(text),
             "code = \"%s\";\nname = \"Region %s\";\njurisdiction = \"J\";\n"
             "gateways = [ \"127.0.0.1:7001\", \"127.0.0.1:7002\" ];\n%s",
             code, code, extra);
    snprintf(name, sizeof(name), "regions/%s.conf", code);
    write_file(name, text, 0644);
}

static void write_good(void)
{
    char buf[1024];
    snprintf(buf, sizeof(buf), "%s%s", gw_good, threads3);
    write_file("gw.conf", buf, 0644);
}

static int setup(void **state)
{
    char sub[128];
    snprintf(dir, sizeof(dir), "/tmp/dm-test-config-XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(sub, sizeof(sub), "%s/regions", dir);
    mkdir(sub, 0755);
    write_file("pepper", "0123456789abcdef0123456789abcdef", 0600);
    write_file("pw", "pw-s3cr3t-value\n", 0600);
    write_file("kek", "0123456789abcdef0123456789abcdef", 0600);
    write_file("ca.crt", "not parsed by the loader\n", 0644);
    write_file("hook.secret", "webhook-secret", 0600);
    write_foreign("eu", "");
    write_region("in", "pool_size = 4;\n");
    write_good();
    return 0;
}

static int teardown(void **state)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static dm_status_t *load(dm_config_t **cfg)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/gw.conf", dir);
    return dm_config_load(path, cfg);
}

/* Load gw.conf, expect failure whose message contains every needle. */
static void expect_error(const char *gw, const char *needle1, const char *needle2)
{
    dm_config_t *cfg = NULL;
    write_file("gw.conf", gw, 0644);
    dm_status_t *st = load(&cfg);
    if (!st)
        fail_msg("config loaded but should fail with \"%s\"", needle1);
    assert_null(cfg);
    assert_int_equal(st->code, GRPC_STATUS_INVALID_ARGUMENT);
    if (!strstr(st->message, needle1) || (needle2 && !strstr(st->message, needle2)))
        fail_msg("message \"%s\" lacks \"%s\" / \"%s\"", st->message, needle1,
                 needle2 ? needle2 : "");
    dm_status_free(st);
    write_good();
}

static void test_good(void **state)
{
    dm_config_t *cfg = NULL;
    dm_status_t *st = load(&cfg);
    if (st)
        fail_msg("%s", st->message);
    assert_string_equal(cfg->listen, "127.0.0.1:0");
    assert_int_equal(cfg->threads, 3);
    assert_int_equal(cfg->max_receive_message_bytes, 4194304); /* default */
    assert_int_equal(cfg->kek_rotate_every_s, 7 * 86400);      /* the crypto-period's defaults */
    assert_int_equal(cfg->kek_retire_after_s, 86400);
    assert_string_equal(cfg->log_level, "info");
    assert_int_equal(cfg->n_regions, 2);
    const dm_region_config_t *in = dm_config_region(cfg, "in");
    assert_non_null(in);
    assert_int_equal(in->pool_size, 4);
    assert_int_equal(dm_config_region(cfg, "eu")->pool_size, 3);
    assert_int_equal(in->n_hosts, 2);
    assert_string_equal(in->ssl_mode, "verify-full");
    assert_non_null(strstr(in->kek_file, "/regions/../kek")); /* relative to the region file */
    assert_null(dm_config_region(cfg, "us"));

    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    dm_config_print(cfg, f);
    fclose(f);
    assert_non_null(strstr(out, "threads = 3;"));
    assert_non_null(strstr(out, "pool_size = 4;"));
    assert_null(strstr(out, "pw-s3cr3t-value")); /* a secret file's contents never appear */
    free(out);
    dm_config_free(cfg);
}

static void test_gateway_errors(void **state)
{
    expect_error("listen = \"127.0.0.1:0\";\ntransport = \"plaintext\";\nbogus = 1;\n",
                 "gw.conf:3: key \"bogus\": unknown key", NULL);
    char buf[1024];
    snprintf(buf, sizeof(buf), "%sthreads = 1000;\n", gw_good);
    expect_error(buf, "key \"threads\"", "between 1 and 64 (got 1000)");
    snprintf(buf, sizeof(buf), "%smax_receive_message_bytes = \"big\";\n", gw_good);
    expect_error(buf, "key \"max_receive_message_bytes\"", "must be an integer");
    expect_error("transport = \"plaintext\";\n", "key \"listen\"", "missing");
    expect_error("listen = \"x:1\";\ntransport = \"ssl\";\n", "gw.conf:2: key \"transport\"",
                 "must be one of plaintext|tls");
    expect_error("listen = \"127.0.0.1:0\"\ntransport = ;\n", "gw.conf:", "syntax error");
    snprintf(buf, sizeof(buf), "%s%sthreads = 2;\n", gw_good, threads3); /* duplicate key */
    expect_error(buf, "gw.conf:", NULL);
    snprintf(buf, sizeof(buf), "%slog_level = \"loud\";\n", gw_good);
    expect_error(buf, "key \"log_level\"", "debug|info|warn|error");
}

static void test_cross_checks(void **state)
{
    char buf[1024];
    const char *base = "listen = \"127.0.0.1:0\";\ntransport = \"plaintext\";\n"
                       "regions_dir = \"regions\";\nsubject_pepper_file = \"pepper\";\n"
                       "principals_file = \"pepper\";\nbases_file = \"pepper\";\n"
                       "routes_file = \"pepper\";\n";
    snprintf(buf, sizeof(buf), "%sgateway_region = \"us\";\nregions = [ \"eu\" ];\n", base);
    expect_error(buf, "key \"gateway_region\"", "not one of the configured regions");
    snprintf(buf, sizeof(buf), "%sgateway_region = \"in\";\nregions = [ \"in\", \"in\" ];\n", base);
    expect_error(buf, "key \"regions\"", "listed twice");
    snprintf(buf, sizeof(buf), "%sgateway_region = \"in\";\nregions = [ \"IN\" ];\n", base);
    expect_error(buf, "key \"regions\"", "not a region code");
    snprintf(buf, sizeof(buf), "%sgateway_region = \"in\";\nregions = [ \"in\", \"uk\" ];\n", base);
    expect_error(buf, "uk.conf", "cannot read file"); /* no region file */
    snprintf(buf, sizeof(buf), "listen = \"127.0.0.1\";\n%s",
             gw_good + strlen("listen = \"127.0.0.1:0\";\n"));
    expect_error(buf, "key \"listen\"", "host:port");
    /* The KEK's crypto-period: a version must be gone within the erasure deadline. */
    snprintf(buf, sizeof(buf), "%skek_rotate_every_s = 2000000;\nkek_retire_after_s = 500000;\n",
             gw_good);
    expect_error(buf, "key \"kek_rotate_every_s\"", "at most 2419200 s (28 days)");
    snprintf(buf, sizeof(buf), "%skek_rotate_every_s = 2419201;\n", gw_good);
    expect_error(buf, "key \"kek_rotate_every_s\"", "between 0 and 2419200");
    snprintf(buf, sizeof(buf), "%skek_retire_after_s = -1;\n", gw_good);
    expect_error(buf, "key \"kek_retire_after_s\"", "between 0 and 2419200");
}

static void test_region_errors(void **state)
{
    write_file("regions/in.conf", "code = \"eu\";\n", 0644);
    expect_error(gw_good, "in.conf", NULL); /* missing keys or wrong code */
    write_region("in", "code2 = 1;\n");
    expect_error(gw_good, "regions/in.conf:9: key \"code2\": unknown key", NULL);
    write_region("in", "pool_size = 0;\n");
    expect_error(gw_good, "key \"pool_size\"", "between 1 and 16");
    write_region("in", "ssl_mode = \"disable\";\n");
    expect_error(gw_good, "key \"ssl_mode\"", "verify-full");
    write_region("in", "");
    write_file("kek", "0123456789abcdef0123456789abcdef", 0644);
    expect_error(gw_good, "key \"kek_file\"", "mode 644");
    write_file("kek", "0123456789abcdef0123456789abcdef", 0600);
    write_file(
        "regions/in.conf",
        "code = \"in\";\nname = \"E\";\njurisdiction = \"J\";\nhosts = [ \"h:99999\" ];\n"
        "password_file = \"../pw\";\nssl_root_cert = \"../ca.crt\";\nkek_file = \"../kek\";\n"
        "ledger_key_file = \"../kek\";\n",
        0644);
    expect_error(gw_good, "key \"hosts\"", "port must be");
    write_region("in", "pool_size = 4;\n");
    dm_config_t *cfg = NULL;
    assert_null(load(&cfg)); /* restored: loads again */
    dm_config_free(cfg);
}

/*
 * Every loader of a libconfig file on settings of the wrong shape: each must fail with
 * "file:line: key \"k\": what" (and must not crash: a NULL name reached strcmp() for a list
 * element where a group was expected, found by fuzz_policy).
 */
typedef enum {
    F_GATEWAY,    /* gw.conf (dm_config_load) */
    F_REGION,     /* regions/in.conf (dm_config_load of a good gw.conf) */
    F_BASES,      /* bases.conf (dm_policy_load with good_routes) */
    F_ROUTES,     /* routes.conf (dm_policy_load with good_bases) */
    F_PRINCIPALS, /* principals.conf (dm_principals_load) */
    F_WEBHOOKS,   /* hooks.conf (dm_webhooks_check) */
} file_kind_t;

typedef struct {
    file_kind_t kind;
    const char *text; /* the file under test */
    const char *want; /* the error starts "<dir>/" followed by this */
    const char *also; /* and contains this (NULL: nothing more) */
} shape_case_t;

static const char good_bases[] =
    "bases = (\n"
    "  { id = \"scc\"; instrument = \"SCC\"; citation = \"OJ\"; kind = \"scc\";\n"
    "    effective = \"2021-06-27\"; revoked = \"\"; notes = \"\"; }\n"
    ");\n";
static const char good_routes[] = "forbidden_purposes = [ \"sale\" ];\n"
                                  "routes = ( { from = \"eu\"; to = \"*\"; purpose = \"*\"; "
                                  "bases = [ \"scc\" ]; } );\n";
#define TOKEN "\"840f135a0cd6a2ca7c9865624d5434f90a072d562d58ec4503fc480d1b65a25d\""
#define BASIS(extra)                                                                               \
    "bases = (\n  { id = \"scc\"; instrument = \"SCC\"; citation = \"OJ\"; kind = \"scc\";\n"      \
    "    effective = \"2021-06-27\";\n" extra " }\n);\n"
#define ROUTE(extra)                                                                               \
    "routes = (\n  { from = \"eu\"; to = \"in\"; purpose = \"*\";\n" extra " }\n);\n"
#define HOOK(extra)                                                                                \
    "webhooks = (\n  { customer = \"acme\"; url = \"https://h.example/dsr\";\n" extra " }\n);\n"

static const shape_case_t shape_cases[] = {
    /* bases */
    {F_BASES, "bases = ( ( { revoked = \"\"; } ) );\n",
     "bases.conf:1: key \"bases\": entry 1 must be a group", "got a list"},
    {F_BASES, "bases = ( [ \"x\" ] );\n", "bases.conf:1: key \"bases\": entry 1 must be a group",
     NULL},
    {F_BASES, "bases = (\n  \"scc\" );\n", "bases.conf:2: key \"bases\": entry 1 must be a group",
     "got a string"},
    {F_BASES, "bases = { id = \"x\"; };\n", "bases.conf:1: key \"bases\": must be a list of groups",
     NULL},
    {F_BASES, "bases = \"x\";\n", "bases.conf:1: key \"bases\": must be a list of groups", NULL},
    {F_BASES, "bases = ();\n", "bases.conf:1: key \"bases\": must have 1 to", NULL},
    {F_BASES, "", "bases.conf:1: key \"bases\": missing: the file has no settings", NULL},
    {F_BASES, "# only a comment\n",
     "bases.conf:1: key \"bases\": missing: the file has no settings", NULL},
    {F_BASES, "basis = ();\n", "bases.conf:1: key \"basis\": unknown key", NULL},
    {F_BASES, BASIS("") "more = 1;\n", "bases.conf:6: key \"more\": unknown key", NULL},
    {F_BASES, BASIS("    revoked = 2031;"), "bases.conf:4: key \"revoked\": must be a string",
     "got an integer"},
    {F_BASES, BASIS("    revoked = [ \"2031-01-01\" ];"),
     "bases.conf:4: key \"revoked\": must be a string", NULL},
    {F_BASES, BASIS("    notes = ( \"a\" );"), "bases.conf:4: key \"notes\": must be a string",
     "got a list"},
    {F_BASES, BASIS("    notes = { a = 1; };"), "bases.conf:4: key \"notes\": must be a string",
     "got a group"},
    {F_BASES, BASIS("    revoked = \"2021-02-30\";"), "bases.conf:4: key \"revoked\": must be",
     NULL},
    {F_BASES, BASIS("    bogus = 1;"), "bases.conf:4: key \"bogus\": unknown key", NULL},
    {F_BASES,
     "bases = ( { id = 5; instrument = \"I\"; citation = \"C\"; kind = \"scc\"; effective = "
     "\"2021-01-01\"; } );\n",
     "bases.conf:1: key \"id\": must be a string", NULL},
    {F_BASES, "bases = (\n  { }\n);\n", "bases.conf:2: key \"id\": missing (required)", NULL},
    {F_BASES,
     "bases = ( { id = \"a\"; instrument = \"I\"; citation = \"C\"; kind = \"scc\";\n"
     "  effective = \" 202-01-01\"; } );\n",
     "bases.conf:2: key \"effective\": must be a date", NULL},
    {F_BASES, "@include \"more-bases.conf\"\n",
     "more-bases.conf:4: key \"notes\": must be a string", NULL},
    /* routes */
    {F_ROUTES, "routes = ( ( { from = \"eu\"; } ) );\n",
     "routes.conf:1: key \"routes\": entry 1 must be a group", NULL},
    {F_ROUTES, "routes = { from = \"eu\"; };\n",
     "routes.conf:1: key \"routes\": must be a list of groups", NULL},
    {F_ROUTES, "", "routes.conf:1: key \"routes\": missing: the file has no settings", NULL},
    {F_ROUTES, "forbidden_purposes = [ \"sale\" ];\n",
     "routes.conf: key \"routes\": missing (required)", NULL},
    {F_ROUTES, "forbidden_purposes = { a = \"sale\"; };\nroutes = ();\n",
     "routes.conf:1: key \"forbidden_purposes\": must be a list of strings", NULL},
    {F_ROUTES, "forbidden_purposes = \"sale\";\nroutes = ();\n",
     "routes.conf:1: key \"forbidden_purposes\": must be a list of strings", NULL},
    {F_ROUTES, "forbidden_purposes = ( \"ok\",\n ( \"sale\" ) );\nroutes = ();\n",
     "routes.conf:2: key \"forbidden_purposes\": entry 2 must be a string", NULL},
    {F_ROUTES, ROUTE("    bases = { a = \"scc\"; };"),
     "routes.conf:3: key \"bases\": must be a list of strings", NULL},
    {F_ROUTES, ROUTE("    bases = ( ( \"scc\" ) );"),
     "routes.conf:3: key \"bases\": entry 1 must be a string", NULL},
    {F_ROUTES, ROUTE("    bases = \"scc\";"),
     "routes.conf:3: key \"bases\": must be a list of strings", NULL},
    {F_ROUTES, ROUTE("    bases = [ \"scc\" ]; to = 1;"), NULL,
     NULL}, /* duplicate `to`: syntax error */
    {F_ROUTES,
     "routes = (\n  { from = 1; to = \"in\"; purpose = \"*\"; bases = [ \"scc\" ]; }\n);\n",
     "routes.conf:2: key \"from\": must be a string", NULL},
    {F_ROUTES,
     "routes = (\n  { from = \"eu\"; to = \"uk\"; purpose = \"*\"; bases = [ \"scc\" ]; }\n);\n",
     "routes.conf:2: key \"to\": \"uk\" is not a configured region", NULL},
    {F_ROUTES,
     "routes = (\n  { from = \"eu\"; to = \"in\"; purpose = \"*\";\n    bases = [ \"nope\" ]; "
     "}\n);\n",
     "routes.conf:3: key \"bases\": \"nope\" is not in the basis catalogue", NULL},
    /* principals */
    {F_PRINCIPALS, "principals = ( ( { name = \"x\"; } ) );\n",
     "principals.conf:1: key \"principals\": entry 1 must be a group", NULL},
    {F_PRINCIPALS, "principals = \"x\";\n",
     "principals.conf:1: key \"principals\": must be a list of groups", NULL},
    {F_PRINCIPALS, "", "principals.conf:1: key \"principals\": missing: the file has no settings",
     NULL},
    {F_PRINCIPALS,
     "principals = (\n  { name = \"svc\"; roles = { a = \"admin\"; }; tenants = [ \"*\" ];\n"
     "    region = \"eu\"; default_purpose = \"support\"; token_sha256 = " TOKEN "; }\n);\n",
     "principals.conf:2: key \"roles\": must be a list of strings", "got a group"},
    {F_PRINCIPALS,
     "principals = (\n  { name = \"svc\"; roles = [ \"admin\" ]; tenants = ( ( \"acme\" ) );\n"
     "    region = \"eu\"; default_purpose = \"support\"; token_sha256 = " TOKEN "; }\n);\n",
     "principals.conf:2: key \"tenants\": entry 1 must be a string", NULL},
    {F_PRINCIPALS, "principals = (\n", NULL, NULL}, /* syntax error */
    {F_PRINCIPALS,
     "principals = (\n  { name = \"svc\"; roles = [ \"service\" ]; tenants = [ \"*\" ]; region = "
     "\"eu\";\n"
     "    default_purpose = \"support\";\n    token_sha256 = 5; cert_subject = \"CN=svc\"; }\n);\n",
     "principals.conf:4: key \"token_sha256\": must be a string", NULL},
    {F_PRINCIPALS,
     "principals = (\n  { name = \"svc\"; roles = [ \"service\" ]; tenants = [ \"*\" ]; region = "
     "\"eu\";\n"
     "    default_purpose = \"support\";\n    token_sha256 = " TOKEN
     "; cert_subject = [ \"CN=svc\" ]; }\n);\n",
     "principals.conf:4: key \"cert_subject\": must be a string", NULL},
    {F_PRINCIPALS,
     "principals = (\n  { name = 1; roles = [ \"service\" ]; tenants = [ \"*\" ]; region = "
     "\"eu\";\n"
     "    default_purpose = \"support\"; token_sha256 = " TOKEN "; }\n);\n",
     "principals.conf:2: key \"name\": must be a string", NULL},
    {F_PRINCIPALS,
     "principals = (\n  { name = \"svc\"; roles = [ \"service\" ]; tenants = [ \"*\" ]; region = "
     "\"eu\";\n"
     "    default_purpose = \"support\"; token_sha256 = " TOKEN "; }\n);\nextra = 1;\n",
     "principals.conf:5: key \"extra\": unknown key", NULL},
    /* customer webhooks */
    {F_WEBHOOKS, "webhooks = ( ( { customer = \"acme\"; } ) );\n",
     "hooks.conf:1: key \"webhooks\": entry 1 must be a group", NULL},
    {F_WEBHOOKS, "webhooks = { customer = \"acme\"; };\n",
     "hooks.conf:1: key \"webhooks\": must be a list of groups", NULL},
    {F_WEBHOOKS, "", "hooks.conf:1: key \"webhooks\": missing: the file has no settings", NULL},
    {F_WEBHOOKS, "webhooks = ();\nextra = 1;\n", "hooks.conf:2: key \"extra\": unknown key", NULL},
    {F_WEBHOOKS, HOOK("    secret_file = 5;"),
     "hooks.conf:3: key \"secret_file\": must be a string", NULL},
    {F_WEBHOOKS, HOOK("    secret_file = \"hook.secret\"; extra = 1;"),
     "hooks.conf:3: key \"extra\": unknown key", NULL},
    {F_WEBHOOKS,
     "webhooks = (\n  { customer = 5; url = \"https://h.example\"; secret_file = \"hook.secret\"; "
     "}\n);\n",
     "hooks.conf:2: key \"customer\": must be a string", NULL},
    {F_WEBHOOKS, HOOK("    secret_file = \"pw-missing\";"),
     "hooks.conf:3: key \"secret_file\": cannot open", NULL},
    {F_WEBHOOKS,
     "webhooks = (\n  { customer = \"acme\"; url = \"https://a.example\"; secret_file = "
     "\"hook.secret\"; },\n"
     "  { customer = \"acme\"; url = \"https://b.example\"; secret_file = \"hook.secret\"; }\n);\n",
     "hooks.conf:3: key \"customer\": \"acme\" has two webhooks", NULL},
    /* gateway and region files */
    {F_GATEWAY, "", "gw.conf:1: key \"listen\": missing: the file has no settings", NULL},
    {F_GATEWAY, "listen = ( \"127.0.0.1:0\" );\n", "gw.conf:1: key \"listen\": must be a string",
     NULL},
    {F_GATEWAY, "threads = { n = 2; };\n", "gw.conf:1: key \"threads\": must be an integer", NULL},
    {F_GATEWAY, "regions = (\n ( \"eu\" ) );\n", "gw.conf:2: key \"regions\": entry 1 must be",
     NULL},
    {F_REGION, "", "regions/in.conf:1: key \"code\": missing: the file has no settings", NULL},
    {F_REGION, "code = \"in\";\nhosts = ( ( \"h:1\" ) );\n",
     "regions/in.conf:2: key \"hosts\": entry 1 must be", NULL},
    {F_REGION, "code = { c = \"in\"; };\n", "regions/in.conf:1: key \"code\": must be a string",
     NULL},
};

static void test_shapes(void **state)
{
    char path[256], other[256], want[512];
    dm_config_t *cfg = NULL;
    write_file("more-bases.conf", BASIS("    notes = 1;"), 0644);
    write_file("good-bases.conf", good_bases, 0644);
    write_file("good-routes.conf", good_routes, 0644);
    assert_null(load(&cfg));
    for (size_t i = 0; i < sizeof(shape_cases) / sizeof(shape_cases[0]); i++) {
        const shape_case_t *c = &shape_cases[i];
        dm_status_t *st = NULL;
        dm_config_t *got = NULL;
        dm_policy_t *policy = NULL;
        dm_principals_t *ps = NULL;
        size_t n = 0;
        switch (c->kind) {
        case F_GATEWAY:
            write_file("gw.conf", c->text, 0644);
            st = load(&got);
            write_good();
            break;
        case F_REGION:
            write_file("regions/in.conf", c->text, 0644);
            st = load(&got);
            write_region("in", "pool_size = 4;\n");
            break;
        case F_BASES:
        case F_ROUTES:
            write_file(c->kind == F_BASES ? "bases.conf" : "routes.conf", c->text, 0644);
            snprintf(path, sizeof(path), "%s/%s", dir,
                     c->kind == F_BASES ? "bases.conf" : "good-bases.conf");
            snprintf(other, sizeof(other), "%s/%s", dir,
                     c->kind == F_ROUTES ? "routes.conf" : "good-routes.conf");
            st = dm_policy_load(path, other, cfg, &policy);
            break;
        case F_PRINCIPALS:
            write_file("principals.conf", c->text, 0644);
            snprintf(path, sizeof(path), "%s/principals.conf", dir);
            st = dm_principals_load(path, cfg, &ps);
            break;
        case F_WEBHOOKS:
            write_file("hooks.conf", c->text, 0644);
            free(cfg->customer_webhooks_file);
            cfg->customer_webhooks_file = malloc(256);
            snprintf(cfg->customer_webhooks_file, 256, "%s/hooks.conf", dir);
            st = dm_webhooks_check(cfg, &n);
            break;
        }
        if (!st)
            fail_msg("case %zu loaded but should fail with \"%s\"", i,
                     c->want ? c->want : "syntax error");
        assert_null(got);
        assert_null(policy);
        assert_null(ps);
        assert_int_equal(st->code, GRPC_STATUS_INVALID_ARGUMENT);
        snprintf(want, sizeof(want), "%s/%s", dir, c->want ? c->want : "");
        if (!c->want && !strstr(st->message, "syntax error"))
            fail_msg("case %zu: \"%s\" is not a syntax error", i, st->message);
        if (c->want && (strncmp(st->message, want, strlen(want)) != 0 ||
                        (c->also && !strstr(st->message, c->also))))
            fail_msg("case %zu: message \"%s\" does not start \"%s\" / lacks \"%s\"", i,
                     st->message, want, c->also ? c->also : "");
        dm_status_free(st);
    }
    /* the good files still load (the cases did not break the fixture) */
    snprintf(path, sizeof(path), "%s/good-bases.conf", dir);
    snprintf(other, sizeof(other), "%s/good-routes.conf", dir);
    dm_policy_t *policy = NULL;
    dm_status_t *st = dm_policy_load(path, other, cfg, &policy);
    if (st)
        fail_msg("%s", st->message);
    assert_int_equal(policy->n_bases, 1);
    assert_int_equal(policy->n_routes, 1);
    dm_policy_free(policy);
    dm_config_free(cfg);
}

/* Sovereign regions: another region's file names its gateways only; the own region's has
 * its database and secrets; the peer keys come with more than one region. */
static void test_foreign_regions(void **state)
{
    char buf[1024];
    write_foreign("eu", "kek_file = \"../kek\";\n");
    expect_error(gw_good, "regions/eu.conf:5: key \"kek_file\": a secret of region \"eu\"",
                 "only that region's own gateways may hold it (this gateway serves \"in\")");
    write_foreign("eu", "password_file = \"../pw\";\n");
    expect_error(gw_good, "regions/eu.conf:5: key \"password_file\": a secret of region", NULL);
    write_foreign("eu", "ledger_key_file = \"../kek\";\n");
    expect_error(gw_good, "regions/eu.conf:5: key \"ledger_key_file\": a secret of region", NULL);
    write_foreign("eu", "pkcs11_pin_file = \"../pw\";\n");
    expect_error(gw_good, "regions/eu.conf:5: key \"pkcs11_pin_file\": a secret of region", NULL);
    write_foreign("eu", "pkcs11_token = \"tok-eu\";\n");
    expect_error(gw_good, "regions/eu.conf:5: key \"pkcs11_token\": a secret of region", NULL);
    write_foreign("eu", "hosts = [ \"127.0.0.1:5432\" ];\n");
    expect_error(gw_good, "regions/eu.conf:5: key \"hosts\": the database of region \"eu\"",
                 "reached only through its own gateways");
    write_foreign("eu", "ssl_root_cert = \"../ca.crt\";\n");
    expect_error(gw_good, "regions/eu.conf:5: key \"ssl_root_cert\": the database of region", NULL);
    write_file("regions/eu.conf", "code = \"eu\";\nname = \"E\";\njurisdiction = \"J\";\n", 0644);
    expect_error(gw_good, "regions/eu.conf: key \"gateways\": missing", NULL);
    write_foreign("eu", "gateways = [ \"no-port\" ];\n"); /* a second `gateways`: duplicate */
    expect_error(gw_good, "regions/eu.conf", NULL);
    write_foreign("eu", "");
    write_region("in", "");
    write_file("regions/in.conf",
               "code = \"in\";\nname = \"I\";\njurisdiction = \"J\";\nhosts = [ \"h:1\" ];\n"
               "password_file = \"../pw\";\nssl_root_cert = \"../ca.crt\";\n"
               "ledger_key_file = \"../kek\";\n",
               0644);
    expect_error(gw_good, "key \"pkcs11_module\": missing (required with kek_source = \"pkcs11\"",
                 NULL);
    write_file("regions/in.conf",
               "code = \"in\";\nname = \"I\";\njurisdiction = \"J\";\nhosts = [ \"h:1\" ];\n"
               "password_file = \"../pw\";\nssl_root_cert = \"../ca.crt\";\n"
               "ledger_key_file = \"../kek\";\nkek_source = \"file\";\n",
               0644);
    expect_error(gw_good, "key \"kek_file\": missing (required with kek_source = \"file\")", NULL);
    /* A token: module, token label and PIN file are named (the token itself is opened at run
     * time: a token that cannot be opened makes only the region unavailable). */
    const char *token_region = "code = \"in\";\nname = \"I\";\njurisdiction = \"J\";\n"
                               "hosts = [ \"h:1\" ];\npassword_file = \"../pw\";\n"
                               "ssl_root_cert = \"../ca.crt\";\nledger_key_file = \"../kek\";\n"
                               "pkcs11_module = \"/nonexistent/libp11.so\";\n"
                               "pkcs11_token = \"tok-in\";\npkcs11_pin_file = \"../pw\";\n";
    snprintf(buf, sizeof(buf), "%s%s", token_region, "pkcs11_env = [ \"NOEQUALS\" ];\n");
    write_file("regions/in.conf", buf, 0644);
    expect_error(gw_good, "key \"pkcs11_env\": entry 1 must be NAME=value", NULL);
    snprintf(buf, sizeof(buf), "%s%s", token_region, "kek_label = \"bad label\";\n");
    write_file("regions/in.conf", buf, 0644);
    expect_error(gw_good, "key \"kek_label\": must be of [A-Za-z0-9._-]", NULL);
    snprintf(buf, sizeof(buf), "%s%s", token_region, "kek_source = \"hsm\";\n");
    write_file("regions/in.conf", buf, 0644);
    expect_error(gw_good, "key \"kek_source\": must be one of pkcs11|file", NULL);
    snprintf(buf, sizeof(buf), "%s%s", token_region, "pkcs11_env = [ \"SOFTHSM2_CONF=/x\" ];\n");
    write_file("regions/in.conf", buf, 0644);
    {
        dm_config_t *cfg = NULL;
        dm_status_t *st = load(&cfg);
        if (st)
            fail_msg("%s", st->message);
        const dm_region_config_t *in = dm_config_region(cfg, "in");
        assert_string_equal(in->kek_source, "pkcs11");
        assert_string_equal(in->pkcs11_token, "tok-in");
        assert_string_equal(in->kek_label, "domicile-kek-in"); /* the default */
        assert_int_equal(in->pkcs11_slot, -1);
        assert_int_equal(in->pkcs11_sessions, 4);
        assert_int_equal(in->n_pkcs11_env, 1);
        assert_string_equal(in->kek_file, "");
        dm_config_free(cfg);
    }
    write_region("in", "pool_size = 4;\n");
    /* two regions: the gateway must have its peer listener and certificate */
    snprintf(buf, sizeof(buf), "%s", gw_good);
    char *pl = strstr(buf, "peer_listen");
    memcpy(pl, "#eer_listen", 11);
    expect_error(buf, "key \"peer_listen\": required", NULL);
    dm_config_t *cfg = NULL;
    assert_null(load(&cfg));
    assert_true(dm_config_region(cfg, "in")->local);
    assert_false(dm_config_region(cfg, "eu")->local);
    assert_int_equal(dm_config_region(cfg, "eu")->n_gateways, 2);
    assert_string_equal(dm_config_region(cfg, "eu")->gateway_identity, "eu.gateway.domicile");
    dm_config_free(cfg);
}

/* Secrets are checked where dm_config_load() reads the config: presence, mode and size. */
static void test_secret_sizes(void **state)
{
    write_file("pepper", "0123456789", 0600); /* 10 bytes: a guessable subject HMAC key */
    expect_error(gw_good, "gw.conf:6: key \"subject_pepper_file\"",
                 "must hold 16 to 1024 bytes (has 10)");
    write_file("pepper", "0123456789abcdef0123456789abcdef", 0600);
    write_file("kek", "0123456789abcdef0123456789abcde", 0600); /* 31 bytes */
    expect_error(gw_good, "key \"kek_file\"", "exactly 32 bytes (has 31)");
    write_file("kek", "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", 0600);
    expect_error(gw_good, "key \"kek_file\"", "exactly 32 bytes (has 64)");
    write_file("kek", "0123456789abcdef0123456789abcdef", 0600);
    dm_config_t *cfg = NULL;
    assert_null(load(&cfg));
    dm_config_free(cfg);
}

/* probe_listen: off by default; host:port of a port of its own, else file:line:key. */
static void test_probe_listen(void **state)
{
    static const struct {
        const char *extra; /* appended to gw_good: the probe_listen line is line 14 */
        const char *needle;
    } bad[] = {
        {"probe_listen = \"50060\";\n",
         "gw.conf:14: key \"probe_listen\": \"50060\" must be host:port"},
        {"probe_listen = \":50060\";\n",
         "gw.conf:14: key \"probe_listen\": \":50060\" must be host:port"},
        {"probe_listen = \"0.0.0.0:65536\";\n",
         "gw.conf:14: key \"probe_listen\": \"0.0.0.0:65536\": port must be 0..65535"},
        {"probe_listen = \"0.0.0.0:http\";\n",
         "gw.conf:14: key \"probe_listen\": \"0.0.0.0:http\": port must be"},
        {"probe_listen = \"0.0.0.0:-1\";\n",
         "gw.conf:14: key \"probe_listen\": \"0.0.0.0:-1\": port must be"},
        {"probe_listen = 50060;\n", "gw.conf:14: key \"probe_listen\": must be a string"},
        {"probe_listen = [ \"0.0.0.0:50060\" ];\n", "gw.conf:14: key \"probe_listen\""},
        {"probe_listen = \"127.0.0.1:7100\";\nmetrics_listen = \"127.0.0.1:7100\";\n",
         "gw.conf:14: key \"probe_listen\": \"127.0.0.1:7100\": port 7100 is also "
         "metrics_listen's (\"127.0.0.1:7100\")"},
    };
    char buf[1024];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(buf, sizeof(buf), "%s%s", gw_good, bad[i].extra);
        expect_error(buf, bad[i].needle, NULL);
    }
    /* peer_listen's port, on another address: one port, one listener. */
    const char *pl = strstr(gw_good, "peer_listen");
    const char *after = strchr(pl, '\n') + 1;
    snprintf(buf, sizeof(buf),
             "%.*speer_listen = \"127.0.0.1:7101\";\n%sprobe_listen = \"0.0.0.0:7101\";\n",
             (int)(pl - gw_good), gw_good, after);
    expect_error(
        buf, "gw.conf:14: key \"probe_listen\": \"0.0.0.0:7101\": port 7101 is also peer_listen's",
        NULL);
    /* listen's port: listen is the first line of gw_good, so write a file of its own. */
    snprintf(buf, sizeof(buf), "listen = \"0.0.0.0:7102\";\n%sprobe_listen = \"0.0.0.0:7102\";\n",
             gw_good + strlen("listen = \"127.0.0.1:0\";\n"));
    expect_error(buf, "gw.conf:14: key \"probe_listen\"", "port 7102 is also listen's");

    dm_config_t *cfg = NULL;
    assert_null(load(&cfg));
    assert_string_equal(cfg->probe_listen, ""); /* off unless asked for */
    dm_config_free(cfg);
    static const char *const good[] = {"0.0.0.0:50060", "[::]:50060", "127.0.0.1:0"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        snprintf(buf, sizeof(buf), "%sprobe_listen = \"%s\";\n", gw_good, good[i]);
        write_file("gw.conf", buf, 0644);
        dm_status_t *st = load(&cfg);
        if (st)
            fail_msg("probe_listen = \"%s\": %s", good[i], st->message);
        assert_string_equal(cfg->probe_listen, good[i]);
        dm_config_free(cfg);
    }
    write_good();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good),
        cmocka_unit_test(test_gateway_errors),
        cmocka_unit_test(test_cross_checks),
        cmocka_unit_test(test_region_errors),
        cmocka_unit_test(test_shapes),
        cmocka_unit_test(test_secret_sizes),
        cmocka_unit_test(test_foreign_regions),
        cmocka_unit_test(test_probe_listen),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
