/*
 * domicile.v1.TransfersService: VerifyLedger (walk a region's chain from its last checkpoint),
 * ListTransfers (entries of one or every region's ledger, filtered, paged), Report (a fan-out
 * over every region: grouped by month x route x basis x purpose, plus each ledger's state).
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "domicile/v1/transfers.pb-c.h"

#include "domicile/log.h"
#include "domicile/metrics.h"
#include "domicile/report.h"
#include "internal.h"

#define VERIFY_PAGE     1000
#define VERIFY_CUTS_MAX 32
#define LOOSE_LIMIT     100000
#define LIST_DEFAULT    100
#define LIST_MAX        1000
#define LIST_CHUNK      200
#define TOKEN_PREFIX    "t3."
#define TOKEN_TAG       16 /* hex digits of the filters' digest in a token */

/* ---- verification -------------------------------------------------------------------- */

typedef struct verify verify_t;
typedef void (*verify_done_fn)(verify_t *v, dm_status_t *err);

/* One link as stored, with what its entry's MAC shows. */
typedef struct link {
    int64_t seq, entry_id;
    bool present;  /* its entry exists */
    bool mac_ok;   /* the entry's MAC verifies: the gateway wrote it */
    bool has_mac;  /* mac holds the stored MAC (32 bytes) */
    bool has_hash; /* hash holds the stored link (32 bytes) */
    unsigned char mac[32], hash[32];
} link_t;

struct verify {
    dm_call_t *call;
    dm_region_t *region;
    const unsigned char *key;
    dm_job_t job;
    verify_done_fn done;
    void *arg;
    char after_s[24], limit_s[16], loose_s[16];
    bool restarted; /* the checkpoint was read again once */
    /* The highest head of this region's chain witnessed in the other regions (0: none);
     * one slot per region while they are read. */
    dm_regions_t *regions;
    atomic_int wpending;
    dm_job_t wjobs[DM_MAX_REGIONS];
    int64_t wseq[DM_MAX_REGIONS];
    unsigned char whash[DM_MAX_REGIONS][32];
    int64_t witness_seq;
    const char *witness_region;
    unsigned char witness_hash[32];
    /* result */
    unsigned char prev[32];
    int64_t expected; /* next seq the chain must show */
    int64_t checked;
    int64_t unsealed;
    int damage; /* Domicile__V1__LedgerDamage */
    int64_t bad_seq;
    /* The first link that did not verify, judged once the next one is read (settle()). */
    bool suspect;
    link_t suspect_link;
    unsigned char suspect_prev[32]; /* the link before it */
    char detail[256];
    bool has_checkpoint;
    Domicile__V1__LedgerCheckpoint cp;
    char cp_hash_hex[65];
    /* Restore cuts after the checkpoint, in chain order; the walk crosses each (jump()). */
    struct cut {
        int64_t restored_seq, resumed_seq;
        unsigned char restored_hash[32], resumed_hash[32];
        char witnessed_by[DM_REGION_CODE_MAX + 1];
        char note[320];
    } cuts[VERIFY_CUTS_MAX];
    Domicile__V1__LedgerRestoreCut cut_msgs[VERIFY_CUTS_MAX];
    Domicile__V1__LedgerRestoreCut *cut_ptrs[VERIFY_CUTS_MAX];
    size_t n_cuts, next_cut;
};

static void verify_page(verify_t *v);
static void verify_read(verify_t *v);

static void set_damage(verify_t *v, int kind, int64_t seq, const char *fmt, ...) DM_PRINTF(4, 5);

static void set_damage(verify_t *v, int kind, int64_t seq, const char *fmt, ...)
{
    if (v->damage != DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE)
        return; /* the first damage is the one reported */
    va_list ap;
    v->damage = kind;
    v->bad_seq = seq;
    va_start(ap, fmt);
    vsnprintf(v->detail, sizeof(v->detail), fmt, ap);
    va_end(ap);
}

/* "link 7 is" or "links 7 to 9 are". */
static const char *links_are(char buf[64], int64_t first, int64_t last)
{
    if (first == last)
        snprintf(buf, 64, "link %lld is", (long long)first);
    else
        snprintf(buf, 64, "links %lld to %lld are", (long long)first, (long long)last);
    return buf;
}

/* Rows outside the chain: committed but not sealed yet, or forged (no valid MAC). */
static void verify_loose_row(verify_t *v, const PGresult *res, int i)
{
    if (!dm_ledger_entry_verifies(v->key, res, i, 3))
        set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_INSERTED, v->expected,
                   "entry %lld carries no valid MAC: inserted outside the gateway",
                   (long long)dm_pg_int8(res, i, 3 + DM_LC_ENTRY_ID));
    else
        v->unsealed++;
}

/*
 * Classifying damage. The database never holds the ledger key, so only the gateway can make an
 * entry's MAC (over its content) or a link, HMAC(key, previous link || seq || entry_id || MAC).
 * At link s, after the verified link P, the verifier computes C = HMAC(key, P || s || entry_id
 * || MAC) from what is stored there: the gateway produced that value only if it sealed that very
 * MAC at s after P. The MAC at s is "sealed here" when C shows up where only the gateway puts
 * links: as the stored link, as the link the next one was chained over, or as the head another
 * region witnessed at s. (The next link chaining over the *stored* link at s proves nothing
 * about it: the sealer chains over whatever head it finds, a forged one too.) A link that does
 * not verify is judged when the next one is read (one link of lookahead, still one pass); only
 * the first damage is reported.
 *
 * - EDITED: the entry's MAC does not verify but is sealed here: the gateway's entry is in place
 *   with the MAC it was sealed with, and its content changed (its link overwritten or not).
 * - DELETED: an entry the gateway sealed is missing: a link without its entry; a gap in seq;
 *   the chain ending before the head witnessed in another region, or verifying up to that head
 *   but with another link there (cut, then sealed again); an entry with a valid MAC whose link
 *   the next one was chained over k positions further on (k links taken out, the rest
 *   renumbered; k <= RENUMBER_MAX); an entry with no valid MAC, not sealed here, where the
 *   gateway sealed another one: the head witnessed at s is another link, or the next entry
 *   (valid MAC) was chained neither over this link at s+1 nor over P at s, so after a link at s
 *   that is gone.
 * - INSERTED: an entry with no valid MAC (the gateway did not write it) where nothing shows an
 *   entry of the gateway's missing: unchained, linked at the end of the chain, linked in the
 *   middle with the rest moved on (the next entry was sealed at s, after P), or followed by
 *   entries the sealer chained over its forged link. An entry whose content and MAC were both
 *   overwritten under its kept link leaves the same evidence as that last case, and is
 *   reported INSERTED too: nothing the gateway wrote for it remains.
 * - REORDERED: an entry with a valid MAC that the chain does not hold at s as stored: moved
 *   (not sealed here, and not renumbered after a deletion), or sealed here under a link that
 *   was overwritten.
 */
#define RENUMBER_MAX 1000

static bool same32(const unsigned char *a, const unsigned char *b)
{
    return CRYPTO_memcmp(a, b, 32) == 0;
}

static void read_link(const verify_t *v, const PGresult *res, int i, link_t *l)
{
    int mlen = 0, hlen = 0;
    const char *hash = dm_pg_bytes(res, i, 2, &hlen);
    memset(l, 0, sizeof(*l));
    l->seq = dm_pg_int8(res, i, 0);
    l->entry_id = dm_pg_int8(res, i, 1);
    l->present = !dm_pg_isnull(res, i, 3 + DM_LC_ENTRY_ID);
    if (l->present) {
        const char *mac = dm_pg_bytes(res, i, 3 + DM_LC_MAC, &mlen);
        l->mac_ok = dm_ledger_entry_verifies(v->key, res, i, 3);
        l->has_mac = mlen == 32;
        if (l->has_mac)
            memcpy(l->mac, mac, 32);
    }
    l->has_hash = hlen == 32;
    if (l->has_hash)
        memcpy(l->hash, hash, 32);
}

/* True when l's stored link is the one the gateway computes for its entry at seq after prev. */
static bool chains(const verify_t *v, const unsigned char prev[32], int64_t seq, const link_t *l)
{
    unsigned char h[32];
    if (!l->present || !l->has_mac || !l->has_hash)
        return false;
    dm_ledger_chain_hash(v->key, prev, seq, l->entry_id, l->mac, h);
    return same32(h, l->hash);
}

/* How many links were taken out before `s` (the rest renumbered): `next` was chained over the
 * link of `s` that many positions further on than it stands now. 0: not that. */
static int renumbered(const verify_t *v, const link_t *s, const link_t *next)
{
    for (int k = 1; s->has_hash && k <= RENUMBER_MAX; k++)
        if (chains(v, s->hash, next->seq + k, next))
            return k;
    return 0;
}

/* Judge the suspect link (see "Classifying damage") now that `next`, the link read after it,
 * is known (NULL: the chain ended or has a gap). */
static void settle(verify_t *v, const link_t *next)
{
    if (!v->suspect)
        return;
    v->suspect = false;
    const link_t *s = &v->suspect_link;
    const unsigned char *p = v->suspect_prev;
    const link_t *n = next && next->present && next->seq == s->seq + 1 ? next : NULL;
    bool witnessed = s->seq == v->witness_seq;
    bool stored = false, sealed = false;
    long long seq = s->seq, id = s->entry_id;
    char buf[64];
    unsigned char c[32];
    if (s->has_mac) {
        dm_ledger_chain_hash(v->key, p, s->seq, s->entry_id, s->mac, c);
        stored = s->has_hash && same32(c, s->hash);
        sealed =
            stored || (witnessed && same32(c, v->witness_hash)) || (n && chains(v, c, n->seq, n));
    }
    if (!s->mac_ok) {
        if (sealed)
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_EDITED, seq,
                       "entry %lld (link %lld) was changed after it was written: its content no "
                       "longer matches the MAC sealed there",
                       id, seq);
        else if (witnessed)
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, seq,
                       "the entry sealed at link %lld is missing (region %s witnessed a link "
                       "there that is not this entry's): entry %lld now at it carries no valid MAC",
                       seq, v->witness_region, id);
        else if (n && n->mac_ok && !chains(v, p, s->seq, n) &&
                 !(s->has_hash && chains(v, s->hash, n->seq, n)))
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, seq,
                       "the entry sealed at link %lld is missing (link %lld was sealed after "
                       "another link): entry %lld now at it carries no valid MAC",
                       seq, (long long)n->seq, id);
        else
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_INSERTED, seq,
                       "entry %lld at link %lld carries no valid MAC: inserted outside the gateway",
                       id, seq);
        return;
    }
    int k = 0;
    if (stored) /* then only the witnessed head differs */
        set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, seq,
                   "link %lld is not the one region %s witnessed: the chain was cut at or before "
                   "it and sealed again",
                   seq, v->witness_region);
    else if (sealed)
        set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_REORDERED, seq,
                   "link %lld is not the one sealed there for entry %lld: the chain was rewritten",
                   seq, id);
    else if (n && (k = renumbered(v, s, n)) > 0)
        set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, seq,
                   "%s missing: the links after %s were renumbered (entry %lld, now at link "
                   "%lld, was sealed at link %lld)",
                   links_are(buf, seq, seq + k - 1), k == 1 ? "it" : "them", id, seq, seq + k);
    else
        set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_REORDERED, seq,
                   "link %lld does not follow link %lld: entries were moved or the chain was "
                   "rewritten",
                   seq, seq - 1);
}

static void verify_link(verify_t *v, const link_t *l)
{
    if (!l->present) {
        set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, l->seq,
                   "entry %lld (link %lld) was deleted", (long long)l->entry_id, (long long)l->seq);
    } else if (v->damage == DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE) {
        bool witness_differs =
            l->seq == v->witness_seq && (!l->has_hash || !same32(l->hash, v->witness_hash));
        if (!l->mac_ok || !chains(v, v->prev, l->seq, l) || witness_differs) {
            v->suspect = true;
            v->suspect_link = *l;
            memcpy(v->suspect_prev, v->prev, 32);
        }
    }
    if (l->has_hash)
        memcpy(v->prev, l->hash, 32); /* continue from the stored link */
}

/* Where the walk has verified the chain up to a restore cut's restored head, it goes on after
 * the cut's resumed head (the head another region had witnessed), as after a checkpoint. */
static void jump(verify_t *v)
{
    while (v->next_cut < v->n_cuts && v->cuts[v->next_cut].restored_seq == v->expected - 1) {
        struct cut *c = &v->cuts[v->next_cut];
        Domicile__V1__LedgerRestoreCut *m = &v->cut_msgs[v->next_cut];
        v->next_cut++;
        settle(v, NULL);
        if (!m->valid)
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_CHECKPOINT_INVALID,
                       c->restored_seq,
                       "the restore cut after link %lld is not signed by this region's ledger key",
                       (long long)c->restored_seq);
        else if (!same32(v->prev, c->restored_hash))
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_REORDERED, c->restored_seq,
                       "link %lld is not the restored head the restore cut records",
                       (long long)c->restored_seq);
        else if (v->witness_seq == c->resumed_seq && !same32(v->witness_hash, c->resumed_hash))
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, c->resumed_seq,
                       "the restore cut resumes at link %lld, which region %s witnessed otherwise",
                       (long long)c->resumed_seq, v->witness_region);
        memcpy(v->prev, c->resumed_hash, 32);
        v->expected = c->resumed_seq + 1;
    }
}

static void verify_chain_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    verify_t *v = job->arg;
    if (err) {
        v->done(v, err);
        return;
    }
    /* Links in seq order, then (on the last page) the unsealed rows. */
    int n = PQntuples(res), i = 0;
    for (; i < n && !dm_pg_isnull(res, i, 0); i++) {
        link_t l;
        read_link(v, res, i, &l);
        settle(v, &l);
        if (l.seq != v->expected) {
            if (v->checked == 0 && !v->restarted) {
                /* A purge may have moved the checkpoint since it was read: read it again,
                 * once. A gap that is still there then is damage. */
                v->restarted = true;
                verify_read(v);
                return;
            }
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, v->expected,
                       "chain link %lld is missing", (long long)v->expected);
            v->expected = l.seq; /* carry on from what is there */
        }
        verify_link(v, &l);
        v->expected = l.seq + 1;
        v->checked++;
        jump(v);
    }
    /* A short page also carried the unsealed rows, read in the same snapshot as its links:
     * an entry sealed meanwhile is counted exactly once. */
    if (i == VERIFY_PAGE) {
        verify_page(v);
        return;
    }
    settle(v, NULL);
    char buf[64];
    if (v->next_cut < v->n_cuts)
        set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, v->expected,
                   "%s missing: the chain ends before the restore cut after link %lld",
                   links_are(buf, v->expected, v->cuts[v->next_cut].restored_seq),
                   (long long)v->cuts[v->next_cut].restored_seq);
    /* The witnesses were read before the chain, after their links had been committed here:
     * a chain ending before the witnessed head lost its tail. */
    if (v->witness_seq > v->expected - 1)
        set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_DELETED, v->expected,
                   "%s missing: region %s witnessed the chain up to link %lld",
                   links_are(buf, v->expected, v->witness_seq), v->witness_region,
                   (long long)v->witness_seq);
    for (; i < n; i++)
        verify_loose_row(v, res, i);
    v->done(v, NULL);
}

static void verify_page(verify_t *v)
{
    memset(&v->job, 0, sizeof(v->job));
    v->job.stmt = DM_SQL_LEDGER_VERIFY;
    v->job.done = verify_chain_done;
    v->job.arg = v;
    v->job.owner = v->call;
    snprintf(v->after_s, sizeof(v->after_s), "%lld", (long long)(v->expected - 1));
    snprintf(v->limit_s, sizeof(v->limit_s), "%d", VERIFY_PAGE);
    snprintf(v->loose_s, sizeof(v->loose_s), "%d", LOOSE_LIMIT);
    dm_job_param_text(&v->job, 0, v->after_s);
    dm_job_param_text(&v->job, 1, v->limit_s);
    dm_job_param_text(&v->job, 2, v->loose_s);
    dm_region_submit(v->region, &v->job);
}

/* The restore cuts past the checkpoint (those before it were purged with their links). */
static void verify_cuts_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    verify_t *v = job->arg;
    if (err) {
        v->done(v, err);
        return;
    }
    v->n_cuts = v->next_cut = 0;
    for (int i = 0; i < PQntuples(res) && v->n_cuts < VERIFY_CUTS_MAX; i++) {
        int64_t rseq = dm_pg_int8(res, i, 0), wseq = dm_pg_int8(res, i, 2);
        if (rseq < v->expected - 1)
            continue;
        int hl = 0, wl = 0, ml = 0, bl = 0;
        const char *rh = dm_pg_bytes(res, i, 1, &hl), *wh = dm_pg_bytes(res, i, 3, &wl);
        const char *by = dm_pg_bytes(res, i, 4, &bl), *mac = dm_pg_bytes(res, i, 7, &ml);
        if (hl != 32 || wl != 32)
            continue;
        struct cut *c = &v->cuts[v->n_cuts];
        Domicile__V1__LedgerRestoreCut *m = &v->cut_msgs[v->n_cuts];
        domicile__v1__ledger_restore_cut__init(m);
        c->restored_seq = rseq;
        c->resumed_seq = wseq;
        memcpy(c->restored_hash, rh, 32);
        memcpy(c->resumed_hash, wh, 32);
        snprintf(c->witnessed_by, sizeof(c->witnessed_by), "%.*s", bl, by);
        m->restored_seq = rseq;
        m->resumed_seq = wseq;
        m->links_lost = wseq - rseq;
        m->witnessed_by = c->witnessed_by;
        m->restore_point_unix_ms = dm_pg_int8(res, i, 5);
        m->recorded_at_unix_ms = dm_pg_int8(res, i, 6);
        unsigned char want[32];
        dm_ledger_restore_mac(v->key, rseq, c->restored_hash, wseq, c->resumed_hash,
                              c->witnessed_by, m->restore_point_unix_ms, want);
        m->valid = ml == 32 && CRYPTO_memcmp(want, mac, 32) == 0;
        char when[40], who[DM_REGION_CODE_MAX + 1], note[sizeof(c->note)];
        dm_time_iso(m->restore_point_unix_ms, when, sizeof(when));
        snprintf(who, sizeof(who), "%s", c->witnessed_by);
        if (wseq > rseq)
            snprintf(note, sizeof(note),
                     "history cut by a restore to %s: the restored chain ends at link %lld; "
                     "links %lld to %lld, sealed after the restore point, were lost (region %s "
                     "had witnessed link %lld); the chain continues after it",
                     when, (long long)rseq, (long long)rseq + 1, (long long)wseq, c->witnessed_by,
                     (long long)wseq);
        else
            snprintf(note, sizeof(note),
                     "history cut by a restore to %s after link %lld: no sealed link was lost "
                     "(entries appended after the restore point and not sealed yet were)",
                     when, (long long)rseq);
        memcpy(c->note, note, sizeof(note));
        m->note = c->note;
        v->cut_ptrs[v->n_cuts] = m;
        v->n_cuts++;
    }
    jump(v);
    verify_page(v);
}

static void verify_checkpoint_done(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    verify_t *v = job->arg;
    if (err) {
        v->done(v, err);
        return;
    }
    memset(v->prev, 0, sizeof(v->prev));
    v->expected = 1;
    if (PQntuples(res) == 1) {
        int len;
        int64_t upto = dm_pg_int8(res, 0, 0);
        const unsigned char *hash = (const unsigned char *)dm_pg_bytes(res, 0, 1, &len);
        int64_t before = dm_pg_time_ms(res, 0, 2);
        int mlen;
        const char *stored = dm_pg_bytes(res, 0, 3, &mlen);
        unsigned char mac[32];
        v->has_checkpoint = true;
        v->cp.seq = upto;
        v->cp.purged_before_unix_ms = before;
        v->cp.created_at_unix_ms = dm_pg_time_ms(res, 0, 4);
        v->cp.entries_purged = dm_pg_int8(res, 0, 5);
        if (len == 32) {
            dm_ledger_checkpoint_mac(v->key, upto, hash, before, mac);
            v->cp.valid = mlen == 32 && CRYPTO_memcmp(mac, stored, 32) == 0;
            memcpy(v->prev, hash, 32);
            dm_hex_encode(hash, 32, v->cp_hash_hex);
        }
        v->cp.chain_hash_hex = v->cp_hash_hex;
        if (!v->cp.valid)
            set_damage(v, DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_CHECKPOINT_INVALID, upto,
                       "the retention checkpoint at link %lld is not signed by this region's "
                       "ledger key",
                       (long long)upto);
        v->expected = upto + 1;
    }
    memset(&v->job, 0, sizeof(v->job));
    v->job.stmt = DM_SQL_LEDGER_CUTS;
    v->job.done = verify_cuts_done;
    v->job.arg = v;
    v->job.owner = v->call;
    dm_region_submit(v->region, &v->job);
}

static void verify_read(verify_t *v)
{
    v->damage = DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE;
    v->bad_seq = 0;
    v->suspect = false;
    v->detail[0] = '\0';
    v->checked = 0;
    v->unsealed = 0;
    v->has_checkpoint = false;
    domicile__v1__ledger_checkpoint__init(&v->cp);
    v->cp.chain_hash_hex = "";
    memset(&v->job, 0, sizeof(v->job));
    v->job.stmt = DM_SQL_LEDGER_CHECKPOINT;
    v->job.done = verify_checkpoint_done;
    v->job.arg = v;
    v->job.owner = v->call;
    dm_region_submit(v->region, &v->job);
}

static void witness_arrived(verify_t *v)
{
    if (atomic_fetch_sub(&v->wpending, 1) != 1)
        return;
    v->witness_seq = 0;
    for (size_t k = 0; k < dm_regions_count(v->regions); k++) {
        if (v->wseq[k] > v->witness_seq) {
            v->witness_seq = v->wseq[k];
            v->witness_region = dm_region_code(dm_regions_at(v->regions, k));
            memcpy(v->witness_hash, v->whash[k], 32);
        }
    }
    verify_read(v);
}

static void witness_got(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    verify_t *v = job->arg;
    size_t k = (size_t)(job - v->wjobs);
    int len;
    if (err) {
        dm_status_free(err); /* a region that cannot answer makes no claim */
    } else if (PQntuples(res) == 1) {
        const char *h = dm_pg_bytes(res, 0, 1, &len);
        if (len == 32) {
            v->wseq[k] = dm_pg_int8(res, 0, 0);
            memcpy(v->whash[k], h, 32);
        }
    }
    witness_arrived(v);
}

/* Read the witnesses of this region's head in every other region, then the ledger. */
static void verify_start(verify_t *v)
{
    size_t n = dm_regions_count(v->regions);
    /* One extra count held while submitting, as a region down answers at once. */
    atomic_store(&v->wpending, (int)n + 1);
    for (size_t k = 0; k < n; k++) {
        dm_region_t *other = dm_regions_at(v->regions, k);
        v->wseq[k] = 0;
        if (other == v->region) {
            atomic_fetch_sub(&v->wpending, 1);
            continue;
        }
        dm_job_t *j = &v->wjobs[k];
        memset(j, 0, sizeof(*j));
        j->stmt = DM_SQL_WITNESS_GET;
        j->done = witness_got;
        j->arg = v;
        j->owner = v->call;
        dm_job_param_text(j, 0, dm_region_code(v->region));
    }
    for (size_t k = 0; k < n; k++)
        if (dm_regions_at(v->regions, k) != v->region)
            dm_region_submit(dm_regions_at(v->regions, k), &v->wjobs[k]);
    witness_arrived(v);
}

/* A verification of the own region's ledger ran to its end: what the alerts watch. */
static void verify_record(const verify_t *v)
{
    for (size_t k = 0; k < dm_regions_count(v->regions); k++)
        if (dm_regions_at(v->regions, k) == v->region)
            dm_metrics_ledger_verified(
                k, v->damage == DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE, v->checked);
}

static void verify_reply(verify_t *v, dm_status_t *err)
{
    dm_call_t *call = v->call;
    if (err) {
        dm_call_finish(call, err);
        return;
    }
    verify_record(v);
    Domicile__V1__VerifyLedgerResponse rep = DOMICILE__V1__VERIFY_LEDGER_RESPONSE__INIT;
    rep.region = (char *)dm_region_code(v->region);
    rep.ok = v->damage == DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE;
    rep.entries_checked = v->checked;
    rep.sealed_up_to_seq = v->expected - 1;
    rep.first_bad_seq = rep.ok ? 0 : v->bad_seq;
    rep.damage = v->damage;
    rep.detail = v->detail;
    rep.checkpoint = v->has_checkpoint ? &v->cp : NULL;
    rep.unsealed_entries = v->unsealed;
    rep.verified_at_unix_ms = dm_now_ms();
    rep.n_restore_cuts = v->n_cuts;
    rep.restore_cuts = v->cut_ptrs;
    if (!rep.ok)
        dm_warn("transfers", "ledger of region %s does not verify: %s", rep.region, v->detail);
    dm_call_reply(call, &rep.base);
}

static dm_status_t *find_region(dm_app_t *app, const char *code, dm_region_t **out)
{
    *out =
        code[0] && strlen(code) <= DM_REGION_CODE_MAX ? dm_regions_find(app->regions, code) : NULL;
    if (!*out)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "region: unknown region code");
    return NULL;
}

void dm_transfers_verify(dm_call_t *call)
{
    const Domicile__V1__VerifyLedgerRequest *req =
        (const Domicile__V1__VerifyLedgerRequest *)dm_call_request(call);
    dm_app_t *app = APP(call);
    dm_region_t *r;
    dm_status_t *st = find_region(app, req->region, &r);
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    /* Only the region's own gateways hold its ledger key. */
    if (dm_api_forward_to(call, r))
        return;
    verify_t *v = dm_calloc(1, sizeof(*v));
    v->call = call;
    v->region = r;
    v->regions = app->regions;
    v->key = app->ledger_keys[dm_app_region_index(app, r)];
    v->done = verify_reply;
    dm_call_set_data(call, v, free);
    verify_start(v);
}

/* ---- ListTransfers ------------------------------------------------------------------- */

/*
 * With every region in scope, the regions' answers are merged: each region is read in
 * (at, entry_id) order in chunks, and the entry with the smallest (at_unix_ms, region code,
 * entry_id) among the regions' next rows is sent next. A region whose chunk is used up is
 * read again before anything else is sent, so that nothing it holds is skipped. The page
 * token is the sort key of the last entry sent; each region resumes after it.
 */
typedef struct list_ctx list_ctx_t;

typedef struct list_src {
    list_ctx_t *c;
    size_t region_i;
    dm_job_t job;
    PGresult *res;  /* the current chunk (a copy, owned here); NULL before the first read */
    int pos;        /* next row of res to send */
    bool exhausted; /* the last read returned fewer rows than asked: nothing after res */
    bool has_after;
    int64_t after_at, after_id; /* read after this (at_ms, entry_id) */
    char at_s[24], id_s[24], limit_s[16];
    dm_status_t *err;
} list_src_t;

struct list_ctx {
    dm_call_t *call;
    dm_app_t *app;
    size_t n;
    list_src_t src[DM_MAX_REGIONS];
    int remaining;
    char from_s[24], to_s[24];
    const char *outcome, *direction;
    bool has_subject;
    unsigned char subject_key[DM_SUBJECT_KEY_LEN];
    int64_t last_at, last_id; /* sort key of the last entry sent */
    const char *last_code;
    char tag[TOKEN_TAG + 1]; /* the filters, in the page token */
    atomic_int pending;
    atomic_bool awaiting_drain;
};

static void list_free(void *p)
{
    list_ctx_t *c = p;
    for (size_t i = 0; i < c->n; i++) {
        PQclear(c->src[i].res);
        dm_status_free(c->src[i].err);
    }
    free(c);
}

static int src_rows(const list_src_t *s)
{
    return s->res ? PQntuples(s->res) : 0;
}

static void list_end(list_ctx_t *c, bool more)
{
    Domicile__V1__ListTransfersResponse msg = DOMICILE__V1__LIST_TRANSFERS_RESPONSE__INIT;
    Domicile__V1__ListTransfersPage end = DOMICILE__V1__LIST_TRANSFERS_PAGE__INIT;
    char tok[100] = "";
    if (more && c->last_code)
        snprintf(tok, sizeof(tok), TOKEN_PREFIX "%s.%lld.%lld.%s", c->tag, (long long)c->last_at,
                 (long long)c->last_id, c->last_code);
    end.next_page_token = tok;
    msg.item_case = DOMICILE__V1__LIST_TRANSFERS_RESPONSE__ITEM_END;
    msg.end = &end;
    dm_call_send(c->call, &msg.base);
    dm_call_finish(c->call, NULL);
}

static void list_fetch(list_ctx_t *c);

static void list_maybe_next(list_ctx_t *c)
{
    if (dm_call_queued(c->call) == 0 && atomic_exchange(&c->awaiting_drain, false))
        list_fetch(c);
}

static void list_drained(dm_call_t *call, void *arg)
{
    (void)call;
    list_maybe_next(arg);
}

static void entry_from_row(Domicile__V1__TransferEntry *e, const PGresult *res, int i,
                           const char *region, char *sk_hex, char *hash_hex, char **ids_buf,
                           char ***ids)
{
    int len;
    e->region = (char *)region;
    e->entry_id = dm_pg_int8(res, i, DM_LC_ENTRY_ID);
    e->seq = dm_pg_isnull(res, i, DM_LC__COUNT) ? 0 : dm_pg_int8(res, i, DM_LC__COUNT);
    e->at_unix_ms = dm_pg_time_ms(res, i, DM_LC_AT);
    e->request_id = (char *)dm_pg_bytes(res, i, DM_LC_REQUEST_ID, &len);
    e->principal = (char *)dm_pg_bytes(res, i, DM_LC_PRINCIPAL, &len);
    e->method = (char *)dm_pg_bytes(res, i, DM_LC_METHOD, &len);
    e->customer_id = (char *)dm_pg_bytes(res, i, DM_LC_CUSTOMER, &len);
    if (!dm_pg_isnull(res, i, DM_LC_SUBJECT)) {
        const char *sk = dm_pg_bytes(res, i, DM_LC_SUBJECT, &len);
        if (len == DM_SUBJECT_KEY_LEN) {
            dm_hex_encode((const unsigned char *)sk, DM_SUBJECT_KEY_LEN, sk_hex);
            e->subject_key_hex = sk_hex;
        }
    }
    e->record_count = dm_pg_int8(res, i, DM_LC_RECORDS);
    e->bytes = dm_pg_int8(res, i, DM_LC_BYTES);
    e->from_region = (char *)dm_pg_bytes(res, i, DM_LC_FROM, &len);
    e->to_region = (char *)dm_pg_bytes(res, i, DM_LC_TO, &len);
    const char *dir = dm_pg_bytes(res, i, DM_LC_DIRECTION, &len);
    e->direction = dir[0] == 'r' ? DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_READ
                                 : DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_WRITE;
    e->purpose = (char *)dm_pg_bytes(res, i, DM_LC_PURPOSE, &len);
    e->basis_id = (char *)dm_pg_bytes(res, i, DM_LC_BASIS, &len);
    const char *outcome = dm_pg_bytes(res, i, DM_LC_OUTCOME, &len);
    e->outcome = outcome[0] == 'a' ? DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_ALLOWED
                                   : DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_REFUSED;
    e->refusal_reason = (char *)dm_pg_bytes(res, i, DM_LC_REFUSAL, &len);
    const char *mac = dm_pg_bytes(res, i, DM_LC_MAC, &len);
    if (len == 32) {
        dm_hex_encode((const unsigned char *)mac, 32, hash_hex);
        e->entry_hash_hex = hash_hex;
    }
    /* Record ids are stored joined by U+001F. */
    const char *joined = dm_pg_bytes(res, i, DM_LC_RECORD_IDS, &len);
    size_t n = 0;
    *ids_buf = NULL;
    *ids = NULL;
    if (len > 0) {
        *ids_buf = dm_strndup(joined, (size_t)len);
        for (const char *p = *ids_buf; *p; p++)
            n += *p == '\x1f';
        n++;
        *ids = dm_calloc(n, sizeof(char *));
        size_t k = 0;
        for (char *p = *ids_buf, *start = *ids_buf;; p++) {
            if (*p == '\x1f' || *p == '\0') {
                bool last = *p == '\0';
                *p = '\0';
                (*ids)[k++] = start;
                start = p + 1;
                if (last)
                    break;
            }
        }
    }
    e->n_record_ids = n;
    e->record_ids = *ids;
}

static void list_send(list_ctx_t *c)
{
    for (;;) {
        list_src_t *best = NULL;
        int64_t best_at = 0, best_id = 0;
        for (size_t i = 0; i < c->n; i++) {
            list_src_t *s = &c->src[i];
            if (s->pos == src_rows(s)) {
                if (!s->exhausted) {
                    /* Read this region on before sending anything that might follow it. */
                    atomic_store(&c->awaiting_drain, true);
                    list_maybe_next(c);
                    return;
                }
                continue;
            }
            int64_t at = dm_pg_time_ms(s->res, s->pos, DM_LC_AT);
            int64_t id = dm_pg_int8(s->res, s->pos, DM_LC_ENTRY_ID);
            int cmp = best == NULL    ? -1
                      : at != best_at ? (at < best_at ? -1 : 1)
                      : s->region_i != best->region_i
                          ? strcmp(dm_region_code(dm_regions_at(c->app->regions, s->region_i)),
                                   dm_region_code(dm_regions_at(c->app->regions, best->region_i)))
                          : (id < best_id ? -1 : 1);
            if (cmp < 0) {
                best = s;
                best_at = at;
                best_id = id;
            }
        }
        if (!best || c->remaining == 0) {
            list_end(c, best != NULL);
            return;
        }
        const char *code = dm_region_code(dm_regions_at(c->app->regions, best->region_i));
        Domicile__V1__TransferEntry e = DOMICILE__V1__TRANSFER_ENTRY__INIT;
        Domicile__V1__ListTransfersResponse msg = DOMICILE__V1__LIST_TRANSFERS_RESPONSE__INIT;
        char sk_hex[65] = "", hash_hex[65] = "", *ids_buf, **ids;
        e.subject_key_hex = "";
        e.entry_hash_hex = "";
        entry_from_row(&e, best->res, best->pos, code, sk_hex, hash_hex, &ids_buf, &ids);
        msg.item_case = DOMICILE__V1__LIST_TRANSFERS_RESPONSE__ITEM_ENTRY;
        msg.entry = &e;
        bool alive = dm_call_send(c->call, &msg.base);
        free(ids);
        free(ids_buf);
        if (!alive) {
            dm_call_finish(c->call, dm_status_new(GRPC_STATUS_CANCELLED, "stream cancelled"));
            return;
        }
        best->pos++;
        c->remaining--;
        c->last_at = best_at;
        c->last_id = best_id;
        c->last_code = code;
    }
}

static void list_arrived(list_ctx_t *c);

static void list_fetched(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    list_src_t *s = job->arg;
    list_ctx_t *c = s->c;
    PQclear(s->res);
    s->res = NULL;
    s->pos = 0;
    if (err) {
        s->err = err;
    } else {
        int rows = PQntuples(res);
        s->res = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
        s->exhausted = rows < atoi(s->limit_s);
        if (rows > 0) {
            s->has_after = true;
            s->after_at = dm_pg_time_ms(res, rows - 1, DM_LC_AT);
            s->after_id = dm_pg_int8(res, rows - 1, DM_LC_ENTRY_ID);
        }
    }
    list_arrived(c);
}

/* One read of the round is in; after the last one, one thread carries on. */
static void list_arrived(list_ctx_t *c)
{
    if (atomic_fetch_sub(&c->pending, 1) != 1)
        return;
    for (size_t i = 0; i < c->n; i++) {
        if (c->src[i].err) {
            dm_status_t *first = c->src[i].err;
            c->src[i].err = NULL;
            dm_call_finish(c->call, first);
            return;
        }
    }
    list_send(c);
}

/* Read the next chunk of every region in scope whose rows are used up. */
static void list_fetch(list_ctx_t *c)
{
    const Domicile__V1__ListTransfersRequest *req =
        (const Domicile__V1__ListTransfersRequest *)dm_call_request(c->call);
    /* After the page is full, one row is enough to tell whether there is a next page. */
    int chunk = c->remaining == 0 ? 1 : c->remaining < LIST_CHUNK ? c->remaining : LIST_CHUNK;
    list_src_t *todo[DM_MAX_REGIONS];
    size_t n = 0;
    for (size_t i = 0; i < c->n; i++)
        if (!c->src[i].exhausted && c->src[i].pos == src_rows(&c->src[i]))
            todo[n++] = &c->src[i];
    /* One extra count held while submitting: a read failing at once must not carry on
     * while later reads are still being set up. */
    atomic_store(&c->pending, (int)n + 1);
    for (size_t k = 0; k < n; k++) {
        list_src_t *s = todo[k];
        snprintf(s->limit_s, sizeof(s->limit_s), "%d", chunk);
        snprintf(s->at_s, sizeof(s->at_s), "%lld", (long long)s->after_at);
        snprintf(s->id_s, sizeof(s->id_s), "%lld", (long long)s->after_id);
        memset(&s->job, 0, sizeof(s->job));
        s->job.stmt = DM_SQL_LEDGER_LIST;
        s->job.done = list_fetched;
        s->job.arg = s;
        s->job.owner = c->call;
        dm_job_param_text(&s->job, 0, c->from_s);
        dm_job_param_text(&s->job, 1, c->to_s);
        dm_job_param_text(&s->job, 2, req->from_region);
        dm_job_param_text(&s->job, 3, req->to_region);
        dm_job_param_text(&s->job, 4, req->basis_id);
        dm_job_param_text(&s->job, 5, req->purpose);
        dm_job_param_text(&s->job, 6, c->outcome);
        dm_job_param_text(&s->job, 7, req->customer_id);
        dm_job_param_text(&s->job, 8, s->has_after ? s->at_s : NULL);
        dm_job_param_text(&s->job, 9, s->id_s);
        dm_job_param_text(&s->job, 10, s->limit_s);
        dm_job_param_text(&s->job, 11, c->direction);
        dm_job_param_text(&s->job, 12, req->principal);
        if (c->has_subject)
            dm_job_param_bin(&s->job, 13, c->subject_key, DM_SUBJECT_KEY_LEN);
        else
            dm_job_param_text(&s->job, 13, NULL);
    }
    for (size_t k = 0; k < n; k++)
        dm_region_submit(dm_regions_at(c->app->regions, todo[k]->region_i), &todo[k]->job);
    list_arrived(c);
}

static dm_status_t *check_filters(const char *from_region, const char *to_region, const char *basis,
                                  const char *purpose, int64_t from_ms, int64_t to_ms)
{
    dm_status_t *st;
    if (strlen(from_region) > DM_REGION_CODE_MAX || strlen(to_region) > DM_REGION_CODE_MAX)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "from_region/to_region: at most %d bytes", DM_REGION_CODE_MAX);
    if ((st = dm_check_kind("basis_id", basis, true)) ||
        (st = dm_check_purpose("purpose", purpose, true)))
        return st;
    if (from_ms < 0 || to_ms < 0 || (to_ms && from_ms > to_ms))
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                             "from_unix_ms/to_unix_ms: must be >= 0 and from <= to");
    return NULL;
}

/* Principal names as the principals file allows them: 1..128 of [A-Za-z0-9._@-]. */
static dm_status_t *check_principal(const char *field, const char *name)
{
    size_t n = strlen(name);
    if (n > 128)
        return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "%s: at most 128 bytes", field);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)name[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '.' || ch == '_' || ch == '@' || ch == '-'))
            return dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                 "%s: a principal name is made of [A-Za-z0-9._@-]", field);
    }
    return NULL;
}

void dm_transfers_list(dm_call_t *call)
{
    const Domicile__V1__ListTransfersRequest *req =
        (const Domicile__V1__ListTransfersRequest *)dm_call_request(call);
    dm_app_t *app = APP(call);
    dm_status_t *st = check_filters(req->from_region, req->to_region, req->basis_id, req->purpose,
                                    req->from_unix_ms, req->to_unix_ms);
    if (!st && req->customer_id[0])
        st = dm_check_customer_id("customer_id", req->customer_id);
    if (!st)
        st = dm_check_page_size("page_size", req->page_size, LIST_MAX);
    if (!st)
        st = check_principal("principal", req->principal);
    if (!st && (req->direction < DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_UNSPECIFIED ||
                req->direction > DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_WRITE))
        st = dm_status_new(GRPC_STATUS_INVALID_ARGUMENT, "direction: unknown value %d",
                           (int)req->direction);
    bool has_subject = false;
    unsigned char subject_key[DM_SUBJECT_KEY_LEN];
    if (!st)
        st = dm_subject_to_key(app, "subject", req->subject, &has_subject, subject_key);
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    list_ctx_t *c = dm_calloc(1, sizeof(*c));
    c->call = call;
    c->app = app;
    dm_call_set_data(call, c, list_free);
    c->direction =
        req->direction == DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_READ    ? "read"
        : req->direction == DOMICILE__V1__TRANSFER_DIRECTION__TRANSFER_DIRECTION_WRITE ? "write"
                                                                                       : "";
    c->has_subject = has_subject;
    memcpy(c->subject_key, subject_key, sizeof(subject_key));
    OPENSSL_cleanse(subject_key, sizeof(subject_key));
    c->remaining = req->page_size ? req->page_size : LIST_DEFAULT;
    snprintf(c->from_s, sizeof(c->from_s), "%lld", (long long)req->from_unix_ms);
    snprintf(c->to_s, sizeof(c->to_s), "%lld", (long long)req->to_unix_ms);
    c->outcome =
        req->outcome == DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_ALLOWED   ? "allowed"
        : req->outcome == DOMICILE__V1__TRANSFER_OUTCOME__TRANSFER_OUTCOME_REFUSED ? "refused"
                                                                                   : "";
    size_t first = 0, end = dm_regions_count(app->regions);
    if (req->region[0]) {
        dm_region_t *r;
        if ((st = find_region(app, req->region, &r))) {
            dm_call_finish(call, st);
            return;
        }
        first = dm_app_region_index(app, r);
        end = first + 1;
    }
    for (size_t i = first; i < end; i++) {
        list_src_t *s = &c->src[c->n++];
        s->c = c;
        s->region_i = i;
    }
    /* A token is valid only with the filters of the listing it came from: every filter and
     * the region are in it, so one used with others is refused instead of being read as a
     * position in another listing. */
    unsigned char h[32];
    DM_FINGERPRINT(h, DM_AAD_STR("ListTransfers"), DM_AAD_STR(c->from_s), DM_AAD_STR(c->to_s),
                   DM_AAD_STR(req->from_region), DM_AAD_STR(req->to_region),
                   DM_AAD_STR(req->basis_id), DM_AAD_STR(req->purpose), DM_AAD_STR(c->outcome),
                   DM_AAD_STR(req->customer_id), DM_AAD_STR(req->region), DM_AAD_STR(c->direction),
                   DM_AAD_STR(req->principal),
                   DM_AAD_BYTES(c->subject_key, c->has_subject ? DM_SUBJECT_KEY_LEN : 0));
    dm_hex_encode(h, TOKEN_TAG / 2, c->tag);
    if (req->page_token[0]) {
        long long at, id;
        char code[DM_REGION_CODE_MAX + 1], tag[TOKEN_TAG + 1], extra;
        dm_region_t *tr = NULL;
        if (strlen(req->page_token) <= 96 &&
            sscanf(req->page_token, TOKEN_PREFIX "%16[0-9a-f].%lld.%lld.%16[a-z0-9]%c", tag, &at,
                   &id, code, &extra) == 4 &&
            strcmp(tag, c->tag) == 0 && at >= 0 && id >= 0)
            tr = dm_regions_find(app->regions, code);
        size_t ti = tr ? dm_app_region_index(app, tr) : 0;
        if (!tr || ti < first || ti >= end) {
            dm_call_finish(call, dm_status_new(GRPC_STATUS_INVALID_ARGUMENT,
                                               "page_token: not a token returned by "
                                               "ListTransfers with these filters"));
            return;
        }
        /* Resume after (at, code, id): regions ordered before the token's read after `at`,
         * the token's region after (at, id), the ones after it from `at` on. */
        for (size_t i = 0; i < c->n; i++) {
            list_src_t *s = &c->src[i];
            int cmp = strcmp(dm_region_code(dm_regions_at(app->regions, s->region_i)), code);
            s->has_after = true;
            s->after_at = at;
            s->after_id = cmp < 0 ? INT64_MAX : cmp == 0 ? id : 0;
        }
    }
    dm_call_on_drain(call, list_drained, c);
    list_fetch(c);
}

/* ---- Report ---------------------------------------------------------------------------- */

typedef struct report report_t;

typedef struct report_part {
    report_t *rep;
    dm_region_t *region;
    dm_job_t job;
    verify_t verify;
    PGresult *rows;
    bool reachable;
} report_part_t;

struct report {
    dm_call_t *call;
    dm_app_t *app;
    atomic_int pending;
    char from_s[24], to_s[24];
    size_t n;
    size_t order[DM_MAX_REGIONS]; /* ledgers are reported in region code order */
    report_part_t parts[DM_MAX_REGIONS];
};

static int cmp_code(const void *a, const void *b, void *arg)
{
    report_t *r = arg;
    return strcmp(dm_region_code(r->parts[*(const size_t *)a].region),
                  dm_region_code(r->parts[*(const size_t *)b].region));
}

static void report_free(void *p)
{
    report_t *r = p;
    for (size_t i = 0; i < r->n; i++)
        PQclear(r->parts[i].rows);
    free(r);
}

static int cmp_row(const void *a, const void *b)
{
    const Domicile__V1__ReportRow *x = *(Domicile__V1__ReportRow *const *)a;
    const Domicile__V1__ReportRow *y = *(Domicile__V1__ReportRow *const *)b;
    int c;
    if ((c = strcmp(x->month, y->month)) || (c = strcmp(x->from_region, y->from_region)) ||
        (c = strcmp(x->to_region, y->to_region)) || (c = strcmp(x->basis_id, y->basis_id)))
        return c;
    return strcmp(x->purpose, y->purpose);
}

static void report_finish(report_t *r)
{
    const Domicile__V1__ReportRequest *req =
        (const Domicile__V1__ReportRequest *)dm_call_request(r->call);
    Domicile__V1__ReportResponse out = DOMICILE__V1__REPORT_RESPONSE__INIT;
    size_t total = 0;
    for (size_t i = 0; i < r->n; i++)
        total += r->parts[i].rows ? (size_t)PQntuples(r->parts[i].rows) : 0;
    Domicile__V1__ReportRow *rows = dm_calloc(total + 1, sizeof(*rows));
    Domicile__V1__ReportRow **rowp = dm_calloc(total + 1, sizeof(*rowp));
    Domicile__V1__LedgerState *states = dm_calloc(r->n, sizeof(*states));
    Domicile__V1__LedgerState **statep = dm_calloc(r->n, sizeof(*statep));
    size_t k = 0;
    bool complete = true;
    for (size_t o = 0; o < r->n; o++) {
        size_t i = r->order[o];
        report_part_t *p = &r->parts[i];
        Domicile__V1__LedgerState *s = &states[o];
        domicile__v1__ledger_state__init(s);
        s->region = (char *)dm_region_code(p->region);
        s->reachable = p->reachable;
        complete = complete && p->reachable;
        if (p->reachable) {
            s->verified = p->verify.damage == DOMICILE__V1__LEDGER_DAMAGE__LEDGER_DAMAGE_NONE;
            s->damage = p->verify.damage;
            s->entries = p->verify.checked + p->verify.unsealed;
            s->first_bad_seq = s->verified ? 0 : p->verify.bad_seq;
            s->sealed_up_to_seq = p->verify.expected - 1;
            s->detail = p->verify.detail;
        }
        statep[o] = s;
        for (int j = 0; p->rows && j < PQntuples(p->rows); j++) {
            Domicile__V1__ReportRow *row = &rows[k];
            int len;
            domicile__v1__report_row__init(row);
            row->month = (char *)dm_pg_bytes(p->rows, j, 0, &len);
            row->from_region = (char *)dm_pg_bytes(p->rows, j, 1, &len);
            row->to_region = (char *)dm_pg_bytes(p->rows, j, 2, &len);
            row->basis_id = (char *)dm_pg_bytes(p->rows, j, 3, &len);
            row->purpose = (char *)dm_pg_bytes(p->rows, j, 4, &len);
            row->transfers = dm_pg_int8(p->rows, j, 5);
            row->records = dm_pg_int8(p->rows, j, 6);
            row->bytes = dm_pg_int8(p->rows, j, 7);
            row->refusals = dm_pg_int8(p->rows, j, 8);
            if ((req->from_region[0] && strcmp(req->from_region, row->from_region) != 0) ||
                (req->to_region[0] && strcmp(req->to_region, row->to_region) != 0))
                continue;
            rowp[k] = row;
            k++;
        }
    }
    qsort(rowp, k, sizeof(*rowp), cmp_row);
    /* One group can be in two ledgers (R -> C reads are logged in R, R -> C writes in C):
     * merge equal keys into one row. */
    size_t m = 0;
    for (size_t j = 0; j < k; j++) {
        if (m > 0 && cmp_row(&rowp[m - 1], &rowp[j]) == 0) {
            rowp[m - 1]->transfers += rowp[j]->transfers;
            rowp[m - 1]->records += rowp[j]->records;
            rowp[m - 1]->bytes += rowp[j]->bytes;
            rowp[m - 1]->refusals += rowp[j]->refusals;
        } else {
            rowp[m++] = rowp[j];
        }
    }
    k = m;
    out.n_rows = k;
    out.rows = rowp;
    out.n_ledgers = r->n;
    out.ledgers = statep;
    out.generated_at_unix_ms = dm_now_ms();
    out.from_unix_ms = req->from_unix_ms;
    out.to_unix_ms = req->to_unix_ms;
    out.complete = complete;
    dm_call_reply(r->call, &out.base);
    free(rows);
    free(rowp);
    free(states);
    free(statep);
}

static void part_done(report_part_t *p)
{
    if (atomic_fetch_sub(&p->rep->pending, 1) == 1)
        report_finish(p->rep);
}

static void part_verified(verify_t *v, dm_status_t *err)
{
    report_part_t *p = v->arg;
    if (err) {
        p->reachable = false;
        dm_status_free(err);
    } else {
        verify_record(v);
    }
    part_done(p);
}

static void part_remote_verified(void *arg, ProtobufCMessage *reply, dm_status_t *err)
{
    report_part_t *p = arg;
    if (err) {
        p->reachable = false;
        dm_status_free(err);
        part_done(p);
        return;
    }
    const Domicile__V1__VerifyLedgerResponse *r = (const Domicile__V1__VerifyLedgerResponse *)reply;
    verify_t *v = &p->verify;
    v->damage = r->damage;
    v->checked = r->entries_checked;
    v->unsealed = r->unsealed_entries;
    v->expected = r->sealed_up_to_seq + 1;
    v->bad_seq = r->first_bad_seq;
    snprintf(v->detail, sizeof(v->detail), "%s", r->detail);
    protobuf_c_message_free_unpacked(reply, NULL);
    part_done(p);
}

static void part_rows(dm_job_t *job, PGresult *res, dm_status_t *err)
{
    report_part_t *p = job->arg;
    if (err) {
        /* A region that cannot answer is reported as such (complete = false), not hidden. */
        p->reachable = false;
        dm_status_free(err);
        part_done(p);
        return;
    }
    p->rows = PQcopyResult(res, PG_COPYRES_ATTRS | PG_COPYRES_TUPLES);
    if (!dm_region_is_local(p->region)) {
        /* The ledger key is the region's own: its gateway verifies, in the same round as the
         * rows would be if they came with it. */
        Domicile__V1__VerifyLedgerRequest vr = DOMICILE__V1__VERIFY_LEDGER_REQUEST__INIT;
        vr.region = (char *)dm_region_code(p->region);
        dm_peer_unary(p->rep->app->peers, p->region, p->verify.call,
                      dm_api_method_path(dm_transfers_verify), &vr.base,
                      &domicile__v1__verify_ledger_response__descriptor, true, part_remote_verified,
                      p);
        return;
    }
    verify_start(&p->verify);
}

void dm_transfers_report(dm_call_t *call)
{
    const Domicile__V1__ReportRequest *req =
        (const Domicile__V1__ReportRequest *)dm_call_request(call);
    dm_app_t *app = APP(call);
    dm_status_t *st = check_filters(req->from_region, req->to_region, req->basis_id, req->purpose,
                                    req->from_unix_ms, req->to_unix_ms);
    if (st) {
        dm_call_finish(call, st);
        return;
    }
    report_t *r = dm_calloc(1, sizeof(*r));
    r->call = call;
    r->app = app;
    r->n = dm_regions_count(app->regions);
    dm_call_set_data(call, r, report_free);
    snprintf(r->from_s, sizeof(r->from_s), "%lld", (long long)req->from_unix_ms);
    snprintf(r->to_s, sizeof(r->to_s), "%lld", (long long)req->to_unix_ms);
    /* One extra count held while submitting: a part that completes at once (its region
     * down) must not finish the call while later parts are still being set up. */
    atomic_init(&r->pending, (int)r->n + 1);
    for (size_t i = 0; i < r->n; i++) {
        report_part_t *p = &r->parts[i];
        p->rep = r;
        p->region = dm_regions_at(app->regions, i);
        p->reachable = true;
        p->verify.call = call;
        p->verify.region = p->region;
        p->verify.regions = app->regions;
        p->verify.key = app->ledger_keys[i];
        p->verify.done = part_verified;
        p->verify.arg = p;
        p->job.stmt = DM_SQL_LEDGER_REPORT;
        p->job.done = part_rows;
        p->job.arg = p;
        p->job.owner = call;
        dm_job_param_text(&p->job, 0, r->from_s);
        dm_job_param_text(&p->job, 1, r->to_s);
        dm_job_param_text(&p->job, 2, req->basis_id);
        dm_job_param_text(&p->job, 3, req->purpose);
    }
    for (size_t i = 0; i < r->n; i++)
        r->order[i] = i;
    qsort_r(r->order, r->n, sizeof(size_t), cmp_code, r);
    /* Submitting may complete parts at once (a region down): count first, then submit. */
    for (size_t i = 0; i < r->n; i++)
        dm_region_submit(r->parts[i].region, &r->parts[i].job);
    if (atomic_fetch_sub(&r->pending, 1) == 1)
        report_finish(r);
}
