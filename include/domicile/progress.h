/*
 * A progress line on stderr for long commands (export, drill, report, later key rotation):
 * one line, redrawn in place ("\r...\033[K"), only when stderr is a terminal. When stderr is a
 * file or a pipe nothing of it is written, so logs and scripts see only the messages.
 *
 *   dm_progress_t *p = dm_progress_start("rotate", 0);      // NULL when not on a terminal
 *   for (...) dm_progress_steps(p, done, total, "%s", region);   // "rotate: eu 40/100 (40%)"
 *   dm_progress_note(p, "region %s done", region);          // a line above the progress line
 *   dm_progress_end(p, true);                               // leave the last state on screen
 *
 * Every function takes NULL (progress off) and then does nothing, except dm_progress_note,
 * which prints its message plainly. Thread-safe: a worker may update while another thread
 * notes; with DM_PROGRESS_TICK a thread of its own redraws the elapsed time while the caller
 * blocks (a unary call that takes long).
 */
#ifndef DOMICILE_PROGRESS_H
#define DOMICILE_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "domicile/mem.h"

typedef struct dm_progress dm_progress_t;

/** dm_progress_start flags. */
enum {
    DM_PROGRESS_ELAPSED = 1 << 0, /* end the line with the time since the start, "12.3 s" */
    DM_PROGRESS_TICK = 1 << 1,    /* redraw every 200 ms from a thread (implies ELAPSED) */
};

/** True when a progress line would be shown: stderr is a terminal and TERM is not "dumb". */
bool dm_progress_wanted(void);

/**
 * Start a progress line labelled `label` (copied), drawn at once. NULL when
 * dm_progress_wanted() is false. End it with dm_progress_end.
 */
dm_progress_t *dm_progress_start(const char *label, unsigned flags);

/**
 * Set the text after the label: the first at once, then redrawn at most every 100 ms (the last
 * one is drawn at the end).
 */
void dm_progress_status(dm_progress_t *p, const char *fmt, ...) DM_PRINTF(2, 3);

/**
 * Set the text and a count: "<text> <done>/<total> (<pct>%)", or "<text> <done>" when total
 * is 0 (unknown). Same rate as dm_progress_status.
 */
void dm_progress_steps(dm_progress_t *p, int64_t done, int64_t total, const char *fmt, ...)
    DM_PRINTF(4, 5);

/**
 * Print a message line on stderr ("domicilectl: " is not added): above the progress line,
 * which is redrawn under it. With p NULL, just the line.
 */
void dm_progress_note(dm_progress_t *p, const char *fmt, ...) DM_PRINTF(2, 3);

/**
 * Stop and free. `keep`: the last state stays on screen with a newline; else the line is
 * cleared, leaving the terminal as it was (for output that follows on the same terminal).
 */
void dm_progress_end(dm_progress_t *p, bool keep);

#endif
