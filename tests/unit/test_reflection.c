/* The descriptor database behind gRPC server reflection (src/server/reflection.c): the embedded
 * FileDescriptorSet of proto/, symbol lookup, dependencies, and malformed input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "domicile/reflection.h"

/* ---- a tiny protobuf writer for hand-made descriptor sets ---- */

typedef struct {
    uint8_t b[4096];
    size_t n;
} pb_t;

static void pb_varint(pb_t *p, uint64_t v)
{
    do {
        assert_true(p->n < sizeof(p->b));
        p->b[p->n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
}

static void pb_bytes(pb_t *p, unsigned num, const void *data, size_t len)
{
    pb_varint(p, (uint64_t)num << 3 | 2);
    pb_varint(p, len);
    assert_true(p->n + len <= sizeof(p->b));
    memcpy(p->b + p->n, data, len);
    p->n += len;
}

static void pb_str(pb_t *p, unsigned num, const char *s)
{
    pb_bytes(p, num, s, strlen(s));
}

static void pb_msg(pb_t *p, unsigned num, const pb_t *sub)
{
    pb_bytes(p, num, sub->b, sub->n);
}

static dm_descdb_t *parse_ok(const pb_t *p)
{
    dm_descdb_t *db = NULL;
    dm_status_t *st = dm_descdb_parse(p->b, p->n, &db);
    if (st)
        fail_msg("parse failed: %s", st->message);
    return db;
}

static void parse_fails(const uint8_t *b, size_t n)
{
    dm_descdb_t *db = (dm_descdb_t *)1;
    dm_status_t *st = dm_descdb_parse(b, n, &db);
    assert_non_null(st);
    assert_int_equal(st->code, GRPC_STATUS_INVALID_ARGUMENT);
    assert_null(db);
    dm_status_free(st);
}

/* ---- the embedded set ---- */

static const char *file_of(const dm_descdb_t *db, const char *symbol)
{
    long f = dm_descdb_find_symbol(db, symbol);
    return f < 0 ? NULL : dm_descdb_file_name(db, (size_t)f);
}

static void test_builtin_files_and_services(void **state)
{
    const dm_descdb_t *db = dm_descdb_builtin();
    assert_non_null(db);
    assert_true(db == dm_descdb_builtin()); /* parsed once */
    const char *files[] = {
        "domicile/v1/common.proto",         "domicile/v1/customers.proto",
        "domicile/v1/records.proto",        "domicile/v1/regions.proto",
        "domicile/v1/subject_rights.proto", "domicile/v1/transfers.proto",
        "grpc/health/v1/health.proto",      "grpc/reflection/v1alpha/reflection.proto",
        "domicile/peer/v1/peer.proto",      "domicile/v1/keys.proto"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++)
        if (dm_descdb_find_file(db, files[i]) < 0)
            fail_msg("%s is not in the embedded set", files[i]);
    assert_int_equal(dm_descdb_find_file(db, "domicile/v1/nope.proto"), -1);
    /* The embedded set has every proto, the gateway-to-gateway one too (ListServices leaves
     * it out; its descriptor still resolves). */
    const char *services[] = {"domicile.peer.v1.PeerService",
                              "domicile.v1.CustomersService",
                              "domicile.v1.KeysService",
                              "domicile.v1.RecordsService",
                              "domicile.v1.RegionsService",
                              "domicile.v1.SubjectRightsService",
                              "domicile.v1.TransfersService",
                              "grpc.health.v1.Health",
                              "grpc.reflection.v1alpha.ServerReflection"};
    assert_int_equal(dm_descdb_n_services(db), sizeof(services) / sizeof(services[0]));
    for (size_t i = 0; i < sizeof(services) / sizeof(services[0]); i++) {
        bool found = false;
        for (size_t j = 0; j < dm_descdb_n_services(db); j++)
            found = found || strcmp(dm_descdb_service(db, j), services[i]) == 0;
        if (!found)
            fail_msg("service %s not found", services[i]);
    }
}

static void test_builtin_symbols(void **state)
{
    const dm_descdb_t *db = dm_descdb_builtin();
    assert_non_null(db);
    /* service, method, message, nested message, enum, nested enum, field, enum value */
    assert_string_equal(file_of(db, "domicile.v1.RecordsService"), "domicile/v1/records.proto");
    assert_string_equal(file_of(db, "domicile.v1.RecordsService.GetRecord"),
                        "domicile/v1/records.proto");
    assert_string_equal(file_of(db, "domicile.v1.SubjectRightsService.Export"),
                        "domicile/v1/subject_rights.proto");
    assert_string_equal(file_of(db, "domicile.v1.PutRecordRequest"), "domicile/v1/records.proto");
    assert_string_equal(file_of(db, "domicile.v1.Record.LabelsEntry"), "domicile/v1/records.proto");
    assert_string_equal(file_of(db, "domicile.v1.CustomerState"), "domicile/v1/customers.proto");
    assert_string_equal(file_of(db, "grpc.health.v1.HealthCheckResponse.ServingStatus"),
                        "grpc/health/v1/health.proto");
    assert_string_equal(file_of(db, "domicile.v1.Record.record_id"), "domicile/v1/records.proto");
    assert_string_equal(file_of(db, "grpc.health.v1.HealthCheckResponse.SERVING"),
                        "grpc/health/v1/health.proto");
    assert_string_equal(file_of(db, "domicile.v1.RegionCount"), "domicile/v1/common.proto");
    assert_string_equal(file_of(db, ".domicile.v1.RecordsService"), "domicile/v1/records.proto");
    assert_string_equal(file_of(db, "grpc.reflection.v1alpha.ServerReflection"),
                        "grpc/reflection/v1alpha/reflection.proto");
    /* unknown */
    const char *unknown[] = {"domicile.v1.Nope",
                             "domicile.v1.Records", /* the name before the Service suffix */
                             "domicile.v1.RecordsService.Nope",
                             "domicile.v1.RecordsService.",
                             "domicile.v1.records",
                             "Records",
                             "",
                             ".",
                             "domicile.v1.Record.LabelsEntry.x"};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++)
        if (dm_descdb_find_symbol(db, unknown[i]) != -1)
            fail_msg("\"%s\" found", unknown[i]);
}

static void test_builtin_dependencies(void **state)
{
    const dm_descdb_t *db = dm_descdb_builtin();
    size_t idx[64];
    assert_true(dm_descdb_n_files(db) <= 64);
    long sr = dm_descdb_find_file(db, "domicile/v1/subject_rights.proto");
    assert_true(sr >= 0);
    size_t n = dm_descdb_closure(db, (size_t)sr, idx);
    assert_int_equal(n, 2);
    assert_int_equal(idx[0], sr);
    assert_string_equal(dm_descdb_file_name(db, idx[1]), "domicile/v1/common.proto");
    long rec = dm_descdb_find_file(db, "domicile/v1/records.proto");
    assert_int_equal(dm_descdb_closure(db, (size_t)rec, idx), 1);
    assert_int_equal(idx[0], rec);
}

static bool contains(const uint8_t *hay, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(hay + i, needle, k) == 0)
            return true;
    return false;
}

/* The served files carry no default json_name, and re-parse to the same symbols. */
static void test_builtin_served_form(void **state)
{
    const dm_descdb_t *db = dm_descdb_builtin();
    assert_true(contains(dm_descriptor_set, dm_descriptor_set_len, "customerId"));
    size_t total = 0;
    uint8_t *set = NULL;
    for (size_t i = 0; i < dm_descdb_n_files(db); i++) {
        size_t len;
        const uint8_t *p = dm_descdb_file_proto(db, i, &len);
        assert_non_null(p);
        assert_false(contains(p, len, "customerId"));
        assert_true(contains(p, len, dm_descdb_file_name(db, i)));
        set = realloc(set, total + 16 + len);
        uint8_t hdr[16];
        size_t h = 0;
        hdr[h++] = 0x0a;
        for (size_t v = len; h == 1 || v; v >>= 7)
            hdr[h++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        memcpy(set + total, hdr, h);
        memcpy(set + total + h, p, len);
        total += h + len;
    }
    assert_true(total < dm_descriptor_set_len);
    dm_descdb_t *again = NULL;
    dm_status_t *st = dm_descdb_parse(set, total, &again);
    assert_null(st);
    assert_int_equal(dm_descdb_n_files(again), dm_descdb_n_files(db));
    assert_int_equal(dm_descdb_find_symbol(again, "domicile.v1.Record.LabelsEntry"),
                     dm_descdb_find_symbol(db, "domicile.v1.Record.LabelsEntry"));
    for (size_t i = 0; i < dm_descdb_n_files(db); i++) {
        size_t a, b;
        const uint8_t *pa = dm_descdb_file_proto(db, i, &a);
        const uint8_t *pb = dm_descdb_file_proto(again, i, &b);
        assert_int_equal(a, b); /* stripping is idempotent */
        assert_memory_equal(pa, pb, a);
    }
    dm_descdb_free(again);
    free(set);
}

/* Every truncation of the real set: rejected unless it ends exactly between two files (then
 * it may still be refused for a missing dependency); never a crash or an overread (ASan). */
static void test_truncated_builtin(void **state)
{
    size_t n = dm_descriptor_set_len;
    /* file boundaries: the top-level fields */
    bool *boundary = calloc(n + 1, sizeof(bool));
    size_t p = 0;
    boundary[0] = true;
    while (p < n) {
        assert_int_equal(dm_descriptor_set[p++], 0x0a);
        uint64_t len = 0;
        for (int shift = 0;; shift += 7) {
            uint8_t b = dm_descriptor_set[p++];
            len |= (uint64_t)(b & 0x7f) << shift;
            if (!(b & 0x80))
                break;
        }
        p += len;
        boundary[p] = true;
    }
    assert_int_equal(p, n);
    for (size_t cut = 0; cut < n; cut++) {
        /* a heap copy of exactly `cut` bytes, so that ASan sees any read past it */
        uint8_t *copy = malloc(cut ? cut : 1);
        memcpy(copy, dm_descriptor_set, cut);
        dm_descdb_t *db = NULL;
        dm_status_t *st = dm_descdb_parse(copy, cut, &db);
        if (!boundary[cut] && !st)
            fail_msg("a set truncated to %zu of %zu bytes was accepted", cut, n);
        dm_status_free(st);
        dm_descdb_free(db);
        free(copy);
    }
    free(boundary);
}

/* ---- hand-made sets ---- */

static void test_malformed(void **state)
{
    static const uint8_t overlong[] = {0x0a, 0x05, 0x0a, 0x01};
    static const uint8_t varint[] = {0x0a, 0xff, 0xff, 0xff, 0xff, 0xff,
                                     0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    static const uint8_t group[] = {0x0b, 0x0c};
    static const uint8_t field_zero[] = {0x02, 0x00};
    static const uint8_t nameless[] = {0x0a, 0x04, 0x12, 0x02, 0x61, 0x62};
    static const uint8_t tag_only[] = {0x0a};
    static const uint8_t fixed64_short[] = {0x09, 0x01, 0x02};
    parse_fails(overlong, sizeof(overlong));
    parse_fails(varint, sizeof(varint));
    parse_fails(group, sizeof(group));
    parse_fails(field_zero, sizeof(field_zero));
    parse_fails(nameless, sizeof(nameless));
    parse_fails(tag_only, sizeof(tag_only));
    parse_fails(fixed64_short, sizeof(fixed64_short));

    pb_t msg = {0}, file = {0}, set = {0};
    /* a message without a name */
    pb_str(&msg, 2, "x");
    pb_str(&file, 1, "a.proto");
    pb_msg(&file, 4, &msg);
    pb_msg(&set, 1, &file);
    parse_fails(set.b, set.n);

    /* a dependency missing from the set */
    file = (pb_t){0};
    set = (pb_t){0};
    pb_str(&file, 1, "a.proto");
    pb_str(&file, 3, "b.proto");
    pb_msg(&set, 1, &file);
    parse_fails(set.b, set.n);

    /* a file twice */
    pb_t a = {0}, c = {0};
    msg = (pb_t){0};
    pb_str(&msg, 1, "M");
    pb_str(&a, 1, "a.proto");
    pb_msg(&a, 4, &msg);
    pb_str(&c, 1, "c.proto");
    pb_msg(&c, 4, &msg);
    set = (pb_t){0};
    pb_msg(&set, 1, &a);
    pb_msg(&set, 1, &a);
    parse_fails(set.b, set.n);
    /* a symbol declared in two files (each file alone is fine) */
    set = (pb_t){0};
    pb_msg(&set, 1, &a);
    pb_msg(&set, 1, &c);
    parse_fails(set.b, set.n);
    set = (pb_t){0};
    pb_msg(&set, 1, &c);
    dm_descdb_free(parse_ok(&set));

    /* a name that is not an identifier */
    msg = (pb_t){0};
    file = (pb_t){0};
    set = (pb_t){0};
    pb_bytes(&msg, 1, "M\0x", 3);
    pb_str(&file, 1, "a.proto");
    pb_msg(&file, 4, &msg);
    pb_msg(&set, 1, &file);
    parse_fails(set.b, set.n);

    /* the empty set is a set */
    dm_descdb_t *db = NULL;
    assert_null(dm_descdb_parse((const uint8_t *)"", 0, &db));
    assert_int_equal(dm_descdb_n_files(db), 0);
    assert_int_equal(dm_descdb_find_symbol(db, "a"), -1);
    dm_descdb_free(db);
}

/* Nested messages: found at any depth within the limit; deeper is refused. */
static void test_nesting(void **state)
{
    for (int depth = 1; depth <= 40; depth++) {
        pb_t inner = {0};
        pb_str(&inner, 1, "N");
        for (int d = 1; d < depth; d++) {
            pb_t outer = {0};
            pb_str(&outer, 1, "N");
            pb_msg(&outer, 3, &inner);
            inner = outer;
        }
        pb_t file = {0}, set = {0};
        pb_str(&file, 1, "n.proto");
        pb_str(&file, 2, "p.q");
        pb_msg(&file, 4, &inner);
        pb_msg(&set, 1, &file);
        dm_descdb_t *db = NULL;
        dm_status_t *st = dm_descdb_parse(set.b, set.n, &db);
        if (depth > 32) {
            assert_non_null(st);
            dm_status_free(st);
            continue;
        }
        assert_null(st);
        char sym[256] = "p.q";
        for (int d = 0; d < depth; d++)
            strcat(sym, ".N");
        assert_int_equal(dm_descdb_find_symbol(db, sym), 0);
        strcat(sym, ".N");
        assert_int_equal(dm_descdb_find_symbol(db, sym), -1);
        dm_descdb_free(db);
    }
}

/* json_name: the default one is dropped (as FileDescriptor::CopyTo does), a custom one kept. */
static void test_json_names(void **state)
{
    pb_t f1 = {0}, f2 = {0}, nested = {0}, msg = {0}, file = {0}, set = {0};
    pb_str(&f1, 1, "a_b_c");
    pb_varint(&f1, 3 << 3); /* number = 3 */
    pb_varint(&f1, 3);
    pb_str(&f1, 10, "aBC");
    pb_str(&f2, 1, "d");
    pb_str(&f2, 10, "custom");
    pb_str(&nested, 1, "Inner");
    pb_msg(&nested, 2, &f1);
    pb_str(&msg, 1, "M");
    pb_msg(&msg, 2, &f1);
    pb_msg(&msg, 2, &f2);
    pb_msg(&msg, 3, &nested);
    pb_str(&file, 1, "j.proto");
    pb_msg(&file, 4, &msg);
    pb_msg(&set, 1, &file);
    dm_descdb_t *db = parse_ok(&set);

    pb_t g1 = {0}, gnested = {0}, gmsg = {0}, gfile = {0};
    pb_str(&g1, 1, "a_b_c");
    pb_varint(&g1, 3 << 3);
    pb_varint(&g1, 3);
    pb_str(&gnested, 1, "Inner");
    pb_msg(&gnested, 2, &g1);
    pb_str(&gmsg, 1, "M");
    pb_msg(&gmsg, 2, &g1);
    pb_msg(&gmsg, 2, &f2);
    pb_msg(&gmsg, 3, &gnested);
    pb_str(&gfile, 1, "j.proto");
    pb_msg(&gfile, 4, &gmsg);
    size_t len;
    const uint8_t *served = dm_descdb_file_proto(db, 0, &len);
    assert_int_equal(len, gfile.n);
    assert_memory_equal(served, gfile.b, len);
    assert_int_equal(dm_descdb_find_symbol(db, "M.Inner.a_b_c"), 0);
    assert_int_equal(dm_descdb_find_symbol(db, "M.d"), 0);
    dm_descdb_free(db);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_builtin_files_and_services),
        cmocka_unit_test(test_builtin_symbols),
        cmocka_unit_test(test_builtin_dependencies),
        cmocka_unit_test(test_builtin_served_form),
        cmocka_unit_test(test_truncated_builtin),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_nesting),
        cmocka_unit_test(test_json_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
