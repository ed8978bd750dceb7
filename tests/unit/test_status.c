/* The SQLSTATE -> gRPC mapping and code names, table-driven (curl's unit1302 style). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "domicile/status.h"

static const struct {
    const char *sqlstate;
    grpc_status_code want;
} cases[] = {
    {"08006", GRPC_STATUS_UNAVAILABLE},       /* connection failure */
    {"08001", GRPC_STATUS_UNAVAILABLE},       /* cannot establish */
    {"57P01", GRPC_STATUS_UNAVAILABLE},       /* admin shutdown */
    {"57P02", GRPC_STATUS_UNAVAILABLE},       /* crash shutdown */
    {"57P03", GRPC_STATUS_UNAVAILABLE},       /* cannot connect now */
    {"25006", GRPC_STATUS_UNAVAILABLE},       /* read-only transaction: a standby */
    {"53300", GRPC_STATUS_UNAVAILABLE},       /* too many connections */
    {"40001", GRPC_STATUS_ABORTED},           /* serialization failure */
    {"40P01", GRPC_STATUS_ABORTED},           /* deadlock */
    {"57014", GRPC_STATUS_DEADLINE_EXCEEDED}, /* query cancelled */
    {"23505", GRPC_STATUS_ALREADY_EXISTS},    /* unique violation */
    {"23502", GRPC_STATUS_FAILED_PRECONDITION},
    {"23503", GRPC_STATUS_FAILED_PRECONDITION},
    {"23514", GRPC_STATUS_FAILED_PRECONDITION},
    {"22001", GRPC_STATUS_INVALID_ARGUMENT},   /* string too long */
    {"22P02", GRPC_STATUS_INVALID_ARGUMENT},   /* invalid text representation */
    {"53100", GRPC_STATUS_RESOURCE_EXHAUSTED}, /* disk full */
    {"53200", GRPC_STATUS_RESOURCE_EXHAUSTED}, /* out of memory */
    {"42P01", GRPC_STATUS_INTERNAL},           /* undefined table: a bug */
    {"XX000", GRPC_STATUS_INTERNAL},
    {"", GRPC_STATUS_UNAVAILABLE}, /* libpq connection error, no SQLSTATE */
    {NULL, GRPC_STATUS_UNAVAILABLE},
    {"2350", GRPC_STATUS_UNAVAILABLE}, /* malformed: treated as no SQLSTATE */
};

static void test_sqlstate_mapping(void **state)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        grpc_status_code got = dm_status_code_from_sqlstate(cases[i].sqlstate);
        if (got != cases[i].want)
            fail_msg("sqlstate %s: got %s, want %s", cases[i].sqlstate ? cases[i].sqlstate : "NULL",
                     dm_status_code_name(got), dm_status_code_name(cases[i].want));
    }
}

static void test_code_names_round_trip(void **state)
{
    for (int c = 0; c <= 16; c++) {
        grpc_status_code back;
        assert_true(dm_status_code_parse(dm_status_code_name((grpc_status_code)c), &back));
        assert_int_equal(back, c);
    }
    assert_string_equal(dm_status_code_name(GRPC_STATUS_NOT_FOUND), "NOT_FOUND");
    assert_string_equal(dm_status_code_name((grpc_status_code)99), "UNKNOWN_CODE");
    grpc_status_code x;
    assert_false(dm_status_code_parse("NOPE", &x));
}

static void test_status_new_never_ok(void **state)
{
    dm_status_t *st = dm_status_new(GRPC_STATUS_OK, "x %d", 1);
    assert_int_equal(st->code, GRPC_STATUS_INTERNAL);
    assert_string_equal(st->message, "x 1");
    dm_status_detail(st, "sqlstate %s", "XX000");
    assert_string_equal(st->detail, "sqlstate XX000");
    dm_status_free(st);
    dm_status_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sqlstate_mapping),
        cmocka_unit_test(test_code_names_round_trip),
        cmocka_unit_test(test_status_new_never_ok),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
