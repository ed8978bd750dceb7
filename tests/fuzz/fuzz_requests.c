/*
 * Every request message of the API through the server's decode path (src/server/server.c
 * decode_bb): the wire check of string fields, protobuf-c unpack, then the field validators
 * the handlers run, chosen by field name so new messages are covered as they land. The first
 * input byte picks the method of dm_api_methods(); the rest is the message.
 * Oracles: a message that passed the wire check decodes to strings that are valid UTF-8; every
 * validator error is INVALID_ARGUMENT with a client-safe message.
 */
#include <string.h>

#include <openssl/crypto.h>

#include "api/internal.h"
#include "domicile/api.h"
#include "domicile/crypto.h"
#include "domicile/validate.h"
#include "fuzz_util.h"
#include "server/wire.h"

static void check_string(const ProtobufCFieldDescriptor *f, const char *v)
{
    const char *n = f->name;
    char *norm = NULL;
    if (!dm_utf8_valid(v, strlen(v)))
        abort(); /* dm_wire_strings_ok() let an invalid string through */
    if (strcmp(n, "customer_id") == 0 || strcmp(n, "tenant") == 0)
        fz_status(dm_check_customer_id(n, v), true);
    else if (strcmp(n, "record_id") == 0 || strcmp(n, "record_ids") == 0)
        fz_status(dm_check_record_id(n, v), true);
    else if (strcmp(n, "request_id") == 0)
        fz_status(dm_check_request_id(n, v), true);
    else if (strcmp(n, "purpose") == 0)
        fz_status(dm_check_purpose(n, v, true), true);
    else if (strcmp(n, "content_type") == 0)
        fz_status(dm_check_content_type(n, v), true);
    else if (strcmp(n, "kind") == 0) {
        fz_status(dm_check_kind(n, v, true), true);
        fz_status(dm_check_kind(n, v, false), true);
    } else if (strcmp(n, "subject") == 0 && v[0]) {
        dm_status_t *st = dm_subject_normalize(v, &norm);
        if (!st && (!dm_utf8_valid(norm, strlen(norm)) || !norm[0]))
            abort();
        fz_status(st, true);
    }
    fz_status(dm_check_text(n, v, 0, 4096), true);
    if (norm) {
        OPENSSL_cleanse(norm, strlen(norm));
        free(norm);
    }
}

static void check_message(const ProtobufCMessage *m)
{
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        const char *at = (const char *)m + f->offset;
        const uint32_t *oneof_case = (const uint32_t *)((const char *)m + f->quantifier_offset);
        size_t n = 1;
        if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) && *oneof_case != f->id)
            continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            n = *(const size_t *)((const char *)m + f->quantifier_offset);
            at = *(const char *const *)at;
        }
        if (f->type == PROTOBUF_C_TYPE_MESSAGE && f->label == PROTOBUF_C_LABEL_REPEATED &&
            strcmp(f->name, "labels") == 0) {
            dm_status_t *st = dm_check_labels(f->name, n, (void *const *)at);
            if (!st) /* what PutRecord / RegisterCustomer store */
                free(dm_labels_to_json(n, (void *const *)at));
            fz_status(st, true);
        }
        for (size_t j = 0; j < n; j++) {
            if (f->type == PROTOBUF_C_TYPE_STRING)
                check_string(f, ((char *const *)at)[j]);
            else if (f->type == PROTOBUF_C_TYPE_MESSAGE && ((void *const *)at)[j])
                check_message(((const ProtobufCMessage *const *)at)[j]);
            else if (f->type == PROTOBUF_C_TYPE_BYTES && strcmp(f->name, "payload") == 0)
                fz_status(dm_check_payload(f->name, ((const ProtobufCBinaryData *)at)[j].len),
                          true);
            else if (f->type == PROTOBUF_C_TYPE_INT32 && strcmp(f->name, "page_size") == 0)
                fz_status(dm_check_page_size(f->name, ((const int32_t *)at)[j], 1000), true);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t n_methods;
    const dm_method_t *methods = dm_api_methods(&n_methods);
    const char *bad = NULL;
    if (size < 1)
        return 0;
    const ProtobufCMessageDescriptor *d = methods[data[0] % n_methods].input;
    if (!dm_wire_strings_ok(d, data + 1, size - 1, &bad)) {
        if (!bad || !bad[0])
            abort(); /* the INVALID_ARGUMENT message names the field */
        return 0;
    }
    ProtobufCMessage *msg = protobuf_c_message_unpack(d, NULL, size - 1, data + 1);
    if (msg) {
        check_message(msg);
        protobuf_c_message_free_unpacked(msg, NULL);
    }
    return 0;
}
