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

#include "domicile/config.h"

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
                             "gateway_region = \"eu\";\n"
                             "regions_dir = \"regions\";\n"
                             "regions = [ \"eu\", \"in\" ];\n"
                             "subject_pepper_file = \"pepper\";\n"
                             "principals_file = \"pepper\";\n"
                             "bases_file = \"pepper\";\n"
                             "routes_file = \"pepper\";\n";
static const char *threads3 = "threads = 3;\n";

static void write_region(const char *code, const char *extra)
{
    char text[1024], name[64];
    snprintf(text, sizeof(text),
             "code = \"%s\";\nname = \"Region %s\";\njurisdiction = \"J\";\n"
             "hosts = [ \"localhost:5432\", \"127.0.0.1:5433\" ];\n"
             "password_file = \"../pw\";\nssl_root_cert = \"../ca.crt\";\n"
             "kek_file = \"../kek\";\nledger_key_file = \"../kek\";\n%s",
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
    write_region("eu", "");
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
    snprintf(buf, sizeof(buf), "%sgateway_region = \"eu\";\nregions = [ \"eu\", \"eu\" ];\n", base);
    expect_error(buf, "key \"regions\"", "listed twice");
    snprintf(buf, sizeof(buf), "%sgateway_region = \"eu\";\nregions = [ \"EU\" ];\n", base);
    expect_error(buf, "key \"regions\"", "not a region code");
    snprintf(buf, sizeof(buf), "%sgateway_region = \"eu\";\nregions = [ \"eu\", \"uk\" ];\n", base);
    expect_error(buf, "uk.conf", "cannot read file"); /* no region file */
    snprintf(buf, sizeof(buf), "listen = \"127.0.0.1\";\n%s",
             gw_good + strlen("listen = \"127.0.0.1:0\";\n"));
    expect_error(buf, "key \"listen\"", "host:port");
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
        "regions/eu.conf",
        "code = \"eu\";\nname = \"E\";\njurisdiction = \"J\";\nhosts = [ \"h:99999\" ];\n"
        "password_file = \"../pw\";\nssl_root_cert = \"../ca.crt\";\nkek_file = \"../kek\";\n"
        "ledger_key_file = \"../kek\";\n",
        0644);
    expect_error(gw_good, "key \"hosts\"", "port must be");
    write_region("eu", "");
    dm_config_t *cfg = NULL;
    assert_null(load(&cfg)); /* restored: loads again */
    dm_config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good),
        cmocka_unit_test(test_gateway_errors),
        cmocka_unit_test(test_cross_checks),
        cmocka_unit_test(test_region_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
