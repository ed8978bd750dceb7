/*
 * Option parsing shared by the bench programs (loadgen, echo): a whole decimal integer within
 * [lo, hi], or false.
 */
#ifndef DM_BENCH_ARGS_H
#define DM_BENCH_ARGS_H

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

static inline bool parse_int(const char *s, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return false;
    *out = (int)v;
    return true;
}

#endif
