/*
 * The descriptor database behind gRPC server reflection (the ServerReflectionInfo handler is
 * src/api/reflection.c): what the gateway serves, as protobuf descriptors.
 *
 * The descriptors are the FileDescriptorSet protoc made of proto/ at build time (embedded as
 * dm_descriptor_set). A small wire reader walks it once: files, dependencies, and every
 * fully-qualified symbol, sorted for lookup. Every length is checked against what is left of
 * its enclosing message, nesting is bounded, and anything malformed rejects the whole set.
 *
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "domicile/log.h"
#include "domicile/reflection.h"

#define MAX_DEPTH 32   /* nested messages in a descriptor */
#define MAX_NAME  4096 /* bytes of a name in a descriptor */

/* ---- wire reader ------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *p, *end;
} rd_t;

typedef struct {
    uint32_t num;
    unsigned wt;
    const uint8_t *start; /* the field's first byte (its tag) */
    const uint8_t *value; /* the first byte after the tag */
    const uint8_t *data;  /* wire type 2: the payload */
    size_t len;
} fld_t;

static bool rd_varint(rd_t *r, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end)
            return false;
        uint8_t b = *r->p++;
        if (shift == 63 && b > 1)
            return false; /* more than 64 bits */
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

/* The next field of the message: 1, or 0 at its end, or -1 when it is malformed. */
static int rd_next(rd_t *r, fld_t *f)
{
    uint64_t key, v;
    if (r->p >= r->end)
        return 0;
    f->start = r->p;
    if (!rd_varint(r, &key))
        return -1;
    if ((key >> 3) == 0 || (key >> 3) > 536870911u) /* field numbers are 1 .. 2^29-1 */
        return -1;
    f->num = (uint32_t)(key >> 3);
    f->wt = (unsigned)(key & 7);
    f->value = r->p;
    f->data = NULL;
    f->len = 0;
    switch (f->wt) {
    case 0:
        return rd_varint(r, &v) ? 1 : -1;
    case 1:
        if (r->end - r->p < 8)
            return -1;
        r->p += 8;
        return 1;
    case 5:
        if (r->end - r->p < 4)
            return -1;
        r->p += 4;
        return 1;
    case 2:
        if (!rd_varint(r, &v) || v > (uint64_t)(r->end - r->p))
            return -1;
        f->data = r->p;
        f->len = (size_t)v;
        r->p += v;
        return 1;
    default:
        return -1; /* groups (3, 4) and the undefined 6, 7 */
    }
}

/* ---- the database ----------------------------------------------------------------------- */

typedef struct {
    char *name;
    size_t file;
} sym_t;

typedef struct {
    char *name;
    uint8_t *proto; /* served form (see dm_descdb_file_proto) */
    size_t proto_len;
    char **dep_names;
    size_t n_deps;
    size_t *deps;
} file_t;

struct dm_descdb {
    file_t *files;
    size_t n_files, cap_files;
    sym_t *syms;
    size_t n_syms, cap_syms;
    char **services;
    size_t n_services, cap_services;
};

typedef struct {
    dm_descdb_t *db;
    size_t file;     /* the file being parsed */
    const char *why; /* set on failure */
} pctx_t;

typedef struct {
    uint8_t *buf;
    size_t len, cap;
} buf_t;

static void buf_put(buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        b->buf = dm_realloc(b->buf, cap);
        b->cap = cap;
    }
    if (n)
        memcpy(b->buf + b->len, p, n);
    b->len += n;
}

static void buf_varint(buf_t *b, uint64_t v)
{
    uint8_t tmp[10];
    size_t n = 0;
    do {
        tmp[n] = (uint8_t)(v & 0x7f);
        v >>= 7;
        if (v)
            tmp[n] |= 0x80;
        n++;
    } while (v);
    buf_put(b, tmp, n);
}

static bool ident_char(uint8_t ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '_';
}

/* A declaration's own name: an identifier. */
static bool name_ok(const uint8_t *s, size_t len)
{
    if (len == 0 || len > MAX_NAME)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!ident_char(s[i]))
            return false;
    return true;
}

/* A package: identifiers joined by dots (may be empty). */
static bool package_ok(const uint8_t *s, size_t len)
{
    if (len > MAX_NAME)
        return false;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '.') {
            if (i == 0 || i + 1 == len || s[i - 1] == '.')
                return false;
        } else if (!ident_char(s[i])) {
            return false;
        }
    }
    return true;
}

/* A file name: printable ASCII, no NUL. */
static bool file_name_ok(const uint8_t *s, size_t len)
{
    if (len == 0 || len > MAX_NAME)
        return false;
    for (size_t i = 0; i < len; i++)
        if (s[i] < 0x20 || s[i] > 0x7e)
            return false;
    return true;
}

static char *join(const char *scope, const uint8_t *name, size_t len)
{
    size_t n = strlen(scope);
    char *out = dm_malloc(n + 1 + len + 1);
    memcpy(out, scope, n);
    if (n)
        out[n++] = '.';
    memcpy(out + n, name, len);
    out[n + len] = '\0';
    return out;
}

/* Takes ownership of `full`. */
static void add_sym(pctx_t *c, char *full)
{
    dm_descdb_t *db = c->db;
    if (db->n_syms == db->cap_syms) {
        db->cap_syms = db->cap_syms ? db->cap_syms * 2 : 256;
        db->syms = dm_realloc(db->syms, db->cap_syms * sizeof(sym_t));
    }
    db->syms[db->n_syms++] = (sym_t){full, c->file};
}

/* The name (field 1) of a declaration, which every declaration must have. */
static bool decl_name(pctx_t *c, const uint8_t *p, size_t len, const uint8_t **name,
                      size_t *name_len)
{
    rd_t r = {p, p + len};
    fld_t f;
    int rc;
    *name = NULL;
    *name_len = 0;
    while ((rc = rd_next(&r, &f)) > 0) {
        if (f.num == 1 && f.wt == 2) {
            *name = f.data;
            *name_len = f.len;
        }
    }
    if (rc < 0) {
        c->why = "truncated or malformed field";
        return false;
    }
    if (!*name || !name_ok(*name, *name_len)) {
        c->why = "a declaration without a valid name";
        return false;
    }
    return true;
}

/* A field, oneof, extension, method or enum value: a name in `scope`, nothing below. */
static bool parse_leaf(pctx_t *c, const char *scope, const uint8_t *p, size_t len)
{
    const uint8_t *name;
    size_t name_len;
    if (!decl_name(c, p, len, &name, &name_len))
        return false;
    add_sym(c, join(scope, name, name_len));
    return true;
}

/* EnumDescriptorProto: name = 1, value = 2. Values are scoped like the enum (C++ rules). */
static bool parse_enum(pctx_t *c, const char *scope, const uint8_t *p, size_t len)
{
    const uint8_t *name;
    size_t name_len;
    if (!decl_name(c, p, len, &name, &name_len))
        return false;
    add_sym(c, join(scope, name, name_len));
    rd_t r = {p, p + len};
    fld_t f;
    while (rd_next(&r, &f) > 0)
        if (f.num == 2 && f.wt == 2 && !parse_leaf(c, scope, f.data, f.len))
            return false;
    return true;
}

/* DescriptorProto: name = 1, field = 2, nested_type = 3, enum_type = 4, extension = 6,
 * oneof_decl = 8. */
static bool parse_message(pctx_t *c, const char *scope, const uint8_t *p, size_t len, int depth)
{
    const uint8_t *name;
    size_t name_len;
    if (depth > MAX_DEPTH) {
        c->why = "messages nested too deeply";
        return false;
    }
    if (!decl_name(c, p, len, &name, &name_len))
        return false;
    char *full = join(scope, name, name_len);
    add_sym(c, full); /* owned by the database now; still valid below */
    rd_t r = {p, p + len};
    fld_t f;
    bool ok = true;
    while (ok && rd_next(&r, &f) > 0) {
        if (f.wt != 2)
            continue;
        switch (f.num) {
        case 2:
        case 6:
        case 8:
            ok = parse_leaf(c, full, f.data, f.len);
            break;
        case 3:
            ok = parse_message(c, full, f.data, f.len, depth + 1);
            break;
        case 4:
            ok = parse_enum(c, full, f.data, f.len);
            break;
        default:
            break;
        }
    }
    return ok;
}

/* ServiceDescriptorProto: name = 1, method = 2. */
static bool parse_service(pctx_t *c, const char *scope, const uint8_t *p, size_t len)
{
    const uint8_t *name;
    size_t name_len;
    if (!decl_name(c, p, len, &name, &name_len))
        return false;
    char *full = join(scope, name, name_len);
    add_sym(c, full);
    dm_descdb_t *db = c->db;
    if (db->n_services == db->cap_services) {
        db->cap_services = db->cap_services ? db->cap_services * 2 : 16;
        db->services = dm_realloc(db->services, db->cap_services * sizeof(char *));
    }
    db->services[db->n_services++] = full; /* shared with the symbol table */
    rd_t r = {p, p + len};
    fld_t f;
    while (rd_next(&r, &f) > 0)
        if (f.num == 2 && f.wt == 2 && !parse_leaf(c, full, f.data, f.len))
            return false;
    return true;
}

/* protobuf's default JSON name: "purge_after_unix_ms" -> "purgeAfterUnixMs". */
static bool json_name_is_default(const uint8_t *name, size_t name_len, const uint8_t *json,
                                 size_t json_len)
{
    size_t j = 0;
    bool upper = false;
    if (!name)
        return false;
    for (size_t i = 0; i < name_len; i++) {
        uint8_t ch = name[i];
        if (ch == '_') {
            upper = true;
            continue;
        }
        if (upper && ch >= 'a' && ch <= 'z')
            ch = (uint8_t)(ch - 'a' + 'A');
        upper = false;
        if (j >= json_len || json[j] != ch)
            return false;
        j++;
    }
    return j == json_len;
}

typedef enum { K_FILE, K_MESSAGE, K_FIELD } kind_t;

/*
 * Copy a FileDescriptorProto, DescriptorProto or FieldDescriptorProto without the default
 * json_name values (FieldDescriptorProto field 10) that --descriptor_set_out adds: the result
 * is what FileDescriptor::CopyTo() writes, which protoc embeds in generated code and which the
 * reference reflection servers send. Everything else is copied byte for byte, in order; the
 * lengths of the messages that lost bytes are re-encoded.
 */
static bool strip_json_names(kind_t kind, const uint8_t *p, size_t len, buf_t *out, int depth)
{
    const uint8_t *name = NULL;
    size_t name_len = 0;
    rd_t r = {p, p + len};
    fld_t f;
    int rc;

    if (depth > MAX_DEPTH + 2)
        return false;
    if (kind == K_FIELD) {
        while ((rc = rd_next(&r, &f)) > 0)
            if (f.num == 1 && f.wt == 2) {
                name = f.data;
                name_len = f.len;
            }
        r = (rd_t){p, p + len};
    }
    while ((rc = rd_next(&r, &f)) > 0) {
        int child = -1;
        if (f.wt == 2) {
            if (kind == K_FILE && f.num == 4)
                child = K_MESSAGE;
            else if (kind == K_FILE && f.num == 7)
                child = K_FIELD;
            else if (kind == K_MESSAGE && (f.num == 2 || f.num == 6))
                child = K_FIELD;
            else if (kind == K_MESSAGE && f.num == 3)
                child = K_MESSAGE;
            else if (kind == K_FIELD && f.num == 10 &&
                     json_name_is_default(name, name_len, f.data, f.len))
                continue; /* dropped */
        }
        if (child < 0) {
            buf_put(out, f.start, (size_t)(r.p - f.start));
            continue;
        }
        buf_t sub = {0};
        if (!strip_json_names((kind_t)child, f.data, f.len, &sub, depth + 1)) {
            free(sub.buf);
            return false;
        }
        buf_put(out, f.start, (size_t)(f.value - f.start)); /* the tag as it was */
        buf_varint(out, sub.len);
        buf_put(out, sub.buf, sub.len);
        free(sub.buf);
    }
    return rc == 0;
}

/* FileDescriptorProto: name = 1, package = 2, dependency = 3, message_type = 4,
 * enum_type = 5, service = 6, extension = 7. */
static bool parse_file(pctx_t *c, const uint8_t *p, size_t len)
{
    dm_descdb_t *db = c->db;
    if (db->n_files == db->cap_files) {
        db->cap_files = db->cap_files ? db->cap_files * 2 : 16;
        db->files = dm_realloc(db->files, db->cap_files * sizeof(file_t));
    }
    c->file = db->n_files++;
    file_t *file = &db->files[c->file];
    memset(file, 0, sizeof(*file));

    /* First the name, package and dependencies, wherever they are. */
    const uint8_t *pkg = NULL;
    size_t pkg_len = 0, cap_deps = 0;
    rd_t r = {p, p + len};
    fld_t f;
    int rc;
    while ((rc = rd_next(&r, &f)) > 0) {
        if (f.wt != 2)
            continue;
        if (f.num == 1) {
            if (!file_name_ok(f.data, f.len)) {
                c->why = "a file with an invalid name";
                return false;
            }
            free(file->name);
            file->name = dm_strndup((const char *)f.data, f.len);
        } else if (f.num == 2) {
            if (!package_ok(f.data, f.len)) {
                c->why = "a file with an invalid package name";
                return false;
            }
            pkg = f.data;
            pkg_len = f.len;
        } else if (f.num == 3) {
            if (!file_name_ok(f.data, f.len)) {
                c->why = "a dependency with an invalid name";
                return false;
            }
            if (file->n_deps == cap_deps) {
                cap_deps = cap_deps ? cap_deps * 2 : 4;
                file->dep_names = dm_realloc(file->dep_names, cap_deps * sizeof(char *));
            }
            file->dep_names[file->n_deps++] = dm_strndup((const char *)f.data, f.len);
        }
    }
    if (rc < 0) {
        c->why = "truncated or malformed field";
        return false;
    }
    if (!file->name) {
        c->why = "a file without a name";
        return false;
    }

    char *scope = dm_strndup(pkg ? (const char *)pkg : "", pkg_len);
    bool ok = true;
    r = (rd_t){p, p + len};
    while (ok && rd_next(&r, &f) > 0) {
        if (f.wt != 2)
            continue;
        switch (f.num) {
        case 4:
            ok = parse_message(c, scope, f.data, f.len, 1);
            break;
        case 5:
            ok = parse_enum(c, scope, f.data, f.len);
            break;
        case 6:
            ok = parse_service(c, scope, f.data, f.len);
            break;
        case 7:
            ok = parse_leaf(c, scope, f.data, f.len);
            break;
        default:
            break;
        }
    }
    free(scope);
    if (!ok)
        return false;

    buf_t out = {0};
    if (!strip_json_names(K_FILE, p, len, &out, 0)) {
        free(out.buf);
        c->why = "truncated or malformed field";
        return false;
    }
    file->proto = out.buf ? out.buf : dm_malloc(1);
    file->proto_len = out.len;
    return true;
}

static int sym_cmp(const void *a, const void *b)
{
    return strcmp(((const sym_t *)a)->name, ((const sym_t *)b)->name);
}

void dm_descdb_free(dm_descdb_t *db)
{
    if (!db)
        return;
    for (size_t i = 0; i < db->n_files; i++) {
        file_t *f = &db->files[i];
        free(f->name);
        free(f->proto);
        for (size_t d = 0; d < f->n_deps; d++)
            free(f->dep_names[d]);
        free(f->dep_names);
        free(f->deps);
    }
    free(db->files);
    for (size_t i = 0; i < db->n_syms; i++)
        free(db->syms[i].name); /* services[] points at some of these */
    free(db->syms);
    free(db->services);
    free(db);
}

dm_status_t *dm_descdb_parse(const uint8_t *buf, size_t len, dm_descdb_t **out)
{
    dm_descdb_t *db = dm_calloc(1, sizeof(*db));
    pctx_t c = {db, 0, NULL};
    rd_t r = {buf, buf + len};
    fld_t f;
    int rc;
    char *bad = NULL;
    dm_status_t *st;

    *out = NULL;
    /* FileDescriptorSet: file = 1. */
    while ((rc = rd_next(&r, &f)) > 0) {
        if (f.num != 1 || f.wt != 2)
            continue;
        if (!parse_file(&c, f.data, f.len))
            goto fail;
    }
    if (rc < 0) {
        c.why = "truncated or malformed field";
        goto fail;
    }
    for (size_t i = 0; i < db->n_files; i++) {
        file_t *file = &db->files[i];
        for (size_t j = 0; j < i; j++)
            if (strcmp(db->files[j].name, file->name) == 0) {
                c.why = "a file named twice";
                bad = dm_strdup(file->name);
                goto fail;
            }
        file->deps = dm_calloc(file->n_deps ? file->n_deps : 1, sizeof(size_t));
        for (size_t d = 0; d < file->n_deps; d++) {
            long k = dm_descdb_find_file(db, file->dep_names[d]);
            if (k < 0) {
                c.why = "a dependency missing from the set";
                bad = dm_strdup(file->dep_names[d]);
                goto fail;
            }
            file->deps[d] = (size_t)k;
        }
    }
    if (db->n_syms)
        qsort(db->syms, db->n_syms, sizeof(sym_t), sym_cmp);
    for (size_t i = 1; i < db->n_syms; i++)
        if (strcmp(db->syms[i - 1].name, db->syms[i].name) == 0) {
            c.why = "a symbol declared twice";
            bad = dm_strdup(db->syms[i].name);
            goto fail;
        }
    *out = db;
    return NULL;

fail:
    st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "descriptor set: %s",
                       c.why ? c.why : "malformed");
    if (bad)
        dm_status_detail(st, "%s", bad);
    free(bad);
    dm_descdb_free(db);
    return st;
}

size_t dm_descdb_n_files(const dm_descdb_t *db)
{
    return db->n_files;
}

const char *dm_descdb_file_name(const dm_descdb_t *db, size_t i)
{
    return i < db->n_files ? db->files[i].name : NULL;
}

const uint8_t *dm_descdb_file_proto(const dm_descdb_t *db, size_t i, size_t *len)
{
    if (i >= db->n_files) {
        *len = 0;
        return NULL;
    }
    *len = db->files[i].proto_len;
    return db->files[i].proto;
}

long dm_descdb_find_file(const dm_descdb_t *db, const char *name)
{
    for (size_t i = 0; i < db->n_files; i++)
        if (strcmp(db->files[i].name, name) == 0)
            return (long)i;
    return -1;
}

long dm_descdb_find_symbol(const dm_descdb_t *db, const char *symbol)
{
    if (symbol[0] == '.')
        symbol++;
    sym_t key = {(char *)symbol, 0};
    const sym_t *s =
        db->n_syms ? bsearch(&key, db->syms, db->n_syms, sizeof(sym_t), sym_cmp) : NULL;
    return s ? (long)s->file : -1;
}

size_t dm_descdb_closure(const dm_descdb_t *db, size_t i, size_t *out)
{
    if (i >= db->n_files)
        return 0;
    bool *seen = dm_calloc(db->n_files, sizeof(bool));
    size_t n = 0;
    out[n++] = i;
    seen[i] = true;
    for (size_t k = 0; k < n; k++) { /* breadth first: the file, its imports, theirs, ... */
        const file_t *f = &db->files[out[k]];
        for (size_t d = 0; d < f->n_deps; d++)
            if (!seen[f->deps[d]]) {
                seen[f->deps[d]] = true;
                out[n++] = f->deps[d];
            }
    }
    free(seen);
    return n;
}

size_t dm_descdb_n_services(const dm_descdb_t *db)
{
    return db->n_services;
}

const char *dm_descdb_service(const dm_descdb_t *db, size_t i)
{
    return i < db->n_services ? db->services[i] : NULL;
}

static pthread_once_t builtin_once = PTHREAD_ONCE_INIT;
static dm_descdb_t *builtin_db;

static void builtin_parse(void)
{
    dm_status_t *st = dm_descdb_parse(dm_descriptor_set, dm_descriptor_set_len, &builtin_db);
    if (st) {
        dm_error("reflection", "embedded descriptor set unusable (bug): %s%s%s", st->message,
                 st->detail ? ": " : "", st->detail ? st->detail : "");
        dm_status_free(st);
    }
}

const dm_descdb_t *dm_descdb_builtin(void)
{
    pthread_once(&builtin_once, builtin_parse);
    return builtin_db;
}
