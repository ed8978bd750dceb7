/*
 * The progress line (include/domicile/progress.h).
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "domicile/progress.h"
#include "domicile/report.h"

#define REDRAW_MS 100 /* at most ten redraws a second */
#define TICK_MS   200

struct dm_progress {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t ticker;
    bool ticking, stop;
    unsigned flags;
    char *label; /* owned */
    char *text;  /* owned, cleaned */
    int64_t start_ms, drawn_ms;
};

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

bool dm_progress_wanted(void)
{
    const char *term = getenv("TERM");
    return isatty(STDERR_FILENO) == 1 && !(term && strcmp(term, "dumb") == 0);
}

/* With p->mu held. */
static void draw(dm_progress_t *p, int64_t now)
{
    p->drawn_ms = now;
    fprintf(stderr, "\r%s: %s", p->label, p->text);
    if (p->flags & (DM_PROGRESS_ELAPSED | DM_PROGRESS_TICK))
        fprintf(stderr, "%s%.1f s", p->text[0] ? ", " : "", (double)(now - p->start_ms) / 1000.0);
    fputs("\033[K", stderr);
    fflush(stderr);
}

static void *tick_main(void *arg)
{
    dm_progress_t *p = arg;
    pthread_mutex_lock(&p->mu);
    while (!p->stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += TICK_MS * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        int rc = pthread_cond_timedwait(&p->cv, &p->mu, &until);
        if (rc == ETIMEDOUT && !p->stop)
            draw(p, mono_ms());
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

dm_progress_t *dm_progress_start(const char *label, unsigned flags)
{
    if (!dm_progress_wanted())
        return NULL;
    dm_progress_t *p = dm_calloc(1, sizeof(*p));
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->flags = flags;
    p->label = dm_report_plain(label);
    p->text = dm_strdup("");
    p->start_ms = mono_ms();
    pthread_mutex_lock(&p->mu);
    draw(p, p->start_ms);
    pthread_mutex_unlock(&p->mu);
    /* Without its thread the line still works: it is just not redrawn while the caller waits. */
    if (flags & DM_PROGRESS_TICK)
        p->ticking = pthread_create(&p->ticker, NULL, tick_main, p) == 0;
    return p;
}

static void set_text(dm_progress_t *p, char *text)
{
    char *clean = dm_report_plain(text);
    free(text);
    pthread_mutex_lock(&p->mu);
    /* The first text is drawn at once: a call that ends quickly still said what it did. */
    bool first = p->text[0] == '\0';
    free(p->text);
    p->text = clean;
    int64_t now = mono_ms();
    if (first || now - p->drawn_ms >= REDRAW_MS)
        draw(p, now);
    pthread_mutex_unlock(&p->mu);
}

static char *vformat(const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        abort(); /* out of memory, as dm_malloc */
    return s;
}

void dm_progress_status(dm_progress_t *p, const char *fmt, ...)
{
    if (!p)
        return;
    va_list ap;
    va_start(ap, fmt);
    char *s = vformat(fmt, ap);
    va_end(ap);
    set_text(p, s);
}

void dm_progress_steps(dm_progress_t *p, int64_t done, int64_t total, const char *fmt, ...)
{
    if (!p)
        return;
    va_list ap;
    va_start(ap, fmt);
    char *s = vformat(fmt, ap), *t;
    va_end(ap);
    if (total > 0)
        t = dm_sprintf("%s%s%lld/%lld (%d%%)", s, s[0] ? " " : "", (long long)done,
                       (long long)total, (int)(done >= total ? 100 : done * 100 / total));
    else
        t = dm_sprintf("%s%s%lld", s, s[0] ? " " : "", (long long)done);
    free(s);
    set_text(p, t);
}

void dm_progress_note(dm_progress_t *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = vformat(fmt, ap);
    va_end(ap);
    if (!p) {
        fprintf(stderr, "%s\n", s);
        free(s);
        return;
    }
    pthread_mutex_lock(&p->mu);
    fprintf(stderr, "\r\033[K%s\n", s);
    draw(p, mono_ms());
    pthread_mutex_unlock(&p->mu);
    free(s);
}

void dm_progress_end(dm_progress_t *p, bool keep)
{
    if (!p)
        return;
    if (p->ticking) {
        pthread_mutex_lock(&p->mu);
        p->stop = true;
        pthread_cond_signal(&p->cv);
        pthread_mutex_unlock(&p->mu);
        pthread_join(p->ticker, NULL);
    }
    if (keep) {
        draw(p, mono_ms());
        fputc('\n', stderr);
    } else {
        fputs("\r\033[K", stderr);
    }
    fflush(stderr);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->label);
    free(p->text);
    free(p);
}
