/* Every rpc of proto/ is in the method table exactly once, with matching message types. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "domicile/api.h"

#include "domicile/v1/customers.pb-c.h"
#include "domicile/v1/keys.pb-c.h"
#include "domicile/v1/records.pb-c.h"
#include "domicile/v1/regions.pb-c.h"
#include "domicile/v1/subject_rights.pb-c.h"
#include "domicile/v1/transfers.pb-c.h"
#include "domicile/peer/v1/peer.pb-c.h"
#include "grpc/health/v1/health.pb-c.h"
#include "grpc/reflection/v1alpha/reflection.pb-c.h"

static const ProtobufCServiceDescriptor *services[] = {
    &grpc__health__v1__health__descriptor,
    &domicile__v1__customers_service__descriptor,
    &domicile__v1__records_service__descriptor,
    &domicile__v1__subject_rights_service__descriptor,
    &domicile__v1__transfers_service__descriptor,
    &domicile__v1__regions_service__descriptor,
    &grpc__reflection__v1alpha__server_reflection__descriptor,
    &domicile__peer__v1__peer_service__descriptor,
    &domicile__v1__keys_service__descriptor,
};

static void test_table_matches_proto(void **state)
{
    size_t n, total = 0;
    const dm_method_t *m = dm_api_methods(&n);
    for (size_t s = 0; s < sizeof(services) / sizeof(services[0]); s++) {
        const ProtobufCServiceDescriptor *sd = services[s];
        for (unsigned i = 0; i < sd->n_methods; i++) {
            char path[256];
            snprintf(path, sizeof(path), "/%s/%s", sd->name, sd->methods[i].name);
            int found = 0;
            for (size_t j = 0; j < n; j++) {
                if (strcmp(m[j].path, path) != 0)
                    continue;
                found++;
                if (m[j].input != sd->methods[i].input || m[j].output != sd->methods[i].output)
                    fail_msg("%s: message types differ from the proto", path);
                if (!m[j].handler && !m[j].pending_issue)
                    fail_msg("%s: no handler and no issue named", path);
            }
            if (found != 1)
                fail_msg("%s appears %d times in the method table", path, found);
            total++;
        }
    }
    assert_int_equal(total, n); /* and nothing in the table that is not in the proto */
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_table_matches_proto)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
