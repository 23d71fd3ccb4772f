/*
 * check.h - the unit tests' one assertion: CHECK counts passes and
 * failures and prints file:line of each failure; a test ends by printing
 * "N passed, N failed" and exiting non-zero on any failure.
 */
#ifndef SMTPBRIDGE_TEST_CHECK_H
#define SMTPBRIDGE_TEST_CHECK_H

#include <stdio.h>

static int n_passed, n_failed;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (cond) {                                                                                \
            n_passed++;                                                                            \
        } else {                                                                                   \
            n_failed++;                                                                            \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

#endif
