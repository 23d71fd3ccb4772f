/*
 * metric.h - a unit test's reading of one counter as /metrics renders it
 * (proxy/metrics.c, linked into the test).
 */
#ifndef SMTPBRIDGE_TEST_METRIC_H
#define SMTPBRIDGE_TEST_METRIC_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"

/* The value of the series `name` (no labels), or ~0 if it is missing. */
static unsigned long long metric(const char *name)
{
    char *text = NULL, *p;
    size_t len = 0, n = strlen(name);
    unsigned long long v = ~0ULL;
    FILE *f = open_memstream(&text, &len);

    if (f == NULL)
        return v;
    metrics_render(f);
    fclose(f);
    for (p = strstr(text, name); p != NULL; p = strstr(p + 1, name))
        if ((p == text || p[-1] == '\n') && p[n] == ' ') {
            v = strtoull(p + n + 1, NULL, 10);
            break;
        }
    free(text);
    return v;
}

#endif
