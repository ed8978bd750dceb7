#include <arpa/inet.h>
#include <string.h>

#include "domicile/sql.h"

#define RECORD_COLUMNS                                                                             \
    "r.record_id, r.kind, r.subject_key, r.content_type, r.labels, r.version, r.restricted, "      \
    "r.created_at, r.updated_at, r.payload_size, r.key_id"

const dm_sql_t dm_sql[DM_SQL__COUNT] = {
    [DM_SQL_PROBE] = {"probe", "SELECT 1", 0},
    [DM_SQL_REGISTER_BEGIN] = {"register_begin",
                               "SELECT * FROM domicile.register_begin($1, $2, $3, $4, $5, $6)", 6},
    [DM_SQL_CUSTOMER_STATE] = {"customer_state", "SELECT * FROM domicile.customer_state($1)", 1},
    [DM_SQL_REGISTER_FINISH] = {"register_finish",
                                "SELECT * FROM domicile.register_finish($1, $2, $3)", 3},
    [DM_SQL_GET_CUSTOMER] = {"get_customer",
                             "SELECT customer_id, residency, state, display_name, labels, "
                             "created_at, closed_at, purge_after, close_reason, purged_at "
                             "FROM domicile.customers WHERE customer_id = $1 "
                             "AND state <> 'pending'",
                             1},
    [DM_SQL_CLOSE_CUSTOMER] = {"close_customer",
                               "SELECT * FROM domicile.close_customer($1, $2, $3, $4)", 4},
    [DM_SQL_PURGE_DUE] = {"purge_due", "SELECT domicile.purge_due_customers($1)", 1},
    [DM_SQL_GET_OR_CREATE_KEY] = {"get_or_create_key",
                                  "SELECT * FROM domicile.get_or_create_key($1, $2, $3)", 3},
    [DM_SQL_PUT_RECORD] = {"put_record",
                           "SELECT * FROM domicile.put_record($1, $2, $3, $4, $5, $6, $7, $8, "
                           "$9, $10, $11, $12)",
                           12},
    [DM_SQL_GET_RECORD] = {"get_record",
                           "SELECT " RECORD_COLUMNS ", r.payload, k.wrapped "
                           "FROM domicile.records r JOIN domicile.data_keys k USING (key_id) "
                           "WHERE r.customer_id = $1 AND r.record_id = $2",
                           2},
    /* The payload and key are fetched only when asked for ($6): a listing without payloads
     * moves no ciphertext. */
    [DM_SQL_LIST_RECORDS] = {"list_records",
                             "SELECT " RECORD_COLUMNS ", "
                             "CASE WHEN $6::boolean THEN r.payload END, "
                             "CASE WHEN $6::boolean THEN k.wrapped END "
                             "FROM domicile.records r JOIN domicile.data_keys k USING (key_id) "
                             "WHERE r.customer_id = $1 AND ($2 = '' OR r.kind = $2) "
                             "AND ($3::bytea IS NULL OR r.subject_key = $3) "
                             "AND r.record_id > $4 ORDER BY r.record_id LIMIT $5",
                             6},
    [DM_SQL_DELETE_RECORD] = {"delete_record",
                              "SELECT * FROM domicile.delete_record($1, $2, $3, $4, $5)", 5},
};

static uint64_t be64(const char *p)
{
    uint32_t hi, lo;
    memcpy(&hi, p, 4);
    memcpy(&lo, p + 4, 4);
    return ((uint64_t)ntohl(hi) << 32) | ntohl(lo);
}

bool dm_pg_isnull(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col);
}

int64_t dm_pg_int8(const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        return 0;
    const char *v = PQgetvalue(res, row, col);
    if (PQgetlength(res, row, col) == 4) {
        uint32_t x;
        memcpy(&x, v, 4);
        return (int32_t)ntohl(x);
    }
    return (int64_t)be64(v);
}

int32_t dm_pg_int4(const PGresult *res, int row, int col)
{
    return (int32_t)dm_pg_int8(res, row, col);
}

bool dm_pg_bool(const PGresult *res, int row, int col)
{
    return !PQgetisnull(res, row, col) && PQgetvalue(res, row, col)[0] != 0;
}

int64_t dm_pg_time_ms(const PGresult *res, int row, int col)
{
    /* Binary timestamptz: microseconds since 2000-01-01 UTC (integer datetimes). */
    if (PQgetisnull(res, row, col))
        return 0;
    int64_t us = (int64_t)be64(PQgetvalue(res, row, col));
    return us / 1000 + 946684800000LL;
}

const char *dm_pg_bytes(const PGresult *res, int row, int col, int *len)
{
    *len = PQgetlength(res, row, col);
    return PQgetvalue(res, row, col);
}

const char *dm_pg_jsonb(const PGresult *res, int row, int col, int *len)
{
    int n = PQgetlength(res, row, col);
    const char *v = PQgetvalue(res, row, col);
    if (PQgetisnull(res, row, col) || n < 1) {
        *len = 0;
        return "";
    }
    *len = n - 1; /* skip the jsonb format version byte */
    return v + 1;
}
