/* Envelope encryption, KEK loading, subject keys, hex and AAD encoding. */
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

#include "domicile/crypto.h"

static const unsigned char key[DM_KEY_LEN] = {
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
};

static unsigned char *record_aad(const char *region, const char *cust, const char *rec, size_t *len)
{
    return DM_AAD(len, DM_AAD_STR(region), DM_AAD_STR(cust), DM_AAD_STR(rec));
}

static void expect_status(dm_status_t *st, grpc_status_code code, const char *needle)
{
    assert_non_null(st);
    if (st->code != code)
        fail_msg("got %s \"%s\", want %s", dm_status_code_name(st->code), st->message,
                 dm_status_code_name(code));
    if (needle && !strstr(st->message, needle))
        fail_msg("message \"%s\" does not contain \"%s\"", st->message, needle);
    dm_status_free(st);
}

static void round_trip(size_t n)
{
    size_t aad_len, ct_len, pt_len = 99;
    unsigned char *aad = record_aad("eu", "acme", "rec-1", &aad_len);
    unsigned char *pt = malloc(n ? n : 1), *ct = NULL, *back = NULL;
    dm_random_bytes(pt, n);

    assert_null(dm_seal(key, aad, aad_len, pt, n, &ct, &ct_len));
    assert_int_equal(ct_len, n + DM_SEAL_OVERHEAD);
    assert_int_equal(ct[0], DM_SEAL_FORMAT);
    assert_null(dm_open(key, aad, aad_len, ct, ct_len, &back, &pt_len));
    assert_int_equal(pt_len, n);
    assert_memory_equal(back, pt, n);

    free(back);
    free(ct);
    free(pt);
    free(aad);
}

static void test_seal_open_round_trip(void **state)
{
    round_trip(0);
    round_trip(1);
    round_trip(1 << 20);

    /* NULL plaintext with length 0 is allowed. */
    unsigned char *ct = NULL, *back = NULL;
    size_t ct_len, pt_len = 99;
    assert_null(dm_seal(key, NULL, 0, NULL, 0, &ct, &ct_len));
    assert_null(dm_open(key, NULL, 0, ct, ct_len, &back, &pt_len));
    assert_int_equal(pt_len, 0);
    free(back);
    free(ct);
}

static void test_wrong_aad(void **state)
{
    static const char *const other[][3] = {
        {"eu", "acme", "rec-2"}, /* another row */
        {"us", "acme", "rec-1"}, /* another region */
        {"eu", "acme2", "rec-1"},
        {"eu", "acm", "erec-1"}, /* same concatenation, different parts */
    };
    const unsigned char pt[] = "personal data";
    size_t aad_len, ct_len;
    unsigned char *aad = record_aad("eu", "acme", "rec-1", &aad_len), *ct = NULL;

    assert_null(dm_seal(key, aad, aad_len, pt, sizeof(pt), &ct, &ct_len));
    for (size_t i = 0; i < DM_ARRAY_LEN(other); i++) {
        size_t l;
        unsigned char *a = record_aad(other[i][0], other[i][1], other[i][2], &l);
        unsigned char *out = NULL;
        size_t out_len = 0;
        expect_status(dm_open(key, a, l, ct, ct_len, &out, &out_len), GRPC_STATUS_DATA_LOSS,
                      "stored ciphertext does not authenticate");
        assert_null(out);
        free(a);
    }
    /* Wrong key, right AAD. */
    unsigned char k2[DM_KEY_LEN];
    memcpy(k2, key, sizeof(k2));
    k2[31] ^= 1;
    unsigned char *out = NULL;
    size_t out_len;
    expect_status(dm_open(k2, aad, aad_len, ct, ct_len, &out, &out_len), GRPC_STATUS_DATA_LOSS,
                  NULL);
    free(ct);
    free(aad);
}

static void test_tampering(void **state)
{
    const unsigned char pt[] = "a short payload of some bytes";
    size_t aad_len, ct_len;
    unsigned char *aad = record_aad("eu", "acme", "rec-1", &aad_len), *ct = NULL;
    assert_null(dm_seal(key, aad, aad_len, pt, sizeof(pt), &ct, &ct_len));

    /* Every bit of format byte, nonce, ciphertext and tag. */
    for (size_t i = 0; i < ct_len; i++) {
        for (int b = 0; b < 8; b++) {
            unsigned char *out = NULL;
            size_t out_len;
            ct[i] ^= (unsigned char)(1u << b);
            dm_status_t *st = dm_open(key, aad, aad_len, ct, ct_len, &out, &out_len);
            if (!st)
                fail_msg("flipping bit %d of byte %zu went unnoticed", b, i);
            expect_status(st, GRPC_STATUS_DATA_LOSS, "stored ciphertext does not authenticate");
            assert_null(out);
            ct[i] ^= (unsigned char)(1u << b);
        }
    }
    /* Every truncation, down to nothing. */
    for (size_t n = 0; n < ct_len; n++) {
        unsigned char *out = NULL;
        size_t out_len;
        expect_status(dm_open(key, aad, aad_len, ct, n, &out, &out_len), GRPC_STATUS_DATA_LOSS,
                      "stored ciphertext does not authenticate");
    }
    /* Extension. */
    unsigned char *longer = malloc(ct_len + 1), *out = NULL;
    size_t out_len;
    memcpy(longer, ct, ct_len);
    longer[ct_len] = 0;
    expect_status(dm_open(key, aad, aad_len, longer, ct_len + 1, &out, &out_len),
                  GRPC_STATUS_DATA_LOSS, NULL);
    /* The untouched value still opens. */
    assert_null(dm_open(key, aad, aad_len, ct, ct_len, &out, &out_len));
    assert_memory_equal(out, pt, sizeof(pt));
    free(out);
    free(longer);
    free(ct);
    free(aad);
}

static void test_nonce_is_random(void **state)
{
    const unsigned char pt[] = "same plaintext";
    unsigned char *a = NULL, *b = NULL;
    size_t al, bl;
    assert_null(dm_seal(key, NULL, 0, pt, sizeof(pt), &a, &al));
    assert_null(dm_seal(key, NULL, 0, pt, sizeof(pt), &b, &bl));
    assert_int_equal(al, bl);
    assert_memory_not_equal(a + 1, b + 1, DM_SEAL_NONCE_LEN);
    assert_memory_not_equal(a, b, al);
    free(a);
    free(b);
}

/* Writes `len` bytes to a new temp file with `mode`; returns its path (caller unlinks, frees). */
static char *write_temp(const unsigned char *data, size_t len, mode_t mode)
{
    char *path = strdup("/tmp/dm_test_kek_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len), (ssize_t)len);
    assert_int_equal(fchmod(fd, mode), 0);
    close(fd);
    return path;
}

static void test_kek_wrap_unwrap(void **state)
{
    unsigned char raw[DM_KEY_LEN], dek[DM_KEY_LEN], back[DM_KEY_LEN];
    dm_random_bytes(raw, sizeof(raw));
    dm_random_bytes(dek, sizeof(dek));
    char *path = write_temp(raw, sizeof(raw), 0600);
    dm_kek_t *kek = NULL;
    assert_null(dm_kek_load(path, &kek));
    assert_non_null(kek);

    size_t aad_len, other_len, wl;
    unsigned char *aad = DM_AAD(&aad_len, DM_AAD_STR("eu"), DM_AAD_STR("acme"), DM_AAD_STR(""));
    unsigned char *other = DM_AAD(&other_len, DM_AAD_STR("us"), DM_AAD_STR("acme"), DM_AAD_STR(""));
    unsigned char *w = NULL;
    assert_null(dm_dek_wrap(kek, dek, aad, aad_len, &w, &wl));
    assert_int_equal(wl, DM_WRAPPED_KEY_LEN);
    assert_int_equal(wl, 61);
    assert_int_equal(w[0], 0x01);
    assert_null(dm_dek_unwrap(kek, w, wl, aad, aad_len, back));
    assert_memory_equal(back, dek, DM_KEY_LEN);

    memset(back, 0xaa, sizeof(back));
    expect_status(dm_dek_unwrap(kek, w, wl, other, other_len, back), GRPC_STATUS_DATA_LOSS,
                  "cannot unwrap data key: authentication failed");
    for (size_t i = 0; i < sizeof(back); i++)
        assert_int_equal(back[i], 0xaa); /* untouched on failure */
    expect_status(dm_dek_unwrap(kek, w, wl - 1, aad, aad_len, back), GRPC_STATUS_DATA_LOSS,
                  "cannot unwrap data key: authentication failed");
    w[0] = 0x02;
    expect_status(dm_dek_unwrap(kek, w, wl, aad, aad_len, back), GRPC_STATUS_DATA_LOSS, NULL);
    w[0] = 0x01;
    w[30] ^= 0x80;
    expect_status(dm_dek_unwrap(kek, w, wl, aad, aad_len, back), GRPC_STATUS_DATA_LOSS, NULL);
    w[30] ^= 0x80;

    /* A different KEK cannot unwrap. */
    raw[0] ^= 1;
    char *path2 = write_temp(raw, sizeof(raw), 0400);
    dm_kek_t *kek2 = NULL;
    assert_null(dm_kek_load(path2, &kek2));
    expect_status(dm_dek_unwrap(kek2, w, wl, aad, aad_len, back), GRPC_STATUS_DATA_LOSS, NULL);

    dm_kek_free(kek2);
    dm_kek_free(kek);
    dm_kek_free(NULL);
    free(w);
    free(aad);
    free(other);
    unlink(path);
    unlink(path2);
    free(path);
    free(path2);
}

static void test_kek_load_errors(void **state)
{
    unsigned char raw[64] = {0};
    dm_kek_t *kek = NULL;

    char *p = write_temp(raw, DM_KEY_LEN, 0644);
    expect_status(dm_kek_load(p, &kek), GRPC_STATUS_FAILED_PRECONDITION, "mode 644");
    unlink(p);
    free(p);

    p = write_temp(raw, DM_KEY_LEN, 0640);
    expect_status(dm_kek_load(p, &kek), GRPC_STATUS_FAILED_PRECONDITION, "mode 640");
    unlink(p);
    free(p);

    p = write_temp(raw, 31, 0600);
    expect_status(dm_kek_load(p, &kek), GRPC_STATUS_FAILED_PRECONDITION, "(has 31)");
    unlink(p);
    free(p);

    p = write_temp(raw, 33, 0600);
    expect_status(dm_kek_load(p, &kek), GRPC_STATUS_FAILED_PRECONDITION, "(has 33)");
    unlink(p);
    free(p);

    p = write_temp(raw, 0, 0600);
    expect_status(dm_kek_load(p, &kek), GRPC_STATUS_FAILED_PRECONDITION, "(has 0)");
    unlink(p);
    free(p);

    expect_status(dm_kek_load("/nonexistent/dm.kek", &kek), GRPC_STATUS_FAILED_PRECONDITION,
                  "/nonexistent/dm.kek");
    expect_status(dm_kek_load("/tmp", &kek), GRPC_STATUS_FAILED_PRECONDITION, NULL);
    assert_null(kek);
}

static void test_subject_normalize(void **state)
{
    static const struct {
        const char *in, *want; /* want NULL: rejected */
    } cases[] = {
        {"  Alice@Example.COM \n", "alice@example.com"},
        {"\t\r\v\fBOB\t", "bob"},
        {"x", "x"},
        {"Ünïcode@EXAMPLE.org", "Ünïcode@example.org"}, /* non-ASCII bytes untouched */
        {"a b", "a b"},                                 /* interior space kept */
        {"", NULL},
        {"   ", NULL},
        {" \n\t ", NULL},
        {"\xc0\xaf", NULL},         /* overlong */
        {"ab\xed\xa0\x80", NULL},   /* surrogate */
        {"\xf4\x90\x80\x80", NULL}, /* > U+10FFFF */
        {"a\xe2\x82", NULL},        /* truncated */
        {"\xff", NULL},
    };
    for (size_t i = 0; i < DM_ARRAY_LEN(cases); i++) {
        char *out = NULL;
        dm_status_t *st = dm_subject_normalize(cases[i].in, &out);
        if (cases[i].want) {
            if (st)
                fail_msg("case %zu: unexpected error \"%s\"", i, st->message);
            assert_string_equal(out, cases[i].want);
            free(out);
        } else {
            if (!st)
                fail_msg("case %zu accepted as \"%s\"", i, out);
            expect_status(st, GRPC_STATUS_INVALID_ARGUMENT,
                          "subject: must be 1..320 bytes of UTF-8 after trimming");
            assert_null(out);
        }
    }

    /* 320 bytes after trimming is the limit. */
    char buf[DM_SUBJECT_MAX + 8];
    memset(buf, 'A', sizeof(buf));
    buf[0] = ' ';
    buf[DM_SUBJECT_MAX + 1] = '\n';
    buf[DM_SUBJECT_MAX + 2] = '\0';
    char *out = NULL;
    assert_null(dm_subject_normalize(buf, &out));
    assert_int_equal(strlen(out), DM_SUBJECT_MAX);
    assert_int_equal(out[0], 'a');
    free(out);
    buf[DM_SUBJECT_MAX + 1] = 'A'; /* 321 */
    out = NULL;
    expect_status(dm_subject_normalize(buf, &out), GRPC_STATUS_INVALID_ARGUMENT, "subject: ");
    assert_null(out);
}

static void test_subject_key_rfc4231(void **state)
{
    /* RFC 4231 test case 2. */
    unsigned char mac[DM_SUBJECT_KEY_LEN];
    char hex[2 * DM_SUBJECT_KEY_LEN + 1];
    dm_subject_key((const unsigned char *)"Jefe", 4, "what do ya want for nothing?", mac);
    dm_hex_encode(mac, sizeof(mac), hex);
    assert_string_equal(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");

    /* A different pepper gives a different key. */
    unsigned char mac2[DM_SUBJECT_KEY_LEN];
    dm_subject_key((const unsigned char *)"Jeff", 4, "what do ya want for nothing?", mac2);
    assert_memory_not_equal(mac, mac2, sizeof(mac));
}

static void test_hex(void **state)
{
    unsigned char in[256], back[256];
    char hex[2 * sizeof(in) + 1];
    for (size_t i = 0; i < sizeof(in); i++)
        in[i] = (unsigned char)i;
    dm_hex_encode(in, sizeof(in), hex);
    assert_int_equal(strlen(hex), 2 * sizeof(in));
    assert_memory_equal(hex, "000102", 6);
    assert_string_equal(hex + 2 * 250, "fafbfcfdfeff");
    assert_true(dm_hex_decode(hex, back, sizeof(back)));
    assert_memory_equal(in, back, sizeof(in));

    unsigned char b[3] = {0};
    assert_true(dm_hex_decode("ABcdEf", b, 3));
    assert_int_equal(b[0], 0xab);
    assert_int_equal(b[1], 0xcd);
    assert_int_equal(b[2], 0xef);
    char empty[1];
    dm_hex_encode(NULL, 0, empty);
    assert_string_equal(empty, "");
    assert_true(dm_hex_decode("", b, 0));

    static const char *const bad[] = {"abcde", "abcdef0", "abcdeg", "ab cd ", "", "0xabcd"};
    for (size_t i = 0; i < DM_ARRAY_LEN(bad); i++) {
        memset(b, 0x55, sizeof(b));
        if (dm_hex_decode(bad[i], b, 3))
            fail_msg("\"%s\" decoded", bad[i]);
        assert_int_equal(b[0], 0x55); /* untouched */
    }
}

static void test_aad_unambiguous(void **state)
{
    size_t l1, l2, l3;
    unsigned char *a = DM_AAD(&l1, DM_AAD_STR("ab"), DM_AAD_STR("c"));
    unsigned char *b = DM_AAD(&l2, DM_AAD_STR("a"), DM_AAD_STR("bc"));
    assert_int_equal(l1, l2);
    assert_memory_not_equal(a, b, l1);
    assert_memory_equal(a, "\0\0\0\002ab\0\0\0\001c", l1);
    assert_int_equal(l1, 11);

    /* Empty parts count: ("a", "") differs from ("a"). */
    unsigned char *c = DM_AAD(&l3, DM_AAD_STR("a"), DM_AAD_BYTES(NULL, 0));
    assert_int_equal(l3, 9);
    free(c);
    c = dm_aad(&l3, 0, NULL);
    assert_int_equal(l3, 0);
    free(c);

    const unsigned char bin[] = {0, 1, 0};
    c = DM_AAD(&l3, DM_AAD_BYTES(bin, sizeof(bin)));
    assert_memory_equal(c, "\0\0\0\003\0\001\0", 7);
    free(c);
    free(a);
    free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_seal_open_round_trip),
        cmocka_unit_test(test_wrong_aad),
        cmocka_unit_test(test_tampering),
        cmocka_unit_test(test_nonce_is_random),
        cmocka_unit_test(test_kek_wrap_unwrap),
        cmocka_unit_test(test_kek_load_errors),
        cmocka_unit_test(test_subject_normalize),
        cmocka_unit_test(test_subject_key_rfc4231),
        cmocka_unit_test(test_hex),
        cmocka_unit_test(test_aad_unambiguous),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
